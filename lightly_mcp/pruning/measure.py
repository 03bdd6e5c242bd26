"""Measuring a network the same way everywhere: parameters, MACs and latency.

:func:`eval_mode` is the one way the package switches a network to eval mode for a
while and back; counting and tracing use it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightly_mcp.errors import InputError

MAC_COUNTER = "torch.utils.flop_counter.FlopCounterMode (FLOPs / 2)"
#: Warm-up runs before latency is timed.
WARMUP_RUNS = 3


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Puts ``module`` in eval mode and restores every submodule's mode on exit.

    Each submodule gets back its own training flag, also when the body raises, so
    a network with some layers deliberately in eval mode (e.g. frozen BatchNorm)
    comes back exactly as it was. A subtree that was wholly in training mode is
    restored with ``train()``, so modules that override it (lightly's
    ``SplitBatchNorm``, :class:`lightly_mcp.pruning.momentum_subnet.MomentumSubnet`)
    update what they keep beside their flag; modules that were in eval mode are not
    switched again (switching ``SplitBatchNorm`` to eval averages its statistics).

    Args:
        module: The network.

    Yields:
        ``module``, in eval mode.

    Examples:
        >>> with eval_mode(backbone):
        ...     features = backbone(images)
    """
    training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        _restore_training(module, training)


def _restore_training(module: nn.Module, training: Mapping[nn.Module, bool]) -> None:
    """Gives ``module`` and its submodules the training flags in ``training``."""
    if all(training.get(m, False) for m in module.modules()):
        module.train()
        return
    if module in training:  # not a module the body added
        module.training = training[module]
    for child in module.children():
        _restore_training(child, training)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one ``in_chans × s × s`` image.

    Counted with PyTorch's ``FlopCounterMode`` (convolutions, linear layers and matrix
    products), which sees through subclassed layers such as timm's ``BatchNormAct2d``
    where torch-pruning's counter does not. The module's mode is left unchanged.
    """
    with eval_mode(module):
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, in_chans, input_size, input_size, device=device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(x)
        return int(counter.get_total_flops()) // 2


def measure_latency(
    models: Mapping[str, Callable[[Tensor], Any]],
    input_shape: Sequence[int],
    repeats: int = 20,
    warmup: int = WARMUP_RUNS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median latency in milliseconds of several models, timed interleaved.

    Every model runs ``warmup`` times first; then each repeat runs every model once,
    in turn, so that slow drifts of the machine (turbo, other load) affect all of
    them alike and their ratios are fair. Runs are under ``torch.inference_mode()``
    on one random input of ``input_shape``; ``nn.Module`` models are put in eval mode
    (and left there).

    Args:
        models: Callables taking one tensor (modules, TorchScript, wrappers).
        input_shape: Shape of the input batch, e.g. ``(1, 3, 224, 224)``.
        repeats: Timed runs per model, >= 1.
        warmup: Untimed runs per model before timing.
        clock: Seconds now (wall time). ``time.thread_time`` measures the calling
            thread's CPU time instead: with one thread (PyTorch's and ONNX
            Runtime's), the work of a run without the time other processes take
            the core, for comparisons on a shared machine.

    Returns:
        Per model name, the median latency in milliseconds.
    """
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}.")
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
                start = clock()
                model(x)
                times[name].append(1000.0 * (clock() - start))
    return {name: statistics.median(values) for name, values in times.items()}
