# MCP: Momentum Contrastive Pruning, in plain PyTorch.
#
# This is lightly's MoCo example (examples/pytorch/moco.py) plus the four pieces MCP
# adds: channel groups, an ADMM penalty on the query backbone, the momentum subnet
# (the momentum backbone seen through the ADMM channel mask) that produces the keys,
# and a smooth transition from the full momentum backbone to the subnet. No
# fine-tuning follows: the momentum subnet at the end of training is the result, and
# it is physically shrunk with `compact`.
#
# Note: The model and training settings do not follow the reference settings from the
# paper. They are chosen so that the example runs in about a minute on 2 CPU cores,
# on Fashion-MNIST from the local idx files (scikit-learn's digits if it is absent).
# MCP normally starts from a pretrained dense MoCo model; here it starts from scratch.
#
# Environment variables (for quick tests):
#   MCP_EXAMPLE_STEPS:      stop after this many training steps (default: 1 epoch)
#   MCP_EXAMPLE_SUBSET:     number of training images (default: 1024)
#   MCP_EXAMPLE_BATCH_SIZE: batch size (default: 64)

# ruff: noqa: D102  (the methods are the familiar MoCo ones, commented where MCP adds)
import copy
import os

import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
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
INPUT_SIZE = 32

PRUNING_RATIO = 0.73  # fraction of channels removed in every channel group
RHO = 0.01  # ADMM penalty (the paper's value)
ADMM_INTERVAL = 4  # ADMM update every 4 steps (the paper: every epoch)
FRQ, DR = 4, 1  # smooth transition: 4, 3, 2, 1 full-backbone steps between subnet ones


class MCP(nn.Module):
    """MoCo plus MCP: ADMM on the query backbone, keys from the momentum subnet."""

    def __init__(self, backbone):
        super().__init__()

        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(512, 512, 128)

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)

        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

        # MCP: the coupled channel groups of the backbone (found once by tracing), the
        # ADMM regularizer on the query backbone (its mask keeps n_g channels per
        # group) and the momentum subnet: the momentum backbone through that mask.
        example = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
        self.groups = find_channel_groups(self.backbone, example)
        self.admm = ADMMRegularizer(self.backbone, self.groups, PRUNING_RATIO, rho=RHO)
        self.subnet = MomentumSubnet(
            self.backbone_momentum, self.groups, self.admm.masks
        )

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


resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
model = MCP(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

# Two MoCo v2 views per image (grayscale images are converted to RGB).
transform = build_transform(input_size=INPUT_SIZE)
# Fashion-MNIST from /usr/share/datasets/fashion-mnist, or scikit-learn's digits.
# Items are (views, label); any dataset of (views, label) items works, for example
# torchvision.datasets.CIFAR10("datasets/cifar10", download=True, transform=transform)
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

criterion = NTXentLoss(temperature=0.2, memory_bank_size=(512, 128))
optimizer = torch.optim.SGD(
    model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4
)
transition = SmoothTransition(frq=FRQ, dr=DR)

epochs = 1 if MAX_STEPS < 0 else MAX_STEPS  # with MAX_STEPS, stop after that many
total_steps = len(dataloader) * epochs if MAX_STEPS < 0 else MAX_STEPS
step = 0

print(f"Starting Training on {dataset.describe()}")
for epoch in range(epochs):
    total_loss, epoch_steps = 0.0, 0
    for batch in dataloader:
        x_query, x_key = batch[0]
        momentum_val = cosine_schedule(step, total_steps, 0.99, 1)
        update_momentum(model.backbone, model.backbone_momentum, m=momentum_val)
        update_momentum(
            model.projection_head, model.projection_head_momentum, m=momentum_val
        )
        x_query = x_query.to(device)
        x_key = x_key.to(device)
        # MCP: the smooth transition picks this step's key source.
        use_subnet = transition.step()
        query = model(x_query)
        key = model.forward_momentum(x_key, use_subnet)
        # MCP: InfoNCE plus the ADMM penalty (rho/2)·||θ_q − Z + U||².
        info_nce = criterion(query, key)
        admm_loss = model.admm(model.backbone)
        loss = info_nce + admm_loss
        total_loss += info_nce.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        epoch_steps += 1
        # MCP: every ADMM_INTERVAL steps, Z ← Π(θ_q + U), U ← U + θ_q − Z and the new
        # mask (support of Z) goes to the momentum subnet.
        if step % ADMM_INTERVAL == 0:
            model.admm.update(model.backbone)
            model.subnet.set_masks(model.admm.masks)
        if step == MAX_STEPS:
            break
    avg_loss = float(total_loss) / epoch_steps
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}, admm: {admm_loss.item():.5f}")
    if step == MAX_STEPS:
        break

# The result: the momentum subnet, physically shrunk (channels really removed).
model.eval()
kept = [int(mask.sum()) for mask in model.subnet.masks]
assert kept == [group.num_kept(PRUNING_RATIO) for group in model.groups]
compact_backbone = compact(model.subnet.materialize(), model.groups, model.subnet.masks)
x = torch.randn(8, 3, INPUT_SIZE, INPUT_SIZE, device=device)
with torch.no_grad():
    error = (compact_backbone(x) - model.subnet(x)).abs().max().item()
dense_params = sum(p.numel() for p in model.backbone_momentum.parameters())
compact_params = sum(p.numel() for p in compact_backbone.parameters())
print(f"final loss: {info_nce.item():.5f}")
print(f"kept channels per group: {kept} (n_g at pruning_ratio={PRUNING_RATIO}: ok)")
print(f"compact vs masked subnet max abs error: {error:.2e}")
print(f"parameters: dense {dense_params:,} -> compact {compact_params:,}")
