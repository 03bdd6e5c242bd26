"""Counting parameters and multiply-accumulates, the same way for every network."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

MAC_COUNTER = "torch.utils.flop_counter.FlopCounterMode (FLOPs / 2)"


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one ``in_chans × s × s`` image.

    Counted with PyTorch's ``FlopCounterMode`` (convolutions, linear layers and matrix
    products), which sees through subclassed layers such as timm's ``BatchNormAct2d``
    where torch-pruning's counter does not. The module's mode is left unchanged.
    """
    training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, in_chans, input_size, input_size, device=device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(x)
        return int(counter.get_total_flops()) // 2
    finally:
        module.train(training)
