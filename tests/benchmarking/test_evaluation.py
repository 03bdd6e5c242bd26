"""Tests of frozen-feature evaluation (kNN, linear probe, embedding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightly_mcp.benchmarking.evaluation import (
    embed,
    evaluate_backbone,
    knn_top1,
    linear_probe_top1,
    raw_pixel_baseline,
)


def reference_knn_predictions(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    k: int,
    t: float,
    num_classes: int,
) -> torch.Tensor:
    """Brute-force weighted kNN, one query at a time."""
    train_n = train_x / train_x.norm(dim=1, keepdim=True)
    test_n = test_x / test_x.norm(dim=1, keepdim=True)
    k = min(k, len(train_x))
    predictions = []
    for query in test_n:
        sims = (train_n * query).sum(dim=1)
        order = torch.argsort(sims, descending=True)[:k]
        scores = torch.zeros(num_classes, dtype=torch.float64)
        for i in order.tolist():
            scores[int(train_y[i])] += torch.exp(sims[i].double() / t)
        predictions.append(int(scores.argmax()))
    return torch.tensor(predictions)


def random_problem(seed: int, n_train: int, n_test: int, dim: int, classes: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_train, dim, generator=g),
        torch.randint(0, classes, (n_train,), generator=g),
        torch.randn(n_test, dim, generator=g),
        torch.randint(0, classes, (n_test,), generator=g),
    )


def blobs(seed: int, n_per_class: int, dim: int = 16, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(
        classes, dim, generator=torch.Generator().manual_seed(99)
    )
    x = torch.cat([c + torch.randn(n_per_class, dim, generator=g) for c in centres])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


@pytest.mark.parametrize("k", [1, 5, 20, 1000])
def test_knn_matches_brute_force(k: int) -> None:
    train_x, train_y, test_x, test_y = random_problem(0, 60, 40, 8, 4)
    expected = reference_knn_predictions(train_x, train_y, test_x, k, 0.1, 4)
    expected_acc = int((expected == test_y).sum()) / len(test_y)
    assert (
        knn_top1(train_x, train_y, test_x, test_y, k=k, temperature=0.1) == expected_acc
    )
    # Batching over test samples gives the same answer.
    assert knn_top1(
        train_x, train_y, test_x, test_y, k=k, temperature=0.1, batch_size=7
    ) == knn_top1(train_x, train_y, test_x, test_y, k=k, temperature=0.1)


def test_knn_predictions_match_per_sample() -> None:
    # Accuracy equality could hide compensating errors: compare each prediction by
    # querying one test sample at a time (accuracy is then 0 or 1 per sample).
    train_x, train_y, test_x, _ = random_problem(1, 50, 25, 6, 3)
    expected = reference_knn_predictions(train_x, train_y, test_x, 10, 0.5, 3)
    for i in range(len(test_x)):
        for label in range(3):
            acc = knn_top1(
                train_x,
                train_y,
                test_x[i : i + 1],
                torch.tensor([label]),
                k=10,
                temperature=0.5,
                num_classes=3,
            )
            assert acc == float(label == int(expected[i]))


def test_separated_clusters_are_easy() -> None:
    train_x, train_y = blobs(0, 50)
    test_x, test_y = blobs(1, 30)
    assert knn_top1(train_x, train_y, test_x, test_y, k=20) == 1.0
    assert linear_probe_top1(train_x, train_y, test_x, test_y, epochs=10) >= 0.95


def test_random_labels_are_near_chance() -> None:
    train_x, _, test_x, _ = random_problem(2, 400, 400, 16, 2)
    g = torch.Generator().manual_seed(3)
    train_y = torch.randint(0, 2, (400,), generator=g)
    test_y = torch.randint(0, 2, (400,), generator=g)
    assert knn_top1(train_x, train_y, test_x, test_y, k=20) < 0.6
    assert linear_probe_top1(train_x, train_y, test_x, test_y, epochs=10) < 0.6


def test_linear_probe_is_deterministic() -> None:
    train_x, train_y, test_x, test_y = random_problem(4, 200, 100, 8, 3)
    first = linear_probe_top1(train_x, train_y, test_x, test_y, epochs=5, seed=7)
    second = linear_probe_top1(train_x, train_y, test_x, test_y, epochs=5, seed=7)
    assert first == second


def test_linear_probe_does_not_depend_on_the_features_scale() -> None:
    """A random-init MobileNetV2 has features of ~1e-8 (every dimension flatter than
    an absolute floor of 1e-6); its probe scored below chance until the floor
    became relative to the widest dimension."""
    train_x, train_y = blobs(0, 50)
    test_x, test_y = blobs(1, 30)
    train_x = torch.cat([train_x, torch.zeros(len(train_x), 1)], dim=1)  # constant
    test_x = torch.cat([test_x, torch.zeros(len(test_x), 1)], dim=1)
    reference = linear_probe_top1(train_x, train_y, test_x, test_y, epochs=5)
    assert reference >= 0.95
    for scale in (1e-8, 1e4):
        scaled = linear_probe_top1(
            scale * train_x, train_y, scale * test_x, test_y, epochs=5
        )
        assert scaled == reference, scale


def test_linear_probe_accepts_inference_tensors() -> None:
    train_x, train_y = blobs(0, 20)
    with torch.inference_mode():
        x = train_x.clone()
        y = train_y.clone()
        assert linear_probe_top1(x, y, x, y, epochs=3) >= 0.95


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_grad_enabled = torch.is_grad_enabled()
        self.last_training = self.training
        return self.pool(torch.relu(self.bn(self.conv(x))))  # [B, 5, 1, 1]


def image_loader(
    n: int, labels: torch.Tensor | None = None, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g)
    if labels is None:
        labels = torch.arange(n) % 3
    names = torch.arange(n)  # an extra item, as lightly datasets yield filenames
    return DataLoader(TensorDataset(images, labels, names), batch_size=4)


def test_embed_shapes_labels_and_mode() -> None:
    torch.manual_seed(0)
    model = TinyBackbone()
    model.train()
    running_mean = model.bn.running_mean.clone()
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 1])
    features, got_labels = embed(model, image_loader(10, labels))
    assert features.shape == (10, 5)
    assert features.dtype == torch.float32
    assert got_labels.dtype == torch.long
    assert torch.equal(got_labels, labels)
    assert model.training and model.bn.training
    assert model.last_training is False
    assert model.last_grad_enabled is False
    assert not features.requires_grad
    assert torch.equal(model.bn.running_mean, running_mean)  # eval mode: no update
    # Eval-mode model stays in eval; mixed modes are restored per submodule.
    model.eval()
    embed(model, image_loader(10, labels), progress=True)
    assert not model.training
    model.train()
    model.bn.eval()
    embed(model, image_loader(10, labels))
    assert model.training and not model.bn.training
    # Same features as a plain eval forward pass.
    with torch.no_grad():
        expected = model.eval()(image_loader(10, labels).dataset.tensors[0]).flatten(1)
    assert torch.allclose(features, expected, atol=1e-6)


def test_evaluate_backbone_keys() -> None:
    torch.manual_seed(0)
    model = TinyBackbone()
    result = evaluate_backbone(
        model, image_loader(24), image_loader(12, seed=1), k=5, linear_epochs=2
    )
    assert set(result) == {
        "knn_top1",
        "linear_top1",
        "feature_dim",
        "num_train",
        "num_test",
        "settings",
    }
    assert set(result["settings"]) == {
        "k",
        "temperature",
        "linear_epochs",
        "seed",
        "linear_probe",
        "knn",
    }
    assert 0.0 <= result["knn_top1"] <= 1.0
    assert 0.0 <= result["linear_top1"] <= 1.0
    assert result["feature_dim"] == 5
    assert result["num_train"] == 24
    assert result["num_test"] == 12
    assert result["settings"]["k"] == 5
    assert model.training  # mode restored


def test_evaluate_backbone_rejects_unlabelled_data() -> None:
    unlabelled = image_loader(8, labels=torch.full((8,), -1))
    with pytest.raises(ValueError, match="needs labels"):
        evaluate_backbone(TinyBackbone(), unlabelled, unlabelled, k=3)


def test_raw_pixel_baseline() -> None:
    # Two classes differing in pattern, plus a large common offset that dominates
    # uncentred cosine similarity.
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(2, 3, 4, 4, generator=g)

    def loader(n: int) -> DataLoader:
        labels = torch.arange(n) % 2
        images = 20.0 + pattern[labels] + 4.0 * torch.randn(n, 3, 4, 4, generator=g)
        return DataLoader(TensorDataset(images, labels), batch_size=8)

    train, test = loader(40), loader(40)
    centred = raw_pixel_baseline(train, test, k=5, center=True)
    plain = raw_pixel_baseline(train, test, k=5, center=False)
    for result in (centred, plain):
        assert set(result) == {
            "knn_top1",
            "feature_dim",
            "num_train",
            "num_test",
            "settings",
        }
        assert result["feature_dim"] == 48
        assert result["num_train"] == 40 and result["num_test"] == 40
    assert centred["settings"]["center"] is True
    assert plain["settings"]["center"] is False
    # Deterministic for these seeds: 0.85 centred vs 0.75 uncentred.
    assert centred["knn_top1"] >= 0.8
    assert centred["knn_top1"] > plain["knn_top1"]
    # With linear_epochs the same pixels also get a linear probe (deterministic for
    # the seed, above chance on this separable pattern).
    with_probe = raw_pixel_baseline(train, test, k=5, linear_epochs=20, seed=0)
    again = raw_pixel_baseline(train, test, k=5, linear_epochs=20, seed=0)
    assert with_probe["knn_top1"] == centred["knn_top1"]
    assert with_probe["linear_top1"] == again["linear_top1"] > 0.6
    assert with_probe["settings"]["linear_epochs"] == 20
