"""Compact export: from an MCP checkpoint to a deployable, physically pruned backbone.

:func:`export` reads an MCP Lightning checkpoint safely, removes the dropped channels
of the momentum subnet for real (:func:`lightly_mcp.pruning.compaction.compact`), checks
that the compact network computes what the masked momentum subnet computes, and writes
one output folder, atomically:

Every file holds the same network, in eval mode, with its BatchNorm layers folded into
the convolutions before them (:mod:`lightly_mcp.formats.folding`); the equivalence check
is run on that folded network.

- ``model.pt2``: a ``torch.export`` program with a dynamic batch axis, code-free;
  :func:`lightly_mcp.formats.runtimes.load_program` checks it and reads it without
  running anything from the file (:mod:`lightly_mcp.io.model_files`).
- ``model.onnx``: ONNX with a dynamic batch axis, when the exporter supports the
  architecture (a failure is noted in the report, not raised).
- ``model.pt``: the compact backbone as a whole pickled ``nn.Module``. Loading it runs
  pickle, i.e. code from the file: load only files you trust (``evaluate`` needs
  ``--trust-pickle``).
- ``model.ts``: TorchScript, only when asked for (``torchscript=True``), for LibTorch
  C++ deployments; PyTorch deprecates TorchScript in favour of ``torch.export``.
  TorchScript is code too: ``evaluate`` loads it only with ``--trust-pickle`` and
  ``run`` never does.
- ``report.json``: sizes, MACs, per deployed form the latency of both networks, each
  network's fastest form, the best-against-best speedup, and the equivalence check
  (:class:`lightly_mcp.formats.report.ExportReport`).

Examples:
    >>> report = export("runs/mcp/last.ckpt", "exported/mobilenet_v2_73")
    >>> compact = load_program("exported/mobilenet_v2_73/model.pt2")  # no pickle
"""

from __future__ import annotations

import copy
import errno
import fcntl
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightly_mcp.errors import ExportError, InputError, describe_error
from lightly_mcp.formats.folding import ConvNorm, conv_norm_pairs, fold_batchnorm
from lightly_mcp.formats.loading import load_mcp_checkpoint
from lightly_mcp.formats.report import (
    Alignment,
    DeployMeasurements,
    ExportFiles,
    ExportReport,
    KeptChannels,
    NetworkMeasurements,
    PerBatch,
    Speedup,
    export_summary_table,
    fastest,
)
from lightly_mcp.formats.runtimes import (
    deployed_forms,
    export_program,
    load_program,
    save_onnx,
    save_program,
)
from lightly_mcp.io.files import write_bytes_atomic, write_json_atomic
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.pruning.batchnorm import merge_split_batchnorm, recalibrate_batchnorm
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.masks import output_feature_index, round_masks
from lightly_mcp.pruning.measure import (
    MAC_COUNTER,
    count_macs,
    count_parameters,
    measure_latency,
)

#: Resolution of the second set of MACs and latencies (ImageNet deployment size).
DEPLOY_RESOLUTION = 224
#: Batch size of the equivalence check.
CHECK_BATCH_SIZE = 4
#: Relative tolerance of the equivalence check: ``err <= TOL * max(1, scale)``.
CHECK_TOLERANCE = 1e-4
#: Channel multiples the export times the compact model at, under ONNX Runtime.
ALIGNMENT_MULTIPLES = (8, 16)
#: How much faster a rounded model must be before the report advises it.
ALIGNMENT_GAIN = 1.1
#: What ``model.pt`` needs to be loaded, repeated in the report.
PICKLE_NOTE = (
    "whole pickled nn.Module: loading it runs code from the file (evaluate needs "
    "--trust-pickle), load only files you trust; model.pt2 / model.onnx need no pickle"
)


# --- the compact model -------------------------------------------------------------
def export_masks(model: MCP, round_to: int | None = None) -> list[Tensor]:
    """The masks export uses: the trained subnet's, on the CPU, widened to multiples
    of ``round_to`` when given (see :func:`round_masks`).
    """
    masks = [mask.detach().cpu().clone() for mask in model.subnet.masks]
    if round_to is not None:
        masks = round_masks(model.backbone_momentum, model.groups, masks, round_to)
    return masks


@dataclass
class CheckedCompact:
    """A compact model and its equivalence check against the masked subnet.

    Attributes:
        model: The compact model (eval mode, float32, on the CPU).
        max_abs_err: Max abs difference from the reference in float32.
        output_scale: Max abs output, the check's tolerance scale.
        folded: BatchNorm layers folded into convolutions (0 when not folded).
        unfolded: The compact model before folding (``model`` when not folded):
            the architecture whose parameters the report counts.
    """

    model: nn.Module
    max_abs_err: float
    output_scale: float
    folded: int
    unfolded: nn.Module


def compact_and_check(
    model: MCP,
    masks: list[Tensor],
    *,
    fold: bool = True,
    pairs: Sequence[ConvNorm] | None = None,
) -> CheckedCompact:
    """The compact momentum subnet of ``model`` with ``masks``, checked.

    The trained subnet (its own normalisation statistics) is compacted, its
    ``SplitBatchNorm`` layers are merged into plain ``BatchNorm2d`` (equal in eval
    mode) and, with ``fold``, folded into the convolutions before them. The output of
    that network in eval mode, on random inputs at the training resolution, is
    compared with that of the masked momentum subnet, both computed in float64
    (float32 rounding, amplified by deep networks with large activations, is not a
    difference of the networks). When the masks prune the group that reaches the
    output (``keep_output_dim=False``), the compact model has fewer features: it is
    compared with the subnet's kept features (:func:`output_feature_index`), and the
    subnet's dropped features must be zero.

    Args:
        model: The MCP module.
        masks: Per group, the channels to keep.
        fold: Fold BatchNorm into the convolutions (what is deployed); ``False``
            keeps the norms (to fine-tune or recalibrate the model).
        pairs: The (convolution, BatchNorm) pairs to fold, found on the dense
            network (:func:`~lightly_mcp.formats.folding.conv_norm_pairs`); ``None``
            traces the compact one.

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
    # below is on the merged (and folded) model, the one that is written.
    merge_split_batchnorm(compact_model)
    compact_model.eval()
    for param in compact_model.parameters():
        param.requires_grad_(True)
    unfolded = compact_model
    folded = 0
    reference64 = copy.deepcopy(unfolded).double()
    if fold:
        reference64, folded = _folded_in_float64(unfolded, size, pairs)
        compact_model = copy.deepcopy(reference64).float()

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_BATCH_SIZE, 3, size, size, generator=generator)
    # The decision is made in float64: in float32 the two networks' different
    # summation orders differ by rounding that deep residual networks with large
    # activations (e.g. an EfficientNet whose BatchNorm statistics were just
    # re-estimated) amplify past any fixed tolerance, while a structural difference
    # is as large in float64. The float32 error is what the report states.
    with torch.no_grad():
        expected = copy.deepcopy(subnet).double()(x.double())
        expected32 = subnet(x)
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
    err32 = _check_same(
        reference64,
        compact_model,
        x,
        expected,
        expected32,
        "the masked momentum subnet",
    )
    return CheckedCompact(compact_model, err32, scale, folded, unfolded)


def fold_and_check(
    model: nn.Module, size: int, pairs: Sequence[ConvNorm] | None = None
) -> tuple[nn.Module, int]:
    """``model`` (eval mode) with its BatchNorm folded, checked against itself.

    ``pairs``, if given, are the pairs to fold (found on a network with the same
    graph); ``None`` traces ``model`` to find them.

    Returns:
        The folded copy and the number of norms folded.

    Raises:
        ExportError: If the folded network computes something else.
    """
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_BATCH_SIZE, 3, size, size, generator=generator)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        expected32 = model(x)
    folded64, folded = _folded_in_float64(model, size, pairs)
    folded_model = copy.deepcopy(folded64).float()
    _check_same(
        folded64, folded_model, x, expected, expected32, "the network before folding"
    )
    return folded_model, folded


def _folded_in_float64(
    model: nn.Module, size: int, pairs: Sequence[ConvNorm] | None = None
) -> tuple[nn.Module, int]:
    """A float64 copy of ``model`` with its BatchNorm folded, and the count folded.

    Folding in float64 and rounding the result once to float32 gives the float32
    weights closest to the folded ones; the float64 copy is what the equivalence
    check compares (a structural check, free of float32 rounding).
    """
    folded = copy.deepcopy(model).double().eval()
    example = torch.randn(2, 3, size, size, dtype=torch.float64)
    count = fold_batchnorm(folded, example, pairs)
    return folded, count


def _check_same(
    model64: nn.Module,
    model: nn.Module,
    x: Tensor,
    expected: Tensor,
    expected32: Tensor,
    reference: str,
) -> float:
    """Checks ``model64(x)`` against ``expected`` (both float64); the float32 error
    of ``model`` against ``expected32``.

    Raises:
        ExportError: If the shapes differ or the float64 error exceeds the tolerance.
    """
    with torch.no_grad():
        got = model64(x.double())
        got32 = model(x)
    if got.shape != expected.shape:
        raise ExportError(
            f"Compact output shape {tuple(got.shape)} differs from that of "
            f"{reference} {tuple(expected.shape)} (its kept output features)."
        )
    scale = float(expected.abs().max())
    err = float((got - expected).abs().max())
    if not err <= CHECK_TOLERANCE * max(1.0, scale):
        raise ExportError(
            f"The compact model does not match {reference}: max abs error "
            f"{err:.3g} (float64) > {CHECK_TOLERANCE:g} * max(1, {scale:.3g}). "
            "Nothing was written."
        )
    return float((got32 - expected32).abs().max())


def compact_from_checkpoint(
    checkpoint: str | Path,
    *,
    round_to: int | None = None,
    recalibrate: DataLoader | None = None,
    recalibration_batches: int = 10,
    expected_backbone: str | None = None,
    fold: bool = True,
) -> nn.Module:
    """The compact model :func:`export` writes, rebuilt from the MCP checkpoint.

    Reads only the checkpoint, safely (``weights_only=True``): no exported file and
    no pickled code. With the same options as the export, the result equals its
    ``model.pt`` (up to float noise of the BatchNorm recalibration, if any).

    Args:
        checkpoint: Path of an MCP Lightning checkpoint, or the trained ``MCP``
            module itself (e.g. right after ``Trainer.fit``).
        round_to: Widen the masks to multiples of this, as the export does.
        recalibrate: Batches to re-estimate the BatchNorm statistics with, if any.
        recalibration_batches: How many of them.
        expected_backbone: If given, refuse checkpoints of another backbone.
        fold: Fold BatchNorm into the convolutions, as the export does; ``False``
            keeps the norms, to fine-tune the compact model.

    Returns:
        The compact model, in eval mode, on the CPU.
    """
    model = load_mcp_checkpoint(checkpoint, expected_backbone=expected_backbone)
    masks = export_masks(model, round_to)
    if recalibrate is None:
        return compact_and_check(model, masks, fold=fold).model
    compact_model = compact_and_check(model, masks, fold=False).model
    recalibrate_batchnorm(compact_model, recalibrate, recalibration_batches)
    if fold:
        compact_model, _ = fold_and_check(
            compact_model, int(model.hparams["input_size"])
        )
    return compact_model.eval()


# --- export -------------------------------------------------------------------------
def export(
    checkpoint: str | Path | MCP,
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
    torchscript: bool = False,
) -> dict[str, Any]:
    """Exports the compact momentum subnet of an MCP checkpoint (or module) to a folder.

    Steps: read the checkpoint safely and rebuild the MCP module (a trained ``MCP``
    module is exported from a copy, left as it was); optionally widen
    the masks to multiples of ``round_to``; compact the momentum subnet; fold its
    BatchNorm layers into the convolutions; check in eval mode, on random inputs at
    the training resolution, that the folded compact network matches the masked
    momentum subnet (with BatchNorm recalibration: the unfolded network is checked
    before recalibrating, which changes outputs on purpose, and the folded one
    against the recalibrated one); count parameters and MACs; time dense and compact
    (both folded) in every deployed form (eager, ``torch.export``, ONNX Runtime);
    write ``model.pt2``, ``model.onnx``, ``model.pt`` (and ``model.ts`` if asked)
    and ``report.json``, checking every reloaded file. Everything is written to a
    temporary sibling folder that is renamed to ``out_dir`` at the end, so a failed
    export leaves no partial output. To fine-tune the compact model, rebuild it
    unfolded with ``compact_from_checkpoint(..., fold=False)``.

    Args:
        checkpoint: Path of an MCP Lightning checkpoint.
        out_dir: Output folder; must not exist or be empty unless ``overwrite``.
        recalibrate: Optional DataLoader for BatchNorm recalibration of the compact
            model (tensors or ``(views, label, ...)`` batches).
        recalibration_batches: Batches used for recalibration.
        round_to: Keep channel counts multiples of this (extra channels are the
            highest-norm dropped ones); None keeps the trained masks as they are.
        latency: Time dense and compact models; if False, latency fields are null.
        latency_repeats: Timed runs per model, form and setting (median reported).
        latency_at_224: Also time both models at 224 px (``at_224``; null
            otherwise). A model trained at 32 px with a small-input stem is not a
            224-px model, and timing it there costs minutes on a small CPU.
        expected_backbone: If given, refuse checkpoints of another backbone.
        overwrite: Replace a non-empty ``out_dir``.
        console: Where the summary table is printed (a new ``Console`` if None).
        onnx: Also write ``model.onnx`` (its failure is noted, never raised).
        torchscript: Also write ``model.ts`` (TorchScript, for LibTorch C++; its
            failure is noted, never raised).

    Returns:
        The report, as written to ``report.json``.

    Raises:
        CheckpointError: If the checkpoint cannot be read safely.
        ExportError: For a non-MCP checkpoint, a backbone mismatch, an existing
            output folder, or a compact model that does not match the subnet.
    """
    console = console if console is not None else Console()
    out_dir = Path(out_dir)
    if not isinstance(checkpoint, (MCP, str, os.PathLike)):
        raise InputError(
            f"export() takes an MCP checkpoint path or an MCP module, got "
            f"{type(checkpoint).__name__}."
        )
    source_file = None if isinstance(checkpoint, MCP) else Path(checkpoint)
    _check_out_dir(source_file, out_dir, overwrite)
    if latency and latency_repeats < 1:
        raise InputError(f"latency_repeats must be >= 1, got {latency_repeats}.")

    if isinstance(checkpoint, MCP):
        model = _module_copy(checkpoint, expected_backbone)
        source = "in memory (an MCP module)"
    else:
        model = load_mcp_checkpoint(checkpoint, expected_backbone=expected_backbone)
        source = str(checkpoint)
    masks = export_masks(model, round_to)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporary_folders(out_dir.parent):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=TEMPORARY_PREFIX))
    marker = -1
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
        marker = _mark_temporary(tmp)
        report = _build(
            model,
            masks,
            tmp,
            checkpoint=source,
            round_to=round_to,
            recalibrate=recalibrate,
            recalibration_batches=recalibration_batches,
            latency=latency,
            latency_repeats=latency_repeats,
            latency_at_224=latency_at_224,
            onnx=onnx,
            torchscript=torchscript,
        )
        as_json = report.to_dict()
        write_json_atomic(tmp / "report.json", as_json)
        os.close(marker)
        marker = -1
        (tmp / TEMPORARY_MARKER).unlink()
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if marker >= 0:
            os.close(marker)
    console.print(export_summary_table(report, DEPLOY_RESOLUTION))
    if report.untrained_mask:
        console.print(f"warning: {report.untrained_mask}", markup=False)
    return as_json


def _module_copy(module: MCP, expected_backbone: str | None) -> MCP:
    """An eval-mode CPU copy of a trained MCP module (the caller's is not touched)."""
    backbone = module.hparams.get("backbone")
    if expected_backbone is not None and backbone != expected_backbone:
        raise ExportError(
            f"The MCP module was trained with backbone '{backbone}', but "
            f"'{expected_backbone}' was expected."
        )
    with torch.no_grad():
        model = copy.deepcopy(module).cpu()
    return model.eval()


def _check_out_dir(checkpoint: Path | None, out_dir: Path, overwrite: bool) -> None:
    """Refuses an output folder the export must not replace.

    ``overwrite`` replaces only a previous export: a folder whose entries are its
    ``report.json`` and the files that report says it wrote. A folder holding the
    input checkpoint is refused whatever ``overwrite`` says.
    """
    if out_dir.is_symlink():
        raise ExportError(
            f"Output path '{out_dir}' is a symbolic link; the export never writes "
            "through links: give the folder itself or another folder."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"Output path '{out_dir}' exists and is not a folder.")
    if checkpoint is not None and Path(os.path.realpath(checkpoint)).is_relative_to(
        os.path.realpath(out_dir)
    ):
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
    _refuse_foreign_files(out_dir)


def _refuse_foreign_files(out_dir: Path) -> None:
    """Refuses a folder holding files no export wrote (``--overwrite`` replaces
    only a previous export).
    """
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
    checkpoint: str,
    round_to: int | None,
    recalibrate: DataLoader | None,
    recalibration_batches: int,
    latency: bool,
    latency_repeats: int,
    latency_at_224: bool,
    onnx: bool,
    torchscript: bool,
) -> ExportReport:
    """Compacts, checks, folds, measures and writes the model files into ``folder``."""
    size = int(model.hparams["input_size"])
    example = torch.randn(1, 3, size, size)
    note = (
        f"folded compact vs masked momentum subnet, eval mode, random inputs "
        f"{CHECK_BATCH_SIZE}x3x{size}x{size}"
    )
    # Pruning channels changes no connection: the pairs of BatchNorm to fold are
    # the dense network's, found with one trace for both networks.
    dense_unfolded = _deployed_dense(model)
    pairs = conv_norm_pairs(dense_unfolded, example)
    if recalibrate is None:
        checked = compact_and_check(model, masks, fold=True, pairs=pairs)
        compact_model, compact_folded = checked.model, checked.folded
        unfolded = checked.unfolded
    else:
        # Recalibration needs the norms: check unfolded, recalibrate, then fold
        # (checked against the recalibrated network).
        checked = compact_and_check(model, masks, fold=False)
        recalibrate_batchnorm(checked.model, recalibrate, recalibration_batches)
        unfolded = checked.model
        compact_model, compact_folded = fold_and_check(unfolded, size, pairs)
        note = (
            f"compact vs masked momentum subnet, eval mode, random inputs "
            f"{CHECK_BATCH_SIZE}x3x{size}x{size}, checked before BatchNorm "
            "recalibration; the folded model checked against the recalibrated one"
        )
    dense, dense_folded = fold_and_check(dense_unfolded, size, pairs)
    files = _save_models(
        compact_model, folder, size, onnx=onnx, torchscript=torchscript
    )

    # Parameters and MACs are the architectures' (with their norms, as the paper
    # counts; the folded networks' parameters beside them); latencies are the
    # folded networks', as deployed.
    nets = {"dense": dense, "compact": compact_model}
    architectures = {"dense": dense_unfolded, "compact": unfolded}
    sides = {name: _measure(net, example, size) for name, net in architectures.items()}
    for name, side in sides.items():
        side.params_deployed = count_parameters(nets[name])
    speedup, not_timed = Speedup(), dict[str, str]()
    alignment = None
    if latency:
        speedup, not_timed = _time(nets, sides, size, latency_repeats, latency_at_224)
        if round_to is None and "compact/onnxruntime" in _timed_forms(sides):
            alignment = _alignment(model, compact_model, size, latency_repeats)

    return ExportReport(
        backbone=model.hparams["backbone"],
        pruning_ratio=float(model.hparams["pruning_ratio"]),
        resolution=size,
        dense=sides["dense"],
        compact=sides["compact"],
        speedup=speedup,
        equivalence_max_abs_err=checked.max_abs_err,
        equivalence_output_scale=checked.output_scale,
        equivalence_note=note,
        kept_channels=[
            KeptChannels(group.root, int(mask.sum()), group.num_channels)
            for group, mask in zip(model.groups, masks)
        ],
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        device="cpu",
        mac_counter=MAC_COUNTER,
        files=files,
        bn_recalibrated=recalibrate is not None,
        round_to=round_to,
        checkpoint=checkpoint,
        bn_folded={"dense": dense_folded, "compact": compact_folded},
        forms_not_timed=not_timed,
        alignment=alignment,
        aligned_to=int(model.hparams.get("round_to", 1)),
        admm_updates=int(model.admm.num_updates),
    )


def _timed_forms(sides: Mapping[str, NetworkMeasurements]) -> set[str]:
    return {
        f"{name}/{form}" for name, s in sides.items() for form in s.latency_ms_by_form
    }


def _alignment(
    model: MCP, compact_model: nn.Module, size: int, repeats: int
) -> Alignment | None:
    """The compact model and its widenings to :data:`ALIGNMENT_MULTIPLES` channels,
    timed under ONNX Runtime at the training resolution, with the advice they give.
    A widening that changes no mask (MCP chose counts aligned to it: its
    ``round_to``) is not timed; None when none changes any.

    Thin layers whose channel counts are multiples of the vector width often run
    faster than narrower unaligned ones (``benchmarks/RESULTS_inference.md``); what
    it buys depends on the runtime, so it is measured, not assumed.
    """
    variants = {"none": compact_model}
    trained = export_masks(model)
    for multiple in ALIGNMENT_MULTIPLES:
        masks = export_masks(model, multiple)
        if all(torch.equal(a, b) for a, b in zip(masks, trained)):
            continue  # the trained counts are multiples already
        variants[str(multiple)] = compact_and_check(model, masks, fold=True).model
    if len(variants) == 1:
        return None
    runners = {}
    for name, net in variants.items():
        forms, _ = deployed_forms(net, size, forms=("onnxruntime",))
        if "onnxruntime" in forms:
            runners[name] = forms["onnxruntime"]
    bs1 = measure_latency(runners, (1, 3, size, size), repeats)
    bs64 = measure_latency(runners, (64, 3, size, size), repeats)
    latency = {name: PerBatch(bs1[name], bs64[name]) for name in runners}
    macs = {name: count_macs(net, size) for name, net in variants.items()}
    _, best = fastest(latency)
    advice = "the trained channel counts run fastest under ONNX Runtime at batch 64"
    if best.bs64 not in (None, "none") and "none" in latency:
        gain = (latency["none"].bs64 or 0.0) / (latency[best.bs64].bs64 or 1.0)
        if gain >= ALIGNMENT_GAIN:
            extra = macs[best.bs64] / macs["none"] - 1.0
            advice = (
                f"under ONNX Runtime, --round-to {best.bs64} runs batch 64 "
                f"{gain:.2f}x faster than the trained channel counts ({extra:+.0%} "
                f"MACs); re-export with it to deploy there, or prune with "
                f"mcp.round_to: {best.bs64} to choose such counts in training"
            )
    return Alignment("onnxruntime", macs, latency, best, advice)


def _deployed_dense(model: MCP) -> nn.Module:
    """The unpruned momentum encoder as it would be deployed, to compare with
    (before folding).
    """
    dense = copy.deepcopy(model.backbone_momentum)
    merge_split_batchnorm(dense)
    return dense.eval()


def _measure(net: nn.Module, example: Tensor, size: int) -> NetworkMeasurements:
    """Parameters, MACs and feature dimension of ``net`` (before folding: the
    architecture); latencies not timed yet.
    """
    with torch.no_grad():
        feature_dim = int(net(example).shape[-1])
    return NetworkMeasurements(
        params=count_parameters(net),
        macs=count_macs(net, size),
        feature_dim=feature_dim,
        latency_ms=PerBatch(),
        at_224=DeployMeasurements(count_macs(net, DEPLOY_RESOLUTION), PerBatch()),
    )


def _time(
    nets: Mapping[str, nn.Module],
    sides: Mapping[str, NetworkMeasurements],
    size: int,
    repeats: int,
    at_224: bool,
) -> tuple[Speedup, dict[str, str]]:
    """Times ``nets`` in every deployed form into their ``sides``.

    The training resolution is always timed, the deployment resolution if
    ``at_224`` (and when it is the training resolution, its timings are reused).

    Returns:
        Dense over compact latency, each network in its fastest form; and per
        ``network/form`` that could not be built, why.
    """
    by_form, not_timed = _time_at(nets, size, repeats)
    for name, side in sides.items():
        side.latency_ms_by_form = by_form[name]
        side.latency_ms, side.fastest_form = fastest(by_form[name])
    speedup = _speedup(sides["dense"].latency_ms, sides["compact"].latency_ms)
    if size == DEPLOY_RESOLUTION:  # the training resolution is 224 px
        for side in sides.values():
            side.at_224.latency_ms = replace(side.latency_ms)
            side.at_224.fastest_form = replace(side.fastest_form)
            side.at_224.latency_ms_by_form = dict(side.latency_ms_by_form)
        return Speedup(speedup.bs1, speedup.bs64, at_224=replace(speedup)), not_timed
    if not at_224:
        return Speedup(speedup.bs1, speedup.bs64), not_timed
    by_form, not_timed_224 = _time_at(nets, DEPLOY_RESOLUTION, repeats)
    for name, side in sides.items():
        side.at_224.latency_ms_by_form = by_form[name]
        side.at_224.latency_ms, side.at_224.fastest_form = fastest(by_form[name])
    speedup_224 = _speedup(
        sides["dense"].at_224.latency_ms, sides["compact"].at_224.latency_ms
    )
    not_timed.update({f"{k} @{DEPLOY_RESOLUTION}": v for k, v in not_timed_224.items()})
    return Speedup(speedup.bs1, speedup.bs64, at_224=speedup_224), not_timed


def _speedup(dense: PerBatch, compact: PerBatch) -> PerBatch:
    def ratio(d: float | None, c: float | None) -> float | None:
        return d / c if d is not None and c else None

    return PerBatch(ratio(dense.bs1, compact.bs1), ratio(dense.bs64, compact.bs64))


def _time_at(
    nets: Mapping[str, nn.Module], resolution: int, repeats: int
) -> tuple[dict[str, dict[str, PerBatch]], dict[str, str]]:
    """Per network and deployed form, latencies at batch 1 and 64, all timed
    interleaved; and per ``network/form`` that could not be built, why.
    """
    runners: dict[str, Any] = {}
    not_timed: dict[str, str] = {}
    for name, net in nets.items():
        forms, skipped = deployed_forms(net, resolution)
        runners.update({f"{name}/{form}": run for form, run in forms.items()})
        not_timed.update({f"{name}/{form}": why for form, why in skipped.items()})
    bs1 = measure_latency(runners, (1, 3, resolution, resolution), repeats)
    bs64 = measure_latency(runners, (64, 3, resolution, resolution), repeats)
    by_form: dict[str, dict[str, PerBatch]] = {name: {} for name in nets}
    for key in runners:
        name, _, form = key.partition("/")
        by_form[name][form] = PerBatch(bs1[key], bs64[key])
    return by_form, not_timed


def _save_models(
    model: nn.Module,
    folder: Path,
    size: int,
    onnx: bool = True,
    torchscript: bool = False,
) -> ExportFiles:
    """Writes model.pt2, model.pt and, when asked and they export, model.onnx and
    model.ts into ``folder``; each reloaded file is checked against ``model``.
    """
    notes = {"model.pt2": _save_program(model, folder / "model.pt2", size)}
    notes["onnx"] = (
        _save_onnx(model, folder / "model.onnx", size) if onnx else "not asked for"
    )
    torch.save(model, folder / "model.pt")
    notes["model.pt"] = PICKLE_NOTE
    notes["torchscript"] = (
        _save_torchscript(model, folder / "model.ts", size)
        if torchscript
        else "not asked for (TorchScript is deprecated; model.pt2 replaces it)"
    )
    model.eval()
    written = [
        name
        for name in ("model.pt2", "model.onnx", "model.pt", "model.ts")
        if (folder / name).is_file()
    ]
    return ExportFiles(written, notes)


def _check_reloaded(reloaded: Any, model: nn.Module, size: int, what: str) -> float:
    """Max abs difference of a reloaded file from ``model`` (batch 2 and 3).

    Raises:
        ExportError: If it exceeds the equivalence tolerance.
    """
    err = 0.0
    for batch in (2, 3):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            reference = model(x)
            err = max(err, float((reloaded(x) - reference).abs().max()))
        if not err <= CHECK_TOLERANCE * max(1.0, float(reference.abs().max())):
            raise ExportError(
                f"The reloaded {what} differs from the compact model by {err:.3g}."
            )
    return err


def _save_program(model: nn.Module, path: Path, size: int) -> str:
    """Writes the ``torch.export`` program of ``model`` to ``path``; the report's note.

    Raises:
        ExportError: If the network cannot be exported or the reloaded program
            computes something else (``model.pt2`` is the primary deployed file).
    """
    save_program(export_program(model, size), path)
    err = _check_reloaded(load_program(path), model, size, "torch.export program")
    return (
        f"ok (torch.export, eval mode, BatchNorm folded, dynamic batch axis; "
        f"max abs err {err:.3g}); load with lightly_mcp.formats.runtimes.load_program"
    )


def _save_torchscript(model: nn.Module, path: Path, size: int) -> str:
    """Traces ``model`` to ``path`` and checks the reloaded file; the report's note.

    A failed trace is noted and leaves no file; a reloaded model that computes
    something else raises :class:`ExportError`. The check reloads the bytes in
    memory, then exactly those bytes are written (atomically): no file is read back
    from disk, so none swapped in meanwhile is ever run.
    """
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.randn(1, 3, size, size))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        scripted = buffer.getvalue()
        reloaded = torch.jit.load(io.BytesIO(scripted))
    except Exception as error:  # noqa: BLE001 - recorded in the report
        return f"failed: {describe_error(error)[:300]}"
    err = _check_reloaded(reloaded, model, size, "TorchScript model")
    write_bytes_atomic(path, scripted)
    return f"ok (traced, eval mode; max abs err {err:.3g})"


def _save_onnx(model: nn.Module, path: Path, size: int) -> str:
    """Exports ``model`` to ONNX at ``path``; the report's note (a failure is noted
    and leaves no file).
    """
    try:
        save_onnx(model, path, size)
    except ExportError as error:
        cause = error.__cause__
        return f"failed: {describe_error(cause if cause is not None else error)[:300]}"
    return "ok (dynamic batch axis, BatchNorm folded)"


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Renames the finished temporary folder to ``out_dir``.

    Without ``overwrite`` the rename only takes a free name (or an empty folder):
    ``rename(2)`` fails on a folder with entries, so a folder someone created there
    while the export ran is never replaced. With ``overwrite`` the previous export
    is checked again (only its own files) before it is replaced.

    Raises:
        ExportError: If ``out_dir`` now holds something the export must not replace.
    """
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        _refuse_foreign_files(out_dir)
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".export-old-"))
        os.replace(out_dir, old / "previous")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        if os.path.lexists(out_dir) and not (
            out_dir.is_dir() and not out_dir.is_symlink()
        ):
            raise FileExistsError(errno.EEXIST, "exists", str(out_dir))
        os.rename(tmp, out_dir)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise
        raise ExportError(
            f"Output folder '{out_dir}' was created or filled while the export ran; "
            "nothing was replaced. Choose another folder, or pass --overwrite to "
            "replace a previous export there."
        ) from None


#: Name prefix of an export's temporary folder (a sibling of its output folder).
TEMPORARY_PREFIX = ".export-"
#: The file that marks a temporary folder as an export's; locked while it runs.
TEMPORARY_MARKER = ".lightly-mcp-export-in-progress"


def _mark_temporary(folder: Path) -> int:
    """Creates the marker of a temporary export folder and locks it (the kernel
    releases the lock when the process dies). Returns its descriptor.
    """
    fd = os.open(folder / TEMPORARY_MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def stale_temporary_folders(parent: Path) -> list[Path]:
    """The temporary folders in ``parent`` of exports that died (SIGKILL, a crash):
    those holding an export's marker that no live export holds locked. Folders
    without the marker (the user's, whatever their name) are never listed.
    """
    stale: list[Path] = []
    try:
        entries = sorted(Path(parent).glob(f"{TEMPORARY_PREFIX}*"))
    except OSError:
        return stale
    for folder in entries:
        marker = folder / TEMPORARY_MARKER
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink():
            continue
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live export
        finally:
            os.close(fd)
        stale.append(folder)
    return stale
