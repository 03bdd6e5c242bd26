"""Training-step cost of MCP against MoCo v2 (target: MCP ≤ 0.9 × MoCo v2).

Models with the same backbone, batch and threads, stepped interleaved in one process
(A, B, C, D, A, B, C, D, ...) so machine noise hits all of them alike:

- ``lightly-example``: a minimal MoCo v2 step written only from lightly's own
  ``examples/pytorch/moco.py`` (backbone + ``MoCoProjectionHead``, ``NTXentLoss`` with
  a memory bank, ``update_momentum``), the reference a lightly user knows;
- ``MoCoV2``: this project's ``lightly_mcp.MoCoV2.training_step``;
- ``MCP``: ``lightly_mcp.MCP.training_step`` with ``frq=0`` (keys from the momentum
  subnet at every step) and the ADMM penalty, keys from the subnet's physically
  pruned copy (``compact_keys=True``, the default);
- ``MCP-masked``: the same with ``compact_keys=False``: keys from the masked forward
  of the full momentum encoder (the reference implementation).

Each step is forward + backward + SGD step. ADMM updates happen every N steps or
epochs and are not part of a step; their cost is printed separately, and so is the
cost of rebuilding the compact copy after a mask change (surgery, check and one key
forward).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/training_step_speed.py \
        --backbone torchvision/mobilenet_v2 --width 0.5 --batch-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import cpu_model
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import update_momentum
from torch import nn

from lightly_mcp import MCP, MoCoV2, build_backbone

warnings.filterwarnings("ignore", message=".*self.log.*")


class LightlyExampleMoCo(nn.Module):
    """The model of lightly's ``examples/pytorch/moco.py`` with our backbone."""

    def __init__(self, backbone: nn.Module, dim: int, batch_norm: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(dim, 2048, 128, batch_norm=batch_norm)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        self.backbone_momentum.requires_grad_(False)
        self.projection_head_momentum.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        query = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(query).detach()


def build_step(
    name: str, args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer, nn.Module]:
    """One model's training step (loss only), its SGD optimizer and the module."""
    kwargs: dict[str, Any] = {"small_input": True}
    if args.width is not None:
        kwargs["width_multiplier"] = args.width
    common = dict(
        backbone=args.backbone,
        backbone_kwargs=kwargs,
        batch_size_per_device=args.batch_size,
        memory_bank_size=4096,
        projection_batch_norm=True,
    )
    size = args.input_size
    generator = torch.Generator().manual_seed(1)
    views = [
        torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
        for _ in range(2)
    ]
    batch = (views, torch.zeros(args.batch_size))

    def sgd(*modules: nn.Module) -> torch.optim.Optimizer:
        params = [p for module in modules for p in module.parameters()]
        return torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)

    step: Callable[[], torch.Tensor]
    if name == "lightly-example":
        backbone = build_backbone(args.backbone, **kwargs)
        example = LightlyExampleMoCo(backbone, backbone.feature_dim, True).to(device)
        criterion = NTXentLoss(memory_bank_size=(4096, 128)).to(device)

        def step() -> torch.Tensor:
            update_momentum(example.backbone, example.backbone_momentum, m=0.99)
            update_momentum(
                example.projection_head, example.projection_head_momentum, m=0.99
            )
            query = example(views[0])
            key = example.forward_momentum(views[1])
            return criterion(query, key)

        return step, sgd(example.backbone, example.projection_head), example
    if name == "MoCoV2":
        model: MoCoV2 = MoCoV2(**common).to(device)
    elif name in ("MCP", "MCP-masked"):
        model = MCP(
            **common,
            pruning_ratio=args.ratio,
            frq=0,
            dr=0,
            input_size=size,
            compact_keys=name == "MCP",
        ).to(device)
    else:
        raise ValueError(f"unknown model {name!r}; use one of {MODELS}")
    return (
        lambda: model.training_step(batch, 0),
        sgd(model.backbone, model.projection_head),
        model,
    )


MODELS = ("lightly-example", "MoCoV2", "MCP", "MCP-masked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="torchvision/mobilenet_v2")
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.73)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="models to step (the ratios need MoCoV2 and the MCP variants)",
    )
    return parser.parse_args(argv)


def describe_setup(args: argparse.Namespace) -> dict[str, Any]:
    """The measured setup, shared by the speed and the memory benchmark."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "backbone": args.backbone,
        "width_multiplier": args.width,
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "pruning_ratio": args.ratio,
        "device": str(args.device),
        "cpu": cpu_model(),
        "torch": torch.__version__,
    }


def run_step(
    step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer
) -> None:
    """Forward + backward + SGD step."""
    loss = step()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compact_rebuild_seconds(model: MCP, views: list[torch.Tensor]) -> float:
    """Seconds to rebuild the compact copy after a mask change: torch-pruning
    surgery, the float64 check against the masked forward and one key forward.
    """
    subnet = model.subnet
    subnet.sync_statistics()
    subnet._drop_compact()
    start = time.perf_counter()
    with torch.no_grad():
        subnet(views[1])
    if views[1].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    built = {name: build_step(name, args, device) for name in args.models}
    times: dict[str, list[float]] = {name: [] for name in built}
    for _, _, module in built.values():
        module.train()
    for i in range(args.warmup + args.steps):
        for name, (step, optimizer, _) in built.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_step(step, optimizer)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result: dict[str, Any] = {
        **describe_setup(args),
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "median_step_seconds": medians,
        "min_step_seconds": {name: min(t) for name, t in times.items()},
    }
    for name in ("MCP", "MCP-masked"):
        if name not in built:
            continue
        mcp = built[name][2]
        assert isinstance(mcp, MCP)
        key = "mcp" if name == "MCP" else "mcp_masked"
        if "MoCoV2" in medians:
            result[f"{key}_over_mocov2"] = medians[name] / medians["MoCoV2"]
        if "lightly-example" in medians:
            result[f"{key}_over_lightly_example"] = (
                medians[name] / medians["lightly-example"]
            )
        if name == "MCP":
            # The compact path must really have computed the keys.
            result["compact_keys_failure"] = mcp.subnet.compact_failure
            result["compact_keys_used"] = mcp.subnet.uses_compact_keys()
            views = [
                torch.randn(args.batch_size, 3, args.input_size, args.input_size).to(
                    device
                )
                for _ in range(2)
            ]
            result["compact_rebuild_seconds"] = compact_rebuild_seconds(mcp, views)
        admm_start = time.perf_counter()
        mcp.admm_update()
        result[f"{key}_admm_update_seconds"] = time.perf_counter() - admm_start
    if "MCP" in medians and "MCP-masked" in medians:
        result["compact_over_masked"] = medians["MCP"] / medians["MCP-masked"]
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
