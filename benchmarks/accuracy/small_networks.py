"""The accuracy grid's compact networks without MCP: masks, surgery, supervised rows.

- :func:`uniform_masks`: n_g channels kept per group, by filter magnitude
  (``channel_scores``) or the first n_g (architecture only).
- :func:`prune_network`: the physically pruned copy (``compact``) and the indices of
  the output features it keeps (``groups.output_feature_index``).
- :class:`SupervisedClassifier`: a backbone and a linear classifier trained with
  cross-entropy on the labels: the paper's supervised comparisons, the small network
  trained supervised from scratch (Fig. 3's red line) and transfer pruning (Fig. 4:
  supervised fine-tune of the dense model, magnitude pruning, supervised fine-tune).
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms as T
from lightly.models.utils import get_weight_decay_parameters
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torch.optim import SGD

from lightly_mcp.backbones import build_backbone
from lightly_mcp.compaction import compact
from lightly_mcp.groups import (
    ChannelGroup,
    channel_scores,
    find_channel_groups,
    output_feature_index,
)
from lightly_mcp.transforms import _ToRGB

MASKS_FROM = ("magnitude", "first")


def uniform_masks(
    groups: list[ChannelGroup],
    ratio: float,
    masks_from: str,
    network: nn.Module | None = None,
) -> list[Tensor]:
    """Per group, the boolean mask of the n_g kept channels.

    ``"magnitude"``: the top n_g channels of ``network`` by ``channel_scores``
    (filter-magnitude pruning); ``"first"``: channels 0..n_g-1.
    """
    if masks_from not in MASKS_FROM:
        raise ValueError(f"masks_from must be one of {MASKS_FROM}, got {masks_from!r}.")
    tensors = dict(network.named_parameters()) if network is not None else {}
    masks = []
    for group in groups:
        mask = torch.zeros(group.num_channels, dtype=torch.bool)
        n = group.num_kept(ratio)
        if masks_from == "magnitude":
            mask[torch.topk(channel_scores(tensors, group), n).indices] = True
        else:
            mask[:n] = True
        masks.append(mask)
    return masks


def prune_network(
    network: nn.Module, ratio: float, input_size: int, masks_from: str
) -> tuple[nn.Module, Tensor | None]:
    """The compact copy of ``network`` (feature dimension pruned too) and the kept
    output features (None when the network has no ``feature_dim``)."""
    example = torch.randn(1, 3, input_size, input_size)
    groups = find_channel_groups(network, example, keep_output_dim=False)
    masks = uniform_masks(groups, ratio, masks_from, network)
    small = compact(network, groups, masks, example)
    num_features = getattr(network, "feature_dim", None)
    if num_features is None:
        return small, None
    kept, _ = output_feature_index(groups, masks, num_features)
    small.feature_dim = len(kept)
    return small, kept


def slice_linear_input(linear: nn.Linear, index: Tensor) -> nn.Linear:
    """A copy of ``linear`` that reads only the input features ``index``."""
    new = nn.Linear(len(index), linear.out_features, linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if linear.bias is not None and new.bias is not None:
            new.bias.copy_(linear.bias)
            new.bias.requires_grad_(linear.bias.requires_grad)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def slice_head_input(head: nn.Module, index: Tensor) -> None:
    """Keeps only the input columns ``index`` of the head's first ``nn.Linear``."""
    for parent in head.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, slice_linear_input(child, index))
                return
    raise ValueError("the projection head has no nn.Linear layer")


def torchvision_init(module: nn.Module) -> None:
    """torchvision's MobileNetV2/ResNet initialisation (fresh random weights)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def supervised_transform(input_size: int, min_scale: float) -> Any:
    """One augmented view: random resized crop, horizontal flip, normalisation
    (MoCo v2's crop scale and normalisation, no colour augmentation)."""
    return T.Compose(
        [
            _ToRGB(),
            T.RandomResizedCrop(input_size, scale=(min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
        ]
    )


class SupervisedClassifier(LightningModule):
    """A backbone with a linear classifier, trained with cross-entropy.

    The backbone is built from ``backbone``/``backbone_kwargs`` (plain BatchNorm:
    SplitBatchNorm is only MoCo's shuffle-BN; merge it before taking a MoCo
    backbone's state), then optionally loaded from ``backbone_state``, then
    optionally pruned to ``pruning_ratio`` (``masks_from``) and re-initialised
    (``reinit``, training from scratch).

    SGD with momentum 0.9, the learning rate ``lr`` per 256 images, no weight decay
    on norm and bias parameters, a cosine over the run (lightly's scheduler).

    Args:
        backbone: Backbone name for ``build_backbone``.
        backbone_kwargs: Its options.
        num_classes: Classes of the labels.
        lr: Learning rate per 256 images.
        weight_decay: Weight decay.
        batch_size_per_device: Batch size (scales the learning rate).
        pruning_ratio: Channels removed per group (None: the dense network).
        masks_from: ``"magnitude"`` or ``"first"`` (see :func:`uniform_masks`).
        reinit: Re-initialise the (pruned) backbone.
        input_size: Image size for tracing the channel groups.
        backbone_state: Weights of the dense backbone (keys of ``build_backbone``).
        classifier_state: Weights of the classifier of the dense backbone; sliced to
            the kept features when the backbone is pruned.
    """

    def __init__(
        self,
        backbone: str,
        backbone_kwargs: dict[str, Any],
        num_classes: int = 10,
        lr: float = 0.06,
        weight_decay: float = 5e-4,
        batch_size_per_device: int = 128,
        pruning_ratio: float | None = None,
        masks_from: str = "first",
        reinit: bool = False,
        input_size: int = 32,
        backbone_state: dict[str, Tensor] | None = None,
        classifier_state: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone_state", "classifier_state"])
        network = build_backbone(backbone, **backbone_kwargs)
        if backbone_state is not None:
            network.load_state_dict(backbone_state)
        classifier = nn.Linear(network.feature_dim, num_classes)
        if classifier_state is not None:
            classifier.load_state_dict(classifier_state)
        if pruning_ratio is not None:
            network, kept = prune_network(
                network, pruning_ratio, input_size, masks_from
            )
            assert kept is not None
            classifier = slice_linear_input(classifier, kept)
        if reinit:
            torchvision_init(network)
            torchvision_init(classifier)
        self.backbone = network
        self.classifier = classifier
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.backbone(images))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        loss = self.criterion(self(images), labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self) -> Any:
        decay, no_decay = get_weight_decay_parameters([self.backbone, self.classifier])
        lr = self.hparams["lr"] * self.hparams["batch_size_per_device"] / 256
        optimizer = SGD(
            [
                {"params": decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            momentum=0.9,
            weight_decay=self.hparams["weight_decay"],
        )
        scheduler = CosineWarmupScheduler(
            optimizer=optimizer,
            warmup_epochs=0,
            max_epochs=int(self.trainer.estimated_stepping_batches),
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    @torch.no_grad()
    def test_top1(self, loader: Any) -> float:
        """Top-1 of the classifier itself on ``loader`` (eval mode)."""
        was_training = self.training
        self.eval()
        correct = total = 0
        for batch in loader:
            images, labels = batch[0].to(self.device), batch[1].to(self.device)
            correct += int((self(images).argmax(1) == labels).sum())
            total += len(labels)
        self.train(was_training)
        return correct / max(1, total)
