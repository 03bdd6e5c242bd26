"""Run by tests/app/test_distributed.py: MCP under Lightning DDP (or one process).

Usage: python tests/app/ddp_mcp_check.py OUT_DIR DEVICES BATCH_PER_DEVICE STEPS

Every rank writes OUT_DIR/rank{r}.pt with its final masks, Z, U, ρ, transition state,
momentum weights and the first step's loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightly_mcp.methods.mcp import MCP  # noqa: E402
from tests.helpers import TINY, TwoViewTensors  # noqa: E402


class FirstLoss(Callback):
    def __init__(self) -> None:
        self.loss: float | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.loss is None:  # the InfoNCE part (synchronised mean over ranks)
            self.loss = float(trainer.callback_metrics["train_loss"])


def main() -> None:
    out, devices, batch, steps = (
        Path(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    pl.seed_everything(0, verbose=False)
    model = MCP(
        **{**TINY, "batch_size_per_device": batch, "backbone": "torchvision/resnet18"},
        pruning_ratio=0.3,  # n_g not multiples of 8: the aligned counts differ
        round_to=8,
        frq=2,
        dr=1,
        admm_interval=2,
        admm_interval_unit="steps",
        lr_schedule="block_step",
        rho_response=1.0,  # ρ derived from the schedule, the same on every rank
        sgd_momentum=0.0,  # 2-step blocks are too short for momentum SGD
        recalibration_batches=2,  # the subnet's statistics, averaged over ranks
        input_size=16,
    )
    # The global batch is the same 16 images in one process or split over two ranks.
    loader = torch.utils.data.DataLoader(
        TwoViewTensors(n=64, size=16), batch_size=batch
    )
    first = FirstLoss()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[first],
        use_distributed_sampler=False,  # rank r takes batch slices below
    )
    if devices > 1:
        # Rank r gets rows r, r + 2, ... of every global batch of 2 * batch images.
        dataset = TwoViewTensors(n=64, size=16)
        rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
        indices = [i for i in range(64) if (i % (2 * batch)) // batch == rank]
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=batch
        )
    trainer.fit(model, loader)
    state = {
        "masks": [m.clone() for m in model.admm.masks],
        "subnet_masks": [m.clone() for m in model.subnet.masks],
        "z": {k: v.clone() for k, v in model.admm.z().items()},
        "u": {k: v.clone() for k, v in model.admm.u().items()},
        "rho": model.admm.rho,
        "transition": model.transition.state_dict(),
        "momentum": {
            k: v.clone() for k, v in model.backbone_momentum.state_dict().items()
        },
        "bank": model.criterion.memory_bank.bank.clone(),
        "subnet_stats": {k: v.clone() for k, v in model.subnet.buffers_dict().items()},
        "block_history": model.block_history,
        "first_loss": first.loss,
    }
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
