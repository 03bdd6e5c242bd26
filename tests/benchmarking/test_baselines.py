"""Tests of lightly_mcp.benchmarking.baselines: the paper's comparison methods."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightly_mcp.app.assemble import moco_kwargs
from lightly_mcp.benchmarking.baselines import (
    CompactMoCoV2,
    DistilledSmall,
    RandomMaskMoCoV2,
    SupervisedClassifier,
    uniform_masks,
)
from lightly_mcp.methods.checkpoints import read_checkpoint
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import channel_scores
from lightly_mcp.pruning.masks import GroupMasks, output_feature_index
from lightly_mcp.pruning.measure import count_parameters
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from tests.conftest import randomize_batchnorm
from tests.helpers import TINY, loader, trainer
from tests.tiny import tiny_recipe


# --- random mask ----------------------------------------------------------------------
def test_random_mask_momentum_update_is_exact() -> None:
    torch.manual_seed(0)
    model = RandomMaskMoCoV2(pruning_ratio=0.5, input_size=16, **TINY)
    m = model.hparams["momentum"]
    key = dict(model.backbone_momentum.named_parameters())
    query = dict(model.backbone.named_parameters())
    multipliers = model.masks.multipliers(query)
    masked = 0
    # θ_k⁰ = φ ⊙ θ_q.
    for name, p_k in key.items():
        mult = multipliers.get(name)
        expected = query[name] if mult is None else query[name] * mult
        assert torch.equal(p_k, expected)
        if mult is not None:
            masked += int((mult == 0).sum())
    assert masked > 0
    # Move the query encoder, then one update.
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in key.items()}
    model.update_momentum_encoder()
    for name, p_k in key.items():
        mult = multipliers.get(name)
        q = query[name].detach()
        phi = torch.ones_like(q) if mult is None else mult.expand_as(q)
        expected = m * before[name] + phi * (1 - m) * q
        torch.testing.assert_close(p_k, expected, rtol=0, atol=1e-6)
        if mult is not None:  # dropped entries stay at φ ⊙ θ_q⁰ = 0
            assert torch.all(p_k[phi.expand_as(p_k) == 0] == 0)


def test_random_mask_is_seeded_and_its_key_encoder_is_the_compact_network() -> None:
    torch.manual_seed(0)
    model = RandomMaskMoCoV2(pruning_ratio=0.5, input_size=16, mask_seed=3, **TINY)
    groups = model.groups
    expected = GroupMasks.random(groups, 0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.masks, expected))
    other = GroupMasks.random(groups, 0.5, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(model.masks, other))
    assert model.masks.kept_channels() == [g.num_kept(0.5) for g in groups]
    # Checkpoints keep the masks as the model's own mask_{g} buffers.
    state = model.state_dict()
    assert all(torch.equal(state[f"mask_{g}"], m) for g, m in enumerate(model.masks))
    # The masked key encoder equals its compact copy on the kept features.
    randomize_batchnorm(model.backbone_momentum)
    model.reset_momentum_encoder()  # BatchNorm weights and biases masked again
    key = model.backbone_momentum.eval()
    small = model.compact_key_encoder().eval()
    kept, _ = output_feature_index(groups, model.masks, key.feature_dim)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), key(x)[:, kept], rtol=1e-4, atol=1e-5)
    assert count_parameters(small) < count_parameters(key)


# --- typical pruning and small from scratch ------------------------------------------
def test_typical_pruning_masks_are_the_top_k_channels_by_magnitude() -> None:
    torch.manual_seed(0)
    network = randomize_batchnorm(MoCoV2(**TINY).backbone)
    groups = find_channel_groups(
        network, torch.randn(1, 3, 16, 16), keep_output_dim=False
    )
    masks = uniform_masks(groups, 0.5, "magnitude", network)
    params = dict(network.named_parameters())
    for group, mask in zip(groups, masks):
        scores = channel_scores(params, group)
        assert int(mask.sum()) == group.num_kept(0.5)
        assert scores[mask].min() >= scores[~mask].max()
    first = uniform_masks(groups, 0.5, "first")
    for group, mask in zip(groups, first):
        assert (
            mask[: group.num_kept(0.5)].all() and not mask[group.num_kept(0.5) :].any()
        )
    with pytest.raises(ValueError, match="masks_from must be one of"):
        uniform_masks(groups, 0.5, "largest", network)


def test_typical_pruning_prunes_the_dense_momentum_encoder(tiny_dense: Path) -> None:
    recipe = tiny_recipe()
    kwargs = moco_kwargs(recipe, "mcp")
    torch.manual_seed(0)
    model = CompactMoCoV2(
        pruning_ratio=0.5, input_size=16, dense_checkpoint=str(tiny_dense), **kwargs
    )
    dense = MoCoV2(**kwargs)
    dense.load_state_dict(read_checkpoint(tiny_dense)["state_dict"])
    momentum = dense.backbone_momentum
    example = torch.randn(1, 3, 16, 16)
    groups = find_channel_groups(momentum, example, keep_output_dim=False)
    params = dict(momentum.named_parameters())
    masks = []
    for group in groups:  # the top n_g channels of the momentum encoder
        order = channel_scores(params, group).argsort(descending=True)
        mask = torch.zeros(group.num_channels, dtype=torch.bool)
        mask[order[: group.num_kept(0.5)]] = True
        masks.append(mask)
    expected = compact(momentum, groups, masks, example).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone_momentum.eval()(x), expected(x))
    # The heads read only the kept features (the dropped ones are zero).
    kept, dropped = output_feature_index(groups, masks, momentum.feature_dim)
    features = torch.randn(4, momentum.feature_dim)
    features[:, dropped] = 0
    head = model.projection_head_momentum.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            head(features[:, kept]), dense.projection_head_momentum.eval()(features)
        )


def test_typical_pruning_is_smaller_and_trains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = MoCoV2(**TINY)
    model = CompactMoCoV2(pruning_ratio=0.5, input_size=16, **TINY)
    assert count_parameters(model.backbone) < count_parameters(dense.backbone)
    assert count_parameters(model.backbone_momentum) == count_parameters(model.backbone)
    x = torch.randn(2, 3, 16, 16)
    assert model.projection_head(model.backbone(x)).shape == (2, 16)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    trainer(tmp_path, max_steps=1).fit(model, loader())
    after = list(model.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_small_from_scratch_is_the_compact_architecture_reinitialised() -> None:
    torch.manual_seed(0)
    model = CompactMoCoV2(
        pruning_ratio=0.5, input_size=16, masks_from="first", reinit=True, **TINY
    )
    dense = MoCoV2(**TINY).backbone
    example = torch.randn(1, 3, 16, 16)
    groups = find_channel_groups(dense, example, keep_output_dim=False)
    small = compact(dense, groups, GroupMasks.leading(groups, 0.5).tensors(), example)
    assert [p.shape for p in model.backbone.parameters()] == [
        p.shape for p in small.parameters()
    ]
    query, key = model.backbone.state_dict(), model.backbone_momentum.state_dict()
    assert all(torch.equal(query[k], key[k]) for k in query)
    assert not any(p.requires_grad for p in model.backbone_momentum.parameters())


# --- distillation ---------------------------------------------------------------------
def test_distillation_student_is_the_compact_network_and_the_teacher_is_frozen_dense(
    tiny_dense: Path, tmp_path: Path
) -> None:
    recipe = tiny_recipe()
    kwargs = moco_kwargs(recipe, "mcp")
    torch.manual_seed(0)
    model = DistilledSmall(
        teacher_checkpoint=str(tiny_dense),
        pruning_ratio=0.5,
        input_size=16,
        masks_from="first",
        reinit=True,
        **kwargs,
    )
    assert not hasattr(model, "backbone_momentum")
    torch.manual_seed(0)
    small = CompactMoCoV2(
        pruning_ratio=0.5, input_size=16, masks_from="first", reinit=True, **kwargs
    )
    assert [p.shape for p in model.backbone.parameters()] == [
        p.shape for p in small.backbone.parameters()
    ]
    # The teacher is the dense model's momentum encoder and head, in eval mode.
    dense = MoCoV2(**kwargs)
    dense.load_state_dict(read_checkpoint(tiny_dense)["state_dict"])
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert model.backbone.training and not model.teacher_backbone.training
    assert not model.teacher_head.training
    with torch.no_grad():
        expected = dense.projection_head_momentum.eval()(
            dense.backbone_momentum.eval()(x)
        )
        torch.testing.assert_close(model.teacher_embeddings(x), expected)
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())
    # One SEED step moves the student, not the teacher; the teacher fills the queue.
    teacher_before = {
        k: v.clone() for k, v in model.teacher_backbone.state_dict().items()
    }
    student_before = [p.detach().clone() for p in model.backbone.parameters()]
    trainer(tmp_path, max_steps=1).fit(model, loader(n=16, batch_size=8))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.backbone.parameters(), student_before)
    )
    for key, value in model.teacher_backbone.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert int(model.criterion.memory_bank.bank_ptr) == 8
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    torch.testing.assert_close(
        checkpoint["memory_bank"]["bank"], model.criterion.memory_bank.bank
    )


def test_pruned_and_distilled_starts_from_the_typical_pruning_weights(
    tiny_dense: Path,
) -> None:
    kwargs = moco_kwargs(tiny_recipe(), "mcp")
    common = dict(pruning_ratio=0.5, input_size=16, dense_checkpoint=str(tiny_dense))
    torch.manual_seed(0)
    model = DistilledSmall(
        teacher_checkpoint=str(tiny_dense), masks_from="magnitude", **common, **kwargs
    )
    typical = CompactMoCoV2(masks_from="magnitude", **common, **kwargs)
    student, pruned = model.backbone.state_dict(), typical.backbone.state_dict()
    assert student.keys() == pruned.keys()
    assert all(torch.equal(student[k], pruned[k]) for k in student)


# --- supervised -----------------------------------------------------------------------
def test_supervised_classifier_trains_and_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SupervisedClassifier(
        backbone=TINY["backbone"],
        backbone_kwargs=TINY["backbone_kwargs"],
        num_classes=3,
        batch_size_per_device=8,
        pruning_ratio=0.5,
        masks_from="first",
        reinit=True,
        input_size=16,
    )
    dense = SupervisedClassifier(
        backbone=TINY["backbone"], backbone_kwargs=TINY["backbone_kwargs"]
    )
    assert count_parameters(model.backbone) < count_parameters(dense.backbone) / 3
    assert model.classifier.in_features == model.backbone.feature_dim
    images = torch.randn(16, 3, 16, 16)
    labels = torch.randint(0, 3, (16,))
    data = torch.utils.data.TensorDataset(images, labels)
    before = [p.detach().clone() for p in model.parameters()]
    trainer(tmp_path, max_steps=2).fit(
        model, torch.utils.data.DataLoader(data, batch_size=8)
    )
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    # test_top1 is the classifier's own accuracy, in eval mode.
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(1)
    top1 = model.test_top1(torch.utils.data.DataLoader(data, batch_size=5))
    assert top1 == pytest.approx(float((predicted == labels).float().mean()))
    model.train()
    model.test_top1(torch.utils.data.DataLoader(data, batch_size=5))
    assert model.training
