"""The paper's comparison methods, as components that train like MCP does.

Every method prunes the ``keep_output_dim=False`` channel groups of the backbone (the
feature dimension too) at one uniform ratio, so that its compact network has the size
of MCP's at that ratio:

- *typical pruning*: filter-magnitude pruning of a dense MoCo v2 model's momentum
  encoder, both encoders compacted with those masks, then MoCo v2:
  ``CompactMoCoV2(masks_from="magnitude", dense_checkpoint=...)``;
- *small from scratch*: the compact architecture from random init, trained with
  MoCo v2: ``CompactMoCoV2(masks_from="first", reinit=True)``;
- *random mask*: a fixed random mask on the momentum update (the paper's Eq. 3),
  from the dense model: :class:`RandomMaskMoCoV2`;
- *distillation* (label-free, SEED): the compact architecture trained to match the
  dense model's similarity distribution over a queue of its embeddings, from random
  init or from the magnitude-pruned dense weights (pruned + distilled):
  :class:`DistilledSmall`;
- *supervised*: a backbone with a linear classifier trained with the labels
  (:class:`SupervisedClassifier` and its :func:`supervised_transform`): the small
  network trained supervised from scratch, and the steps of transfer pruning
  (supervised fine-tune, magnitude pruning with :func:`prune_network`, supervised
  fine-tune).

Reference:
    Momentum Contrastive Pruning, Section 4 (Tables 1-4, Figs. 3 and 4) and Eq. 3.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms as T
from lightly.models.utils import get_weight_decay_parameters, update_momentum
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torch.optim import SGD

from lightly_mcp.methods.backbones import Backbone, build_backbone
from lightly_mcp.methods.checkpoints import load_dense_moco
from lightly_mcp.methods.distill import (
    SEED_STUDENT_TEMPERATURE,
    SEED_TEACHER_TEMPERATURE,
    SEEDLoss,
)
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.methods.transforms import ToRGB
from lightly_mcp.pruning.batchnorm import merge_split_batchnorm, use_split_batchnorm
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import ChannelGroup
from lightly_mcp.pruning.masks import GroupMasks, output_feature_index, register_masks
from lightly_mcp.pruning.measure import eval_mode
from lightly_mcp.pruning.prunable_groups import find_channel_groups

MASKS_FROM = ("magnitude", "first")


# --- masks and surgery --------------------------------------------------------------
def uniform_masks(
    groups: Sequence[ChannelGroup],
    ratio: float,
    masks_from: str,
    network: nn.Module | None = None,
) -> GroupMasks:
    """Per group, the boolean mask of the n_g kept channels.

    Args:
        groups: The channel groups.
        ratio: Fraction of channels removed in every group.
        masks_from: ``"magnitude"``: the top n_g channels (whole units) of
            ``network`` by ``channel_scores`` (filter-magnitude pruning,
            ``GroupMasks.top_k``); ``"first"``: the first n_g channels, the
            architecture only (``GroupMasks.leading``).
        network: The network whose weights rank the channels (``"magnitude"``).

    Examples:
        >>> groups = find_channel_groups(backbone, keep_output_dim=False)
        >>> masks = uniform_masks(groups, 0.5, "magnitude", backbone)
        >>> small = compact(backbone, groups, masks.tensors())
    """
    if masks_from not in MASKS_FROM:
        raise ValueError(f"masks_from must be one of {MASKS_FROM}, got {masks_from!r}.")
    if masks_from == "first":
        return GroupMasks.leading(groups, ratio)
    if network is None:
        raise ValueError("masks_from='magnitude' needs the network to rank.")
    return GroupMasks.top_k(groups, ratio, dict(network.named_parameters()))


def prune_network(
    network: Backbone, ratio: float, input_size: int, masks_from: str
) -> tuple[Backbone, Tensor]:
    """The compact copy of ``network`` (feature dimension pruned too) and the indices
    of the output features it keeps.

    Args:
        network: A backbone (``build_backbone``).
        ratio: Fraction of channels removed in every group.
        input_size: Image size for tracing the channel groups.
        masks_from: See :func:`uniform_masks`.
    """
    example = torch.randn(1, 3, input_size, input_size)
    groups = find_channel_groups(network, example, keep_output_dim=False)
    masks = uniform_masks(groups, ratio, masks_from, network)
    small = compact(network, groups, masks.tensors(), example)
    assert isinstance(small, Backbone)  # a copy of the network
    kept, _ = output_feature_index(groups, masks, network.feature_dim)
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
    """Fresh random weights with torchvision's MobileNetV2/ResNet initialisation."""
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


# --- self-supervised baselines ------------------------------------------------------
def _start_from_dense(
    model: MoCoV2, dense_checkpoint: str | None, input_size: int
) -> tuple[list[ChannelGroup], Tensor]:
    """Loads the dense start (if any) into ``model`` and finds its backbone's channel
    groups with the feature dimension pruned too (``keep_output_dim=False``).

    Returns:
        The groups and the example batch they were traced with.
    """
    if dense_checkpoint is not None:
        load_dense_moco(model, dense_checkpoint)
    example = torch.randn(1, 3, input_size, input_size)
    groups = find_channel_groups(model.backbone, example, keep_output_dim=False)
    return groups, example


class CompactMoCoV2(MoCoV2):
    """MoCo v2 on a physically pruned backbone: typical pruning, small from scratch.

    The channel groups (``keep_output_dim=False``) of the dense backbone are traced,
    n_g channels per group are kept, the query and momentum backbones are replaced by
    ``compact`` copies and the projection heads lose the dropped feature inputs.

    Args:
        pruning_ratio: Fraction of channels removed in every group.
        input_size: Image size for tracing.
        dense_checkpoint: Dense MoCo checkpoint loaded before pruning.
        masks_from: ``"magnitude"``: the top-n_g channels of the momentum encoder by
            ``channel_scores`` (filter-magnitude pruning); ``"first"``: the first n_g
            channels (architecture only, with ``reinit``).
        reinit: Re-initialise the compact networks (training from scratch).
        **kwargs: Arguments of :class:`MoCoV2`.

    Examples:
        >>> # typical pruning: magnitude masks of the dense model, then MoCo v2
        >>> model = CompactMoCoV2(pruning_ratio=0.76, masks_from="magnitude",
        ...                       dense_checkpoint="pretrain/final.ckpt",
        ...                       backbone="torchvision/mobilenet_v2")
        >>> # small from scratch: the same architecture from random init
        >>> model = CompactMoCoV2(pruning_ratio=0.76, masks_from="first",
        ...                       reinit=True, backbone="torchvision/mobilenet_v2")
        >>> pytorch_lightning.Trainer(max_steps=1200).fit(model, dataloader)
        >>> compact_backbone = model.backbone_momentum
    """

    def __init__(
        self,
        pruning_ratio: float = 0.73,
        input_size: int = 32,
        dense_checkpoint: str | None = None,
        masks_from: str = "magnitude",
        reinit: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        groups, example = _start_from_dense(self, dense_checkpoint, input_size)
        masks = uniform_masks(groups, pruning_ratio, masks_from, self.backbone_momentum)
        index, _ = output_feature_index(groups, masks, self.backbone.feature_dim)
        split = int(self.hparams["split_batch_norm"])
        for name in ("backbone", "backbone_momentum"):
            dense = getattr(self, name)
            small = compact(dense, groups, masks.tensors(), example)
            assert isinstance(small, Backbone)  # a copy of the dense backbone
            if split > 1:
                use_split_batchnorm(small, split)
            small.feature_dim = len(index)
            setattr(self, name, small)
        slice_head_input(self.projection_head, index)
        slice_head_input(self.projection_head_momentum, index)
        if reinit:
            torchvision_init(self.backbone)
            torchvision_init(self.projection_head)
            self.backbone_momentum.load_state_dict(self.backbone.state_dict())
            self.projection_head_momentum.load_state_dict(
                self.projection_head.state_dict()
            )
        self.backbone_momentum.requires_grad_(False)
        self.projection_head_momentum.requires_grad_(False)


class RandomMaskMoCoV2(MoCoV2):
    """MoCo v2 with a fixed random mask φ on the momentum update (the paper's Eq. 3).

    ``θ_k ← m·θ_k + φ ⊙ (1 − m)·θ_q`` for every output-side member parameter of the
    channel groups (``keep_output_dim=False``), ``θ_k⁰ = φ ⊙ θ_q``; all other
    parameters (and the projection head) follow the plain momentum update. Dropped
    channels of the key encoder are therefore exactly zero at all times (weights,
    norm scale and shift), so the key encoder *is* the masked network, and
    ``compact_key_encoder()`` is its physically pruned copy. The query encoder is not
    masked. The mask is ``GroupMasks.random`` of ``mask_seed``, owned by the model
    (``group_masks``, saved as ``mask_{g}``); φ per parameter is its
    ``multipliers()``, as for the momentum subnet and ADMM.

    Args:
        pruning_ratio: Fraction of channels removed in every group.
        input_size: Image size for tracing.
        mask_seed: Seed of the random mask.
        dense_checkpoint: Dense MoCo checkpoint to start from (None: random init).
        **kwargs: Arguments of :class:`MoCoV2`.

    Examples:
        >>> model = RandomMaskMoCoV2(pruning_ratio=0.76, mask_seed=0,
        ...                          dense_checkpoint="pretrain/final.ckpt",
        ...                          backbone="torchvision/mobilenet_v2")
        >>> pytorch_lightning.Trainer(max_steps=1200).fit(model, dataloader)
        >>> compact_backbone = model.compact_key_encoder()
    """

    group_masks: GroupMasks

    def __init__(
        self,
        pruning_ratio: float = 0.73,
        input_size: int = 32,
        mask_seed: int = 0,
        dense_checkpoint: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.groups, _ = _start_from_dense(self, dense_checkpoint, input_size)
        register_masks(
            self, GroupMasks.random(self.groups, pruning_ratio, seed=mask_seed)
        )
        self.reset_momentum_encoder()

    @property
    def masks(self) -> GroupMasks:
        """Per group, the boolean mask of kept channels (φ)."""
        return self.group_masks

    @torch.no_grad()
    def reset_momentum_encoder(self) -> None:
        """``θ_k⁰ = φ ⊙ θ_q`` (backbone; the head is copied as it is)."""
        query = dict(self.backbone.named_parameters())
        phi = self.group_masks.multipliers(query)
        for name, p_k in self.backbone_momentum.named_parameters():
            p_q = query[name].detach()
            mult = phi.get(name)
            p_k.copy_(p_q if mult is None else p_q * mult)
        self.projection_head_momentum.load_state_dict(self.projection_head.state_dict())

    @torch.no_grad()
    def update_momentum_encoder(self) -> None:
        """``θ_k ← m·θ_k + φ ⊙ (1 − m)·θ_q``; plain update outside the groups."""
        m = float(self.hparams["momentum"])
        query = dict(self.backbone.named_parameters())
        phi = self.group_masks.multipliers(query)
        for name, p_k in self.backbone_momentum.named_parameters():
            p_q = query[name].detach()
            mult = phi.get(name)
            p_k.mul_(m).add_(p_q if mult is None else p_q * mult, alpha=1.0 - m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)

    def compact_key_encoder(self) -> nn.Module:
        """The physically pruned key encoder (equal to the masked one)."""
        size = self.hparams["input_size"]
        return compact(
            self.backbone_momentum,
            self.groups,
            self.group_masks.tensors(),
            torch.randn(1, 3, size, size, device=self.device),
        )


class DistilledSmall(CompactMoCoV2):
    """The compact architecture trained by SEED distillation from the dense model,
    without labels (:class:`~lightly_mcp.methods.distill.SEEDLoss`).

    The student is :class:`CompactMoCoV2`'s query side (compact backbone and
    projection head; the momentum side is removed): from random init
    (``masks_from="first"``, ``reinit=True``: distillation) or from the dense model's
    magnitude-pruned weights (``masks_from="magnitude"`` with ``dense_checkpoint``:
    pruned + distilled). The teacher is the dense model's momentum encoder and
    projection head (``teacher_checkpoint``), frozen and always in eval mode; it
    embeds the same augmented view as the student, and its embeddings form the
    queue (``memory_bank_size``).

    Args:
        teacher_checkpoint: Dense MoCo checkpoint of the teacher.
        student_temperature: SEED's τ_s.
        teacher_temperature: SEED's τ_t.
        **kwargs: Arguments of :class:`CompactMoCoV2` and :class:`MoCoV2`.

    Examples:
        >>> model = DistilledSmall(teacher_checkpoint="pretrain/final.ckpt",
        ...                        pruning_ratio=0.76, masks_from="first",
        ...                        reinit=True, backbone="torchvision/mobilenet_v2")
        >>> pytorch_lightning.Trainer(max_steps=1200).fit(model, dataloader)
        >>> compact_backbone = model.backbone
    """

    def __init__(
        self,
        teacher_checkpoint: str,
        student_temperature: float = SEED_STUDENT_TEMPERATURE,
        teacher_temperature: float = SEED_TEACHER_TEMPERATURE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        del self.backbone_momentum, self.projection_head_momentum
        moco_keys = inspect.signature(MoCoV2).parameters
        teacher = MoCoV2(**{k: v for k, v in kwargs.items() if k in moco_keys})
        load_dense_moco(teacher, teacher_checkpoint)
        merge_split_batchnorm(teacher.backbone_momentum)
        self.teacher_backbone = teacher.backbone_momentum.requires_grad_(False)
        self.teacher_head = teacher.projection_head_momentum.requires_grad_(False)
        self.criterion = SEEDLoss(
            queue_size=int(self.hparams["memory_bank_size"]),
            dim=int(self.hparams["projection_dim"]),
            student_temperature=student_temperature,
            teacher_temperature=teacher_temperature,
            gather_distributed=True,
        )
        self.train()

    def train(self, mode: bool = True) -> DistilledSmall:
        """Sets the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        return self

    @torch.no_grad()
    def teacher_embeddings(self, x: Tensor) -> Tensor:
        """The frozen teacher's projections of ``x``."""
        embeddings: Tensor = self.teacher_head(self.teacher_backbone(self._layout(x)))
        return embeddings

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One SEED step on the first view of ``batch`` (student and teacher see the
        same image).
        """
        view = batch[0][0]
        loss: Tensor = self.criterion(
            self.forward_query_encoder(view), self.teacher_embeddings(view)
        )
        self.check_finite(loss)
        self.log(
            "train_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(view)
        )
        return loss


# --- supervised baselines -----------------------------------------------------------
def supervised_transform(input_size: int, min_scale: float) -> Any:
    """One augmented view: random resized crop, horizontal flip, normalisation
    (MoCo v2's crop scale and normalisation, no colour augmentation).
    """
    return T.Compose(
        [
            ToRGB(),
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

    Examples:
        >>> # the compact architecture trained with the labels from scratch
        >>> model = SupervisedClassifier("torchvision/mobilenet_v2",
        ...                              {"small_input": True}, pruning_ratio=0.76,
        ...                              masks_from="first", reinit=True)
        >>> pytorch_lightning.Trainer(max_steps=1000).fit(model, labelled_loader)
        >>> top1 = model.test_top1(test_loader)
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
            classifier = slice_linear_input(classifier, kept)
        if reinit:
            torchvision_init(network)
            torchvision_init(classifier)
        self.backbone = network
        self.classifier = classifier
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, images: Tensor) -> Tensor:
        """Class logits of ``images``."""
        return self.classifier(self.backbone(images))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy of a batch ``(images, labels, ...)``."""
        images, labels = batch[0], batch[1]
        loss = self.criterion(self(images), labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self) -> Any:
        """SGD (no weight decay on norms and biases) with a cosine over the run."""
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
        correct = total = 0
        with eval_mode(self):
            for batch in loader:
                images, labels = batch[0].to(self.device), batch[1].to(self.device)
                correct += int((self(images).argmax(1) == labels).sum())
                total += len(labels)
        return correct / max(1, total)
