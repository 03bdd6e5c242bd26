"""MCP from a plain Lightning Trainer (the README example), on random images."""

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightly_mcp import MCP, build_transform


class RandomImages(Dataset):
    """Random 28x28 grayscale images (stand-ins for a real dataset)."""

    def __init__(self, n: int = 64) -> None:
        self.images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        self.transform = build_transform(input_size=32)  # two MoCo v2 views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i].numpy(), mode="L")
        return self.transform(image), 0


model = MCP(
    backbone="torchvision/mobilenet_v2",
    backbone_kwargs={"small_input": True, "width_multiplier": 0.5},
    projection_batch_norm=True,
    batch_size_per_device=16,
    memory_bank_size=256,
    pruning_ratio=0.73,  # channels removed in every group
    schedule="converging",  # ADMM blocks, rho and transition from the Trainer's steps
    dense_checkpoint=None,  # or a MoCoV2 checkpoint to start from
)
trainer = pl.Trainer(
    max_steps=160,
    accelerator="auto",
    devices=1,
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(model, DataLoader(RandomImages(), batch_size=16, drop_last=True))

compact_backbone = model.compact_momentum_subnet()  # channels really removed
print(
    sum(p.numel() for p in model.backbone_momentum.parameters()),
    "->",
    sum(p.numel() for p in compact_backbone.parameters()),
    "parameters",
)
