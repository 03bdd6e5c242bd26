"""Accuracy benchmark: the paper's experiment grid at CPU scale on Fashion-MNIST.

Shaped like lightly's ``benchmarks/imagenet/resnet50/main.py``: a registry ``METHODS``
of ``{"model": <builds a LightningModule>, "transform": ...}`` and one entry point.
All settings come from ``recipes/fashion_mnist_mobilenetv2.yaml`` (32x32 3-channel
Fashion-MNIST, torchvision MobileNetV2 width 0.5 with the small-input stem), loaded
with ``lightly_mcp.app.recipe.load_recipe`` and ``--set section.key=value`` overrides.
The models, data and trainers are built by the package: MCP, MoCo v2, data and
trainer through ``lightly_mcp.app.assemble`` (an MCP row is the recipe with its ratio
and ablation set), the comparison methods from ``lightly_mcp.benchmarking.baselines``;
this file holds the grid's protocol (rows, budgets, seeds, the transition scaling, the
results files).

The protocol matches the paper's *penalty response*, not its step count (issue "The
paper's promise, measured"): every pruning row trains ``mcp.max_steps`` = 1,200 SGD
steps at batch 128 on the recipe's fixed-seed 20k-image subset; MCP runs the recipe's
converging schedule (DESIGN.md section 8): 4 ADMM blocks of 300 steps (3 / (1 − m),
so that θ_k follows θ_q within a block), the paper's step-down learning rate
restarting every block, ρ derived for a θ-response of 2 per block, keys from the full
momentum encoder until the mask holds (``stable_mask``), the last block with the mask
frozen, the subnet's BatchNorm recalibrated at the end.

The grid (the paper's Tables 1-4, Figs. 3 and 4, DESIGN.md section 3):

- the shared dense MoCo v2 model: ``pretrain.dense_checkpoint`` (the checkpoint
  shipped in ``pretrained/``, 16 epochs of all 60k images; sha256-verified on load);
  with ``pretrain.dense_checkpoint=null`` the benchmark pretrains its own
  (``pretrain`` section, cached in ``OUT/pretrain_seed0``);
- ``dense``: that model's momentum encoder (and its query encoder, reported beside
  it). With the shipped model its seeds vary only the linear probe;
- ``typical_pruning``: filter-magnitude pruning of the dense momentum encoder (top
  n_g channels per group by ``channel_scores``), query and key encoders compacted
  with those masks, then MoCo v2 (one cosine) for the pruning budget;
- ``scratch_small``: the compact architecture from random init, MoCo v2 on all
  training images for the pretraining budget (``pretrain.epochs`` epochs) plus the
  pruning budget;
- ``random_mask``: a random mask and the masked momentum update
  θ_k ← m·θ_k + φ ⊙ (1−m)·θ_q with θ_k⁰ = φ ⊙ θ_q (Eq. 3), from the dense model,
  the pruning budget;
- ``supervised_small``: the compact architecture trained with the labels
  (cross-entropy) from random init for ``scratch_small``'s budget on all images (the
  paper's Fig. 3 red line);
- ``transfer_pruning``: the dense momentum encoder fine-tuned with the labels for the
  pruning budget, filter-magnitude pruned, fine-tuned with the labels for the same
  budget again (Fig. 4);
- ``distill`` / ``pruned_distill``: label-free SEED distillation of the dense model
  (teacher: its momentum encoder and head, frozen) into the r = 0.76 architecture,
  from random init / from the magnitude-pruned dense weights, at MCP's wall-clock
  budget: ``mcp_r0.76``'s training seconds of the same seed divided by one
  distillation step's seconds, timed over 20 steps just before the run
  (``distill_steps``; the rule and its numbers are in the row's JSON);
- ``mcp_r0.31`` / ``mcp_r0.52`` / ``mcp_r0.76``: MCP removing 50.0 % / 74.7 % /
  92.6 % of the backbone's parameters (uniform ratios from
  ``solve_pruning_ratio(..., target=0.5 / 0.75 / 0.927, "params")`` on
  ``keep_output_dim=False`` groups, rounded to two decimals);
- the ρ ablation at r = 0.76: a fixed ρ of ×10 and ×0.1 the derived ρ
  (``mcp_r0.76_rho_x10``, ``..._rho_x0.1``; ×1 is ``mcp_r0.76`` itself), the
  paper's {0.1, 0.01, 0.001} around its best;
- the transition ablation at r = 0.76 (Table 4): the paper's (frq, dr) = (100, 1)
  scaled to the run, (1, 0) and (0, 0) (``mcp_r0.76_frq100_dr1``, ``..._frq1_dr0``,
  ``..._frq0_dr0``), against the recipe's ``stable_mask`` (``mcp_r0.76``); (1, 0)
  with 3 seeds, since its seed 0 beat ``stable_mask`` by more than 2 points;
- the budget rows ``mcp_r0.76_budget_x2`` and ``scratch_small_budget_x2``: the
  pruning phase twice as long (``scaled_budget``: MCP 4 blocks of 600 steps, the
  small network its pretraining budget plus 2,400 steps), to measure what budget
  the 92 % target needs;
- ``mcp_r0.76_frozen_hard``: the frozen block with θ_q's dropped channels held at
  zero (``frozen_mask: hard``) instead of pulled there by a penalty;
- ``mcp_r0.76_fixed_mask``: the dense model's magnitude mask kept at every ADMM
  update (``mcp.mask_updates: fixed``), with the same schedule and subnet keys: what
  ADMM's changing mask adds.

All pruned rows prune ``keep_output_dim=False`` groups (the feature dimension is
pruned too) at the same ratio, so their compact networks have the same size.

Transition scaling: the paper's (frq, dr) = (100, 1) spends 5,150 iterations with
keys from the full momentum encoder in a 450-epoch pruning phase of 195 iterations per
epoch (CIFAR-10, batch 256), i.e. 5.87 % of the phase. Here ``(100, 1)`` means the
largest frq with dr = 1 whose transition fits in the same 5.87 % of this run's
pruning steps (``scaled_frq``; 1,200 steps → frq = 10, 65 iterations). (1, 0) and
(0, 0) do not depend on the run length and are used as they are.

Every configuration writes ``OUT/<name>_seed<k>.json`` (atomically) with kNN and
linear-probe top-1 (10k test images, 60k bank, 30-epoch probe: the recipe's
``eval`` section), each ``eval.transfer`` evaluation of the recipe under
``"transfer"`` (e.g. the classes ``data.classes`` held out, and digits), parameters,
MACs, wall time, the command, the commit and the machine, and keeps its result
network as ``OUT/models/<name>_seed<k>.pt2`` (``torch.export``, code-free; read with
``lightly_mcp.io.model_files.load_program``) so that later evaluations need no
retraining; configurations whose JSON exists are skipped, and an interrupted training
resumes from its ``last.ckpt`` (written every epoch). The headline rows (dense,
typical pruning, small from scratch, MCP at 92 %) run first, then the other MCP
ratios, the headline rows' seeds 1 and 2, and the remaining rows (``grid_order``).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/accuracy/main.py            # full grid
    OMP_NUM_THREADS=2 python benchmarks/accuracy/main.py --quick    # smoke run
    python benchmarks/accuracy/main.py --only typical_pruning --device cuda
    python benchmarks/accuracy/main.py --recipe recipes/OTHER.yaml --out OTHER_DIR
    python benchmarks/accuracy/report.py benchmarks/accuracy/results
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning import LightningModule
from torch import Tensor, nn

from lightly_mcp.app.assemble import (
    IN_DOMAIN,
    evaluation_data,
    evaluation_names,
    mcp_model,
    moco_kwargs,
    recipe_backbone,
    recipe_dataset,
    trainer_for,
    training_data,
)
from lightly_mcp.app.pipeline import pretrain
from lightly_mcp.app.recipe import Recipe, load_recipe, validate
from lightly_mcp.benchmarking.baselines import (
    CompactMoCoV2,
    DistilledSmall,
    RandomMaskMoCoV2,
    SupervisedClassifier,
    supervised_transform,
)
from lightly_mcp.benchmarking.evaluation import evaluate_backbone
from lightly_mcp.formats.runtimes import export_program
from lightly_mcp.io.files import write_json_atomic
from lightly_mcp.io.model_files import load_program, save_program
from lightly_mcp.methods.checkpoints import read_checkpoint
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.methods.transforms import build_transform
from lightly_mcp.pruning.batchnorm import merge_split_batchnorm
from lightly_mcp.pruning.measure import MAC_COUNTER, count_macs, count_parameters
from lightly_mcp.pruning.schedule import BlockSchedule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/common.py
from common import cpu_model  # noqa: E402

warnings.filterwarnings("ignore", message=".*does not have many workers.*")

REPO = HERE.parents[1]
RECIPE = REPO / "recipes" / "fashion_mnist_mobilenetv2.yaml"
DEFAULT_OUT = HERE / "results"

# Uniform channel ratios (keep_output_dim=False groups) and the fraction of backbone
# parameters they remove, from solve_pruning_ratio at 32 px (MobileNetV2 width 0.5).
RATIOS = {0.31: 0.4997, 0.52: 0.7465, 0.76: 0.9264}
R92 = 0.76

# The paper's transition (frq=100, dr=1: 5,150 iterations) over its pruning phase
# (450 epochs x 195 iterations of batch 256 on CIFAR-10's 50k images).
PAPER_TRANSITION_FRACTION = 5150 / (450 * (50000 // 256))

QUICK_OVERRIDES = [
    "data.subset=512",
    "pretrain.epochs=1",
    "pretrain.max_steps=8",
    "mcp.max_steps=12",
    "mcp.admm_interval=4",
    "mcp.rho_response=0.02",
    "eval.train_subset=1000",
    "eval.test_subset=500",
    "eval.linear_epochs=10",
]


# --- the registry -------------------------------------------------------------------
@dataclass
class Context:
    """What a registry entry needs to build its model.

    ``fit(model, steps, phase)`` trains a model of an earlier phase of the row (e.g.
    transfer pruning's dense fine-tune) on the row's data, resumably, in
    ``run_dir/phase``; ``run_dir`` holds the row's files.
    """

    recipe: Recipe
    dense_checkpoint: Path
    seed: int
    run_dir: Path | None = None
    fit: Callable[[LightningModule, int, str], None] | None = None


def full_training_set(recipe: Recipe) -> int:
    """Training images of the recipe's data without its subset (60,000 for
    Fashion-MNIST; 30,000 for five of its classes)."""
    return len(recipe_dataset(recipe, train=True, classes=recipe.data.classes))


def pruning_steps(recipe: Recipe) -> int:
    """SGD steps of the pruning phase (``mcp.max_steps``, else ``mcp.epochs`` over
    the data subset)."""
    m = recipe.mcp
    if m.max_steps > 0:
        return m.max_steps
    images = recipe.data.subset or full_training_set(recipe)
    return m.epochs * (images // m.batch_size)


def pretraining_steps(recipe: Recipe) -> int:
    """SGD steps of the dense pretraining (``pretrain.epochs`` over all images)."""
    p = recipe.pretrain
    if p.max_steps > 0:
        return p.max_steps
    return p.epochs * (full_training_set(recipe) // p.batch_size)


def scaled_budget(recipe: Recipe, factor: int) -> Recipe:
    """The recipe with its pruning phase ``factor`` times as long: ``mcp.max_steps``
    and the ADMM block length scaled together, so that the schedule keeps its shape
    (the same number of blocks, each ``factor`` times longer; ρ is derived per block
    for the same θ-response). The budget rows (``*_budget_x2``) use it."""
    if factor == 1:
        return recipe
    m = recipe.mcp
    if m.admm_interval_unit != "steps":
        raise ValueError("budget rows need mcp.admm_interval_unit: steps")
    mcp = dataclasses.replace(
        m,
        max_steps=factor * pruning_steps(recipe),
        admm_interval=factor * m.admm_interval,
    )
    return dataclasses.replace(recipe, mcp=mcp)


def transition_length(frq: int, dr: int) -> int:
    """Iterations until every key comes from the subnet (math.inf if never)."""
    if frq <= 0:
        return 0
    if dr <= 0:
        return math.inf  # type: ignore[return-value]
    total, f = 0, frq
    while f > 0:
        total += f + 1
        f -= dr
    return total


def scaled_frq(steps: int, fraction: float = PAPER_TRANSITION_FRACTION) -> int:
    """Largest frq (dr = 1) whose transition fits in ``fraction`` of ``steps`` (≥ 1)."""
    frq = 1
    while transition_length(frq + 1, 1) <= fraction * steps:
        frq += 1
    return frq


def derived_rho(recipe: Recipe) -> float:
    """The ρ that ``mcp.rho_response`` derives for the first block of the recipe's
    pruning phase (every block's, with the block schedules).

    The ρ ablation scales this value: ``rho_response`` itself cannot go ×10, since
    derived_rho refuses responses whose penalty step exceeds the critical damping
    (which is the point of that row: a fixed ρ ten times too large).
    """
    m = recipe.mcp
    if m.rho_response is None or m.lr_schedule == "cosine":
        raise ValueError("the ρ ablation needs mcp.rho_response and a block schedule")
    steps = pruning_steps(recipe)
    schedule = BlockSchedule(m.admm_interval, steps, m.frozen_blocks, m.lr_schedule)
    peak = m.lr * m.batch_size / 256
    sgd_momentum = inspect.signature(MoCoV2).parameters["sgd_momentum"].default
    return schedule.derived_rho(
        0, m.rho_response, lambda t: peak * schedule.lr_factor(t), sgd_momentum
    )


def build_dense(ctx: Context) -> LightningModule:
    """The pretrained dense MoCo v2 model (no further training)."""
    model = MoCoV2(**moco_kwargs(ctx.recipe, "pretrain"))
    model.load_state_dict(read_checkpoint(ctx.dense_checkpoint)["state_dict"])
    return model


def build_typical_pruning(ctx: Context) -> LightningModule:
    return CompactMoCoV2(
        pruning_ratio=R92,
        input_size=ctx.recipe.data.input_size,
        dense_checkpoint=str(ctx.dense_checkpoint),
        masks_from="magnitude",
        **moco_kwargs(ctx.recipe, "mcp"),
    )


def build_scratch_small(ctx: Context) -> LightningModule:
    return CompactMoCoV2(
        pruning_ratio=R92,
        input_size=ctx.recipe.data.input_size,
        masks_from="first",
        reinit=True,
        **moco_kwargs(ctx.recipe, "pretrain"),
    )


def build_random_mask(ctx: Context) -> LightningModule:
    return RandomMaskMoCoV2(
        pruning_ratio=R92,
        input_size=ctx.recipe.data.input_size,
        mask_seed=ctx.seed,
        dense_checkpoint=str(ctx.dense_checkpoint),
        **moco_kwargs(ctx.recipe, "mcp"),
    )


def _supervised_kwargs(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The backbone and ``stage``'s schedule, as the MoCo rows get them."""
    moco = moco_kwargs(recipe, stage)
    keys = (
        "backbone",
        "backbone_kwargs",
        "lr",
        "weight_decay",
        "batch_size_per_device",
    )
    return {**{k: moco[k] for k in keys}, "input_size": recipe.data.input_size}


def build_supervised_small(ctx: Context) -> LightningModule:
    """The compact architecture trained with the labels from random init (Fig. 3)."""
    return SupervisedClassifier(
        pruning_ratio=R92,
        masks_from="first",
        reinit=True,
        **_supervised_kwargs(ctx.recipe, "pretrain"),
    )


def distill_builder(from_pruned: bool) -> Callable[[Context], LightningModule]:
    """SEED distillation of the dense model into the r = 0.76 architecture (the MCP
    row's size): from random init, or from the dense model's magnitude-pruned
    weights (``from_pruned``: pruned + distilled). Its budget is MCP's wall-clock
    time (``distill_steps``)."""

    def build(ctx: Context) -> LightningModule:
        start = (
            {"masks_from": "magnitude", "dense_checkpoint": str(ctx.dense_checkpoint)}
            if from_pruned
            else {"masks_from": "first", "reinit": True}
        )
        return DistilledSmall(
            teacher_checkpoint=str(ctx.dense_checkpoint),
            pruning_ratio=R92,
            input_size=ctx.recipe.data.input_size,
            **start,
            **moco_kwargs(ctx.recipe, "mcp"),
        )

    return build


#: The MCP row whose training time is the distillation rows' budget.
DISTILL_BUDGET_ROW = f"mcp_r{R92}"
#: Steps timed to measure a distillation step before the run.
CALIBRATION_STEPS = 20


def distill_steps(
    ctx: Context, model: LightningModule, out: Path, name: str
) -> tuple[int, dict[str, Any]]:
    """The distillation rows' budget in steps: MCP's training seconds for the same
    seed (``DISTILL_BUDGET_ROW``'s JSON, measured on this machine) divided by the
    seconds of one distillation step, timed over ``CALIBRATION_STEPS`` steps on a
    copy of the model just before the run (same process, same load).

    Raises:
        SystemExit: When the MCP row of this seed has no result yet.
    """
    mcp_file = out / f"{DISTILL_BUDGET_ROW}_seed{ctx.seed}.json"
    if not mcp_file.is_file():
        raise SystemExit(
            f"{name} seed {ctx.seed}: its budget is {mcp_file.name}'s training time; "
            f"run --only {DISTILL_BUDGET_ROW} first"
        )
    budget = float(json.loads(mcp_file.read_text())["train_seconds"])
    probe = copy_for_timing(model)
    _, loader = training_data(
        ctx.recipe, ctx.recipe.mcp.batch_size, moco_transform(ctx.recipe), ctx.seed
    )
    probe.train()
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)

    def batches() -> Any:
        while True:  # as many batches as timing needs, however small the data
            yield from loader

    stream = batches()
    probe.training_step(next(stream), 0)  # warm-up, not timed
    start = time.perf_counter()
    for i in range(CALIBRATION_STEPS):
        loss = probe.training_step(next(stream), i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_step = (time.perf_counter() - start) / CALIBRATION_STEPS
    steps = max(1, round(budget / per_step))
    return steps, {
        "rule": f"MCP's training seconds ({DISTILL_BUDGET_ROW}, same seed) / one "
        f"distillation step's seconds (timed over {CALIBRATION_STEPS} steps here)",
        "mcp_train_seconds": budget,
        "seconds_per_step": round(per_step, 4),
        "steps": steps,
    }


def copy_for_timing(model: LightningModule) -> LightningModule:
    """A copy of ``model`` whose timing steps leave the original untouched."""
    probe = copy.deepcopy(model)
    probe.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return probe


def _dense_backbone_state(ctx: Context) -> dict[str, Tensor]:
    """The dense model's momentum encoder (the ``dense`` row), plain BatchNorm."""
    backbone = build_dense(ctx).backbone_momentum  # type: ignore[union-attr]
    merge_split_batchnorm(backbone)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def build_transfer_pruning(ctx: Context) -> LightningModule:
    """Transfer pruning (Fig. 4): the dense momentum encoder fine-tuned with the
    labels for the pruning budget (phase ``finetune_dense``), then filter-magnitude
    pruned and returned for a supervised fine-tune of the same budget."""
    assert ctx.fit is not None and ctx.run_dir is not None
    kwargs = _supervised_kwargs(ctx.recipe, "mcp")
    finetuned = ctx.run_dir / "finetuned_dense.pt"
    if not finetuned.is_file():
        dense = SupervisedClassifier(
            backbone_state=_dense_backbone_state(ctx), **kwargs
        )
        ctx.fit(dense, pruning_steps(ctx.recipe), "finetune_dense")
        state = {
            "backbone": dense.backbone.state_dict(),
            "classifier": dense.classifier.state_dict(),
        }
        tmp = finetuned.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(finetuned)
    state = torch.load(finetuned, map_location="cpu", weights_only=True)
    return SupervisedClassifier(
        pruning_ratio=R92,
        masks_from="magnitude",
        backbone_state=state["backbone"],
        classifier_state=state["classifier"],
        **kwargs,
    )


def mcp_builder(
    ratio: float,
    rho_scale: float | None = None,
    transition: tuple[int, int] | None = None,
    frozen_mask: str | None = None,
    round_to: int = 1,
    target_params: float | None = None,
    mask_updates: str | None = None,
) -> Callable[[Context], LightningModule]:
    """An MCP row with the recipe's schedule (``mcp`` section).

    ``round_to``: 1 (exactly ``n_g`` channels per group, as the baselines keep and
    the recorded rows were trained; equal budgets), or MCP's aligned counts.

    ``target_params``: the fraction of parameters to remove instead of ``ratio``.

    ``rho_scale``: a fixed ρ of ``rho_scale`` × the derived ρ (the ρ ablation).
    ``transition``: the paper's (frq, dr) transition instead of the recipe's; (100, 1)
    is scaled to the run (``scaled_frq``). ``frozen_mask``, ``mask_updates``: instead
    of the recipe's.
    """

    def build(ctx: Context) -> LightningModule:
        options: dict[str, Any] = {
            "pruning_ratio": ratio if target_params is None else None,
            "target_params": target_params,
            "keep_output_dim": False,
            "round_to": round_to,
        }
        if frozen_mask is not None:
            options["frozen_mask"] = frozen_mask
        if mask_updates is not None:
            options["mask_updates"] = mask_updates
        if rho_scale is not None:
            options.update(rho=rho_scale * derived_rho(ctx.recipe), rho_response=None)
        if transition is not None:
            frq, dr = transition
            if (frq, dr) == (100, 1):
                frq = scaled_frq(pruning_steps(ctx.recipe))
            options.update(transition="paper", frq=frq, dr=dr)
        row = dataclasses.replace(
            ctx.recipe, mcp=dataclasses.replace(ctx.recipe.mcp, **options)
        )
        validate(row, "grid row")
        return mcp_model(row, ctx.dense_checkpoint)

    return build


def networks_of(model: LightningModule) -> dict[str, nn.Module]:
    """The networks to evaluate, the first one being the row's result."""
    if isinstance(model, MCP):
        return {"momentum_subnet": model.compact_momentum_subnet()}
    if isinstance(model, DistilledSmall):
        return {"student": model.backbone}
    if isinstance(model, RandomMaskMoCoV2):
        return {"key_encoder": model.compact_key_encoder()}
    if isinstance(model, CompactMoCoV2):
        return {"key_encoder": model.backbone_momentum}
    if isinstance(model, SupervisedClassifier):
        return {"backbone": model.backbone}
    assert isinstance(model, MoCoV2)
    return {"momentum": model.backbone_momentum, "query": model.backbone}


def moco_transform(recipe: Recipe) -> Any:
    """MoCo v2's two-view augmentation at the recipe's size and crop scale."""
    return build_transform(
        input_size=recipe.data.input_size, min_scale=recipe.data.min_scale
    )


def labelled_transform(recipe: Recipe) -> Any:
    """One augmented view for the supervised rows (same crop scale as MoCo's)."""
    return supervised_transform(recipe.data.input_size, recipe.data.min_scale)


# "steps": the row's (last) training length in SGD steps (None = no training);
# "data": which training images ("pruning": the recipe's subset, "pretraining": all
# images); "tier": when the row's seed 0 runs (seeds > 0 of the headline rows run in
# tier 2, right after the MCP ratios; an ablation's extra seeds after every ablation's
# seed 0): the grid runs the answer to the headline question first and the ablations
# last.
# Seeds: for the pruned rows they vary the training (data order, augmentations,
# initialisation); all of them start from the one shared dense model. For ``dense``
# they vary only the linear probe: the dense model is the shipped pretraining run
# (113 min on 2 cores), which the grid does not repeat three times.
def _entry(model: Callable[[Context], LightningModule], **kwargs: Any) -> dict:
    entry = {
        "model": model,
        "transform": moco_transform,
        "steps": pruning_steps,
        "data": "pruning",
        "seeds": 1,
        "tier": 3,
        "budget": 1,
    }
    entry.update(kwargs)
    return entry


METHODS: dict[str, dict[str, Any]] = {
    "dense": _entry(build_dense, steps=None, seeds=3, tier=0),
    "typical_pruning": _entry(build_typical_pruning, seeds=3, tier=0),
    "scratch_small": _entry(
        build_scratch_small,
        steps=lambda r: pretraining_steps(r) + pruning_steps(r),
        data="pretraining",
        seeds=3,
        tier=0,
    ),
    "random_mask": _entry(build_random_mask),
    "supervised_small": _entry(
        build_supervised_small,
        transform=labelled_transform,
        steps=lambda r: pretraining_steps(r) + pruning_steps(r),
        data="pretraining",
    ),
    "transfer_pruning": _entry(build_transfer_pruning, transform=labelled_transform),
}
# The budget rows: MCP at 92 % and the small network from scratch with the pruning
# phase twice as long (MCP: 4 blocks of 600 steps; the small network: its pretraining
# budget plus 2,400 steps), for the question what budget meets the 92 % target.
# They run after the paper's rows, before the ablations.
METHODS["scratch_small_budget_x2"] = {
    **METHODS["scratch_small"],
    "seeds": 1,
    "tier": 3,
    "budget": 2,
}
for _ratio in RATIOS:
    METHODS[f"mcp_r{_ratio}"] = _entry(
        mcp_builder(_ratio),
        seeds=3 if _ratio == R92 else 1,
        tier=0 if _ratio == R92 else 1,
    )
METHODS[f"mcp_r{R92}_budget_x2"] = _entry(mcp_builder(R92), budget=2)
# Label-free distillation (SEED) into the MCP row's architecture, at MCP's wall-clock
# budget: after MCP in the registry, so that MCP's seed runs first in its tier.
METHODS["distill"] = _entry(
    distill_builder(from_pruned=False), steps="mcp_wall_clock", seeds=3, tier=0
)
METHODS["pruned_distill"] = _entry(
    distill_builder(from_pruned=True), steps="mcp_wall_clock"
)
# The ρ ablation: the paper's {0.1, 0.01, 0.001} around its best, here ×{10, 0.1}
# around the derived ρ (×1 is mcp_r0.76 itself).
for _scale in (10.0, 0.1):
    METHODS[f"mcp_r{R92}_rho_x{_scale:g}"] = _entry(mcp_builder(R92, rho_scale=_scale))
# The transition ablation (Table 4): the paper's (100, 1) scaled to the run, (1, 0)
# (every other key from the subnet, forever), (0, 0) (subnet keys from the start),
# against the recipe's stable_mask transition (mcp_r0.76).
# (1, 0)'s seed 0 beat the recipe's transition by 2.6 kNN / 2.4 linear points, more
# than 5 times the headline seeds' spread: it gets 3 seeds to check it.
for _frq, _dr in ((100, 1), (1, 0), (0, 0)):
    METHODS[f"mcp_r{R92}_frq{_frq}_dr{_dr}"] = _entry(
        mcp_builder(R92, transition=(_frq, _dr)),
        seeds=3 if (_frq, _dr) == (1, 0) else 1,
    )
# Aligned pruning (issue #35): the same rows with every group's kept count a multiple
# of 8 (MCP's default), the parameter budget honoured by the rounding; the recorded
# rows above keep exactly n_g channels (round_to 1).
for _ratio in (0.52, R92):
    METHODS[f"mcp_r{_ratio}_round_to8"] = _entry(mcp_builder(_ratio, round_to=8))
# At r = 0.76 the aligned counts keep 15 % more parameters and 1.7x the MACs (small
# early groups cannot go below 8): the aligned row at the unaligned row's parameter
# budget (92.64 % removed) isolates alignment.
METHODS["mcp_t0.9264_round_to8"] = _entry(
    mcp_builder(R92, round_to=8, target_params=RATIOS[R92])
)
# The frozen block with θ_q's dropped channels held at exactly zero (the query trains
# as the compact network) instead of the recipe's penalty pulling them there.
METHODS[f"mcp_r{R92}_frozen_hard"] = _entry(mcp_builder(R92, frozen_mask="hard"))
# What ADMM's changing mask adds: the start's magnitude mask kept at every update, the
# same schedule (penalty, gradual shrink, transition, subnet keys).
METHODS[f"mcp_r{R92}_fixed_mask"] = _entry(mcp_builder(R92, mask_updates="fixed"))


def grid_order(names: list[str], max_seeds: int | None) -> list[tuple[str, int]]:
    """``(name, seed)`` pairs in the order the grid runs them: seed 0 by tier,
    seeds > 0 in tier 2 (an ablation's extra seeds after every seed 0 of its tier),
    the registry's order within a tier."""
    pairs = []
    for index, name in enumerate(names):
        seeds, tier = METHODS[name]["seeds"], METHODS[name]["tier"]
        if max_seeds is not None:
            seeds = min(seeds, max_seeds)
        for seed in range(seeds):
            pairs.append((tier if seed == 0 else max(2, tier), seed, index, name))
    return [(name, seed) for _, seed, _, name in sorted(pairs)]


# --- running ------------------------------------------------------------------------
def git_commit() -> str | None:
    """The checked-out commit, ``+dirty`` with uncommitted changes to tracked files
    (None outside a git checkout)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


#: The code this process runs: read once at start (a later commit in the checkout
#: does not change the code already imported).
CODE_COMMIT = git_commit()


def dense_checkpoint(
    out: Path, overrides: list[str], seed: int, progress: bool
) -> Path:
    """The shared dense model: ``pretrain.dense_checkpoint`` when the recipe names
    one (verified against its provenance sha256 when loaded), else the cached dense
    pretraining run of ``seed`` (trained on first use)."""
    recipe = load_recipe(RECIPE, [*overrides, f"seed={seed}"])
    if recipe.pretrain.dense_checkpoint is not None:
        path = Path(recipe.pretrain.dense_checkpoint)
        return path if path.is_absolute() else REPO / path
    return pretrain(recipe, out / f"pretrain_seed{seed}", progress=progress)


def save_row_model(
    networks: dict[str, nn.Module], out: Path, name: str, seed: int, size: int
) -> str | None:
    """The row's result network (the first of ``networks``) as a ``torch.export``
    program, ``OUT/models/<name>_seed<k>.pt2`` (folded BatchNorm, any batch size;
    read with ``lightly_mcp.io.model_files.load_program``), checked against the
    network; None (with the reason printed) when it does not export."""
    network = copy.deepcopy(next(iter(networks.values()))).cpu().eval()
    merge_split_batchnorm(network)
    path = out / "models" / f"{name}_seed{seed}.pt2"
    path.parent.mkdir(exist_ok=True)
    try:
        save_program(export_program(network, size), path)
    except Exception as error:  # noqa: BLE001 - the row's numbers still count
        print(f"[warn] {name} seed {seed}: model not kept ({error})")
        return None
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(
            load_program(path)(x), network(x), atol=1e-4, rtol=1e-4
        )
    return str(path.relative_to(out))


def run_config(
    name: str,
    seed: int,
    out: Path,
    overrides: list[str],
    device: str,
    progress: bool,
    command: str,
) -> dict[str, Any] | None:
    """Trains and evaluates one configuration; None when its JSON exists."""
    result_file = out / f"{name}_seed{seed}.json"
    if result_file.is_file():
        print(f"[skip] {result_file.name} exists")
        return None
    entry = METHODS[name]
    start = time.perf_counter()
    # The data subset stays that of seed 0; the seed varies model and training.
    recipe = scaled_budget(load_recipe(RECIPE, overrides), entry["budget"])
    shared = recipe.pretrain.dense_checkpoint is not None
    dense_seed = seed if name == "dense" and not shared else 0
    dense = dense_checkpoint(out, overrides, dense_seed, progress)
    pretrain_seconds = time.perf_counter() - start
    run_dir = out / "runs" / f"{name}_seed{seed}"
    data_recipe = recipe
    if entry["data"] == "pretraining":
        data_recipe = load_recipe(RECIPE, [*overrides, "data.subset=null"])
    steps_done: list[int] = []

    def fit(model: LightningModule, steps: int, phase: str = "") -> None:
        """Trains ``model`` for ``steps`` on the row's data, resuming from the
        phase's ``last.ckpt``. The loader's order and augmentations follow the
        row's seed; the subset stays that of the recipe's seed."""
        stage_dir = run_dir / phase if phase else run_dir
        _, loader = training_data(
            data_recipe,
            recipe.mcp.batch_size,
            entry["transform"](recipe),
            loader_seed=seed,
        )
        trainer = trainer_for(recipe, stage_dir, -1, steps, progress)
        last = stage_dir / "last.ckpt"
        trainer.fit(
            model,
            loader,
            ckpt_path=str(last) if last.is_file() else None,
            weights_only=True,
        )
        steps_done.append(steps)

    ctx = Context(
        recipe=recipe, dense_checkpoint=dense, seed=seed, run_dir=run_dir, fit=fit
    )
    pl.seed_everything(seed, verbose=False)
    train_start = time.perf_counter()
    model = entry["model"](ctx)
    extra: dict[str, Any] = {}
    if entry["steps"] == "mcp_wall_clock":
        budget_steps, extra["budget_rule"] = distill_steps(ctx, model, out, name)
        train_start = time.perf_counter()  # the timing steps are not training
        pl.seed_everything(seed, verbose=False)
        fit(model, budget_steps)
    elif entry["steps"] is not None:
        pl.seed_everything(seed, verbose=False)
        fit(model, entry["steps"](recipe))
    steps = sum(steps_done)
    train_seconds = time.perf_counter() - train_start
    model = model.cpu().eval()
    networks = networks_of(model)
    size = recipe.data.input_size
    dense_backbone = recipe_backbone(recipe)
    dense_params = count_parameters(dense_backbone)
    dense_macs = count_macs(dense_backbone, size)
    eval_start = time.perf_counter()
    e = recipe.eval
    evaluations: dict[str, dict[str, Any]] = {}
    transfer: dict[str, dict[str, Any]] = {}
    descriptions: dict[str, str] = {}
    for on in evaluation_names(recipe):
        train_loader, test_loader, descriptions[on], _ = evaluation_data(recipe, on)
        for net_name, network in networks.items():
            scores = evaluate_backbone(
                network.to(device),
                train_loader,
                test_loader,
                device=device,
                k=e.k,
                temperature=e.temperature,
                linear_epochs=e.linear_epochs,
                seed=seed,
            )
            if on == IN_DOMAIN:
                evaluations[net_name] = scores
                evaluations[net_name]["params"] = count_parameters(network)
                evaluations[net_name]["macs"] = count_macs(network.cpu(), size)
            else:
                transfer.setdefault(on, {"data": descriptions[on]})[net_name] = {
                    key: scores[key] for key in ("knn_top1", "linear_top1")
                }
        if on == IN_DOMAIN:
            in_domain_test = test_loader
    description = descriptions[IN_DOMAIN]
    model_file = save_row_model(networks, out, name, seed, size)
    if isinstance(model, SupervisedClassifier):  # the classifier it trained
        extra["classifier_top1"] = model.to(device).test_top1(in_domain_test)
    if isinstance(model, MCP):  # the per-block record (convergence.py)
        extra["admm_blocks"] = model.block_history
    eval_seconds = time.perf_counter() - eval_start
    primary = next(iter(networks))
    result: dict[str, Any] = {
        "name": name,
        "seed": seed,
        "network": primary,
        "knn_top1": evaluations[primary]["knn_top1"],
        "linear_top1": evaluations[primary]["linear_top1"],
        "params": evaluations[primary]["params"],
        "macs": evaluations[primary]["macs"],
        "dense_params": dense_params,
        "dense_macs": dense_macs,
        "params_removed": 1.0 - evaluations[primary]["params"] / dense_params,
        "macs_removed": 1.0 - evaluations[primary]["macs"] / dense_macs,
        "mac_counter": MAC_COUNTER,
        "hparams": {
            k: v
            for k, v in dict(model.hparams).items()
            if isinstance(v, (int, float, str, bool, type(None)))
        },
        "budget": entry["budget"],
        "train_steps": steps,
        "train_images": steps * recipe.mcp.batch_size,
        "dense_seed": dense_seed,
        "dense_checkpoint": str(dense),
        "networks": evaluations,
        "transfer": {
            on: {"data": part["data"], **part[primary]} for on, part in transfer.items()
        },
        "transfer_networks": transfer,
        "model_file": model_file,
        **extra,
        "data": description,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "pretrain_seconds_this_call": round(pretrain_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "command": command,
        "overrides": overrides,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "cpu": cpu_model(),
        "commit": CODE_COMMIT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    log = run_dir / "logs" / "metrics.csv"
    if log.is_file():  # the training curve, kept beside the result (committed)
        (out / "metrics").mkdir(exist_ok=True)
        shutil.copyfile(log, out / "metrics" / f"{name}_seed{seed}.csv")
    write_json_atomic(result_file, result)
    print(
        f"[done] {name} seed {seed}: kNN {result['knn_top1']:.4f} linear "
        f"{result['linear_top1']:.4f} params {result['params']:,} "
        f"({result['params_removed']:.1%} removed) in {result['wall_seconds']:.0f} s"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    global RECIPE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--recipe",
        type=Path,
        default=RECIPE,
        help="the grid's recipe (default: recipes/fashion_mnist_mobilenetv2.yaml)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke grid")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--only", action="append", choices=sorted(METHODS))
    parser.add_argument("--seeds", type=int, default=None, help="cap seeds per row")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    RECIPE = args.recipe.resolve()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    out = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    overrides.append(f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}")
    max_seeds = 1 if args.quick else args.seeds
    names = args.only or list(METHODS)
    start = time.perf_counter()
    for name, seed in grid_order(names, max_seeds):
        run_config(name, seed, out, overrides, device, args.progress, command)
    print(f"grid finished in {time.perf_counter() - start:.0f} s; results in {out}")
    from report import write_report  # benchmarks/accuracy/report.py

    print(write_report(out))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
