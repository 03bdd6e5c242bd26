"""The ``Examples:`` blocks of the public entry points run as written (doctest)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module",
    [
        "lightly_mcp.methods.backbones",  # build_backbone
        "lightly_mcp.methods.checkpoints",  # checkpoint_kind
        "lightly_mcp.data.registry",  # build_dataset
        "lightly_mcp.errors",
        "lightly_mcp.formats.folding",  # fold_batchnorm
        "lightly_mcp.methods.options",  # check_mcp_options
        "lightly_mcp.app.recipe",  # load_recipe
        "lightly_mcp.io.safe_yaml",  # load_yaml
        "lightly_mcp.pruning.schedule",
        "lightly_mcp.pruning.transition",  # SmoothTransition
    ],
)
def test_examples_run(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # examples name files such as recipes/quickstart.yaml
    result = doctest.testmod(
        importlib.import_module(module),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=True,
    )
    assert result.attempted > 0
    assert result.failed == 0
