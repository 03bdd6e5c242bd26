"""Peak memory of an MCP training step against MoCo v2 (and lightly's example step).

Each model runs in its own fresh process (peaks would mix in one), built exactly as in
``training_step_speed.py`` (same backbone, batch, memory bank and ratio; MCP with
``frq=0``, keys from the momentum subnet at every step). Reported per model:

- ``state_bytes``: parameters and buffers of the module (for MCP this includes Z, U
  and the masks) plus the SGD momentum buffers after the first step;
- ``step_peak_bytes``: on CPU, the process's peak resident memory (VmHWM, reset
  through ``/proc/self/clear_refs`` just before the first step, so that building the
  model does not count) during warm-up + measured steps minus its resident memory
  just before the first step, i.e. what a training step needs on top of the model
  (activations, gradients, optimizer state, allocator slack); on CUDA,
  ``torch.cuda.max_memory_allocated`` minus the allocation before the first step;
- ``peak_rss_bytes`` (CPU): the process's peak resident memory during the steps,
  interpreter, libraries and model included.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/training_step_memory.py --width 0.5 \\
        --batch-size 64 --steps 5 --out benchmarks/results/training_step_memory.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any

import torch
from training_step_speed import (
    MODELS,
    build_step,
    describe_setup,
    parse_args,
    run_step,
)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(name: str, argv: list[str]) -> dict[str, Any]:
    """One model's memory, in this process (call in a fresh one)."""
    args = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    step, optimizer, module = build_step(name, args, device)
    module.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        before = _current_rss_bytes()
    for _ in range(args.warmup + args.steps):
        run_step(step, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    state = _tensor_bytes(module.parameters()) + _tensor_bytes(module.buffers())
    state += _tensor_bytes(
        v
        for per_param in optimizer.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )
    result = {"state_bytes": state, "step_peak_bytes": peak - before}
    if device.type != "cuda":
        result["peak_rss_bytes"] = peak
        result["peak_reset_before_steps"] = int(reset)
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], sys.argv[3:])))
        return
    args = parse_args()
    forwarded = list(sys.argv[1:])
    if "--out" in forwarded:
        i = forwarded.index("--out")
        del forwarded[i : i + 2]
    per_model = {}
    for name in MODELS:
        child = subprocess.run(
            [sys.executable, __file__, "--child", name, *forwarded],
            check=True,
            capture_output=True,
            text=True,
        )
        per_model[name] = json.loads(child.stdout.strip().splitlines()[-1])
    mib = 2**20
    result = {
        **describe_setup(args),
        "steps": args.warmup + args.steps,
        "per_model_bytes": per_model,
        "per_model_mib": {
            name: {k: round(v / mib, 1) for k, v in values.items() if "bytes" in k}
            for name, values in per_model.items()
        },
        "mcp_over_mocov2_step_peak": per_model["MCP"]["step_peak_bytes"]
        / per_model["MoCoV2"]["step_peak_bytes"],
        "mcp_over_mocov2_state": per_model["MCP"]["state_bytes"]
        / per_model["MoCoV2"]["state_bytes"],
    }
    if "peak_rss_bytes" in per_model["MCP"]:
        result["mcp_over_mocov2_peak_rss"] = (
            per_model["MCP"]["peak_rss_bytes"] / per_model["MoCoV2"]["peak_rss_bytes"]
        )
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
