"""Tests for lightly_mcp.methods.backbones: building, small inputs, widths, local weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightly_mcp.errors import InputError
from lightly_mcp.methods.backbones import (
    SUPPORTED_TORCHVISION,
    Backbone,
    backbone_names,
    build_backbone,
)

# name -> (feature dim, downsampling removed by small_input)
BACKBONES: dict[str, tuple[int, int]] = {
    "torchvision/mobilenet_v2": (1280, 2),
    "torchvision/resnet18": (512, 4),
    "torchvision/resnet34": (512, 4),
    "torchvision/resnet50": (2048, 4),
    "timm/resnet18": (512, 4),
    "timm/mobilenetv2_100": (1280, 2),
    "timm/efficientnet_b0": (1280, 2),
}


def _last_conv_spatial_size(backbone: Backbone, x: Tensor) -> tuple[int, int]:
    """Returns the spatial size of the last convolution's output, before pooling."""
    sizes: list[tuple[int, int]] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        sizes.append((output.shape[-2], output.shape[-1]))

    handles = [
        module.register_forward_hook(hook)
        for module in backbone.modules()
        if isinstance(module, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            backbone(x)
    finally:
        for handle in handles:
            handle.remove()
    return sizes[-1]


def _stem(backbone: Backbone) -> tuple[nn.Conv2d, nn.Module | None]:
    """Returns the stem convolution and the early max-pool (None if there is none)."""
    net = backbone.net
    if backbone.name == "torchvision/mobilenet_v2":
        conv = net.get_submodule("features.0.0")
    elif hasattr(net, "conv_stem"):
        conv = net.get_submodule("conv_stem")
    else:
        conv = net.get_submodule("conv1")
    assert isinstance(conv, nn.Conv2d)
    pool = net.get_submodule("maxpool") if hasattr(net, "maxpool") else None
    return conv, pool


def _assert_state_dicts_equal(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


@pytest.mark.parametrize("name", list(BACKBONES))
def test_build_backbone_features(name: str) -> None:
    """Both stems give [B, feature_dim]; small_input keeps a larger feature map."""
    feature_dim, downsampling_removed = BACKBONES[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    default = build_backbone(name).eval()
    small = build_backbone(name, small_input=True).eval()

    for backbone in (default, small):
        assert isinstance(backbone, Backbone)
        assert backbone.name == name
        assert backbone.feature_dim == feature_dim
        with torch.no_grad():
            out = backbone(x)
        assert out.shape == (2, feature_dim)
        assert torch.isfinite(out).all()
        # No classifier: every parameter is the backbone's, under "net.".
        names = [param_name for param_name, _ in backbone.named_parameters()]
        assert all(param_name.startswith("net.") for param_name in names)
        assert not any(
            part in ("fc", "classifier") for n in names for part in n.split(".")
        )

    default_conv, default_pool = _stem(default)
    small_conv, small_pool = _stem(small)
    assert default_conv.stride == (2, 2)
    assert small_conv.stride == (1, 1)
    if default_pool is not None:
        assert isinstance(default_pool, nn.MaxPool2d)
        assert isinstance(small_pool, nn.Identity)

    default_size = _last_conv_spatial_size(default, x)
    small_size = _last_conv_spatial_size(small, x)
    assert small_size == (
        default_size[0] * downsampling_removed,
        default_size[1] * downsampling_removed,
    )


def test_torchvision_resnet_small_input_stem() -> None:
    """The CIFAR stem: conv1 is 3x3, stride 1, padding 1, no bias; same channels."""
    backbone = build_backbone("torchvision/resnet18", small_input=True)
    conv1 = backbone.net.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.kernel_size == (3, 3)
    assert conv1.stride == (1, 1)
    assert conv1.padding == (1, 1)
    assert conv1.bias is None
    assert conv1.out_channels == 64


def test_parameter_names_are_the_networks_under_net() -> None:
    names = dict(build_backbone("torchvision/mobilenet_v2").named_parameters())
    assert "net.features.0.0.weight" in names
    names = dict(build_backbone("timm/efficientnet_b0").named_parameters())
    assert "net.conv_stem.weight" in names


def test_parameters_are_the_networks_without_classifier() -> None:
    """The wrapper adds no parameters: it holds resnet18 minus its fc layer."""
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    expected = sum(p.numel() for p in reference.parameters()) - sum(
        p.numel() for p in reference.fc.parameters()
    )
    backbone = build_backbone("torchvision/resnet18")
    assert sum(p.numel() for p in backbone.parameters()) == expected


@pytest.mark.parametrize(
    ("name", "feature_dim", "size"),
    [
        # mobilenetv3 applies a head conv after pooling: 1024 > num_features (576).
        ("timm/mobilenetv3_small_100", 1024, 32),
        # Attention models can be built (pruning refuses them later).
        ("timm/vit_tiny_patch16_224", 192, 224),
    ],
)
def test_timm_feature_dim(name: str, feature_dim: int, size: int) -> None:
    backbone = build_backbone(name).eval()
    assert backbone.feature_dim == feature_dim
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, size, size)).shape == (1, feature_dim)


@pytest.mark.parametrize(
    ("name", "stem_conv"),
    [
        ("timm/resnet50d", "conv1.0"),  # deep stem: conv1 is a Sequential
        ("timm/test_byobnet", "stem.conv"),  # fallback: first strided conv
    ],
)
def test_timm_small_input_other_stems(name: str, stem_conv: str) -> None:
    backbone = build_backbone(name, small_input=True).eval()
    conv = backbone.net.get_submodule(stem_conv)
    assert isinstance(conv, nn.Conv2d)
    assert conv.stride == (1, 1)
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, backbone.feature_dim)


@pytest.mark.parametrize("name", ["timm/vit_tiny_patch16_224", "timm/test_convnext"])
def test_timm_small_input_refuses_patchify_stems(name: str) -> None:
    with pytest.raises(ValueError, match="small_input is not supported.*patchify"):
        build_backbone(name, small_input=True)


def test_mobilenet_v2_width_multiplier() -> None:
    full = build_backbone("torchvision/mobilenet_v2")
    half = build_backbone("torchvision/mobilenet_v2", width_multiplier=0.5)
    assert sum(p.numel() for p in half.parameters()) < sum(
        p.numel() for p in full.parameters()
    )
    # torchvision keeps last_channel at 1280 for width_mult <= 1.
    assert half.feature_dim == 1280
    with torch.no_grad():
        assert half.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 1280)


def test_timm_width_multiplier() -> None:
    full = build_backbone("timm/test_efficientnet")
    half = build_backbone("timm/test_efficientnet", width_multiplier=0.5)
    assert sum(p.numel() for p in half.parameters()) < sum(
        p.numel() for p in full.parameters()
    )
    with torch.no_grad():
        out = half.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, half.feature_dim)


@pytest.mark.parametrize(
    "name",
    [
        "torchvision/resnet18",
        "timm/resnet18",
        # timm fixes the multiplier in the model name (mobilenetv2_100, _050, ...).
        "timm/mobilenetv2_100",
    ],
)
def test_width_multiplier_unsupported(name: str) -> None:
    with pytest.raises(ValueError, match="has no width multiplier"):
        build_backbone(name, width_multiplier=0.5)


def test_width_multiplier_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        build_backbone("torchvision/mobilenet_v2", width_multiplier=0.0)


def _lightning_checkpoint(backbone: Backbone) -> dict[str, object]:
    state: dict[str, Tensor] = {
        f"backbone.{key}": value for key, value in backbone.state_dict().items()
    }
    # A MoCo LightningModule also stores heads and the momentum copy.
    state["projection_head.layer.0.weight"] = torch.zeros(4, 4)
    state["backbone_momentum.net.features.0.0.weight"] = torch.zeros(1)
    return {"epoch": 3, "global_step": 10, "state_dict": state}


@pytest.mark.parametrize(
    "layout", ["network", "network_with_classifier", "backbone", "lightning"]
)
def test_load_weights_layouts(tmp_path: Path, layout: str) -> None:
    name = "torchvision/mobilenet_v2"
    torch.manual_seed(0)
    source = build_backbone(name, width_multiplier=0.5)
    # Make batch-norm buffers differ from their defaults too.
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None
            module.running_mean.uniform_()

    contents: object
    if layout == "network":
        contents = source.net.state_dict()  # features.0.0.weight, ...
    elif layout == "network_with_classifier":
        contents = dict(source.net.state_dict())
        contents["classifier.1.weight"] = torch.zeros(1000, 1280)
        contents["classifier.1.bias"] = torch.zeros(1000)
    elif layout == "backbone":
        contents = source.state_dict()  # net.features.0.0.weight, ...
    else:
        contents = _lightning_checkpoint(source)
    path = tmp_path / "weights.pt"
    torch.save(contents, path)

    torch.manual_seed(1)
    fresh = build_backbone(name, width_multiplier=0.5)
    assert not torch.equal(
        fresh.get_parameter("net.features.0.0.weight"),
        source.get_parameter("net.features.0.0.weight"),
    )
    loaded = build_backbone(name, width_multiplier=0.5, weights=path)
    _assert_state_dicts_equal(loaded, source)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded.eval()(x), source.eval()(x))


def test_load_weights_lightning_without_net_prefix(tmp_path: Path) -> None:
    """Lightning modules that hold the bare network: backbone.<network key>."""
    torch.manual_seed(0)
    source = build_backbone("timm/test_efficientnet", small_input=True)
    state = {f"backbone.{k}": v for k, v in source.net.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = build_backbone("timm/test_efficientnet", small_input=True, weights=path)
    _assert_state_dicts_equal(loaded, source)


def test_load_weights_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(build_backbone("torchvision/resnet18").state_dict(), path)
    with pytest.raises(ValueError) as info:
        build_backbone("torchvision/resnet34", weights=path)
    message = str(info.value)
    assert f"weights file '{path}' does not match torchvision/resnet34" in message
    assert "missing keys (layer1.2." in message
    assert "\n" not in message


def test_load_weights_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(build_backbone("torchvision/resnet18").state_dict(), path)
    with pytest.raises(ValueError, match=r"1 shape mismatch \(conv1\.weight: file"):
        build_backbone("torchvision/resnet18", small_input=True, weights=path)


def test_load_weights_unexpected_keys(tmp_path: Path) -> None:
    state = dict(build_backbone("timm/test_efficientnet").net.state_dict())
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 unexpected key \(extra\.weight\)"):
        build_backbone("timm/test_efficientnet", weights=path)


def test_load_weights_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="holds no state dict"):
        build_backbone("timm/test_efficientnet", weights=path)


def test_load_weights_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "does_not_exist.pt"
    with pytest.raises(FileNotFoundError, match="does_not_exist.pt"):
        build_backbone("torchvision/mobilenet_v2", weights=path)


@pytest.mark.parametrize(
    "name",
    ["foo/bar", "timm/not_a_model", "torchvision/not_a_model", "resnet18", "timm/"],
)
def test_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match=r"use torchvision/NAME or timm/NAME"):
        build_backbone(name)
    with pytest.raises(ValueError) as refused:
        build_backbone(name + "x" * 200)
    assert (
        "backbone.name" in str(refused.value) and len(str(refused.value)) <= 148
    )  # the preflight adds 43


def test_backbone_names() -> None:
    names = backbone_names()
    assert names[:4] == [
        "torchvision/mobilenet_v2",
        "torchvision/resnet18",
        "torchvision/resnet34",
        "torchvision/resnet50",
    ]
    assert [f"torchvision/{arch}" for arch in SUPPORTED_TORCHVISION] == sorted(
        n for n in names if n.startswith("torchvision/")
    )
    assert all(name.startswith(("torchvision/", "timm/")) for name in names)
    assert "timm/efficientnet_b0" in backbone_names(include_timm=True)


def test_every_torchvision_classifier_builds_without_its_classifier() -> None:
    """Any classification model of torchvision.models, by name (shapes on meta)."""
    assert len(SUPPORTED_TORCHVISION) >= 80
    assert "vit_b_16" in SUPPORTED_TORCHVISION
    assert "deeplabv3_resnet50" not in SUPPORTED_TORCHVISION  # segmentation
    for arch in SUPPORTED_TORCHVISION:
        if arch.startswith("regnet"):
            continue  # torchvision's regnet init does not run on meta (built below)
        with torch.device("meta"):
            # (build_backbone's shape probe ran the features at 224 px.)
            backbone = build_backbone(f"torchvision/{arch}")
        assert backbone.feature_dim >= 400, arch
        classes = [
            n
            for n, m in backbone.named_modules()
            if getattr(m, "out_features", getattr(m, "out_channels", 0)) == 997
        ]
        assert classes == [], arch


@pytest.mark.parametrize(
    "name, feature_dim",
    [
        ("torchvision/regnet_x_400mf", 400),
        ("torchvision/mobilenet_v3_small", 1024),
        ("torchvision/efficientnet_b0", 1280),
        ("torchvision/shufflenet_v2_x0_5", 1024),
        ("torchvision/squeezenet1_1", 512),
        ("torchvision/densenet121", 1024),
        ("torchvision/googlenet", 1024),
    ],
)
def test_torchvision_features_and_small_input_stem(name: str, feature_dim: int) -> None:
    x = torch.randn(2, 3, 32, 32)
    default = build_backbone(name).eval()
    small = build_backbone(name, small_input=True).eval()
    with torch.no_grad():
        for backbone in (default, small):
            assert backbone.feature_dim == feature_dim
            assert backbone(x).shape == (2, feature_dim)
    # The first convolution has stride 1 and no max-pool follows it directly.
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].stride == (1, 1)
    default_size = _last_conv_spatial_size(default, x)
    small_size = _last_conv_spatial_size(small, x)
    assert small_size[0] > default_size[0]
    # Dropout feeding the classifier goes with it: features stay deterministic.
    if name == "torchvision/efficientnet_b0":
        assert isinstance(small.net.classifier, nn.Identity)


def test_mobilenet_v2_classifier_is_one_identity_as_before() -> None:
    backbone = build_backbone("torchvision/mobilenet_v2", width_multiplier=0.5)
    assert isinstance(backbone.net.classifier, nn.Identity)
    assert not any(isinstance(m, nn.Dropout) for m in backbone.modules())


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_dropout_before_a_top_level_classifier_is_removed(arch: str) -> None:
    with torch.device("meta"):
        backbone = build_backbone(f"torchvision/{arch}")
    assert isinstance(backbone.net.fc, nn.Identity)
    assert isinstance(backbone.net.dropout, nn.Identity)
    assert not any(isinstance(m, nn.Dropout) for m in backbone.modules())


@pytest.mark.parametrize(
    "name, reason",
    [
        ("torchvision/vgg11", "it has no strided convolution"),
        ("torchvision/convnext_tiny", "has stride (4, 4) (a patchify stem)"),
    ],
)
def test_torchvision_small_input_refuses_stems_without_an_obvious_one(
    name: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        with torch.device("meta"):
            build_backbone(name, small_input=True)


def test_timm_blur_pool_follows_the_channels_and_keeps_the_output() -> None:
    import timm
    from timm.layers import BlurPool2d

    torch.manual_seed(0)
    reference = timm.create_model("resnetblur18", num_classes=0).eval()
    backbone = build_backbone("timm/resnetblur18").eval()
    backbone.net.load_state_dict(reference.state_dict())
    blurs = [m for m in backbone.modules() if isinstance(m, BlurPool2d)]
    assert blurs and all(m.channels is None for m in blurs)
    assert all(m.filt.shape[0] == 1 for m in blurs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), reference(x))


# --- your own module ------------------------------------------------------------------
class _PooledCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.head = torch.nn.Conv2d(16, 8, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.head(torch.relu(self.bn(self.conv(x)))))


def test_a_module_is_wrapped_with_its_feature_dimension() -> None:
    from lightly_mcp.methods.backbones import Backbone, backbone_label

    net = _PooledCNN()
    backbone = build_backbone(net)
    assert isinstance(backbone, Backbone) and backbone.net is net
    assert backbone.feature_dim == 8 and backbone.name == "module/_PooledCNN"
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 8)
    assert build_backbone(backbone) is backbone  # a Backbone is used as it is
    assert backbone_label(backbone) == "module/_PooledCNN"
    assert backbone_label("timm/resnet18") == "timm/resnet18"


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (torch.nn.Conv2d(3, 4, 3), r"returns shape \(1, 4, 30, 30\) .* not pooled"),
        (torch.nn.Conv2d(1, 4, 3), r"does not run on a \[1, 3, 32, 32\] image batch"),
    ],
)
def test_a_module_that_gives_no_pooled_features_is_refused(
    net: torch.nn.Module, message: str
) -> None:
    with pytest.raises(InputError, match=message) as refused:
        build_backbone(net)
    assert "nn.Identity()" in str(refused.value)


def test_name_options_with_a_module_and_a_saved_module_label_are_refused() -> None:
    with pytest.raises(InputError, match="apply to backbone names"):
        build_backbone(_PooledCNN(), small_input=True)
    with pytest.raises(InputError, match=r"was a Python module .* backbone=_PooledCNN"):
        build_backbone("module/_PooledCNN")
    with pytest.raises(InputError, match="must be a name or an nn.Module, got int"):
        build_backbone(3)  # type: ignore[arg-type]
