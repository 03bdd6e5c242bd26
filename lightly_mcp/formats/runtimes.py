"""Deployed forms: a network as eager PyTorch, as a ``torch.export`` program and in
ONNX Runtime, and the code-free files that hold the last two.

- ``model.pt2``: a ``torch.export`` program with a dynamic batch axis
  (:func:`save_program`). :func:`load_program` reads it without running anything
  from the file (it checks the archive first, see :mod:`lightly_mcp.io.model_files`).
- ``model.onnx``: ONNX with a dynamic batch axis (:func:`save_onnx`), run with ONNX
  Runtime's CPU provider (:func:`onnx_runner`), only for the file export has just
  written (ONNX files from users are never read).

:func:`deployed_forms` gives one network in every form this machine can run, as
callables taking an image batch, for timing them side by side; :func:`onnx_network`
gives the ONNX Runtime form as a module (the evaluation embeds images with it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightly_mcp.errors import ExportError, describe_error
from lightly_mcp.io.model_files import ExportedNetwork as ExportedNetwork  # re-exported
from lightly_mcp.io.model_files import load_program as load_program  # re-exported
from lightly_mcp.io.model_files import save_program as save_program  # re-exported

#: The forms :func:`deployed_forms` can give, fastest first on typical CPUs.
FORMS = ("onnxruntime", "torch.export", "eager")
#: The batch size a program is traced with (1 would be specialised by torch.export).
_TRACE_BATCH = 2


# --- torch.export -------------------------------------------------------------------
def export_program(model: nn.Module, size: int) -> torch.export.ExportedProgram:
    """``model`` (eval mode) as a ``torch.export`` program for ``3×size×size`` images,
    any batch size.

    Raises:
        ExportError: If ``torch.export`` cannot trace the network.
    """
    example = torch.randn(_TRACE_BATCH, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with torch.no_grad():
            return torch.export.export(
                model.eval(), (example,), dynamic_shapes=({0: batch},)
            )
    except Exception as error:  # noqa: BLE001 - any tracing failure
        raise ExportError(
            f"torch.export cannot trace the network: {describe_error(error)[:300]}"
        ) from error


# --- ONNX ---------------------------------------------------------------------------
def save_onnx(model: nn.Module, path: str | Path, size: int) -> None:
    """Writes ``model`` (eval mode) as ONNX with a dynamic batch axis.

    Raises:
        ExportError: If the exporter fails (no file is left behind).
    """
    path = Path(path)
    try:
        torch.onnx.export(
            model.eval(),
            (torch.randn(1, 3, size, size),),
            str(path),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            dynamo=False,
        )
    except Exception as error:  # noqa: BLE001 - any exporter failure
        for leftover in path.parent.glob(f"{path.name}*"):
            leftover.unlink()
        raise ExportError(
            f"ONNX export failed: {describe_error(error)[:300]}"
        ) from error


def onnx_runner(
    path: str | Path, threads: int | None = None
) -> Callable[[Tensor], Tensor]:
    """A callable running the ONNX model at ``path`` with ONNX Runtime on the CPU.

    Args:
        path: An ONNX file with one image input and one output.
        threads: Intra-op threads (PyTorch's thread count if None).

    Raises:
        ImportError: If onnxruntime is not installed (``pip install
            lightly-mcp[onnx]``).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # ONNX Runtime's worker threads spin after each run by default, taking the cores
    # from whatever runs next (another model timed interleaved, the caller's own
    # work); they wait without spinning here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        (out,) = session.run(None, {name: x.detach().cpu().numpy()})
        return torch.from_numpy(out)

    return run


# --- all forms ----------------------------------------------------------------------
def deployed_forms(
    model: nn.Module, size: int, forms: tuple[str, ...] = FORMS
) -> tuple[dict[str, Callable[[Tensor], Any]], dict[str, str]]:
    """``model`` in each of ``forms`` this machine can run.

    Args:
        model: The network as deployed (eval mode, BatchNorm folded if wanted).
        size: The image size the programs are traced for.
        forms: Which of :data:`FORMS` to build.

    Returns:
        Per form, a callable taking an image batch; and per form that could not be
        built, why (e.g. onnxruntime not installed, a tracing failure).
    """
    runners: dict[str, Callable[[Tensor], Any]] = {}
    skipped: dict[str, str] = {}
    for form in forms:
        try:
            if form == "eager":
                runners[form] = model.eval()
            elif form == "torch.export":
                runners[form] = ExportedNetwork(export_program(model, size))
            elif form == "onnxruntime":
                runners[form] = _onnx_in_memory(model, size)
            else:
                raise ValueError(f"unknown form '{form}'; choose from {FORMS}")
        except (ExportError, ImportError) as error:
            skipped[form] = describe_error(error)[:300]
    return runners, skipped


def _onnx_in_memory(model: nn.Module, size: int) -> Callable[[Tensor], Tensor]:
    import onnxruntime  # noqa: F401 - fail before exporting when it is missing

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        save_onnx(model, path, size)
        return onnx_runner(path)


class OnnxRuntimeNetwork(nn.Module):
    """A network run by ONNX Runtime on the CPU, as a module without parameters.

    Made by :func:`onnx_network`; its ``forward`` takes a float32 image batch on the
    CPU in any memory layout and returns the network's output as a CPU tensor.
    """

    def __init__(self, runner: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self._runner = runner

    def forward(self, images: Tensor) -> Tensor:
        """The network's output for ``images`` (made C-contiguous for ONNX Runtime)."""
        return self._runner(images.contiguous())


def onnx_network(model: nn.Module, size: int) -> OnnxRuntimeNetwork:
    """``model`` (eval mode) exported to ONNX in memory and run by ONNX Runtime.

    ONNX Runtime fuses BatchNorm into the convolutions and runs small CNNs on the
    CPU 1.7-3x faster than eager PyTorch (benchmarks/RESULTS_evaluation.md).

    Raises:
        ImportError: If onnxruntime is not installed.
        ExportError: If the network cannot be exported to ONNX.
    """
    return OnnxRuntimeNetwork(_onnx_in_memory(model, size))
