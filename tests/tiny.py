"""A tiny recipe (digits at 16 px, MobileNetV2 width 0.25, a few steps per stage) and
its stages, shared by the preflight, recipe and recipe-key tests.

``conftest.py`` trains its dense checkpoint and MCP checkpoint once per session
(``tiny_dense``, ``tiny_pruned``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from lightly_mcp.app.recipe import Recipe, recipe_from_dict

TINY: dict[str, Any] = {
    "seed": 0,
    "data": {"kind": "digits", "input_size": 16, "subset": 16},
    "backbone": {
        "name": "torchvision/mobilenet_v2",
        "small_input": False,
        "width_multiplier": 0.25,
    },
    "pretrain": {
        "epochs": 1,
        "batch_size": 8,
        "memory_bank_size": 32,
        "projection_hidden_dim": 16,
        "projection_dim": 8,
    },
    "mcp": {
        "pruning_ratio": 0.5,
        "frq": 2,
        "admm_interval": 1,
        "admm_interval_unit": "steps",
        "epochs": 1,
        "batch_size": 8,
    },
    "export": {"latency": False},
    "eval": {
        "train_subset": 48,
        "test_subset": 24,
        "linear_epochs": 1,
        "baselines": False,
    },
    "trainer": {"accelerator": "cpu", "log_every_n_steps": 1},
}
"""16 images in batches of 8: 2 steps per stage, ADMM blocks of 1 step."""


def tiny_dict(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny recipe as plain data with ``{"section.key": value}`` overrides."""
    raw = copy.deepcopy(TINY)
    for dotted, value in (overrides or {}).items():
        node = raw
        *sections, key = dotted.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return raw


def tiny_recipe(overrides: dict[str, Any] | None = None) -> Recipe:
    """The tiny recipe, validated, with ``{"section.key": value}`` overrides."""
    return recipe_from_dict(tiny_dict(overrides), source="tiny recipe")


def write_tiny(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Writes the tiny recipe (with overrides) to ``directory/recipe.yaml``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(overrides)))
    return path
