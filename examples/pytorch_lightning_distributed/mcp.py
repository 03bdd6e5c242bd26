# MCP: Momentum Contrastive Pruning, with PyTorch Lightning and DDP.
#
# This is lightly's distributed MoCo example
# (examples/pytorch_lightning_distributed/moco.py) plus the four pieces MCP adds:
# channel groups, an ADMM penalty on the query backbone, the momentum subnet (the
# momentum backbone seen through the ADMM channel mask) that produces the keys, and a
# smooth transition from the full momentum backbone to the subnet. No fine-tuning
# follows: the momentum subnet at the end of training is the result, and it is
# physically shrunk with `compact`.
#
# Distributed MCP needs nothing special: the ADMM state, the mask and the transition
# position must be identical on all processes, and they are. Every process builds the
# same model (same seed), DDP keeps the query weights identical, so every ADMM update
# computes the same Z, U and mask, and the transition counts the same steps.
#
# Note: The model and training settings do not follow the reference settings from the
# paper. They are chosen so that the example runs in about a minute with 2 processes
# on 2 CPU cores (gloo), or unchanged on GPUs (nccl), on Fashion-MNIST from the local
# idx files (scikit-learn's digits if it is absent). MCP normally starts from a
# pretrained dense MoCo model; here it starts from scratch.
#
# Environment variables (for quick tests):
#   MCP_EXAMPLE_STEPS:      stop after this many training steps (default: 1 epoch)
#   MCP_EXAMPLE_SUBSET:     number of training images (default: 1024)
#   MCP_EXAMPLE_BATCH_SIZE: batch size per process (default: 64)
#   MCP_EXAMPLE_DEVICES:    Trainer(devices=...) (default: "auto" on GPUs, 2 on CPU)

# ruff: noqa: D102  (the methods are the familiar MoCo ones, commented where MCP adds)
import copy
import os

import pytorch_lightning as pl
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import (
    batch_shuffle,
    batch_unshuffle,
    deactivate_requires_grad,
    update_momentum,
)
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from lightly_mcp import (
    ADMMRegularizer,
    MomentumSubnet,
    SmoothTransition,
    build_transform,
    compact,
    find_channel_groups,
)
from lightly_mcp.data import build_dataset, default_dataset_kind

MAX_STEPS = int(os.environ.get("MCP_EXAMPLE_STEPS", "-1"))
SUBSET = int(os.environ.get("MCP_EXAMPLE_SUBSET", "1024"))
BATCH_SIZE = int(os.environ.get("MCP_EXAMPLE_BATCH_SIZE", "64"))
DEVICES = os.environ.get(
    "MCP_EXAMPLE_DEVICES", "auto" if torch.cuda.is_available() else "2"
)
INPUT_SIZE = 32


class MCP(pl.LightningModule):
    """MoCo plus MCP: ADMM on the query backbone, keys from the momentum subnet."""

    def __init__(
        self,
        pruning_ratio=0.73,  # fraction of channels removed in every channel group
        rho=0.01,  # ADMM penalty (the paper's value)
        admm_interval=4,  # ADMM update every 4 steps (the paper: every epoch)
        frq=4,  # smooth transition: 4, 3, 2, 1 full-backbone steps between subnet ones
        dr=1,
    ):
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = MoCoProjectionHead(512, 512, 128)

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)

        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

        # gather_distributed=True: the keys of all processes enter the memory bank.
        self.criterion = NTXentLoss(
            temperature=0.2, memory_bank_size=(512, 128), gather_distributed=True
        )

        # MCP: the coupled channel groups of the backbone (found once by tracing), the
        # ADMM regularizer on the query backbone (its mask keeps n_g channels per
        # group), the momentum subnet (the momentum backbone through that mask) and
        # the smooth transition that picks the key source of every step.
        example = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
        self.groups = find_channel_groups(self.backbone, example)
        self.admm = ADMMRegularizer(self.backbone, self.groups, pruning_ratio, rho=rho)
        self.subnet = MomentumSubnet(
            self.backbone_momentum, self.groups, self.admm.masks
        )
        self.transition = SmoothTransition(frq=frq, dr=dr)
        self.pruning_ratio = pruning_ratio
        self.admm_interval = admm_interval

    def forward(self, x):
        query = self.backbone(x).flatten(start_dim=1)
        query = self.projection_head(query)
        return query

    def forward_momentum(self, x, use_subnet):
        # MCP: keys come from the momentum subnet, or from the full momentum backbone
        # during the smooth transition.
        key_backbone = self.subnet if use_subnet else self.backbone_momentum
        key = key_backbone(x).flatten(start_dim=1)
        key = self.projection_head_momentum(key).detach()
        return key

    def training_step(self, batch, batch_idx):
        momentum = cosine_schedule(
            self.global_step, self.trainer.estimated_stepping_batches, 0.99, 1
        )
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        x_query, x_key = batch[0]
        use_subnet = self.transition.step()  # the same on every process
        query = self.forward(x_query)
        # Shuffle BN: the keys are computed on a batch shuffled across processes.
        distributed = self.trainer.world_size > 1
        x_key, shuffle = batch_shuffle(x_key, distributed=distributed)
        key = self.forward_momentum(x_key, use_subnet)
        key = batch_unshuffle(key, shuffle, distributed=distributed)
        # MCP: InfoNCE plus the ADMM penalty (rho/2)·||θ_q − Z + U||².
        loss = self.criterion(query, key)
        admm_loss = self.admm(self.backbone)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        self.log("admm_loss", admm_loss, prog_bar=True, sync_dist=True)
        return loss + admm_loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # MCP: every admm_interval steps, Z ← Π(θ_q + U), U ← U + θ_q − Z, and the new
        # mask (support of Z) goes to the momentum subnet. θ_q is synchronised by DDP,
        # so every process computes the same update.
        if self.global_step % self.admm_interval == 0:
            self.admm.update(self.backbone)
            self.subnet.set_masks(self.admm.masks)

    def on_train_end(self):
        # Check: every process ends with the same mask.
        masks = torch.cat(self.subnet.masks).float()
        assert bool((self.all_gather(masks) == masks).all())

    def configure_optimizers(self):
        optim = torch.optim.SGD(
            self.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4
        )
        return optim

    def compact_momentum_subnet(self):
        # The result: the momentum subnet, physically shrunk (channels removed).
        return compact(self.subnet.materialize(), self.groups, self.subnet.masks)


# DDP starts every process by running this file again: keep the work under __main__.
if __name__ == "__main__":
    # The same seed on every process: the same model, groups, ADMM state and mask.
    pl.seed_everything(0, workers=True)
    model = MCP()

    # Two MoCo v2 views per image (grayscale images are converted to RGB).
    transform = build_transform(input_size=INPUT_SIZE)
    # Fashion-MNIST from /usr/share/datasets/fashion-mnist, or scikit-learn's digits.
    # Items are (views, label); any dataset of (views, label) items works, e.g.
    # torchvision.datasets.CIFAR10("datasets/cifar10", transform=transform)
    dataset = build_dataset(
        default_dataset_kind(), train=True, transform=transform, subset=SUBSET
    )

    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )

    # Train with DDP. Synchronized BatchNorm needs GPUs (torch refuses it on CPU);
    # distributed sampling gives every process its own share of the data.
    trainer = pl.Trainer(
        max_epochs=1 if MAX_STEPS < 0 else -1,
        max_steps=MAX_STEPS,
        devices=int(DEVICES) if DEVICES.isdigit() else DEVICES,
        accelerator="auto",
        strategy="ddp",
        sync_batchnorm=torch.cuda.is_available(),
        use_distributed_sampler=True,
        # A checkpoint would not hold the transition position; lightly_mcp.MCP does.
        enable_checkpointing=False,
    )
    trainer.fit(model=model, train_dataloaders=dataloader)

    if trainer.is_global_zero:
        model.eval()
        kept = [int(mask.sum()) for mask in model.subnet.masks]
        assert kept == [group.num_kept(model.pruning_ratio) for group in model.groups]
        compact_backbone = model.compact_momentum_subnet()
        dense_params = sum(p.numel() for p in model.backbone_momentum.parameters())
        compact_params = sum(p.numel() for p in compact_backbone.parameters())
        print(f"processes: {trainer.world_size}, all with the same mask")
        print(f"final loss: {float(trainer.callback_metrics['train_loss']):.5f}")
        print(
            f"kept channels per group: {kept} (n_g at ratio {model.pruning_ratio}: ok)"
        )
        print(f"parameters: dense {dense_params:,} -> compact {compact_params:,}")
