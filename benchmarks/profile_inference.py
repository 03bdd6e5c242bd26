"""Where the CPU time of dense vs compact MobileNetV2 goes (bs64 @ 224, eager).

Usage: OMP_NUM_THREADS=2 python benchmarks/profile_inference.py [--ratio 0.73]

Prints the top operators (torch.profiler, self CPU time) and the time spent in
depthwise vs other convolutions (forward hooks) for both models.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import mobilenet_v2_pair
from torch import nn
from torch.profiler import ProfilerActivity, profile


def conv_split(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Milliseconds in depthwise vs other convolutions for one forward pass."""
    times = {"depthwise": 0.0, "other conv": 0.0}
    starts: dict[nn.Module, float] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kind = "depthwise" if module.groups > 1 else "other conv"

            def pre(m: nn.Module, _inputs: object) -> None:
                starts[m] = time.perf_counter()

            def post(m: nn.Module, _i: object, _o: object, kind: str = kind) -> None:
                times[kind] += 1e3 * (time.perf_counter() - starts[m])

            hooks.append(module.register_forward_pre_hook(pre))
            hooks.append(module.register_forward_hook(post))
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.73)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, small = mobilenet_v2_pair(args.ratio)
    x = torch.randn(64, 3, 224, 224)
    for name, model in (("dense", dense), ("compact", small)):
        with torch.inference_mode():
            model(x)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(x)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{name}: total {total / 1e3:.0f} ms")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:4]:
            share = 100 * e.self_cpu_time_total / total
            print(f"   {e.key:32s} {e.self_cpu_time_total / 1e3:8.1f} ms {share:5.1f}%")
        split = {k: round(v) for k, v in conv_split(model, x).items()}
        print(f"   convolutions (ms): {split}")


if __name__ == "__main__":
    main()
