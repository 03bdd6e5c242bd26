"""YAML recipes: every setting of a ``lightly-mcp`` run, validated before anything runs.

A recipe has the top-level sections ``seed``, ``data``, ``backbone``, ``pretrain``,
``mcp``, ``export``, ``eval`` and ``trainer``. Missing values take the defaults of the
dataclasses below; unknown keys and wrong types are errors that name the key. Any
value can be overridden from the command line with ``--set section.key=value`` (the
value is parsed as YAML: ``--set mcp.pruning_ratio=0.5``, ``--set data.subset=null``).

Files and ``--set`` values are read with the bounded safe loader of
:mod:`lightly_mcp.io.safe_yaml` (a key written twice, an alias bomb, nesting deeper than
``MAX_DEPTH`` and bytes that are not UTF-8 are refused), and :func:`validate` refuses
every value a stage would refuse later, so a bad recipe stops before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from lightly_mcp.errors import InputError, RecipeError
from lightly_mcp.io.safe_yaml import (
    UnsafeYAMLError,
    describe_yaml_error,
    load_yaml,
    parse_yaml,
)
from lightly_mcp.methods.options import check_mcp_options


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
            (``lightly_mcp.methods.batched_views``: lightly's parameters per image,
            applied in the DataLoader's collate) instead of per image with PIL; views
            with Gaussian blur (``input_size`` above 64) keep the per-image transform.
        classes: Train (pretrain and MCP) on the images of these classes only (ids
            or names; the labels choose the images and are never trained on); the
            in-domain evaluation uses the same classes, and ``eval.transfer:
            [held_out_classes]`` the others. ``null``: all images.
    """

    kind: str = "auto"
    root: str | None = None
    input_size: int = 32
    subset: int | None = None
    download: bool = False
    num_workers: int = 0
    min_scale: float = 0.2
    batched_augment: bool = True
    classes: list | None = None


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
        round_to: Hardware-aligned pruning: every group keeps a multiple of this many
            channels, chosen in the mask during training (1: exactly the ratio's).
        target_params: Instead of ``pruning_ratio``: fraction of parameters to remove
            (the uniform ratio is solved by bisection, with the aligned counts).
        rho_response: Derive ρ per block so that θ_q moves this far towards Z − U
            (``ρ·Σlr/(1 − momentum)``; ≥ 1 lets the mask settle); ``rho`` is then
            ignored. See ``lightly_mcp.pruning.schedule``.
        admm_interval: ADMM block length (an update at the end of every block).
        lr_schedule: ``cosine`` (one over the run), ``block_step`` (the paper's:
            restart every block, ×0.1 every third) or ``block_cosine``.
        frozen_blocks: Last blocks trained with the mask frozen (subnet keys).
        frozen_mask: ``penalty`` (pull θ_q's dropped channels towards zero) or
            ``hard`` (keep them at zero: θ_q trains as the compact network).
        transition: ``paper`` (``frq``/``dr``) or ``stable_mask`` (full-encoder keys
            until an update leaves the mask unchanged).
        mask_updates: ``admm`` (the method) or ``fixed`` (the start's magnitude
            mask kept at every update: an ablation).
        schedule: ``manual`` (the keys above as given) or ``converging``: the ADMM
            blocks, ρ (``rho_response`` 1 unless set), the learning rate and the
            transition laid out from the stage's length (``MCP(schedule=...)``);
            ``admm_interval``, ``admm_interval_unit``, ``lr_schedule``,
            ``frozen_blocks`` and ``transition`` must then be left at their
            defaults.
        recalibration_batches: Batches re-estimating the momentum subnet's
            BatchNorm statistics when training ends (0: off).
        compact_keys: Compute the momentum subnet's keys with a physically pruned
            copy (cheaper; the masked forward is the automatic fallback).
    """

    pruning_ratio: float | None = 0.73
    round_to: int = 8
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
    mask_updates: str = "admm"
    schedule: str = "manual"
    recalibration_batches: int = 20
    keep_output_dim: bool = True
    compact_keys: bool = True


@dataclass
class ExportSection:
    """Compact export (see ``lightly_mcp.formats.export``).

    Attributes:
        round_to: Widen the trained masks to multiples of this after training (adds
            back channels MCP removed; ``mcp.round_to`` chooses aligned counts in
            training instead, so this is rarely needed). None: as trained.
    """

    round_to: int | None = None
    recalibrate_bn: bool = False
    latency: bool = True
    latency_repeats: int = 20
    latency_at_224: bool = False
    torchscript: bool = False


#: The evaluation baselines ``eval.baselines`` can name.
BASELINES = ("raw_pixels", "random_init")
#: What ``eval.runtime`` can be: where the networks embed the evaluation images.
EVAL_RUNTIMES = ("auto", "onnxruntime", "torch")
#: The ``eval.transfer`` entry that evaluates on the classes ``data.classes`` left out.
HELD_OUT_CLASSES = "held_out_classes"


@dataclass
class EvalSection:
    """Frozen-feature evaluation (kNN and linear probe).

    Attributes:
        train_subset: Training images used as kNN bank / probe training set.
        test_subset: Test images evaluated.
        baselines: Which baselines to evaluate beside the models: ``true`` (raw
            pixels and a randomly initialised backbone), ``false`` (none), or a
            list of names from :data:`BASELINES` (e.g. ``[raw_pixels]``: the
            random-init backbone costs a forward pass over the evaluation images
            and a probe). Each is read from the per-user cache
            (``lightly_mcp.benchmarking.baseline_cache``) when it holds it for these
            images and settings, else computed and stored there.
        runtime: What embeds the evaluation images: ``onnxruntime`` (each network
            exported to ONNX in memory and run by ONNX Runtime on the CPU, the
            deployed form; 1.7-3x faster than eager PyTorch for small CNNs),
            ``torch`` (eager PyTorch, channels_last), or ``auto``: ONNX Runtime on
            the CPU where it is installed and the network exports, PyTorch
            otherwise (on a GPU, or ``pip install lightly-mcp`` without
            ``[onnx]``). Features agree to float rounding (about 1e-6).
        transfer: Evaluations beside the in-domain one (each its own kNN bank and
            probe; results under ``"transfer"`` in ``eval.json``):
            ``held_out_classes`` (the training kind's classes that ``data.classes``
            leaves out: unseen in training), a dataset kind (e.g. ``digits``, with
            its default folder), or a mapping ``{kind: imagefolder, root: DIR}``
            (optional ``name``). Images are resized to ``data.input_size``.
    """

    k: int = 200
    temperature: float = 0.1
    linear_epochs: int = 30
    batch_size: int = 256
    train_subset: int | None = None
    test_subset: int | None = None
    baselines: bool | list = True
    runtime: str = "auto"
    transfer: list = field(default_factory=list)

    @property
    def baseline_names(self) -> tuple[str, ...]:
        """The baselines asked for, in :data:`BASELINES` order."""
        return baseline_names(self.baselines)


def baseline_names(baselines: bool | typing.Sequence[str]) -> tuple[str, ...]:
    """``eval.baselines`` (True: all, False: none, or names) as names, in
    :data:`BASELINES` order.

    Raises:
        InputError: For a name that is not in :data:`BASELINES`.
    """
    if baselines is True:
        return BASELINES
    if baselines is False:
        return ()
    unknown = sorted(set(baselines) - set(BASELINES), key=str)
    if unknown:
        raise InputError(
            f"Unknown baseline {unknown[0]!r}; the baselines are "
            f"{', '.join(BASELINES)}."
        )
    return tuple(name for name in BASELINES if name in baselines)


@dataclass
class TrainerSection:
    """Lightning ``Trainer`` flags, and the memory layout of the training steps.

    Attributes:
        channels_last: Run MoCo v2 and MCP steps on ``channels_last`` batches (faster
            convolutions on CPU; results equal up to float rounding, see
            ``lightly_mcp.pruning.batchnorm.ShuffleBatchNorm``).
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
        RecipeError: On a missing, unreadable or refused file (see
            :func:`read_recipe_file`), unknown keys, wrong types or values out of
            range, with a message naming the file and the key.

    Examples:
        >>> recipe = load_recipe("recipes/quickstart.yaml", ["mcp.pruning_ratio=0.5"])
        >>> recipe.mcp.pruning_ratio, recipe.backbone.name
        (0.5, 'torchvision/mobilenet_v2')
    """
    path = Path(path)
    raw = read_recipe_file(path) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe '{path}' must be a mapping of sections.")
    for override in overrides or []:
        apply_override(raw, override)
    return recipe_from_dict(raw, source=str(path))


def read_recipe_file(path: str | Path) -> Any:
    """A recipe file's YAML document, read with the bounded safe loader
    (``lightly_mcp.io.safe_yaml``); None for an empty file.

    Raises:
        RecipeError: A missing or unreadable file, not UTF-8, invalid YAML, a key
            written twice, an alias bomb or nesting too deep; the message names the
            file and the line.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        if path.exists() and not path.is_dir():
            what = "is not a regular file"
        raise RecipeError(f"recipe '{path}' {what}; see recipes/ for examples.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RecipeError(
            f"recipe '{path}' cannot be read ({error.strerror or error}); check its "
            "permissions."
        ) from None
    return load_yaml(data, f"recipe '{path}'")


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
        value = parse_yaml(value_text) if value_text.strip() else None
    except UnsafeYAMLError as error:
        raise RecipeError(f"--set '{dotted}': {describe_yaml_error(error)}.") from None
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
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise RecipeError(f"{source}: {_unknown_key(str(unknown[0]), known, prefix)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.", source)  # type: ignore[arg-type]
        else:
            values[name] = _check_type(value, hint, f"{prefix}{name}", source)
    return cls(**values)


def _unknown_key(key: str, known: typing.Iterable[str], prefix: str) -> str:
    """``unknown key 'mcp.x'`` with the closest known key, if one is close, and
    where the keys are documented.
    """
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    return (
        f"unknown key {_shown(prefix + key)}; {hint}all keys: "
        "lightly_mcp/app/recipe.py."
    )


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
            f"{source}: '{key}' must be {names}, got {type(value).__name__} "
            f"{_shown(value)}."
        )
    return value


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 60 characters (a message stays one short line)."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 2, 40, 40
    return shortener.repr(value)[:60]


def _allowed_types(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(typing.get_args(hint))
    return (hint,)


def _require(condition: bool, message: str, source: str) -> None:
    if not condition:
        raise RecipeError(f"{source}: {message}")


#: Largest ``data.input_size``: a side of 1024 px already needs gigabytes per batch.
MAX_INPUT_SIZE = 1024
#: ``seed`` is given to numpy, which takes 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1
#: Largest ``backbone.width_multiplier``: parameters grow with its square (8 already
#: makes MobileNetV2 about 60 times larger).
MAX_WIDTH_MULTIPLIER = 8.0
#: Largest ``pretrain.memory_bank_size`` (MoCo uses 65,536 negatives).
MAX_MEMORY_BANK_SIZE = 2**20
#: Largest ``pretrain.projection_dim`` and ``pretrain.projection_hidden_dim``.
MAX_PROJECTION_DIM = 2**16
#: Largest memory bank in float32 values (``memory_bank_size * projection_dim``): 4 GiB.
MAX_MEMORY_BANK_VALUES = 2**30
#: Keys holding a path; an empty string is refused (null means the default).
PATH_KEYS = ("data.root", "backbone.weights", "pretrain.dense_checkpoint")


def max_num_workers() -> int:
    """Largest ``data.num_workers``: 4 per CPU core, at least 64 (more only adds
    processes that wait, each with a copy of the dataset).
    """
    return max(64, 4 * (os.cpu_count() or 1))


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Checks ranges and combinations that types alone do not catch.

    Every value that a stage would refuse (or fail on) later is refused here, so a
    bad recipe stops before any model is built, with the key named.
    """
    _check_finite(recipe, source)
    _check_paths(recipe, source)
    m, p, d, e = recipe.mcp, recipe.pretrain, recipe.data, recipe.eval
    _require(
        0 <= recipe.seed <= MAX_SEED,
        f"'seed' must be in [0, {MAX_SEED}], got {recipe.seed}.",
        source,
    )
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
        _require(
            section.max_steps == -1 or section.max_steps >= 1,
            f"'{name}.max_steps' must be -1 (all epochs) or >= 1, got "
            f"{section.max_steps}.",
            source,
        )
        _require(
            section.weight_decay >= 0,
            f"'{name}.weight_decay' must be >= 0, got {section.weight_decay}.",
            source,
        )
    _require(p.temperature > 0, "'pretrain.temperature' must be > 0.", source)
    _require(
        p.keep_every_n_epochs >= 0,
        "'pretrain.keep_every_n_epochs' must be >= 0 (0 keeps no epoch checkpoints).",
        source,
    )
    _require(0 <= p.momentum <= 1, "'pretrain.momentum' must be in [0, 1].", source)
    _require(
        0 <= p.memory_bank_size <= MAX_MEMORY_BANK_SIZE,
        f"'pretrain.memory_bank_size' must be in [0, {MAX_MEMORY_BANK_SIZE}], got "
        f"{p.memory_bank_size}.",
        source,
    )
    for key in ("projection_hidden_dim", "projection_dim"):
        value = getattr(p, key)
        _require(
            1 <= value <= MAX_PROJECTION_DIM,
            f"'pretrain.{key}' must be in [1, {MAX_PROJECTION_DIM}], got {value}.",
            source,
        )
    _require(
        p.memory_bank_size * p.projection_dim <= MAX_MEMORY_BANK_VALUES,
        f"'pretrain.memory_bank_size' x 'pretrain.projection_dim' must be at most "
        f"{MAX_MEMORY_BANK_VALUES} (a 4 GiB memory bank); lower one of them.",
        source,
    )
    _require(
        p.split_batch_norm >= 0,
        "'pretrain.split_batch_norm' must be >= 0 (0 or 1: plain BatchNorm).",
        source,
    )
    _require(p.warmup_epochs >= 0, "'pretrain.warmup_epochs' must be >= 0.", source)
    _require(
        8 <= d.input_size <= MAX_INPUT_SIZE,
        f"'data.input_size' must be in [8, {MAX_INPUT_SIZE}], got {d.input_size}.",
        source,
    )
    _require(d.subset is None or d.subset >= 1, "'data.subset' must be >= 1.", source)
    _require(0 < d.min_scale <= 1, "'data.min_scale' must be in (0, 1].", source)
    workers = max_num_workers()
    _require(
        0 <= d.num_workers <= workers,
        f"'data.num_workers' must be in [0, {workers}] (4 per CPU core, at least 64),"
        f" got {d.num_workers}.",
        source,
    )
    _check_data_kind(d.kind, source)
    width = recipe.backbone.width_multiplier
    _require(
        width is None or 0 < width <= MAX_WIDTH_MULTIPLIER,
        f"'backbone.width_multiplier' must be in (0, {MAX_WIDTH_MULTIPLIER:g}] or "
        f"null, got {width}.",
        source,
    )
    x = recipe.export
    _require(
        x.round_to is None or x.round_to >= 1,
        f"'export.round_to' must be >= 1 or null, got {x.round_to}.",
        source,
    )
    _require(
        x.latency_repeats >= 1,
        f"'export.latency_repeats' must be >= 1 (or set 'export.latency: false'), "
        f"got {x.latency_repeats}.",
        source,
    )
    _require(e.k >= 1, "'eval.k' must be >= 1.", source)
    _require(e.temperature > 0, "'eval.temperature' must be > 0.", source)
    _require(
        e.linear_epochs >= 1,
        f"'eval.linear_epochs' must be >= 1, got {e.linear_epochs}.",
        source,
    )
    _require(e.batch_size >= 1, "'eval.batch_size' must be >= 1.", source)
    for key in ("train_subset", "test_subset"):
        value = getattr(e, key)
        _require(
            value is None or value >= 1,
            f"'eval.{key}' must be >= 1 or null (all images), got {value}.",
            source,
        )
    _require(
        e.runtime in EVAL_RUNTIMES,
        f"'eval.runtime' must be one of {', '.join(EVAL_RUNTIMES)}; got "
        f"{_shown(e.runtime)}.",
        source,
    )
    if isinstance(e.baselines, list):
        unknown = [n for n in e.baselines if n not in BASELINES]
        _require(
            not unknown and len(set(e.baselines)) == len(e.baselines),
            f"'eval.baselines' must be true, false or a list of distinct names from "
            f"{', '.join(BASELINES)}; got {_shown(e.baselines)}.",
            source,
        )
    _check_classes(d.classes, source)
    _check_transfer(e.transfer, d.classes, source)
    _check_trainer(recipe.trainer, source)
    if p.split_batch_norm > 1:
        for name, section in (("pretrain", p), ("mcp", m)):
            _require(
                section.batch_size % p.split_batch_norm == 0,
                f"'{name}.batch_size' ({section.batch_size}) must be divisible by "
                f"'pretrain.split_batch_norm' ({p.split_batch_norm}).",
                source,
            )


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (what a run records next to its outputs)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _check_finite(recipe: Recipe, source: str) -> None:
    """Refuses NaN and infinite values (YAML's ``.nan``, ``.inf``) in any key."""
    for section in fields(recipe):
        value = getattr(recipe, section.name)
        items = [(section.name, value)]
        if dataclasses.is_dataclass(value):
            items = [
                (f"{section.name}.{f.name}", getattr(value, f.name))
                for f in fields(value)
            ]
        for key, item in items:
            _require(
                not isinstance(item, float) or math.isfinite(item),
                f"'{key}' must be a finite number, got {item}.",
                source,
            )


def _check_paths(recipe: Recipe, source: str) -> None:
    """Refuses an empty path (null means the default) and a ``~user`` whose home
    folder cannot be found, naming the key.
    """
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is None:
            continue
        _require(
            value.strip() != "",
            f"'{key}' is an empty string; give a path, or null for the default.",
            source,
        )
        _require(
            not value.startswith("~") or not os.path.expanduser(value).startswith("~"),
            f"'{key}' is {_shown(value)}, but that user's home folder is unknown; "
            "give the full path.",
            source,
        )


def _check_classes(classes: list | None, source: str) -> None:
    """``data.classes``: null, or distinct class ids (ints >= 0) or names."""
    if classes is None:
        return
    ok = all(
        (isinstance(c, int) and not isinstance(c, bool) and c >= 0)
        or (isinstance(c, str) and c.strip())
        for c in classes
    )
    _require(
        bool(classes) and ok and len(set(classes)) == len(classes),
        "'data.classes' must be null (all images) or a list of distinct class ids "
        f"(0, 1, ...) or names; got {_shown(classes)}.",
        source,
    )


def transfer_entry(entry: Any) -> tuple[str, str, str | None]:
    """One ``eval.transfer`` entry as ``(name, kind, root)``: ``held_out_classes``
    (kind ``""``), a kind name, or a mapping ``{kind, root, name}``.

    Raises:
        InputError: For an entry of another shape or an unknown kind.
    """
    from lightly_mcp.data.registry import SUPPORTED_KINDS

    def kind_of(value: Any) -> str:
        kind = str(value).strip().lower().replace("-", "_")
        if kind not in SUPPORTED_KINDS:
            raise InputError(
                f"'eval.transfer' entry {_shown(value)} is not {HELD_OUT_CLASSES} or "
                f"a dataset kind ({', '.join(SUPPORTED_KINDS)})."
            )
        return kind

    if entry == HELD_OUT_CLASSES:
        return HELD_OUT_CLASSES, "", None
    if isinstance(entry, str):
        kind = kind_of(entry)
        return kind, kind, None
    if (
        isinstance(entry, dict)
        and "kind" in entry
        and set(entry)
        <= {
            "kind",
            "root",
            "name",
        }
    ):
        kind = kind_of(entry["kind"])
        root = entry.get("root")
        if root is not None and (not isinstance(root, str) or not root.strip()):
            raise InputError(
                f"'eval.transfer' entry {_shown(entry)}: 'root' must be a path."
            )
        name = entry.get("name") or (f"{kind}:{root}" if root else kind)
        return str(name), kind, root
    raise InputError(
        f"'eval.transfer' entry {_shown(entry)} must be {HELD_OUT_CLASSES}, a dataset "
        "kind, or a mapping {kind: ..., root: ..., name: ...}."
    )


def _check_transfer(transfer: list, classes: list | None, source: str) -> None:
    """``eval.transfer``: known entries, distinct names, and ``held_out_classes``
    only with ``data.classes``.
    """
    try:
        names = [transfer_entry(entry)[0] for entry in transfer]
    except InputError as error:
        raise RecipeError(f"{source}: {error}") from None
    _require(
        len(set(names)) == len(names) and "in_domain" not in names,
        f"'eval.transfer' names an evaluation twice (or 'in_domain'): {names}; give "
        "each a distinct 'name'.",
        source,
    )
    _require(
        HELD_OUT_CLASSES not in names or classes is not None,
        f"'eval.transfer: [{HELD_OUT_CLASSES}]' needs 'data.classes' (the classes "
        "trained on); without it no class is held out.",
        source,
    )


def _check_data_kind(kind: str, source: str) -> None:
    from lightly_mcp.data.registry import SUPPORTED_KINDS

    allowed = ("auto", *SUPPORTED_KINDS)
    _require(
        kind.strip().lower().replace("-", "_") in allowed,
        f"'data.kind' must be one of {', '.join(allowed)}; got {_shown(kind)}.",
        source,
    )


def _check_trainer(t: TrainerSection, source: str) -> None:
    """Refuses Lightning flags the ``Trainer`` would reject (with a traceback) at
    the start of a stage: names from Lightning's own registries.
    """
    from lightning_fabric.connector import (
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )
    from pytorch_lightning.accelerators import AcceleratorRegistry
    from pytorch_lightning.strategies import StrategyRegistry

    registered = sorted(AcceleratorRegistry.available_accelerators())
    accelerators = ("auto", "gpu", *registered)
    _require(
        t.accelerator in accelerators,
        f"'trainer.accelerator' must be one of {', '.join(accelerators)}; "
        f"got {_shown(t.accelerator)}.",
        source,
    )
    strategies = StrategyRegistry.available_strategies()
    _require(
        t.strategy.lower() in ("auto", *strategies),
        f"'trainer.strategy' must be auto or a Lightning strategy such as ddp, "
        f"ddp_spawn, fsdp, deepspeed; got {_shown(t.strategy)}.",
        source,
    )
    precisions = typing.get_args(_PRECISION_INPUT_STR) + typing.get_args(
        _PRECISION_INPUT_STR_ALIAS
    )
    _require(
        t.precision in precisions,
        "'trainer.precision' must be a Lightning precision such as 32-true, "
        f"16-mixed, bf16-mixed, 64-true; got {_shown(t.precision)}.",
        source,
    )
    _require(
        t.log_every_n_steps >= 0,
        "'trainer.log_every_n_steps' must be >= 0 (0: no step metrics).",
        source,
    )


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Writes the resolved recipe as YAML, atomically (next to a run's outputs)."""
    from lightly_mcp.io.files import write_text_atomic

    write_text_atomic(path, recipe_yaml(recipe))
