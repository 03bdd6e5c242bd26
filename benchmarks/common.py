"""Helpers shared by the benchmark scripts (`python benchmarks/<script>.py`)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightly_mcp import compact, find_channel_groups
from lightly_mcp.pruning.masks import leading_masks


def cpu_model() -> str:
    """The CPU model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mobilenet_v2_pair(
    ratio: float, randomise_bn: bool = True
) -> tuple[nn.Module, nn.Module]:
    """Dense torchvision MobileNetV2 (no classifier, random weights, eval mode) and
    its compact version at ``ratio`` in every group, the output group included (the
    paper's setting). With ``randomise_bn`` the BatchNorm statistics are random
    (:func:`randomise_batchnorm`), so that folding them is not trivial."""
    dense = torchvision.models.mobilenet_v2()
    dense.classifier = nn.Identity()
    if randomise_bn:
        randomise_batchnorm(dense)
    dense.eval()
    groups = find_channel_groups(dense, keep_output_dim=False)
    small = compact(dense, groups, leading_masks(groups, ratio)).eval()
    return dense, small


@torch.no_grad()
def randomise_batchnorm(model: nn.Module, seed: int = 0) -> int:
    """Gives every BatchNorm random running statistics and affine parameters, so
    that folding it into the preceding convolution is not the identity.

    Statistics are drawn around a freshly initialised norm's (mean ~ N(0, 0.1²),
    variance ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1²)) so activations
    keep their scale through a deep network. Returns the number of norms changed.
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.running_mean is None or module.running_var is None:
            continue
        n = module.num_features
        module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
        if module.affine:
            module.weight.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.copy_(0.1 * torch.randn(n, generator=generator))
        count += 1
    return count


def peak_flops(
    size: int = 2048, repeats: int = 10, warmup: int = 2
) -> dict[str, float]:
    """The machine's float32 FLOP rate on a large GEMM (``size × size`` matmul), at
    PyTorch's current thread count: the best of ``repeats`` timed products.

    Returns:
        ``{"size", "repeats", "best_s", "median_s", "flops_per_s"}`` where
        ``flops_per_s = 2 · size³ / best_s``.
    """
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            torch.mm(a, b, out=out)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "size": size,
        "repeats": repeats,
        "best_s": best,
        "median_s": statistics.median(times),
        "flops_per_s": 2.0 * size**3 / best,
    }
