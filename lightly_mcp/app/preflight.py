"""The preflight: every stage of a recipe tried in seconds before a long run trains.

A run that fails at export after hours of pruning loses those hours. Before
``lightly-mcp run``, ``pretrain`` or ``prune`` trains, :func:`preflight` checks that
every stage from the first one that will train through evaluation succeeds with the
recipe, on a few images:

- the data: the training images of every training stage (batch size against the
  dataset, subsets, files) and the labelled evaluation images;
- the whole MCP schedule of the real run: its ADMM blocks (``mcp.frozen_blocks``
  against the number of blocks) and, with ``mcp.rho_response``, the ρ of every block
  (blocks too short for SGD momentum are refused here, not at train start);
- the models: MoCo v2 and MCP built as the stages build them (the dense checkpoint
  loaded, ``mcp.target_params`` solved), one training step of each method (MCP: an
  ADMM update and, with ``mcp.frozen_blocks``, a frozen-mask step) with the recipe's
  accelerator and precision;
- the export: the compact model of the initial mask, its self-check against the
  masked subnet, TorchScript and ONNX (latency is not timed);
- one evaluation pass (kNN and a one-epoch linear probe, baselines included) on a
  handful of images.

It writes nothing to the output folder (everything goes to a temporary folder that
is removed) and does not change the run: it draws from RNGs seeded with the
recipe's seed inside a fork of the global ones (the same recipe gives the same
preflight, and the caller's random state is left as it was), and the stages seed
their RNGs themselves. Its few steps on a handful of images check that each stage
runs, not that it converges: their gradients are clipped (:data:`CLIP_NORM`), since
BatchNorm over four images at 1×1 resolution can blow up an unclipped step. A
failure raises :class:`PreflightError` with the message the stage would have given.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from rich.console import Console
from torch.utils.data import Subset

from lightly_mcp.app.recipe import Recipe
from lightly_mcp.app.run_folder import (
    completion_record,
    final_checkpoint,
)
from lightly_mcp.errors import (
    InputError,
    MCPWarning,
    PreflightError,
    UnsafeCheckpointError,
    first_line,
)
from lightly_mcp.formats.export import export
from lightly_mcp.methods.batched_views import collate_for
from lightly_mcp.methods.checkpoints import CheckpointError
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.methods.resumable_data import ResumableLoader
from lightly_mcp.pruning.prunable_groups import find_channel_groups

#: Images of the evaluation pass (training bank, test set).
EVAL_IMAGES = (16, 8)
#: Images per training batch of the preflight steps (at least two per split BN split,
#: at most the stage's batch).
STEP_BATCH = 4
#: Gradient-norm clip of the preflight steps (their updates only need to be finite).
CLIP_NORM = 1.0

T = TypeVar("T")


@dataclass
class PreflightResult:
    """What the preflight checked.

    Attributes:
        seconds: Wall time of the preflight.
        checked: One line per check that passed, in order.
        notes: Things a user should know before the run (e.g. the data resolved).
    """

    seconds: float = 0.0
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the checks and the time."""
        return f"preflight passed in {self.seconds:.1f} s: " + "; ".join(self.checked)


@contextmanager
def _stage(name: str) -> Iterator[None]:
    """Turns any failure inside into a one-line :class:`PreflightError`; a refused
    model file (:class:`UnsafeCheckpointError`, a full line naming the file and the
    fix) is raised as it is.
    """
    try:
        yield
    except (PreflightError, UnsafeCheckpointError):
        raise
    except Exception as error:
        message = first_line(error) or type(error).__name__
        if not isinstance(error, (ValueError, FileNotFoundError)):
            message = f"{type(error).__name__}: {message}"
        raise PreflightError(
            f"{name} stage (preflight; nothing written): {message}"
        ) from error


def first_stage(recipe: Recipe, command: str) -> str:
    """The first stage ``command`` runs: ``pretrain`` or ``prune``."""
    if command == "pretrain":
        return "pretrain"
    if command == "run" and recipe.pretrain.dense_checkpoint is None:
        return "pretrain"
    return "prune"


def preflight(
    recipe: Recipe,
    first: str = "pretrain",
    dense: Path | None = None,
    device: str = "cpu",
    console: Console | None = None,
) -> PreflightResult:
    """Checks in seconds that every stage from ``first`` through evaluation succeeds.

    Args:
        recipe: The recipe of the run.
        first: ``"pretrain"`` (a tiny pretraining makes the dense checkpoint MCP
            starts from) or ``"prune"`` (MCP starts from ``dense``).
        dense: The dense checkpoint MCP starts from when ``first == "prune"``
            (None: MCP from scratch).
        device: Device of the evaluation pass.
        console: Where progress notes go (None: nowhere).

    Returns:
        What was checked, the notes and the time.

    Raises:
        PreflightError: A stage would fail; the message is that stage's.
    """
    from lightly_mcp.app import assemble, pipeline

    if first not in ("pretrain", "prune"):
        raise InputError(f"first must be 'pretrain' or 'prune', got {first!r}.")
    start = time.perf_counter()
    result = PreflightResult()
    quiet = Console(file=io.StringIO())
    with (
        _seeded_rng(recipe.seed),
        tempfile.TemporaryDirectory(prefix="lightly-mcp-preflight-") as folder,
    ):
        tmp = Path(folder)
        with _stage("prune"):
            # Refuse a backbone MCP cannot prune exactly before anything trains.
            size = recipe.data.input_size
            find_channel_groups(
                assemble.recipe_backbone(recipe),
                torch.randn(1, 3, size, size),
                keep_output_dim=recipe.mcp.keep_output_dim,
            )
            result.checked.append("backbone prunes exactly")
        with _stage("data"):
            kind = assemble.dataset_kind(recipe)
            if recipe.data.kind == "auto":
                result.notes.append(f"data.kind auto resolved to {kind}")
            batches = {"prune": recipe.mcp.batch_size}
            if first == "pretrain":
                batches["pretrain"] = recipe.pretrain.batch_size
            datasets = {}
            for stage, batch in batches.items():
                datasets[stage], _ = assemble.training_data(recipe, batch)
            train_eval, test_eval, description, labelled = assemble.evaluation_data(
                recipe
            )
            result.notes.append(f"training data: {datasets['prune'].describe()}")
            result.notes.append(f"evaluation data: {description}")
            result.checked.append("data")
        if first == "pretrain":
            with _stage("pretrain"):
                moco = MoCoV2(**assemble.moco_kwargs(recipe, "pretrain"))
                _steps(
                    moco,
                    recipe,
                    datasets["pretrain"],
                    1,
                    recipe.pretrain.batch_size,
                    tmp / "pretrain",
                )
                dense = tmp / "dense.ckpt"
                moco.trainer.save_checkpoint(str(dense))
                result.checked.append("one MoCo v2 step")
        with _stage("prune"):
            if dense is not None and not Path(dense).is_file():
                from lightly_mcp.io.provenance import missing_checkpoint_message

                raise FileNotFoundError(
                    missing_checkpoint_message(dense, "dense checkpoint")
                )
            model = assemble.mcp_model(recipe, dense)
            result.checked.append(_check_schedule(model, recipe, datasets["prune"]))
            steps = _prepare_short_schedule(model)
            loader = _steps(
                model,
                recipe,
                datasets["prune"],
                steps,
                recipe.mcp.batch_size,
                tmp / "prune",
            )
            pruned = tmp / "mcp.ckpt"
            model.trainer.save_checkpoint(str(pruned))
            result.checked.append(f"{steps} MCP steps with an ADMM update")
        with _stage("export"):
            report = _export(recipe, pruned, tmp / "export", loader, quiet)
            result.checked.append(
                "export self-check (feature dim "
                f"{report['dense']['feature_dim']} -> "
                f"{report['compact']['feature_dim']}, "
                f"{', '.join(report['files']['written'])})"
            )
        with _stage("evaluate"):
            if not labelled:
                result.notes.append(
                    "the evaluation images have no labels: evaluation will be skipped"
                )
            else:
                tiny = _tiny_evaluation(
                    recipe, _length(train_eval.dataset), _length(test_eval.dataset)
                )
                networks = pipeline.load_backbone_for_eval(pruned, recipe)
                if dense is not None:  # as run(): the starting point when readable
                    try:
                        networks["dense"] = pipeline.load_backbone_for_eval(
                            dense, recipe
                        )["dense"]
                    except (ValueError, CheckpointError):
                        pass
                networks["compact"] = pipeline.exported_compact(
                    recipe, pruned, tmp, report
                )
                pipeline.evaluate(
                    networks,
                    tiny,
                    tmp / "eval.json",
                    device,
                    progress=False,
                    baselines=recipe.eval.baseline_names,
                )
                names = [*networks, *recipe.eval.baseline_names]
                result.checked.append(f"evaluation pass ({', '.join(names)})")
    result.seconds = time.perf_counter() - start
    if console is not None:
        for note in result.notes:
            console.print(f"note: {note}")
        console.print(result.summary())
    return result


@contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's global RNGs seeded with ``seed`` inside, and
    restored to their states on the way out (an error included).
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# --- the real schedule ---------------------------------------------------------------
def _check_schedule(model: MCP, recipe: Recipe, dataset: Any) -> str:
    """Builds the real run's ADMM blocks and every block's ρ with MCP's own code.

    A shallow copy of ``model`` is attached to a stand-in for the Lightning Trainer
    that answers what MCP asks (steps of the run, batches per epoch, ranks), so
    ``block_schedule``, ``configure_optimizers`` and ``block_rho`` run exactly as in
    training; ``model`` itself is left untouched.
    """
    m, t = recipe.mcp, recipe.trainer
    world = t.devices if isinstance(t.devices, int) and t.devices > 0 else 1
    batches = (len(dataset) // world) // m.batch_size
    total = m.epochs * batches
    if m.max_steps > 0:
        total = min(total, m.max_steps)
    if batches < 1:
        raise InputError(
            f"the training set ({len(dataset)} images over {world} devices) gives no "
            f"full batch of {m.batch_size}; lower mcp.batch_size or use more data."
        )
    probe = copy.copy(model)
    probe._trainer = SimpleNamespace(  # type: ignore[assignment]
        world_size=world,
        estimated_stepping_batches=total,
        num_training_batches=batches,
        accumulate_grad_batches=1,
    )
    probe.configure_optimizers()
    schedule = probe.block_schedule()
    if m.rho_response is not None:
        rhos = [probe.block_rho(block) for block in range(schedule.num_blocks)]
        rho = f"rho {min(rhos):.3g}..{max(rhos):.3g} from rho_response {m.rho_response}"
    else:
        rho = f"rho {m.rho}"
    return (
        f"MCP schedule ({total} steps in {schedule.num_blocks} ADMM blocks of "
        f"{schedule.block_steps}, {rho})"
    )


def _prepare_short_schedule(model: MCP) -> int:
    """Makes ``model`` train a short schedule that has every kind of step.

    Blocks of one step (an ADMM update after the first), a frozen-mask step when the
    recipe has a frozen phase, and ρ as given (the real run's derived ρ was checked
    by :func:`_check_schedule`). Returns the number of steps.
    """
    hparams = model.hparams
    frozen = min(1, int(hparams["frozen_blocks"]))
    hparams["admm_interval"] = 1
    hparams["admm_interval_unit"] = "steps"
    hparams["frozen_blocks"] = frozen
    hparams["rho_response"] = None
    return 2 + frozen


# --- tiny training -----------------------------------------------------------------
def _steps(
    model: pl.LightningModule,
    recipe: Recipe,
    dataset: Any,
    steps: int,
    real_batch: int,
    root: Path,
) -> ResumableLoader:
    """``steps`` optimizer steps of ``model`` on the first images of ``dataset``;
    returns the loader of those images.

    Batches are small (:data:`STEP_BATCH` images, two per ``SplitBatchNorm`` split),
    never larger than the stage's own (``real_batch``), so that a batch the stage
    cannot take fails here too.
    """
    split = max(recipe.pretrain.split_batch_norm, 1)
    batch = max(STEP_BATCH, 2 * split) if split > 1 else STEP_BATCH
    batch = min(batch, real_batch)
    if len(dataset) < batch:
        raise InputError(
            f"the training set has {len(dataset)} images, fewer than one batch of "
            f"{batch}; use more data."
        )
    images = Subset(dataset, range(min(len(dataset), batch * steps)))
    loader = ResumableLoader(
        images,
        batch_size=batch,
        seed=recipe.seed,
        num_workers=min(recipe.data.num_workers, 1),
        collate_fn=collate_for(dataset),
    )
    t = recipe.trainer
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,  # type: ignore[arg-type]
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        gradient_clip_val=CLIP_NORM,
        gradient_clip_algorithm="norm",
    )
    with warnings.catch_warnings():
        # The oscillation warning is about the real run's blocks, not these.
        warnings.simplefilter("ignore", MCPWarning)
        trainer.fit(model, loader)
    if trainer.global_step < steps:
        raise InputError(
            f"training stopped after {trainer.global_step} of {steps} steps."
        )
    return loader


def _export(
    recipe: Recipe, checkpoint: Path, folder: Path, loader: Any, console: Console
) -> dict[str, Any]:
    """The export stage (``pipeline.export_stage``) without its slow parts that
    cannot fail: latency is not timed, ONNX (noted, never raised) is not written,
    and BatchNorm recalibration runs on the preflight's images.
    """
    e = recipe.export
    return export(
        checkpoint,
        folder,
        recalibrate=loader if e.recalibrate_bn else None,
        recalibration_batches=1,
        round_to=e.round_to,
        latency=False,
        expected_backbone=recipe.backbone.name,
        overwrite=True,
        console=console,
        onnx=False,
    )


# --- recipes for the short checks ---------------------------------------------------
def _length(dataset: Any) -> int:
    return len(dataset)


def _replace(section: T, **changes: Any) -> T:
    return dataclasses.replace(section, **changes)  # type: ignore[type-var]


def _tiny_evaluation(recipe: Recipe, num_train: int, num_test: int) -> Recipe:
    """The recipe evaluating a handful of images with a one-epoch probe."""
    changed = copy.deepcopy(recipe)
    changed.eval = _replace(
        changed.eval,
        train_subset=min(EVAL_IMAGES[0], num_train),
        test_subset=min(EVAL_IMAGES[1], num_test),
        linear_epochs=1,
    )
    return changed


def for_command(
    command: str,
    recipe: Recipe,
    out: Path,
    dense: Path | None = None,
    device: str = "cpu",
    console: Console | None = None,
    always: bool = False,
) -> PreflightResult | None:
    """The preflight of ``lightly-mcp COMMAND`` (``run``, ``pretrain``, ``prune``).

    It checks from the first stage the command will train: a ``run`` whose
    pretraining is complete starts at ``prune`` from ``out/pretrain/final.ckpt``.
    Returns None without checking when the command trains nothing (its training
    stages are complete), unless ``always``.
    """
    first = first_stage(recipe, command)
    if command == "run":
        if completion_record(out, "prune").is_file() and not always:
            return None
        if first == "pretrain" and completion_record(out, "pretrain").is_file():
            first, dense = "prune", final_checkpoint(out, "pretrain")
        elif first == "prune" and recipe.pretrain.dense_checkpoint is not None:
            dense = Path(recipe.pretrain.dense_checkpoint)
    elif completion_record(out, first).is_file() and not always:
        return None
    return preflight(recipe, first, dense, device, console)
