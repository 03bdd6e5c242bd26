"""CPU inference speed of a dense backbone vs its compact (channel-pruned) copy.

No checkpoint is needed: the backbone has random weights and every channel group keeps
its first n_g channels (``leading_masks``), which gives exactly the architecture an
MCP run at the same ratio exports. Latencies are medians of dense/compact runs timed
interleaved (``lightly_mcp.measure.measure_latency``).

Example:
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/inference_speed.py \
        --ratio 0.73 --backbone torchvision/mobilenet_v2 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import cpu_model
from torch import Tensor, nn

from lightly_mcp.backbones import build_backbone
from lightly_mcp.compaction import compact
from lightly_mcp.masks import leading_masks, round_masks
from lightly_mcp.measure import (
    MAC_COUNTER,
    count_macs,
    count_parameters,
    measure_latency,
)
from lightly_mcp.prunable_groups import find_channel_groups

SETTINGS = [(1, 32), (64, 32), (1, 224), (64, 224)]


def channels_last(model: nn.Module) -> Callable[[Tensor], Any]:
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    return lambda x: model(x.contiguous(memory_format=torch.channels_last))


def frozen_script(model: nn.Module) -> Callable[[Tensor], Any]:
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), torch.randn(1, 3, 32, 32))
    return torch.jit.freeze(traced)


def onnx_runtime(model: nn.Module, folder: Path, name: str, threads: int) -> Any:
    import onnxruntime as ort

    path = folder / f"{name}.onnx"
    torch.onnx.export(
        model.eval(),
        (torch.randn(1, 3, 32, 32),),
        str(path),
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}, "features": {0: "b"}},
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x.numpy()})


def time_row(
    dense: Callable[[Tensor], Any],
    compact_model: Callable[[Tensor], Any],
    repeats: dict[tuple[int, int], int],
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for batch, size in SETTINGS:
        n = repeats[(batch, size)]
        ms = measure_latency(
            {"dense": dense, "compact": compact_model},
            (batch, 3, size, size),
            n,
            warmup=1 if n <= 5 else 3,
        )
        row[f"bs{batch}@{size}"] = {
            "dense_ms": ms["dense"],
            "compact_ms": ms["compact"],
            "speedup": ms["dense"] / ms["compact"],
            "repeats": n,
        }
        print(
            f"    bs{batch}@{size}: dense {ms['dense']:.2f} ms, compact "
            f"{ms['compact']:.2f} ms, speedup {ms['dense'] / ms['compact']:.2f}",
            flush=True,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.73)
    parser.add_argument("--backbone", default="torchvision/mobilenet_v2")
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--width", type=float, default=None, help="width multiplier")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="bs1 repeats")
    parser.add_argument("--repeats-bs64", type=int, default=10, help="bs64@32")
    parser.add_argument("--repeats-bs64-224", type=int, default=3)
    parser.add_argument("--round-to", type=int, default=8, help="0: skip that row")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True
    )
    parser.add_argument("--no-script", action="store_true")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/inference_speed.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = {
        (1, 32): args.repeats,
        (1, 224): args.repeats,
        (64, 32): args.repeats_bs64,
        (64, 224): args.repeats_bs64_224,
    }
    environment = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mac_counter": MAC_COUNTER,
    }
    try:
        import onnxruntime

        environment["onnxruntime_version"] = onnxruntime.__version__
    except ImportError:
        environment["onnxruntime_version"] = None
    print(json.dumps(environment, indent=2))

    width = {} if args.width is None else {"width_multiplier": args.width}
    dense = build_backbone(args.backbone, small_input=args.small_input, **width).eval()
    example = torch.randn(1, 3, 32, 32)
    groups = find_channel_groups(dense, example, keep_output_dim=False)
    masks = leading_masks(groups, args.ratio)
    compact_model = compact(dense, groups, masks, example).eval()
    models = {"compact": compact_model}
    if args.round_to:
        wide = round_masks(dense, groups, masks, args.round_to)
        models[f"compact_round{args.round_to}"] = compact(
            dense, groups, wide, example
        ).eval()

    sizes: dict[str, Any] = {}
    for name, net in {"dense": dense, **models}.items():
        sizes[name] = {
            "params": count_parameters(net),
            "macs@32": count_macs(net, 32),
            "macs@224": count_macs(net, 224),
        }
    for name in models:
        removed = 1 - sizes[name]["params"] / sizes["dense"]["params"]
        sizes[name]["params_removed"] = removed
        sizes[name]["macs_ratio@32"] = (
            sizes["dense"]["macs@32"] / sizes[name]["macs@32"]
        )
        sizes[name]["macs_ratio@224"] = (
            sizes["dense"]["macs@224"] / sizes[name]["macs@224"]
        )
        print(
            f"{name}: params {sizes['dense']['params']:,} -> "
            f"{sizes[name]['params']:,} ({100 * removed:.1f} % removed), MACs ratio "
            f"@32 {sizes[name]['macs_ratio@32']:.2f}, "
            f"@224 {sizes[name]['macs_ratio@224']:.2f}",
            flush=True,
        )

    rows: dict[str, Any] = {}
    print("eager (NCHW)", flush=True)
    rows["eager"] = time_row(dense, compact_model, repeats)
    if args.channels_last:
        print("eager channels_last", flush=True)
        rows["channels_last"] = time_row(
            channels_last(dense), channels_last(compact_model), repeats
        )
        dense.to(memory_format=torch.contiguous_format)  # type: ignore[call-arg]
        compact_model.to(memory_format=torch.contiguous_format)  # type: ignore[call-arg]
    if args.round_to:
        name = f"compact_round{args.round_to}"
        print(f"eager, round_to={args.round_to}", flush=True)
        rows[f"round_to_{args.round_to}"] = time_row(dense, models[name], repeats)
    if not args.no_script:
        print("TorchScript trace + freeze", flush=True)
        rows["torchscript_frozen"] = time_row(
            frozen_script(dense), frozen_script(compact_model), repeats
        )
    if not args.no_onnx:
        print("ONNX Runtime (CPUExecutionProvider)", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            try:
                rows["onnxruntime"] = time_row(
                    onnx_runtime(dense, Path(folder), "dense", args.threads),
                    onnx_runtime(compact_model, Path(folder), "compact", args.threads),
                    repeats,
                )
            except Exception as error:  # noqa: BLE001 - reported
                rows["onnxruntime"] = {"failed": f"{type(error).__name__}: {error}"}
                print(f"    failed: {rows['onnxruntime']['failed']}")

    result = {
        "command_args": vars(args),
        "environment": environment,
        "backbone": args.backbone,
        "ratio": args.ratio,
        "keep_output_dim": False,
        "sizes": sizes,
        "latency": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
