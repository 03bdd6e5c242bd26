"""YAML recipes: every setting of a ``lightly-mcp`` run, validated before anything runs.

A recipe has the top-level sections ``seed``, ``data``, ``backbone``, ``pretrain``,
``mcp``, ``export``, ``eval`` and ``trainer``. Missing values take the defaults of the
dataclasses below; unknown keys and wrong types are errors that name the key. Any
value can be overridden from the command line with ``--set section.key=value`` (the
value is parsed as YAML: ``--set mcp.pruning_ratio=0.5``, ``--set data.subset=null``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from lightly_mcp.errors import InputError, RecipeError
from lightly_mcp.options import check_mcp_options


@dataclass
class DataSection:
    """Where the images come from.

    Attributes:
        kind: ``auto`` (Fashion-MNIST when its Debian files exist, else scikit-learn's
            digits), ``fashion_mnist``, ``digits``, ``cifar10``, ``cifar100``,
            ``stl10`` or ``imagefolder``.
        root: Dataset folder (defaults per kind).
        input_size: Side of the training crops and evaluation images.
        subset: Fixed-seed subset of the training images for pretrain and MCP.
        download: Let torchvision download CIFAR/STL (never done implicitly).
        num_workers: DataLoader workers.
        min_scale: Smallest random-resized-crop scale of the MoCo views.
        batched_augment: Augment the MoCo views on the batch
            (``lightly_mcp.batched_views``: lightly's parameters per image, applied
            in the DataLoader's collate) instead of per image with PIL; views with
            Gaussian blur (``input_size`` above 64) keep the per-image transform.
    """

    kind: str = "auto"
    root: str | None = None
    input_size: int = 32
    subset: int | None = None
    download: bool = False
    num_workers: int = 0
    min_scale: float = 0.2
    batched_augment: bool = True


@dataclass
class BackboneSection:
    """The backbone, as for ``lightly_mcp.build_backbone``."""

    name: str = "torchvision/mobilenet_v2"
    small_input: bool = True
    width_multiplier: float | None = None
    weights: str | None = None


@dataclass
class StageSchedule:
    """How long and how fast a training stage (``pretrain`` or ``mcp``) trains.

    Attributes:
        epochs: Epochs of the stage.
        max_steps: Stop after this many optimizer steps (-1: run all epochs).
        batch_size: Images per step (per device).
        lr: Base learning rate of SGD.
        weight_decay: SGD weight decay.
    """

    epochs: int = 1
    max_steps: int = -1
    batch_size: int = 128
    lr: float = 0.06
    weight_decay: float = 5e-4


@dataclass
class PretrainSection(StageSchedule):
    """Dense MoCo v2 pretraining; its model settings (temperature, momentum, queue,
    projection head, split BatchNorm) are shared with MCP.

    Attributes:
        dense_checkpoint: Start MCP from this dense checkpoint and skip pretraining.
        keep_every_n_epochs: Also keep the checkpoint of every n-th epoch in
            ``pretrain/epochs/`` (0: only ``last.ckpt`` and ``final.ckpt``).
    """

    dense_checkpoint: str | None = None
    temperature: float = 0.1
    momentum: float = 0.99
    memory_bank_size: int = 4096
    projection_hidden_dim: int = 2048
    projection_dim: int = 128
    projection_batch_norm: bool = True
    split_batch_norm: int = 0
    symmetric_loss: bool = False
    warmup_epochs: int = 0
    keep_every_n_epochs: int = 0


@dataclass
class MCPSection(StageSchedule):
    """Momentum Contrastive Pruning.

    Attributes:
        pruning_ratio: Fraction of channels removed in every group.
        target_params: Instead of ``pruning_ratio``: fraction of parameters to remove
            (the uniform ratio is solved by bisection).
        rho_response: Derive ρ per block so that θ_q moves this far towards Z − U
            (``ρ·Σlr/(1 − momentum)``; ≥ 1 lets the mask settle); ``rho`` is then
            ignored. See ``lightly_mcp.schedule``.
        admm_interval: ADMM block length (an update at the end of every block).
        lr_schedule: ``cosine`` (one over the run), ``block_step`` (the paper's:
            restart every block, ×0.1 every third) or ``block_cosine``.
        frozen_blocks: Last blocks trained with the mask frozen (subnet keys).
        frozen_mask: ``penalty`` (pull θ_q's dropped channels towards zero) or
            ``hard`` (keep them at zero: θ_q trains as the compact network).
        transition: ``paper`` (``frq``/``dr``) or ``stable_mask`` (full-encoder keys
            until an update leaves the mask unchanged).
        recalibration_batches: Batches re-estimating the momentum subnet's
            BatchNorm statistics when training ends (0: off).
        compact_keys: Compute the momentum subnet's keys with a physically pruned
            copy (cheaper; the masked forward is the automatic fallback).
    """

    pruning_ratio: float | None = 0.73
    target_params: float | None = None
    rho: float = 0.01
    rho_growth: float = 1.0
    rho_response: float | None = None
    admm_interval: int = 1
    admm_interval_unit: str = "epochs"
    lr_schedule: str = "cosine"
    frozen_blocks: int = 0
    frozen_mask: str = "penalty"
    transition: str = "paper"
    frq: int = 100
    dr: int = 1
    recalibration_batches: int = 20
    keep_output_dim: bool = True
    compact_keys: bool = True


@dataclass
class ExportSection:
    """Compact export (see ``lightly_mcp.export``)."""

    round_to: int | None = None
    recalibrate_bn: bool = False
    latency: bool = True
    latency_repeats: int = 20
    latency_at_224: bool = False
    torchscript: bool = False


@dataclass
class EvalSection:
    """Frozen-feature evaluation (kNN and linear probe).

    Attributes:
        train_subset: Training images used as kNN bank / probe training set.
        test_subset: Test images evaluated.
        baselines: Also evaluate raw pixels and a randomly initialised backbone.
    """

    k: int = 200
    temperature: float = 0.1
    linear_epochs: int = 30
    batch_size: int = 256
    train_subset: int | None = None
    test_subset: int | None = None
    baselines: bool = True


@dataclass
class TrainerSection:
    """Lightning ``Trainer`` flags, and the memory layout of the training steps.

    Attributes:
        channels_last: Run MoCo v2 and MCP steps on ``channels_last`` batches (faster
            convolutions on CPU; results equal up to float rounding, see
            ``lightly_mcp.batchnorm.ShuffleBatchNorm``).
    """

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    channels_last: bool = True


@dataclass
class Recipe:
    """A whole ``lightly-mcp`` run."""

    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    backbone: BackboneSection = field(default_factory=BackboneSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    mcp: MCPSection = field(default_factory=MCPSection)
    export: ExportSection = field(default_factory=ExportSection)
    eval: EvalSection = field(default_factory=EvalSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (for YAML and reports)."""
        return asdict(self)


TOP_LEVEL_KEYS = tuple(f.name for f in fields(Recipe))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads, overrides and validates a recipe file.

    Args:
        path: A YAML file.
        overrides: ``section.key=value`` strings (values parsed as YAML).

    Raises:
        RecipeError: On a missing or unreadable file, unknown keys, wrong types or
            values out of range, with a message naming the key.

    Examples:
        >>> recipe = load_recipe("recipes/quickstart.yaml", ["mcp.pruning_ratio=0.5"])
        >>> recipe.mcp.pruning_ratio, recipe.backbone.name
        (0.5, 'torchvision/mobilenet_v2')
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe '{path}' does not exist; see recipes/ for examples.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe '{path}' is not valid YAML{where}.") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe '{path}' must be a mapping of sections.")
    for override in overrides or []:
        apply_override(raw, override)
    return recipe_from_dict(raw, source=str(path))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Applies one ``section.key=value`` override to raw recipe data, in place."""
    if "=" not in override:
        raise RecipeError(
            f"--set '{override}' must look like section.key=value, "
            "e.g. --set mcp.pruning_ratio=0.5."
        )
    dotted, value_text = override.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set '{override}': '{key}' is not a section.")
        node = child
    node[keys[-1]] = value


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Builds and validates a :class:`Recipe` from plain data."""
    recipe = _build(Recipe, raw, prefix="", source=source)
    assert isinstance(recipe, Recipe)
    validate(recipe, source)
    return recipe


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: '{prefix.rstrip('.')}' must be a mapping.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise RecipeError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; allowed keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)}."
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.", source)  # type: ignore[arg-type]
        else:
            values[name] = _check_type(value, hint, f"{prefix}{name}", source)
    return cls(**values)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(value: Any, hint: Any, key: str, source: str) -> Any:
    allowed = _allowed_types(hint)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        # PyYAML reads 1e-3 (no dot) as a string (YAML 1.1); YAML 1.2 has it a float.
        return float(value)
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, tuple(t for t in allowed if t is not type(None)))
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise RecipeError(
            f"{source}: '{key}' must be {names}, got {type(value).__name__} {value!r}."
        )
    return value


def _allowed_types(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(typing.get_args(hint))
    return (hint,)


def _require(condition: bool, message: str, source: str) -> None:
    if not condition:
        raise RecipeError(f"{source}: {message}")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Checks ranges and combinations that types alone do not catch."""
    m, p, d, e = recipe.mcp, recipe.pretrain, recipe.data, recipe.eval
    _require(
        (m.pruning_ratio is None) != (m.target_params is None),
        "set exactly one of 'mcp.pruning_ratio' and 'mcp.target_params'.",
        source,
    )
    if m.pruning_ratio is not None:
        _require(
            0.0 <= m.pruning_ratio < 1.0,
            f"'mcp.pruning_ratio' must be in [0, 1), got {m.pruning_ratio}.",
            source,
        )
    if m.target_params is not None:
        _require(
            0.0 < m.target_params < 1.0,
            f"'mcp.target_params' must be in (0, 1), got {m.target_params}.",
            source,
        )
    try:
        check_mcp_options(asdict(m), qualify=lambda name: f"'mcp.{name}'")
    except InputError as error:
        raise RecipeError(f"{source}: {error}") from None
    for name, section in (("pretrain", p), ("mcp", m)):
        _require(section.batch_size >= 1, f"'{name}.batch_size' must be >= 1.", source)
        _require(section.lr > 0, f"'{name}.lr' must be > 0.", source)
        _require(section.epochs >= 1, f"'{name}.epochs' must be >= 1.", source)
    _require(p.temperature > 0, "'pretrain.temperature' must be > 0.", source)
    _require(
        p.keep_every_n_epochs >= 0,
        "'pretrain.keep_every_n_epochs' must be >= 0 (0 keeps no epoch checkpoints).",
        source,
    )
    _require(0 <= p.momentum <= 1, "'pretrain.momentum' must be in [0, 1].", source)
    _require(
        p.memory_bank_size >= 0, "'pretrain.memory_bank_size' must be >= 0.", source
    )
    _require(d.input_size >= 8, "'data.input_size' must be >= 8.", source)
    _require(d.subset is None or d.subset >= 1, "'data.subset' must be >= 1.", source)
    _require(0 < d.min_scale <= 1, "'data.min_scale' must be in (0, 1].", source)
    _require(e.k >= 1, "'eval.k' must be >= 1.", source)
    _require(e.temperature > 0, "'eval.temperature' must be > 0.", source)
    if p.split_batch_norm > 1:
        for name, section in (("pretrain", p), ("mcp", m)):
            _require(
                section.batch_size % p.split_batch_norm == 0,
                f"'{name}.batch_size' ({section.batch_size}) must be divisible by "
                f"'pretrain.split_batch_norm' ({p.split_batch_norm}).",
                source,
            )


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Writes the resolved recipe as YAML (next to a run's outputs)."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
