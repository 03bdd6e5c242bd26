"""Where the CPU time of dense vs compact MobileNetV2 goes (eager, BatchNorm folded),
against the machine's peak FLOP rate.

Usage: OMP_NUM_THREADS=2 python benchmarks/profile_inference.py [--ratio 0.73]
       [--batch 64] [--size 224] [--threads 2] [--unfolded]

Both models have random weights and random BatchNorm statistics
(``common.mobilenet_v2_pair``) and are profiled as deployed: BatchNorm folded into the
convolutions (``lightly_mcp.formats.folding.fold_batchnorm``; ``--unfolded`` profiles
them as built). Prints the top operators (torch.profiler, self CPU time) and, per kind
of convolution (depthwise, 1×1, other; forward hooks), its time, MACs and achieved FLOP
rate as a fraction of the peak of a large float32 GEMM at the same thread count
(``common.peak_flops``): the per-operator roofline of ``RESULTS_inference.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import mobilenet_v2_pair, peak_flops  # noqa: E402

from lightly_mcp.formats.folding import fold_batchnorm  # noqa: E402

KINDS = ("depthwise", "1x1", "other conv")


def conv_kind(conv: nn.Conv2d) -> str:
    """``depthwise`` (one input channel per group), ``1x1`` or ``other conv``."""
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise"
    if conv.kernel_size == (1, 1):
        return "1x1"
    return "other conv"


def conv_split(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per kind of convolution: milliseconds and MACs of one forward pass."""
    stats = {kind: {"ms": 0.0, "macs": 0.0, "layers": 0} for kind in KINDS}
    starts: dict[nn.Module, float] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kind = conv_kind(module)

            def pre(m: nn.Module, _inputs: object) -> None:
                starts[m] = time.perf_counter()

            def post(
                m: nn.Module, _i: object, out: torch.Tensor, kind: str = kind
            ) -> None:
                stats[kind]["ms"] += 1e3 * (time.perf_counter() - starts[m])
                assert isinstance(m, nn.Conv2d)
                per_output = (
                    (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                )
                stats[kind]["macs"] += out.numel() * per_output
                stats[kind]["layers"] += 1

            hooks.append(module.register_forward_pre_hook(pre))
            hooks.append(module.register_forward_hook(post))
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.73)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--unfolded", action="store_true", help="do not fold BatchNorm")
    parser.add_argument("--gemm-size", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = peak_flops(args.gemm_size)["flops_per_s"]
    print(
        f"peak ({args.gemm_size}² float32 GEMM, {args.threads} threads): "
        f"{peak / 1e9:.1f} GFLOP/s"
    )
    dense, small = mobilenet_v2_pair(args.ratio)
    if not args.unfolded:
        for model in (dense, small):
            fold_batchnorm(model, torch.randn(2, 3, 32, 32))
    x = torch.randn(args.batch, 3, args.size, args.size)
    state = "as built" if args.unfolded else "BatchNorm folded"
    print(f"bs{args.batch} @{args.size}, eager, {state}")
    for name, model in (("dense", dense), ("compact", small)):
        with torch.inference_mode():
            model(x)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(x)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{name}: total {total / 1e3:.0f} ms")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:5]:
            share = 100 * e.self_cpu_time_total / total
            print(f"   {e.key:32s} {e.self_cpu_time_total / 1e3:8.1f} ms {share:5.1f}%")
        for kind, s in conv_split(model, x).items():
            if not s["layers"]:
                continue
            rate = 2 * s["macs"] / (s["ms"] / 1e3)
            print(
                f"   {kind:10s} {int(s['layers']):3d} layers {s['ms']:8.1f} ms "
                f"{s['macs'] / 1e6:9.1f} MMACs {rate / 1e9:6.1f} GFLOP/s "
                f"({100 * rate / peak:4.1f} % of peak)"
            )


if __name__ == "__main__":
    main()
