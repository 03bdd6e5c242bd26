"""BatchNorm: single-device shuffle-BN, its removal, and recalibration.

On one device lightly's ``batch_shuffle`` only permutes the batch, which does nothing
for BatchNorm. ``SplitBatchNorm`` normalises sub-batches separately instead, which is
what MoCo's shuffle-BN achieves on several devices. For deployment the layers are
turned back into plain ``BatchNorm2d`` (identical in eval mode), whose running
statistics :func:`recalibrate_batchnorm` can re-estimate on a few batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightly.models.batchnorm import SplitBatchNorm
from torch import Tensor, nn

from lightly_mcp.errors import ExportError, InputError


def _replace_modules(module: nn.Module, convert: type, make: object) -> int:
    replaced = 0
    for name, child in list(module.named_children()):
        if type(child) is convert:
            setattr(module, name, make(child))  # type: ignore[operator]
            replaced += 1
        else:
            replaced += _replace_modules(child, convert, make)
    return replaced


def use_split_batchnorm(module: nn.Module, num_splits: int) -> int:
    """Replaces every ``nn.BatchNorm2d`` in ``module`` by ``SplitBatchNorm``, in place.

    Affine parameters and running statistics are copied. Returns the count replaced.
    """
    if num_splits < 2:
        raise InputError(f"num_splits must be >= 2, got {num_splits}.")

    def make(bn: nn.BatchNorm2d) -> SplitBatchNorm:
        split = SplitBatchNorm(
            bn.num_features, num_splits, eps=bn.eps, momentum=bn.momentum
        )
        with torch.no_grad():
            split.weight.copy_(bn.weight)
            split.bias.copy_(bn.bias)
            assert bn.running_mean is not None and bn.running_var is not None
            split.running_mean.copy_(bn.running_mean.repeat(num_splits))
            split.running_var.copy_(bn.running_var.repeat(num_splits))
        split.train(bn.training)
        return split

    return _replace_modules(module, nn.BatchNorm2d, make)


def merge_split_batchnorm(module: nn.Module) -> int:
    """Replaces every ``SplitBatchNorm`` by an equivalent ``nn.BatchNorm2d``, in place.

    Running statistics are averaged over the splits (what ``SplitBatchNorm`` uses in
    eval mode), so eval-mode outputs are unchanged. Returns the count replaced.
    """

    def make(split: SplitBatchNorm) -> nn.BatchNorm2d:
        c = split.num_features
        bn = nn.BatchNorm2d(c, eps=split.eps, momentum=split.momentum)
        bn = bn.to(device=split.weight.device, dtype=split.weight.dtype)
        with torch.no_grad():
            bn.weight.copy_(split.weight)
            bn.bias.copy_(split.bias)
            bn.weight.requires_grad_(split.weight.requires_grad)
            bn.bias.requires_grad_(split.bias.requires_grad)
            assert split.running_mean is not None and split.running_var is not None
            bn.running_mean = split.running_mean.view(-1, c).mean(0).clone()
            bn.running_var = split.running_var.view(-1, c).mean(0).clone()
            bn.num_batches_tracked = split.num_batches_tracked
        bn.train(split.training)
        return bn

    return _replace_modules(module, SplitBatchNorm, make)


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

    Raises:
        ExportError: If ``batches`` gives no batch, or a batch without images.
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
