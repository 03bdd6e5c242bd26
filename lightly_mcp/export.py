"""Compact export: from an MCP checkpoint to a deployable, physically pruned backbone.

:func:`export` reads an MCP Lightning checkpoint safely, removes the dropped channels
of the momentum subnet for real (:func:`lightly_mcp.compaction.compact`), checks that
the compact network computes what the masked momentum subnet computes, and writes one
output folder, atomically:

- ``model.pt``: the compact backbone as a whole pickled ``nn.Module``. Loading it runs
  pickle (``torch.load(path, weights_only=False)``): load only files you trust.
- ``model.ts``: TorchScript (traced in eval mode), loadable with ``torch.jit.load``.
- ``model.onnx``: ONNX with a dynamic batch axis, when the exporter supports the
  architecture (a failure is noted in the report, not raised).
- ``report.json``: sizes, MACs, latencies, speedups and the equivalence check.

Examples:
    >>> report = export("runs/mcp/last.ckpt", "exported/mobilenet_v2_73")
    >>> compact = torch.jit.load("exported/mobilenet_v2_73/model.ts")  # no pickle
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightly_mcp.batchnorm import merge_split_batchnorm
from lightly_mcp.checkpoints import module_from_checkpoint, read_checkpoint
from lightly_mcp.compaction import compact
from lightly_mcp.counting import MAC_COUNTER, count_macs, count_parameters
from lightly_mcp.errors import describe_error
from lightly_mcp.files import write_json_atomic
from lightly_mcp.groups import ChannelGroup, channel_scores, output_feature_index
from lightly_mcp.mcp import MCP

#: Resolution of the second set of MACs and latencies (ImageNet deployment size).
DEPLOY_RESOLUTION = 224
#: Batch size of the equivalence check.
CHECK_BATCH_SIZE = 4
#: Relative tolerance of the equivalence check: ``err <= TOL * max(1, scale)``.
CHECK_TOLERANCE = 1e-4
#: Warm-up runs before latency is timed.
WARMUP_RUNS = 3
#: What ``model.pt`` needs to be loaded, repeated in the report.
PICKLE_NOTE = (
    "whole pickled nn.Module: torch.load(path, weights_only=False) runs pickle, "
    "load only files you trust; model.ts / model.onnx need no pickle"
)


class ExportError(ValueError):
    """An export that cannot be done or did not verify; the message says why."""


# --- loading ------------------------------------------------------------------------
def load_mcp_checkpoint(
    checkpoint: str | Path, expected_backbone: str | None = None
) -> MCP:
    """Rebuilds an :class:`MCP` module from a Lightning checkpoint, safely.

    The file is read with ``weights_only=True``; the module is rebuilt from the
    checkpoint's hyper-parameters (with ``dense_checkpoint=None``: the weights come
    from this checkpoint, no other file is read), then its state, queue and
    transition scheduler are restored.

    Args:
        checkpoint: Path of a checkpoint written by a Lightning ``Trainer`` for MCP.
        expected_backbone: If given, the backbone name the checkpoint must have.

    Returns:
        The MCP module, in eval mode, on the CPU.

    Raises:
        CheckpointError: If the file cannot be read safely (corrupt, truncated, code)
            or does not rebuild.
        ExportError: If it is not an MCP checkpoint (e.g. a MoCo v2 one) or was
            trained with another backbone than ``expected_backbone``.
    """
    data = read_checkpoint(checkpoint)
    state = data.get("state_dict")
    hparams = data.get("hyper_parameters")
    if not isinstance(state, Mapping) or not isinstance(hparams, Mapping):
        raise ExportError(
            f"Checkpoint '{checkpoint}' is not a Lightning checkpoint (no "
            "'state_dict' and 'hyper_parameters'); export needs the checkpoint an MCP "
            "training run wrote."
        )
    if not any(str(key).startswith("admm.") for key in state):
        if any(str(key).startswith("backbone_momentum.") for key in state):
            raise ExportError(
                f"Checkpoint '{checkpoint}' is a MoCo v2 checkpoint (no ADMM state), "
                "not an MCP checkpoint: there is no pruning mask to export. Prune it "
                "first with MCP(dense_checkpoint=...) and export that run's checkpoint."
            )
        raise ExportError(
            f"Checkpoint '{checkpoint}' is not an MCP checkpoint (no 'admm.*' state)."
        )
    backbone = hparams.get("backbone")
    if expected_backbone is not None and backbone != expected_backbone:
        raise ExportError(
            f"Checkpoint '{checkpoint}' was trained with backbone '{backbone}', but "
            f"'{expected_backbone}' was expected. Use a checkpoint of "
            f"'{expected_backbone}' or expect '{backbone}'."
        )
    model = module_from_checkpoint(data, checkpoint)
    assert isinstance(model, MCP)
    return model.eval()


# --- masks --------------------------------------------------------------------------
def round_masks(
    encoder: nn.Module,
    groups: Sequence[ChannelGroup],
    masks: Sequence[Tensor],
    round_to: int,
) -> list[Tensor]:
    """Widens masks so that every group keeps a multiple of ``round_to`` channels.

    Per group, the kept count is rounded up to the next multiple of ``round_to``
    (capped at the group's size); the extra channels are the dropped ones with the
    highest L2 norm over the group's members in ``encoder`` (as
    :func:`lightly_mcp.groups.channel_scores`). Kept channels stay kept.

    Args:
        encoder: The encoder whose weights rank the dropped channels (the momentum
            encoder).
        groups: Its channel groups.
        masks: Per group, the boolean mask of kept channels.
        round_to: The channel multiple, >= 1.

    Returns:
        New boolean masks (the inputs are not modified).
    """
    if isinstance(round_to, bool) or not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}.")
    params = dict(encoder.named_parameters())
    widened = []
    for group, mask in zip(groups, masks):
        mask = mask.detach().cpu().to(torch.bool).clone()
        kept = int(mask.sum())
        target = min(group.num_channels, math.ceil(kept / round_to) * round_to)
        if target > kept:
            scores = channel_scores(params, group).detach().cpu().float()
            scores[mask] = -math.inf
            extra = torch.topk(scores, target - kept).indices
            mask[extra] = True
        widened.append(mask)
    return widened


# --- timing -------------------------------------------------------------------------
def measure_latency(
    models: Mapping[str, Callable[[Tensor], Any]],
    input_shape: Sequence[int],
    repeats: int = 20,
    warmup: int = WARMUP_RUNS,
) -> dict[str, float]:
    """Median latency in milliseconds of several models, timed interleaved.

    Every model runs ``warmup`` times first; then each repeat runs every model once,
    in turn, so that slow drifts of the machine (turbo, other load) affect all of
    them alike and their ratios are fair. Runs are under ``torch.inference_mode()``
    on one random input of ``input_shape``; ``nn.Module`` models are put in eval mode.

    Args:
        models: Callables taking one tensor (modules, TorchScript, wrappers).
        input_shape: Shape of the input batch, e.g. ``(1, 3, 224, 224)``.
        repeats: Timed runs per model, >= 1.
        warmup: Untimed runs per model before timing.

    Returns:
        Per model name, the median latency in milliseconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    x = torch.randn(*input_shape)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            if isinstance(model, nn.Module):
                model.eval()
            for _ in range(warmup):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


# --- BatchNorm recalibration --------------------------------------------------------
def _images(batch: Any) -> Tensor:
    """The image tensor of a batch: a tensor, or ``(views, label, ...)``."""
    while isinstance(batch, (list, tuple)):
        if not batch:
            break
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise ExportError(
            f"Cannot find images in a recalibration batch of type "
            f"{type(batch).__name__}; give tensors or (views, label, ...) batches."
        )
    return batch


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Any], num_batches: int = 10
) -> int:
    """Recomputes the running statistics of every BatchNorm layer of ``model``.

    The statistics are reset and re-estimated as a cumulative average
    (``momentum=None``) over ``num_batches`` batches in train mode; the layers'
    momentum is restored afterwards and the model is left in eval mode.

    Args:
        model: The network (e.g. the compact backbone).
        batches: Batches of images, or ``(views, label, ...)`` (first view is used).
        num_batches: How many batches to run.

    Returns:
        The number of batches that were run.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.train()
    seen = 0
    try:
        for batch in batches:
            if seen >= num_batches:
                break
            model(_images(batch).to(device))
            seen += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    if seen == 0:
        raise ExportError("The recalibration DataLoader gave no batch.")
    return seen


# --- the compact model -------------------------------------------------------------
def export_masks(model: MCP, round_to: int | None = None) -> list[Tensor]:
    """The masks export uses: the trained subnet's, widened to multiples of
    ``round_to`` when given (see :func:`round_masks`).
    """
    masks = [mask.detach().cpu().clone() for mask in model.subnet.masks]
    if round_to is not None:
        masks = round_masks(model.backbone_momentum, model.groups, masks, round_to)
    return masks


def compact_and_check(
    model: MCP, masks: list[Tensor]
) -> tuple[nn.Module, float, float]:
    """The compact momentum subnet of ``model`` with ``masks``, checked.

    The trained subnet (its own normalisation statistics) is compacted, its
    ``SplitBatchNorm`` layers are merged into plain ``BatchNorm2d`` (equal in eval
    mode), and its output in eval mode, on random inputs at the training resolution,
    is compared with that of the masked momentum subnet, both computed in float64
    (float32 rounding, amplified by deep networks with large activations, is not a
    difference of the networks). When the masks prune the group that reaches the
    output (``keep_output_dim=False``), the compact model has fewer features: it is
    compared with the subnet's kept features (:func:`output_feature_index`), and the
    subnet's dropped features must be zero.

    Returns:
        The compact model (eval mode, every parameter requiring gradients, float32),
        the max abs error between the two in float32 and the output scale the
        check's tolerance is relative to.

    Raises:
        ExportError: If the compact model does not match the masked subnet.
    """
    size = int(model.hparams["input_size"])
    example = torch.randn(1, 3, size, size)
    subnet = copy.deepcopy(model.subnet)
    subnet.set_masks(masks)
    subnet.eval()
    compact_model = compact(subnet.materialize(), model.groups, masks, example)
    # Deployed files hold plain BatchNorm2d: lightly's SplitBatchNorm (kept by
    # compact() for train-mode equivalence) only matters for training. The check
    # below is on the merged model, the one that is written.
    merge_split_batchnorm(compact_model)
    compact_model.eval()
    for param in compact_model.parameters():
        param.requires_grad_(True)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_BATCH_SIZE, 3, size, size, generator=generator)
    # The decision is made in float64: in float32 the two networks' different
    # summation orders differ by rounding that deep residual networks with large
    # activations (e.g. an EfficientNet whose BatchNorm statistics were just
    # re-estimated) amplify past any fixed tolerance, while a structural difference
    # is as large in float64. The float32 error is what the report states.
    with torch.no_grad():
        expected = copy.deepcopy(subnet).double()(x.double())
        got = copy.deepcopy(compact_model).double()(x.double())
        expected32 = subnet(x)
        got32 = compact_model(x)
    # A pruned output group (keep_output_dim=False) removes output features: the
    # compact model computes the subnet's kept features, in order, and the subnet's
    # dropped features are zero.
    kept, dropped = output_feature_index(model.groups, masks, expected.shape[1])
    scale = float(expected.abs().max())
    tolerance = CHECK_TOLERANCE * max(1.0, scale)
    if len(dropped):
        leak = float(expected.index_select(1, dropped).abs().max())
        if not leak <= tolerance:
            raise ExportError(
                f"The masked momentum subnet's dropped output features are not zero "
                f"(max abs {leak:.3g}); the compact model cannot reproduce them. "
                "Nothing was written."
            )
        expected = expected.index_select(1, kept)
        expected32 = expected32.index_select(1, kept)
    if got.shape != expected.shape:
        raise ExportError(
            f"Compact output shape {tuple(got.shape)} differs from the momentum "
            f"subnet's {tuple(expected.shape)} (its kept output features)."
        )
    err = float((got - expected).abs().max())
    if not err <= tolerance:
        raise ExportError(
            f"The compact model does not match the masked momentum subnet: max abs "
            f"error {err:.3g} (float64) > {CHECK_TOLERANCE:g} * max(1, {scale:.3g}). "
            "Nothing was written."
        )
    return compact_model, float((got32 - expected32).abs().max()), scale


def compact_from_checkpoint(
    checkpoint: str | Path,
    *,
    round_to: int | None = None,
    recalibrate: DataLoader | None = None,
    recalibration_batches: int = 10,
    expected_backbone: str | None = None,
) -> nn.Module:
    """The compact model :func:`export` writes, rebuilt from the MCP checkpoint.

    Reads only the checkpoint, safely (``weights_only=True``): no exported file and
    no pickled code. With the same options as the export, the result equals its
    ``model.pt`` (up to float noise of the BatchNorm recalibration, if any).

    Returns:
        The compact model, in eval mode, on the CPU.
    """
    model = load_mcp_checkpoint(checkpoint, expected_backbone=expected_backbone)
    compact_model, _, _ = compact_and_check(model, export_masks(model, round_to))
    if recalibrate is not None:
        recalibrate_batchnorm(compact_model, recalibrate, recalibration_batches)
    return compact_model.eval()


# --- export -------------------------------------------------------------------------
def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    recalibrate: DataLoader | None = None,
    recalibration_batches: int = 10,
    round_to: int | None = None,
    latency: bool = True,
    latency_repeats: int = 20,
    latency_at_224: bool = False,
    expected_backbone: str | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    onnx: bool = True,
) -> dict[str, Any]:
    """Exports the compact momentum subnet of an MCP checkpoint to a folder.

    Steps: read the checkpoint safely and rebuild the MCP module; optionally widen
    the masks to multiples of ``round_to``; compact the momentum subnet; check in
    eval mode, on random inputs at the training resolution, that the compact network
    matches the masked momentum subnet (before any BatchNorm recalibration, which
    changes outputs on purpose); optionally recalibrate BatchNorm statistics; count
    parameters and MACs; time dense vs compact; write ``model.pt``, ``model.ts``,
    ``model.onnx`` and ``report.json``. Everything is written to a temporary sibling
    folder that is renamed to ``out_dir`` at the end, so a failed export leaves no
    partial output. The compact model is saved in eval mode with all parameters
    requiring gradients (ready to fine-tune).

    Args:
        checkpoint: Path of an MCP Lightning checkpoint.
        out_dir: Output folder; must not exist or be empty unless ``overwrite``.
        recalibrate: Optional DataLoader for BatchNorm recalibration of the compact
            model (tensors or ``(views, label, ...)`` batches).
        recalibration_batches: Batches used for recalibration.
        round_to: Keep channel counts multiples of this (extra channels are the
            highest-norm dropped ones); None keeps the trained masks as they are.
        latency: Time dense and compact models; if False, latency fields are null.
        latency_repeats: Timed runs per model and setting (median reported).
        latency_at_224: Also time both models at 224 px (``at_224``; null
            otherwise). A model trained at 32 px with a small-input stem is not a
            224-px model, and timing it there costs minutes on a small CPU.
        expected_backbone: If given, refuse checkpoints of another backbone.
        overwrite: Replace a non-empty ``out_dir``.
        console: Where the summary table is printed (a new ``Console`` if None).
        onnx: Also write ``model.onnx`` (its failure is noted, never raised).

    Returns:
        The report, as written to ``report.json``.

    Raises:
        CheckpointError: If the checkpoint cannot be read safely.
        ExportError: For a non-MCP checkpoint, a backbone mismatch, an existing
            output folder, or a compact model that does not match the subnet.
    """
    console = console if console is not None else Console()
    out_dir = Path(out_dir)
    _check_out_dir(Path(checkpoint), out_dir, overwrite)
    if latency and latency_repeats < 1:
        raise ValueError(f"latency_repeats must be >= 1, got {latency_repeats}.")

    model = load_mcp_checkpoint(checkpoint, expected_backbone=expected_backbone)
    size = int(model.hparams["input_size"])
    masks = export_masks(model, round_to)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".export-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
        report = _build(
            model,
            masks,
            tmp,
            size=size,
            recalibrate=recalibrate,
            recalibration_batches=recalibration_batches,
            latency=latency,
            latency_repeats=latency_repeats,
            latency_at_224=latency_at_224,
            onnx=onnx,
        )
        report["round_to"] = round_to
        report["checkpoint"] = str(checkpoint)
        write_json_atomic(tmp / "report.json", report)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(summary_table(report))
    return report


def _check_out_dir(checkpoint: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuses an output folder the export must not replace.

    ``overwrite`` replaces only a previous export: a folder whose entries are its
    ``report.json`` and the files that report says it wrote. A folder holding the
    input checkpoint is refused whatever ``overwrite`` says.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"Output path '{out_dir}' exists and is not a folder.")
    if Path(os.path.realpath(checkpoint)).is_relative_to(os.path.realpath(out_dir)):
        raise ExportError(
            f"The checkpoint '{checkpoint}' lies inside the output folder "
            f"'{out_dir}', which the export replaces; choose an output folder that "
            "does not hold it."
        )
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return
    if not overwrite:
        raise ExportError(
            f"Output folder '{out_dir}' exists and is not empty; choose another "
            "folder or pass --overwrite (overwrite=True) to replace a previous "
            "export there."
        )
    foreign = _not_from_an_export(out_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ExportError(
            f"Output folder '{out_dir}' holds {len(foreign)} file(s) an export did "
            f"not write ({shown}); --overwrite only replaces a previous export. "
            "Choose another folder or move them out."
        )


def _not_from_an_export(folder: Path) -> list[str]:
    """The entries of ``folder`` that no export wrote (by its ``report.json``)."""
    written: set[str] = set()
    try:
        report = json.loads((folder / "report.json").read_text())
        listed = report["files"]["written"]
        if isinstance(listed, list):
            written = {str(name) for name in listed} | {"report.json"}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable report: not an export folder
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if not (
            entry.is_file()
            and not entry.is_symlink()
            and (
                entry.name in written
                or ("model.onnx" in written and entry.name.startswith("model.onnx."))
            )
        )
    )


def _build(
    model: MCP,
    masks: list[Tensor],
    folder: Path,
    *,
    size: int,
    recalibrate: DataLoader | None,
    recalibration_batches: int,
    latency: bool,
    latency_repeats: int,
    latency_at_224: bool = False,
    onnx: bool = True,
) -> dict[str, Any]:
    """Compacts, checks, measures and writes the model files into ``folder``."""
    example = torch.randn(1, 3, size, size)
    compact_model, err, scale = compact_and_check(model, masks)

    recalibrated = False
    if recalibrate is not None:
        recalibrate_batchnorm(compact_model, recalibrate, recalibration_batches)
        recalibrated = True
    compact_model.eval()

    dense = copy.deepcopy(model.backbone_momentum)
    merge_split_batchnorm(dense)
    dense.eval()

    files = _save_models(compact_model, folder, size, onnx=onnx)

    sides: dict[str, dict[str, Any]] = {}
    for name, net in (("dense", dense), ("compact", compact_model)):
        with torch.no_grad():
            feature_dim = int(net(example).shape[-1])
        sides[name] = {
            "params": count_parameters(net),
            "macs": count_macs(net, size),
            "feature_dim": feature_dim,
            "latency_ms": {"bs1": None, "bs64": None},
            "at_224": {
                "macs": count_macs(net, DEPLOY_RESOLUTION),
                "latency_ms": {"bs1": None, "bs64": None},
            },
        }
    speedup: dict[str, Any] = {"bs1": None, "bs64": None, "at_224": {}}
    speedup["at_224"] = {"bs1": None, "bs64": None}
    if latency:
        nets = {"dense": dense, "compact": compact_model}
        resolutions = [size]
        if latency_at_224 and DEPLOY_RESOLUTION != size:
            resolutions.append(DEPLOY_RESOLUTION)
        for resolution in resolutions:
            for batch in (1, 64):
                key = f"bs{batch}"
                ms = measure_latency(
                    nets, (batch, 3, resolution, resolution), latency_repeats
                )
                for name in nets:
                    side = sides[name]
                    target = side if resolution == size else side["at_224"]
                    target["latency_ms"][key] = ms[name]
                ratio = ms["dense"] / ms["compact"]
                if resolution == size:
                    speedup[key] = ratio
                else:
                    speedup["at_224"][key] = ratio
        if size == DEPLOY_RESOLUTION:  # the training resolution is 224 px
            for name in nets:
                sides[name]["at_224"]["latency_ms"] = dict(sides[name]["latency_ms"])
            speedup["at_224"] = {k: speedup[k] for k in ("bs1", "bs64")}

    return {
        "backbone": model.hparams["backbone"],
        "pruning_ratio": float(model.hparams["pruning_ratio"]),
        "resolution": size,
        "dense": sides["dense"],
        "compact": sides["compact"],
        "speedup": speedup,
        "macs_ratio": sides["dense"]["macs"] / sides["compact"]["macs"],
        "params_removed": 1.0 - sides["compact"]["params"] / sides["dense"]["params"],
        "equivalence_max_abs_err": err,
        "equivalence_output_scale": scale,
        "equivalence_note": (
            "compact vs masked momentum subnet, eval mode, random inputs "
            f"{CHECK_BATCH_SIZE}x3x{size}x{size}, checked before BatchNorm "
            "recalibration"
        ),
        "kept_channels": [
            {"group": g.root, "kept": int(m.sum()), "total": g.num_channels}
            for g, m in zip(model.groups, masks)
        ],
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "mac_counter": MAC_COUNTER,
        "files": files,
        "bn_recalibrated": recalibrated,
    }


def _save_models(
    model: nn.Module, folder: Path, size: int, onnx: bool = True
) -> dict[str, Any]:
    """Writes model.pt, model.ts and (when asked and it exports) model.onnx into
    ``folder``.
    """
    written = []
    notes: dict[str, Any] = {}
    torch.save(model, folder / "model.pt")
    written.append("model.pt")
    notes["model.pt"] = PICKLE_NOTE

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.randn(1, 3, size, size))
        traced.save(str(folder / "model.ts"))
        reloaded = torch.jit.load(str(folder / "model.ts"))
        with torch.no_grad():
            ts_err = float((reloaded(x) - reference).abs().max())
    except Exception as error:  # noqa: BLE001 - recorded in the report
        (folder / "model.ts").unlink(missing_ok=True)
        notes["torchscript"] = f"failed: {describe_error(error)[:300]}"
    else:
        if not ts_err <= CHECK_TOLERANCE * max(1.0, float(reference.abs().max())):
            raise ExportError(
                f"The reloaded TorchScript model differs from the compact model by "
                f"{ts_err:.3g}."
            )
        written.append("model.ts")
        notes["torchscript"] = f"ok (traced, eval mode; max abs err {ts_err:.3g})"

    if not onnx:
        notes["onnx"] = "not asked for"
        model.eval()
        return {"written": written, **notes}
    try:
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            str(folder / "model.onnx"),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            dynamo=False,
        )
    except Exception as error:  # noqa: BLE001 - recorded in the report
        for leftover in folder.glob("model.onnx*"):
            leftover.unlink()
        notes["onnx"] = f"failed: {describe_error(error)[:300]}"
    else:
        written.append("model.onnx")
        notes["onnx"] = "ok (dynamic batch axis)"
    model.eval()
    return {"written": written, **notes}


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Renames the finished temporary folder to ``out_dir`` (replacing it if any)."""
    old: Path | None = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".export-old-"))
        os.replace(out_dir, old / "previous")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- summary ------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: Mapping[str, Any]) -> Table:
    """A rich table of dense vs compact size, MACs, latency and speedup."""
    size = report["resolution"]
    dense, comp, speed = report["dense"], report["compact"], report["speedup"]
    table = Table(
        title=f"MCP export: {report['backbone']} "
        f"(pruning ratio {report['pruning_ratio']:g})"
    )
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("compact", justify="right")
    table.add_column("dense / compact", justify="right")

    def row(label: str, d: Any, c: Any, ratio: Any, spec: str = ",") -> None:
        table.add_row(label, _fmt(d, spec), _fmt(c, spec), _fmt(ratio, ".2f"))

    row("params", dense["params"], comp["params"], dense["params"] / comp["params"])
    row(f"MACs @{size}", dense["macs"], comp["macs"], report["macs_ratio"])
    d224, c224 = dense["at_224"], comp["at_224"]
    row("MACs @224", d224["macs"], c224["macs"], d224["macs"] / c224["macs"])
    row("feature dim", dense["feature_dim"], comp["feature_dim"], None)
    for batch in ("bs1", "bs64"):
        row(
            f"latency ms @{size} {batch}",
            dense["latency_ms"][batch],
            comp["latency_ms"][batch],
            speed[batch],
            ".2f",
        )
        if size != DEPLOY_RESOLUTION and d224["latency_ms"][batch] is not None:
            row(
                f"latency ms @224 {batch}",
                d224["latency_ms"][batch],
                c224["latency_ms"][batch],
                speed["at_224"][batch],
                ".2f",
            )
    table.caption = (
        f"equivalence max abs err {report['equivalence_max_abs_err']:.2e} "
        f"(output scale {report['equivalence_output_scale']:.3g}); "
        f"threads {report['threads']}; BN recalibrated: {report['bn_recalibrated']}"
    )
    return table
