"""BatchNorm folding: the folded network computes what the unfolded one did."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from lightly_mcp.errors import ExportError, InputError
from lightly_mcp.formats.folding import ConvNorm, conv_norm_pairs, fold_batchnorm

SIZE = 16


def _randomise_norms(net: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters, so folding changes weights."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator))
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=generator))
    return net.eval()


def _same_function(net: nn.Module, folded: nn.Module) -> None:
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = net.double()(x.double())
        got = folded.double()(x.double())
    # Folding rounds the weights in float32.
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_conv_bn_relu_folds_to_conv_relu() -> None:
    net = _randomise_norms(
        nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    )
    folded = copy.deepcopy(net)
    assert fold_batchnorm(folded, torch.randn(2, 3, SIZE, SIZE)) == 1
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None  # a convolution without bias gets one
    _same_function(net, folded)


def test_timm_norm_act_keeps_its_activation() -> None:
    net = timm.create_model("efficientnet_b0", num_classes=0, drop_rate=0.0)
    net = _randomise_norms(net)
    folded = copy.deepcopy(net)
    count = fold_batchnorm(folded, torch.randn(2, 3, SIZE, SIZE))
    norm_acts = [m for m in net.modules() if isinstance(m, BatchNormAct2d)]
    assert count == len(norm_acts) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(folded.bn1, nn.Sequential)
    assert isinstance(folded.bn1[1], nn.SiLU)
    _same_function(net, folded)


class _Shared(nn.Module):
    """One norm applied after two convolutions, and a norm after a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.shared = nn.BatchNorm2d(4)
        self.after_cat = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.shared(self.a(x)), self.shared(self.b(x))
        return self.after_cat(torch.cat([left, right], 1))


def test_norms_that_are_not_one_conv_s_are_left() -> None:
    net = _randomise_norms(_Shared())
    assert conv_norm_pairs(net, torch.randn(2, 3, SIZE, SIZE)) == []
    folded = copy.deepcopy(net)
    assert fold_batchnorm(folded, torch.randn(2, 3, SIZE, SIZE)) == 0
    _same_function(net, folded)


def test_conv_output_used_twice_is_not_folded() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(y) + y

    net = _randomise_norms(Twice())
    assert conv_norm_pairs(net, torch.randn(2, 3, SIZE, SIZE)) == []


def test_train_mode_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(InputError, match=r"train mode; call model.eval\(\)"):
        fold_batchnorm(net, torch.randn(2, 3, SIZE, SIZE))


def test_untraceable_network_is_an_export_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x > 0].sum().reshape(1) if x.sum() > 0 else x.flatten()

    with pytest.raises(ExportError, match="Cannot trace the network"):
        fold_batchnorm(DataDependent().eval(), torch.randn(2, 3, SIZE, SIZE))


def test_given_pairs_fold_a_network_with_the_same_graph_without_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pairs found on a wide network fold a narrower one of the same graph (what the
    export does with the dense and the compact network) exactly as tracing it would.
    """
    import torchvision

    wide = torchvision.models.mobilenet_v2(width_mult=1.0, num_classes=10).eval()
    narrow = _randomise_norms(torchvision.models.mobilenet_v2(width_mult=0.5))
    pairs = conv_norm_pairs(wide, torch.randn(2, 3, SIZE, SIZE))
    assert pairs == conv_norm_pairs(narrow, torch.randn(2, 3, SIZE, SIZE))
    traced = copy.deepcopy(narrow)
    count = fold_batchnorm(traced, torch.randn(2, 3, SIZE, SIZE))

    def no_trace(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced although the pairs were given")

    monkeypatch.setattr(torch.export, "export", no_trace)
    given = copy.deepcopy(narrow)
    assert fold_batchnorm(given, torch.randn(2, 3, SIZE, SIZE), pairs) == count == 52
    for a, b in zip(traced.state_dict().items(), given.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    _same_function(narrow, given)


def test_pairs_of_another_graph_are_refused_and_change_nothing() -> None:
    net = _randomise_norms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    )
    before = copy.deepcopy(net.state_dict())
    good = ConvNorm("0", "1")
    for bad in (ConvNorm("2", "1"), ConvNorm("0", "2"), ConvNorm("0", "9")):
        with pytest.raises(ExportError, match=f"Cannot fold '{bad.norm}' into"):
            fold_batchnorm(net, torch.randn(2, 3, SIZE, SIZE), [good, bad])
    assert isinstance(net[1], nn.BatchNorm2d)  # nothing folded, not even the good one
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
