"""Dense vs compact MobileNetV2 latency with BatchNorm folded into the convolutions.

Usage: OMP_NUM_THREADS=2 python benchmarks/fold_batchnorm_speed.py [--ratio 0.73]

Folds every Conv-BatchNorm pair with ``torch.fx.experimental.optimization.fuse``
(eval mode), checks that outputs are unchanged, and times dense vs compact
interleaved (``lightly_mcp.measure.measure_latency``) at 224 px, batch 1 and 64, in
NCHW and channels_last.
"""

from __future__ import annotations

import argparse

import torch
from common import mobilenet_v2_pair
from torch.fx.experimental.optimization import fuse

from lightly_mcp.measure import measure_latency


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.73)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, small = mobilenet_v2_pair(args.ratio)
    folded = {"dense": fuse(dense), "compact": fuse(small)}
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        for name, model in (("dense", dense), ("compact", small)):
            error = float((folded[name](x) - model(x)).abs().max())
            print(f"{name}: folding changes outputs by {error:.2e}")
    channels_last = {
        k: v.to(memory_format=torch.channels_last) for k, v in folded.items()
    }
    for label, models in (("folded", folded), ("folded, channels_last", channels_last)):
        for batch, repeats in ((1, 20), (64, 5)):
            fns = {
                k: (lambda t, m=m: m(t.contiguous(memory_format=torch.channels_last)))
                if "channels_last" in label
                else m
                for k, m in models.items()
            }
            ms = measure_latency(fns, (batch, 3, 224, 224), repeats=repeats)
            print(
                f"{label} bs{batch} @224: dense {ms['dense']:.1f} ms, compact "
                f"{ms['compact']:.1f} ms, speedup {ms['dense'] / ms['compact']:.2f}"
            )


if __name__ == "__main__":
    main()
