"""The stages of a ``lightly-mcp`` run: pretrain → prune → export → evaluate.

Data flows one way: each stage reads the previous stage's file and writes its own
folder under the run directory. A stage is *complete* when its ``done.json`` marker
(or, for export, its ``report.json``) exists; ``run`` skips complete stages and an
interrupted training stage resumes from its ``last.ckpt``. What a stage trains and
evaluates is built from the recipe by ``lightly_mcp.app.assemble``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from lightly_mcp.app import manifest
from lightly_mcp.app.assemble import (
    IN_DOMAIN,
    backbone_kwargs,
    evaluation_data,
    evaluation_names,
    export_recalibration_data,
    mcp_model,
    moco_kwargs,
    recipe_backbone,
    trainer_for,
    training_data,
)
from lightly_mcp.app.interrupts import SIGINT_EXIT
from lightly_mcp.app.recipe import (
    BASELINES,
    Recipe,
    RecipeError,
    baseline_names,
    recipe_yaml,
)
from lightly_mcp.app.run_folder import (
    DONE,
    FINAL,
    IGNORED_KEYS,
    LAST,
    STAGE_FILES,
    OutputFolderError,
    check_no_links,
    check_recipe,
    is_rank_zero,
    stages_of,
)
from lightly_mcp.benchmarking.baseline_cache import (
    DataDigest,
    baseline_key,
    entry_path,
    read_baselines,
    write_baselines,
)
from lightly_mcp.benchmarking.evaluation import (
    embed_models,
    evaluate_features,
    in_runtime,
    raw_pixel_scores,
    resolved_runtime,
)
from lightly_mcp.errors import (
    CodeFileError,
    StageInterrupted,
    UnsafeCheckpointError,
    clipped,
)
from lightly_mcp.formats.export import compact_from_checkpoint, export
from lightly_mcp.formats.loading import module_from_checkpoint
from lightly_mcp.formats.report import headline, write_plots
from lightly_mcp.formats.runtimes import OnnxRuntimeNetwork, onnx_runner
from lightly_mcp.io.files import write_json_atomic
from lightly_mcp.io.model_files import (
    TRUST_FLAG,
    load_program,
    load_trusted_module,
    shown_path,
)
from lightly_mcp.methods.checkpoints import (
    CheckpointError,
    checkpoint_file,
    read_checkpoint,
)
from lightly_mcp.methods.mcp import LEGACY_HPARAMS, MCP
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.pruning.masks import round_masks
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet


def read_json(path: Path) -> Any:
    """Reads a JSON file of a run folder.

    Raises:
        OutputFolderError: For a file that is not JSON (named, with the fix).
    """
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError) as error:
        why = "not JSON" if isinstance(error, ValueError) else error.strerror
        raise OutputFolderError(
            f"'{path}' cannot be read ({why}); delete it to let the run write it "
            "again, or pass --restart."
        ) from None


def _short(value: Any) -> str:
    """``repr(value)``, its end only beyond 50 characters (messages stay short)."""
    return clipped(repr(value), 50, keep_end=True)


def _relative(out: Path, path: Path) -> str:
    return os.path.relpath(path, out)


def _recorded_fit(out: Path, stage_dir: Path, fit: Callable[[], Path]) -> Path:
    """Runs ``fit`` and lists in the manifest the files it created under
    ``stage_dir`` (TensorBoard events, epoch checkpoints), however it ends.
    """
    before = manifest.files_under(out, stage_dir.name)
    try:
        return fit()
    finally:
        if is_rank_zero():
            present = manifest.files_under(out, stage_dir.name)
            # New files, and ours that a resumed fit wrote to (metrics.csv rows).
            ours = present & set(manifest.read_manifest(out))
            manifest.record(out, sorted((present - before) | ours))


def _fit(
    model: MoCoV2,
    recipe: Recipe,
    stage_dir: Path,
    loader: DataLoader,
    epochs: int,
    max_steps: int,
    progress: bool,
    keep_every_n_epochs: int = 0,
) -> Path:
    """Fits (resuming from ``last.ckpt``), finishes and saves ``final.ckpt`` atomically.

    The end-of-training work (``model.finish_training``: MCP's BatchNorm
    recalibration) is done once, also when ``last.ckpt`` had taken every step and
    Lightning trains no further, so a resumed run ends with the uninterrupted run's
    model. Under DDP every rank calls this (Lightning's launcher re-runs the
    command); only rank 0 writes files, and the ranks wait for its ``final.ckpt``
    before going on.

    Raises:
        RecipeError: When the data cannot fill one batch on every device, or the
            stage ended without a training step.
        StageInterrupted: After a SIGTERM (``last.ckpt`` saved) or Ctrl-C (the last
            end-of-epoch ``last.ckpt`` kept), with the message saying so.
    """
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    trainer = trainer_for(
        recipe, stage_dir, epochs, max_steps, progress, keep_every_n_epochs
    )
    images = len(cast(Sized, loader.dataset))
    _check_one_step(stage_dir.name, images, loader.batch_size, trainer)
    last = stage_dir / LAST
    resume = None
    if last.is_file():
        restart = f"delete it to restart stage {stage_dir.name} from scratch"
        try:
            saved = read_checkpoint(last, fix=restart)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as error:
            raise CheckpointError(
                f"cannot resume {stage_dir.name}: {error} Delete '{last}' to restart "
                "the stage from scratch."
            ) from None
        _check_resume_settings(saved, model, stage_dir.name, last)
        resume = str(last)
    try:
        trainer.fit(model, loader, ckpt_path=resume, weights_only=True)
    except SIGTERMException:
        # Lightning stops at the next step boundary; keep everything done so far.
        trainer.save_checkpoint(str(last))
        raise StageInterrupted(
            f"stage '{stage_dir.name}' stopped by SIGTERM at step "
            f"{trainer.global_step}; saved '{last}'. Run the same command again to "
            "continue."
        ) from None
    except SystemExit as error:
        # Lightning turns Ctrl-C into sys.exit(1) after its own cleanup.
        if not isinstance(error.__context__, KeyboardInterrupt):
            raise
        raise StageInterrupted(
            _ctrl_c_message(stage_dir.name, trainer.global_step, last),
            exit_code=SIGINT_EXIT,
        ) from None
    if trainer.global_step == 0:
        raise RecipeError(
            f"stage '{stage_dir.name}' ended without a training step "
            f"({images} images, batch {loader.batch_size} on each of "
            f"{trainer.world_size} device(s), max_steps {max_steps}); the stage is "
            "not done. Use more data, a smaller batch or fewer devices."
        )
    if trainer.received_sigterm:
        # A SIGTERM after the last step (Lightning notes it and trains no further):
        # last.ckpt holds the finished training.
        raise StageInterrupted(
            f"stage '{stage_dir.name}' stopped by SIGTERM at the end of training "
            f"(step {trainer.global_step}); kept '{last}'. Run the same command again "
            "to finish it."
        )
    # Done already unless Lightning resumed a checkpoint that had taken every step.
    model.finish_training(loader)
    final = stage_dir / FINAL
    # Collective; rank 0 writes the file, atomically (AtomicCheckpointIO).
    trainer.save_checkpoint(str(final))
    trainer.strategy.barrier(FINAL)  # the next stage reads it on every rank
    return final


def _ctrl_c_message(stage: str, step: int, last: Path) -> str:
    """What a Ctrl-C during training keeps, and how to continue."""
    if last.is_file():
        kept = f"kept its last end-of-epoch checkpoint '{last}'"
    else:
        kept = "no checkpoint yet (one is written at every epoch end)"
    return (
        f"stage '{stage}' interrupted by Ctrl-C at step {step}; {kept}. Run the same "
        "command again to continue."
    )


def _check_one_step(
    stage: str, images: int, batch_size: int | None, trainer: pl.Trainer
) -> None:
    """Refuses a stage in which no training step would run (or ran): every device
    needs a full batch (the training loader drops incomplete ones).
    """
    batch = batch_size or 1
    devices = trainer.world_size
    if images >= batch * devices:
        return
    key = {"pretrain": "pretrain", "prune": "mcp"}.get(stage, stage) + ".batch_size"
    raise RecipeError(
        f"the training data is too small for stage '{stage}': {images} images "
        f"cannot fill one batch of {batch} on each of {devices} device(s) "
        f"(batch size x devices = {batch * devices}), so no training step would run; "
        f"lower '{key}', use fewer devices or more data."
    )


def _check_resume_settings(
    saved: dict[str, Any], model: pl.LightningModule, stage: str, last: Path
) -> None:
    """Refuses to resume a checkpoint trained with other settings (e.g. another
    pruning ratio), whatever the folder's recipe files say.
    """
    old = saved.get("hyper_parameters")
    if not isinstance(old, dict):
        return
    new = dict(model.hparams)
    if isinstance(model, MCP):  # settings an older checkpoint was trained with
        old = {**LEGACY_HPARAMS, **old}
    differing = [
        key
        for key in sorted(set(old) & set(new))
        if key != "dense_checkpoint" and old[key] != new[key]
    ]
    if differing:
        shown = ", ".join(f"{k} {old[k]!r} there, {new[k]!r} now" for k in differing)
        raise OutputFolderError(
            f"cannot resume {stage} from '{last}': it was trained with other "
            f"settings ({shown}); use a new --out folder or pass --restart to "
            "delete its previous outputs and start over."
        )


# --- stages ------------------------------------------------------------------------
def _start_stage(recipe: Recipe, out: Path, stage: str) -> None:
    """Before a training stage writes: refuses links and files of others at its
    paths, lists its files in the manifest and records its recipe (rank 0).
    """
    if not is_rank_zero():
        (out / stage).mkdir(parents=True, exist_ok=True)
        return
    check_no_links(out, (stage,))
    (out / stage).mkdir(parents=True, exist_ok=True)
    manifest.claim(out, STAGE_FILES[stage])
    manifest.write_file(out, f"{stage}/recipe.yaml", recipe_yaml(recipe).encode())


def pretrain(recipe: Recipe, out: Path, progress: bool = True) -> Path:
    """Dense MoCo v2 → ``out/pretrain/final.ckpt``."""
    stage_dir = out / "pretrain"
    check_recipe(recipe, out, ("pretrain",))
    if (stage_dir / DONE).is_file():
        return stage_dir / FINAL
    _start_stage(recipe, out, "pretrain")
    start = time.perf_counter()
    dataset, loader = training_data(recipe, recipe.pretrain.batch_size)
    pl.seed_everything(recipe.seed, verbose=False)
    model = MoCoV2(**moco_kwargs(recipe, "pretrain"))
    p = recipe.pretrain
    final = _recorded_fit(
        out,
        stage_dir,
        lambda: _fit(
            model,
            recipe,
            stage_dir,
            loader,
            p.epochs,
            p.max_steps,
            progress,
            keep_every_n_epochs=p.keep_every_n_epochs,
        ),
    )
    if not is_rank_zero():
        return final
    manifest.write_json(
        out,
        f"pretrain/{DONE}",
        {
            "checkpoint": str(final),
            "seconds": time.perf_counter() - start,
            "data": dataset.describe(),
        },
    )
    return final


def prune(recipe: Recipe, dense: Path | None, out: Path, progress: bool = True) -> Path:
    """MCP from the dense checkpoint → ``out/prune/final.ckpt``."""
    stage_dir = out / "prune"
    check_recipe(recipe, out, ("prune",))
    if (stage_dir / DONE).is_file():
        return stage_dir / FINAL
    if dense is not None:
        checkpoint_file(dense, "dense checkpoint")
    _start_stage(recipe, out, "prune")
    start = time.perf_counter()
    dataset, loader = training_data(recipe, recipe.mcp.batch_size)
    m = recipe.mcp
    pl.seed_everything(recipe.seed, verbose=False)
    model = mcp_model(recipe, dense)
    if model.dense_load_report and progress:
        Console().print(f"loaded {dense}: " + "; ".join(model.dense_load_report))
    final = _recorded_fit(
        out,
        stage_dir,
        lambda: _fit(model, recipe, stage_dir, loader, m.epochs, m.max_steps, progress),
    )
    if not is_rank_zero():
        return final
    manifest.write_json(
        out,
        f"prune/{DONE}",
        {
            "checkpoint": str(final),
            "dense_checkpoint": str(dense) if dense is not None else None,
            "pruning_ratio": model.hparams["pruning_ratio"],
            "dense_load_report": model.dense_load_report,
            "admm_blocks": model.block_history,
            "seconds": time.perf_counter() - start,
            "data": dataset.describe(),
        },
    )
    return final


def export_stage(
    recipe: Recipe, checkpoint: Path, out: Path, console: Console | None = None
) -> dict[str, Any]:
    """Compact export → ``out/export/`` (skipped when its report exists).

    An existing report is reused when the folder's manifest lists it or (an export
    run by hand, as a failed run's message suggests) it names ``checkpoint``; the
    files of a new export are listed in the manifest.

    Raises:
        OutputFolderError: For a report that is not JSON, or the export of another
            checkpoint.
    """
    export_dir = out / "export"
    if (export_dir / "report.json").is_file():
        report: dict[str, Any] = read_json(export_dir / "report.json")
        source = report.get("checkpoint") if isinstance(report, dict) else None
        ours = manifest.is_ours(out, "export/report.json", manifest.read_manifest(out))
        if not isinstance(report, dict) or not (
            ours
            or (
                isinstance(source, str)
                and os.path.realpath(source) == os.path.realpath(checkpoint)
            )
        ):
            raise OutputFolderError(
                f"'{export_dir / 'report.json'}' is not this run's export (it "
                f"exports {_short(source)}); move export/ out of the folder to export "
                "again."
            )
        return report
    check_no_links(out, ("export",))
    e = recipe.export
    recalibrate = export_recalibration_data(recipe)
    written = export(
        checkpoint,
        export_dir,
        recalibrate=recalibrate,
        round_to=e.round_to,
        latency=e.latency,
        latency_repeats=e.latency_repeats,
        latency_at_224=e.latency_at_224,
        torchscript=e.torchscript,
        console=console,
        expected_backbone=recipe.backbone.name,
        overwrite=True,
    )
    manifest.record(out, sorted(manifest.files_under(out, "export")))
    return written


def load_backbone_for_eval(
    path: Path, recipe: Recipe, trust_pickle: bool = False
) -> dict[str, nn.Module]:
    """The networks to evaluate in a file, by name.

    A MoCo v2 checkpoint gives ``dense`` (its momentum encoder); an MCP checkpoint
    gives ``dense`` (the unmasked momentum encoder) and ``subnet`` (the masked one);
    an exported ``model.pt2`` (a ``torch.export`` program, read without running
    anything from it), or an export folder (its ``model.pt2``), gives ``compact``.
    Checkpoints, whatever their suffix, are read with ``weights_only=True``. A
    TorchScript ``model.ts`` and a whole pickled module (an exported ``model.pt``)
    are code: they are loaded only with ``trust_pickle=True``
    (:mod:`lightly_mcp.io.model_files`).

    Raises:
        CheckpointError: For a file that cannot be read safely (without
            ``trust_pickle``), or a pickle that does not hold an ``nn.Module``.
        FileNotFoundError: For a missing file, or a folder without ``model.pt2``.
    """
    path = Path(path)
    if path.is_dir():
        program = path / "model.pt2"
        code = [path / name for name in ("model.ts", "model.pt")]
        if program.is_file():
            path = program
        elif trust_pickle and any(file.is_file() for file in code):
            path = next(file for file in code if file.is_file())
        else:
            checkpoints = sorted(path.glob("*.ckpt")) + sorted(path.glob("*/*.ckpt"))
            found = next((file for file in code if file.is_file()), None)
            hint = (
                f"; its {found.name} is code: give that file with {TRUST_FLAG} if "
                "you trust it"
                if found is not None
                else "; to evaluate a checkpoint give its file, as "
                f"'{checkpoints[0].relative_to(path)}' in it"
                if checkpoints
                else " (export writes it)"
            )
            raise FileNotFoundError(
                f"'{shown_path(path)}' has no model.pt2 to evaluate{hint}."
            )
    if path.suffix == ".pt2":
        return {"compact": load_program(path)}
    if path.suffix == ".ts":
        return {"compact": load_trusted_module(path, trust_pickle)}
    try:
        data = read_checkpoint(path)  # weights_only=True: runs no code
    except CodeFileError:
        return {"compact": load_trusted_module(path, trust_pickle)}
    model = module_from_checkpoint(data, path)
    networks: dict[str, nn.Module] = {"dense": model.backbone_momentum}
    if isinstance(model, MCP):
        networks["subnet"] = model.subnet
    return networks


def exported_compact(
    recipe: Recipe,
    checkpoint: Path,
    out: Path,
    report: dict[str, Any],
    runtime: str = "torch",
) -> nn.Module:
    """The compact model of ``out/export``, without running anything from a file.

    With ``runtime`` ``"onnxruntime"``, its ``model.onnx`` run by ONNX Runtime (the
    deployed file; ONNX holds no code) where the export wrote one. Otherwise its
    ``model.pt2`` (checked, then read: :func:`load_program`), or the same compact
    model rebuilt from the MCP checkpoint, read with ``weights_only=True``.
    ``model.pt`` and ``model.ts`` are code and never read here.
    """
    written = report.get("files", {}).get("written", [])
    onnx_file = out / "export" / "model.onnx"
    if runtime == "onnxruntime" and "model.onnx" in written and onnx_file.is_file():
        return OnnxRuntimeNetwork(onnx_runner(onnx_file))
    program = out / "export" / "model.pt2"
    if "model.pt2" in written and program.is_file():
        return load_program(program)
    e = recipe.export
    recalibrate = export_recalibration_data(recipe)
    return compact_from_checkpoint(
        checkpoint,
        round_to=e.round_to,
        recalibrate=recalibrate,
        expected_backbone=recipe.backbone.name,
    )


def subnet_same_as_compact(
    subnet: nn.Module, export_report: dict[str, Any]
) -> str | None:
    """Why the masked momentum subnet and the exported compact model are the same
    network, or None when they can differ (then both are evaluated).

    They are the same when the export compacted the subnet's own masks (no
    ``round_to`` widening, or one that changed no mask) and its own normalisation
    statistics (no BatchNorm recalibration), and kept every output feature (with
    ``keep_output_dim=False`` the subnet has zero features where the compact model
    has none, which changes the linear probe's initialisation). The export then
    checked that both compute the same features; the folded, compact network differs
    from the masked one only by float32 rounding (its stated max abs error).
    """
    if not isinstance(subnet, MomentumSubnet):
        return None
    if export_report.get("bn_recalibrated", True):
        return None
    masks = subnet.masks
    round_to = export_report.get("round_to")
    if round_to is not None:
        rounded = round_masks(subnet.encoder, subnet.groups, masks, int(round_to))
        if not all(torch.equal(a.cpu(), b) for a, b in zip(masks, rounded)):
            return None
    for group, mask in zip(subnet.groups, masks):
        if any(not bool(mask[channel]) for channel, _ in group.output_features):
            return None
    err = export_report.get("equivalence_max_abs_err")
    return (
        "subnet = compact (the same network: the export compacted the subnet's own "
        "masks and statistics and checked the outputs, max abs err "
        + (f"{err:.1e}" if isinstance(err, float) else "within tolerance")
        + " from float32 rounding); not re-evaluated"
    )


def _baseline_identity(recipe: Recipe, description: str, device: str) -> dict[str, Any]:
    """What the baselines depend on besides the images (the cache key)."""
    e = recipe.eval
    return {
        "data": description,
        "input_size": recipe.data.input_size,
        "k": e.k,
        "temperature": e.temperature,
        "linear_epochs": e.linear_epochs,
        "seed": recipe.seed,
        "random_init": {"name": recipe.backbone.name, **backbone_kwargs(recipe)},
        "center": True,
        "device": torch.device(device).type,
        "runtime": resolved_runtime(e.runtime, device),
    }


def _baseline_models(
    recipe: Recipe, device: str, names: Sequence[str] = BASELINES
) -> dict[str, nn.Module]:
    """The baselines of ``names``: the random-init backbone (seeded with the
    recipe's seed) and raw pixels.
    """
    models: dict[str, nn.Module] = {}
    if "random_init" in names:
        torch.manual_seed(recipe.seed)
        models["random_init"] = recipe_backbone(recipe, weights=False).to(device)
    if "raw_pixels" in names:
        models["raw_pixels"] = nn.Flatten()
    return models


def evaluate(
    networks: dict[str, nn.Module],
    recipe: Recipe,
    out_file: Path,
    device: str = "cpu",
    progress: bool = True,
    baselines: bool | Sequence[str] = False,
    provenance: dict[str, Any] | None = None,
    same_as: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """KNN and linear-probe top-1 of each network → ``out_file`` (JSON), with
    ``provenance`` (:func:`evaluation_provenance`) when given.

    The in-domain evaluation (the training data's test split) fills the top level
    (``"data"``, ``"models"``, ``"baselines"``); each ``eval.transfer`` evaluation
    gets the same keys under ``"transfer"``, by name. In each, the images are loaded
    once: each batch goes through every network (and the random-init baseline) in
    one pass, and each network's features feed both kNN and the linear probe. Every
    network is put in its runtime once, for all evaluations. A network named in
    ``same_as`` (name → (other, why)) is not evaluated: it gets the other's numbers,
    marked ``"evaluated": false`` with the reason. ``baselines`` (True: all of
    :data:`~lightly_mcp.app.recipe.BASELINES`, or their names) come from the
    per-user cache (:mod:`lightly_mcp.benchmarking.baseline_cache`) when it holds
    them for these images and settings, else they are computed and stored there.
    ``"evaluated"`` in each result says what was computed and what reused.
    """
    wanted = baseline_names(baselines)
    same_as = {k: v for k, v in (same_as or {}).items() if v[0] in networks}
    in_runtime_models: list[tuple[dict[str, nn.Module], dict[str, str]]] = []

    def prepared() -> tuple[dict[str, nn.Module], dict[str, str]]:
        if not in_runtime_models:
            models = {
                name: network.to(device)
                for name, network in networks.items()
                if name not in same_as
            }
            in_runtime_models.append(
                in_runtime(models, recipe.eval.runtime, recipe.data.input_size, device)
            )
        return in_runtime_models[0]

    results: dict[str, Any] = {}
    for name in evaluation_names(recipe):
        part = _evaluate_on(
            name, networks, prepared, recipe, device, progress, wanted, same_as
        )
        if name == IN_DOMAIN:
            results.update(part)
            if provenance is not None:
                results["provenance"] = provenance
        else:
            results.setdefault("transfer", {})[name] = part
    write_json_atomic(out_file, results)
    return results


def _evaluate_on(
    on: str,
    networks: dict[str, nn.Module],
    prepared: Callable[[], tuple[dict[str, nn.Module], dict[str, str]]],
    recipe: Recipe,
    device: str,
    progress: bool,
    wanted: tuple[str, ...],
    same_as: dict[str, tuple[str, str]],
) -> dict[str, Any]:
    """One evaluation of :func:`evaluate` (``on``: its name), as a result dict."""
    train_loader, test_loader, description, has_labels = evaluation_data(recipe, on)
    e = recipe.eval
    results: dict[str, Any] = {"data": description, "models": {}}
    if not has_labels:
        results["skipped"] = (
            "evaluation skipped: the images have no labels (put them in class "
            "sub-folders to get kNN and linear-probe accuracy)"
        )
        if progress:
            prefix = "" if on == IN_DOMAIN else f"{on}: "
            Console().print(prefix + results["skipped"])
        return results
    models, runtimes = prepared()
    models, runtimes = dict(models), dict(runtimes)
    identity = _baseline_identity(recipe, description, device)
    key = baseline_key(identity)
    entry = read_baselines(key) if wanted else None
    stored, stored_digest = entry if entry is not None else ({}, None)
    cached = {name: stored[name] for name in wanted if name in stored}
    missing = [name for name in wanted if name not in cached]
    if missing:
        extra, extra_runtimes = _baselines_in_runtime(recipe, device, missing)
        models.update(extra)
        runtimes.update(extra_runtimes)
    digest = DataDigest()
    label = "" if on == IN_DOMAIN else f" ({on})"
    embedded = [
        embed_models(
            models, loader, device, progress, f"embed {split}{label}", digest.update
        )
        for split, loader in (("train", train_loader), ("test", test_loader))
    ]
    data_digest = digest.hexdigest()
    if stored_digest is not None and stored_digest != data_digest:
        # Same description, other images (files changed): recompute.
        stored = {}
        if cached:
            extra, _ = _baselines_in_runtime(recipe, device, list(cached))
            for (features, _), loader in zip(embedded, (train_loader, test_loader)):
                features.update(embed_models(extra, loader, device, progress)[0])
            cached = {}
    (train_x, train_y), (test_x, test_y) = embedded
    scored: dict[str, dict[str, Any]] = {}
    for name in train_x:
        score = raw_pixel_scores if name == "raw_pixels" else evaluate_features
        scored[name] = score(
            train_x[name],
            train_y,
            test_x[name],
            test_y,
            k=e.k,
            temperature=e.temperature,
            linear_epochs=e.linear_epochs,
            seed=recipe.seed,
        )
    for name in networks:
        if name in same_as:
            other, why = same_as[name]
            scored[name] = {
                **scored[other],
                "evaluated": False,
                "same_as": other,
                "note": why,
            }
        results["models"][name] = scored[name]
    evaluated = [name for name in networks if name not in same_as]
    notes = [f"evaluated {', '.join(evaluated)}{_runtime_note(runtimes)}"]
    notes += [why for _, why in same_as.values()]
    if wanted:
        computed = {name: scored[name] for name in wanted if name not in cached}
        results["baselines"] = {
            name: cached[name] if name in cached else computed[name] for name in wanted
        }
        where = None
        if computed:
            where = write_baselines(key, identity, data_digest, {**stored, **computed})
        notes.append(_baseline_note(list(cached), list(computed), key, where))
    results["runtime"] = runtimes
    results["evaluated"] = "; ".join(notes)
    results["data_digest"] = data_digest
    return results


def transfer_summary(part: dict[str, Any]) -> dict[str, Any]:
    """One transfer evaluation of ``eval.json`` as the run report keeps it: its
    data, and kNN / linear top-1 of every model and baseline (or why it was
    skipped).
    """
    summary: dict[str, Any] = {"data": part.get("data")}
    if "skipped" in part:
        summary["skipped"] = part["skipped"]
    scores = {**part.get("baselines", {}), **part.get("models", {})}
    summary["models"] = {
        name: {key: result.get(key) for key in ("knn_top1", "linear_top1")}
        for name, result in scores.items()
    }
    return summary


def _baselines_in_runtime(
    recipe: Recipe, device: str, names: Sequence[str]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The baselines of ``names`` (:func:`_baseline_models`) in the recipe's runtime."""
    models = _baseline_models(recipe, device, names)
    return in_runtime(models, recipe.eval.runtime, recipe.data.input_size, device)


def _runtime_note(runtimes: dict[str, str]) -> str:
    """What embedded the images, as the evaluation note says it (" in ONNX Runtime")."""
    kinds = sorted(set(runtimes.values()))
    if not kinds:
        return ""
    if len(kinds) == 1:
        return f" in {_RUNTIME_NAMES.get(kinds[0], kinds[0])}"
    return " (" + ", ".join(f"{n} in {r}" for n, r in runtimes.items()) + ")"


_RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "torch": "PyTorch"}


def _baseline_note(
    cached: list[str], computed: list[str], key: str, stored: Path | None
) -> str:
    """What the report says about where its baselines came from."""
    where = f" (cached in {stored})" if stored else " (cache off)"
    if not computed:
        return f"baselines from the cache {entry_path(key)}"
    if not cached:
        return "baselines computed" + where
    return (
        f"baselines {', '.join(cached)} from the cache {entry_path(key)}, "
        f"{', '.join(computed)} computed" + where
    )


def _file_identity(path: Path) -> dict[str, Any]:
    """A file (or an export folder, by its report) as path, size and mtime."""
    path = Path(path)
    target = path / "report.json" if path.is_dir() else path
    try:
        stat = target.stat()
    except OSError:
        return {"path": str(path)}
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def evaluation_provenance(recipe: Recipe, sources: dict[str, Path]) -> dict[str, Any]:
    """What an evaluation depends on: each network's file (path, size, mtime) and
    the recipe's seed, data and eval settings. ``run`` reuses an ``eval.json`` only
    when its provenance is this one.
    """
    settings = recipe.to_dict()
    data = {
        key: value
        for key, value in settings["data"].items()
        if f"data.{key}" not in IGNORED_KEYS
    }
    record = {
        "sources": {
            name: _file_identity(path) for name, path in sorted(sources.items())
        },
        "seed": recipe.seed,
        "data": data,
        "eval": settings["eval"],
    }
    return cast(dict[str, Any], json.loads(json.dumps(record, default=str)))


def _reusable_evaluation(
    out: Path, eval_file: Path, provenance: dict[str, Any]
) -> dict[str, Any] | None:
    """The run folder's ``eval.json`` when this run wrote it from the same networks
    and settings; None when it must be computed (again).

    Raises:
        OutputFolderError: For an ``eval.json`` this run did not write (e.g. by
            ``lightly-mcp evaluate``), or one that is not JSON.
    """
    if not os.path.lexists(eval_file):
        return None
    if not manifest.is_ours(out, "eval/eval.json", manifest.read_manifest(out)):
        raise OutputFolderError(
            f"'{eval_file}' was not written by this run (another evaluation, or "
            "changed since); move it out of the folder and run again to evaluate "
            "dense, subnet and compact."
        )
    old = read_json(eval_file)
    if (
        isinstance(old, dict)
        and old.get("provenance") == provenance
        and isinstance(old.get("models"), dict)
        and "data" in old
    ):
        return old
    return None


def run(
    recipe: Recipe,
    out: Path,
    progress: bool = True,
    console: Console | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """All stages in order, skipping complete ones → ``out/report.json``.

    Refuses (``OutputFolderError``) a folder whose stages were made with another
    recipe (see ``lightly_mcp.app.run_folder.check_recipe``).
    """
    stage_names = stages_of(recipe)
    check_recipe(recipe, out, stage_names)
    if is_rank_zero():
        check_no_links(out, stage_names)
    out.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        manifest.claim(out, STAGE_FILES["evaluate"])
        manifest.write_file(out, "recipe.yaml", recipe_yaml(recipe).encode())
    stages: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        stages[name] = round(time.perf_counter() - start, 2)
        return result

    dense: Path | None
    if recipe.pretrain.dense_checkpoint is not None:
        dense = Path(recipe.pretrain.dense_checkpoint)
        stages["pretrain"] = 0.0
    else:
        dense = timed("pretrain", lambda: pretrain(recipe, out, progress))
    pruned = timed("prune", lambda: prune(recipe, dense, out, progress))
    if not is_rank_zero():
        return {}  # the other ranks of a multi-process run only train
    report: dict[str, Any] = dict(
        timed("export", lambda: export_stage(recipe, pruned, out, console))
    )
    eval_file = out / "eval" / "eval.json"
    provenance = evaluation_provenance(
        recipe,
        {"dense": dense or pruned, "subnet": pruned, "compact": out / "export"},
    )
    evaluation = _reusable_evaluation(out, eval_file, provenance)
    if evaluation is not None:
        stages["evaluate"] = 0.0
    else:
        networks = load_backbone_for_eval(pruned, recipe)
        # "dense" is the starting point of MCP (its momentum encoder) when its
        # checkpoint is one of ours; otherwise MCP's unmasked momentum encoder.
        if dense is not None:
            try:
                networks["dense"] = load_backbone_for_eval(dense, recipe)["dense"]
            except (ValueError, CheckpointError):
                pass
        networks["compact"] = exported_compact(
            recipe, pruned, out, report, resolved_runtime(recipe.eval.runtime, device)
        )
        why = subnet_same_as_compact(networks.get("subnet", nn.Identity()), report)
        same_as = {"subnet": ("compact", why)} if why else {}
        evaluation = timed(
            "evaluate",
            lambda: evaluate(
                networks,
                recipe,
                eval_file,
                device,
                progress,
                recipe.eval.baseline_names,
                provenance,
                same_as,
            ),
        )
        manifest.record(out, ["eval/eval.json"])
    for name, result in evaluation["models"].items():
        entry = report.setdefault(name, {})
        entry["knn_top1"] = result["knn_top1"]
        entry["linear_top1"] = result["linear_top1"]
        if result.get("same_as"):
            entry["same_as"] = result["same_as"]
    if "dense" in report:
        report["dense"]["evaluated_checkpoint"] = str(dense) if dense else str(pruned)
    if "skipped" in evaluation:
        report["evaluation"] = evaluation["skipped"]
    elif "evaluated" in evaluation:
        report["evaluation"] = evaluation["evaluated"]
    report["baselines"] = evaluation.get("baselines", {})
    report["data"] = evaluation["data"]
    if evaluation.get("transfer"):
        report["transfer"] = {
            on: transfer_summary(part) for on, part in evaluation["transfer"].items()
        }
    report["frq"], report["dr"] = recipe.mcp.frq, recipe.mcp.dr
    report["stages"] = stages
    report["headline"] = headline(report)
    plots = write_plots(out, report)
    manifest.record(out, [_relative(out, path) for path in plots])
    report["plots"] = [str(p) for p in plots]
    manifest.write_json(out, "report.json", report)
    return report
