"""BatchNorm: single-device shuffle-BN, its removal, and recalibration.

On one device lightly's ``batch_shuffle`` only permutes the batch, which does nothing
for BatchNorm. ``SplitBatchNorm`` normalises sub-batches separately instead, which is
what MoCo's shuffle-BN achieves on several devices. :class:`ShuffleBatchNorm` is
lightly's layer that also takes ``channels_last`` inputs (lightly's reshapes them with
``view``, which fails on that layout). For deployment the layers are turned back into
plain ``BatchNorm2d`` (identical in eval mode), whose running statistics
:func:`recalibrate_batchnorm` can re-estimate on a few batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightly.models.batchnorm import SplitBatchNorm
from torch import Tensor, nn

from lightly_mcp.errors import ExportError, InputError


def _replace_modules(
    module: nn.Module, convert: type, make: object, subclasses: bool = False
) -> int:
    replaced = 0
    for name, child in list(module.named_children()):
        if type(child) is convert or (subclasses and isinstance(child, convert)):
            setattr(module, name, make(child))  # type: ignore[operator]
            replaced += 1
        else:
            replaced += _replace_modules(child, convert, make, subclasses)
    return replaced


class _ChannelsLastSplitNorm(torch.autograd.Function):
    """Training-mode ``SplitBatchNorm`` of a ``channels_last`` batch, in its layout.

    Split ``j`` holds images ``j, j + s, j + 2s, ...`` as in lightly's layer (whose
    ``view`` to ``(N / s, s·C, H, W)`` groups them so). In ``channels_last`` memory the
    batch is ``(N / s, s, H·W, C)`` contiguous: statistics reduce over dimensions 0
    and 2, and the output and the gradient keep the layout, without the transposing
    copies that going through lightly's contiguous path takes.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_splits: int,
        momentum: float,
        eps: float,
    ) -> Tensor:
        n_images, c, h, w = x.shape
        grouped = x.permute(0, 2, 3, 1).reshape(
            n_images // num_splits, num_splits, -1, c
        )
        count = grouped.shape[0] * grouped.shape[2]
        if count < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input "
                f"size {list(x.shape)} with {num_splits} splits"
            )
        mean = grouped.sum(0).sum(1) / count  # (num_splits, C)
        centered = grouped - mean[:, None, :]
        var = (centered * centered).sum(0).sum(1) / count
        if running_mean is not None and running_var is not None:
            running_mean.view(num_splits, c).lerp_(mean, momentum)
            unbiased = var * (count / (count - 1))
            running_var.view(num_splits, c).lerp_(unbiased, momentum)
        rstd = (var + eps).rsqrt()
        scale = rstd * weight
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(
            bias,
            centered,
            scale[:, None, :],
            out=out.permute(0, 2, 3, 1).view(grouped.shape),
        )
        ctx.save_for_backward(grouped, mean, rstd, weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grouped, mean, rstd, weight = ctx.saved_tensors
        count = grouped.shape[0] * grouped.shape[2]
        grad_grouped = grad.permute(0, 2, 3, 1).reshape(grouped.shape)
        sum_grad = grad_grouped.sum(0).sum(1)
        sum_grad_x = (grad_grouped * grouped).sum(0).sum(1)
        sum_grad_xhat = rstd * (sum_grad_x - mean * sum_grad)
        scale = rstd * weight
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)) = a * g + b * x + c
        b = -scale * rstd * sum_grad_xhat / count
        c = -scale * sum_grad / count - b * mean
        grad_x = torch.empty_like(grad, memory_format=torch.channels_last)
        grad_x_grouped = grad_x.permute(0, 2, 3, 1).view(grouped.shape)
        torch.addcmul(
            c[:, None, :], grad_grouped, scale[:, None, :], out=grad_x_grouped
        )
        grad_x_grouped.addcmul_(grouped, b[:, None, :])
        return (grad_x, sum_grad_xhat.sum(0), sum_grad.sum(0), *(None,) * 5)


class ShuffleBatchNorm(SplitBatchNorm):
    """lightly's ``SplitBatchNorm`` that also takes ``channels_last`` batches.

    Contiguous inputs and eval mode run lightly's code unchanged; a ``channels_last``
    batch in train mode is normalised in its own layout (same splits, same running
    statistics, equal outputs and gradients up to float rounding), so a backbone can
    run ``channels_last`` end to end (faster convolutions on CPU).
    """

    def forward(self, input: Tensor) -> Tensor:
        """``SplitBatchNorm``'s forward, in the input's memory layout."""
        if not (self.training or not self.track_running_stats):
            return super().forward(input)  # no view: any layout
        channels_last = (
            input.dim() == 4
            and not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last)
        )
        if not channels_last:
            return super().forward(input.contiguous())
        momentum = 0.0 if self.momentum is None else self.momentum
        out: Tensor = _ChannelsLastSplitNorm.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.num_splits,
            momentum,
            self.eps,
        )
        return out


def use_split_batchnorm(module: nn.Module, num_splits: int) -> int:
    """Replaces every ``nn.BatchNorm2d`` in ``module`` by a
    :class:`ShuffleBatchNorm` (lightly's ``SplitBatchNorm``), in place.

    Affine parameters and running statistics are copied. Returns the count replaced.
    """
    if num_splits < 2:
        raise InputError(f"num_splits must be >= 2, got {num_splits}.")

    def make(bn: nn.BatchNorm2d) -> SplitBatchNorm:
        split = ShuffleBatchNorm(
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

    return _replace_modules(module, SplitBatchNorm, make, subclasses=True)


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
