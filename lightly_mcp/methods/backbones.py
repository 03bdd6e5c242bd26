"""Backbones: one factory, one string.

``build_backbone("torchvision/resnet18")`` or ``build_backbone("timm/efficientnet_b0")``
returns a :class:`Backbone`, an ``nn.Module`` that maps images ``[B, 3, H, W]`` to flat
features ``[B, D]`` and knows its feature dimension ``D``. The classifier is removed, so
the module's parameters are exactly the backbone's, and the network sits under a single
attribute ``net`` so that parameter names stay simple and stable
(``net.features.0.0.weight``, ``net.layer1.0.conv1.weight``).

Options:

- ``small_input=True`` adapts the stem to 28-64 px images (CIFAR, Tiny ImageNet): the
  first convolution gets stride 1 and the early max-pool is removed where there is one.
- ``width_multiplier`` scales the channels of architectures that have such a knob
  (torchvision ``mobilenet_v2``, timm models that accept ``channel_multiplier``).
- ``weights`` loads a local state dict (never from a hub): a plain network state dict,
  one saved from a :class:`Backbone` (``net.`` prefix) or a Lightning checkpoint whose
  ``state_dict`` holds the backbone under ``backbone.``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from timm.layers import BlurPool2d
from torch import Tensor, nn

from lightly_mcp.errors import InputError, describe_error
from lightly_mcp.io.model_files import read_tensors
from lightly_mcp.pruning.measure import count_parameters, eval_mode

SUPPORTED_TORCHVISION: tuple[str, ...] = tuple(
    torchvision.models.list_models(module=torchvision.models)
)
"""torchvision architectures accepted as ``"torchvision/<name>"``: every
classification model of ``torchvision.models`` (attention models build, but
``find_channel_groups`` refuses them)."""

# Models whose channels MCP prunes, named first by backbone_names().
_TORCHVISION_EXAMPLES: tuple[str, ...] = (
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
)

# The classifier is found as the one layer with this many outputs (a count no
# backbone layer has), then replaced by nn.Identity.
_PROBE_CLASSES = 997

SUPPORTED_PREFIXES: tuple[str, ...] = ("torchvision/", "timm/")
"""Prefixes of backbone names: the library that builds the network."""

_EXAMPLE_NAMES: tuple[str, ...] = (
    "torchvision/mobilenet_v2",
    "torchvision/resnet18",
    "timm/resnet18",
    "timm/efficientnet_b0",
)

# Top-level modules that hold an image classifier. Keys under them in a weights file
# are ignored when the built network has no parameters there (the classifier was
# replaced by nn.Identity or built with num_classes=0).
_CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc", "classifier")

# Spatial size of the meta-device probe forward that checks a timm model after its
# stem was adapted for small inputs (the largest size small_input is meant for).
_SMALL_INPUT_PROBE_SIZE = 64

# How many key names an error message shows before "...".
_MAX_EXAMPLES = 3


class Backbone(nn.Module):
    """A feature extractor: images ``[B, 3, H, W]`` to flat features ``[B, D]``.

    The wrapped network is stored as ``net``, so parameter names are the network's own
    names prefixed by ``net.``. The network must end with global pooling (and no
    classifier); ``forward`` only flattens its output.

    Attributes:
        net: The wrapped network, without classifier.
        feature_dim: ``D``, the size of the feature vector.
        name: The string the backbone was built from, e.g. ``"torchvision/resnet18"``.
    """

    def __init__(self, net: nn.Module, feature_dim: int, name: str) -> None:
        """Wraps a network.

        Args:
            net: Network mapping images to pooled features ``[B, D]`` or
                ``[B, D, 1, 1]``.
            feature_dim: ``D``.
            name: The backbone name, kept for reports and error messages.
        """
        super().__init__()
        self.net = net
        self.feature_dim = int(feature_dim)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        """Computes features.

        Args:
            x: Images ``[B, 3, H, W]``.

        Returns:
            Features ``[B, feature_dim]``.
        """
        out: Tensor = self.net(x)
        return out.flatten(1)

    def extra_repr(self) -> str:
        """Returns the name and feature dimension for ``repr``."""
        return f"name={self.name!r}, feature_dim={self.feature_dim}"


def backbone_names(include_timm: bool = False) -> list[str]:
    """Lists valid backbone names.

    Args:
        include_timm: Also list every timm model as ``"timm/<name>"`` (about a
            thousand names, CNNs and transformers alike). Without it, only two timm
            examples are listed.

    Returns:
        Backbone names accepted by :func:`build_backbone`.
    """
    others = [a for a in SUPPORTED_TORCHVISION if a not in _TORCHVISION_EXAMPLES]
    names = [f"torchvision/{arch}" for arch in (*_TORCHVISION_EXAMPLES, *others)]
    if include_timm:
        names += [f"timm/{arch}" for arch in timm.list_models()]
    else:
        names += [name for name in _EXAMPLE_NAMES if name.startswith("timm/")]
    return names


#: The name a backbone built from a Python module gets: ``"module/<ClassName>"``.
MODULE_PREFIX = "module/"


def backbone_label(backbone: str | nn.Module) -> str:
    """The name a backbone is recorded under: the name itself, a :class:`Backbone`'s
    ``name``, or ``"module/<ClassName>"`` for any other module.
    """
    if isinstance(backbone, Backbone):
        return backbone.name
    if isinstance(backbone, nn.Module):
        return MODULE_PREFIX + type(backbone).__name__
    return backbone


def backbone_from_module(net: nn.Module, input_size: int = 32) -> Backbone:
    """Wraps a user's network as a :class:`Backbone` (a ``Backbone`` is returned as
    it is).

    The network must map images ``[B, 3, H, W]`` to pooled features ``[B, D]`` (or
    ``[B, D, 1, 1]``): a classifier's head removed (e.g. a torchvision ResNet with
    ``fc = nn.Identity()``). ``D`` is found with a shape-only forward of one
    ``input_size`` image on the meta device (no compute).

    Raises:
        InputError: If the network does not run on such an image, or returns
            something other than one feature vector per image.
    """
    if isinstance(net, Backbone):
        return net
    label = backbone_label(net)
    out = _probe_output(net, (3, input_size, input_size))
    fix = (
        "give a module that maps images [B, 3, H, W] to pooled features [B, D] "
        "(no classifier head, e.g. fc = nn.Identity())"
    )
    if out is None:
        raise InputError(
            f"backbone module {type(net).__name__} does not run on a [1, 3, "
            f"{input_size}, {input_size}] image batch; {fix}."
        )
    if out.dim() not in (2, 4) or (out.dim() == 4 and tuple(out.shape[2:]) != (1, 1)):
        raise InputError(
            f"backbone module {type(net).__name__} returns shape {tuple(out.shape)} "
            f"for a [1, 3, {input_size}, {input_size}] batch, not pooled features; "
            f"{fix}."
        )
    return Backbone(net, feature_dim=int(out.shape[1]), name=label)


def build_backbone(
    name: str | nn.Module,
    *,
    small_input: bool = False,
    width_multiplier: float | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Builds a backbone from its name.

    Networks are randomly initialised (nothing is downloaded) unless ``weights`` names
    a local file.

    Args:
        name: ``"torchvision/<arch>"`` for any classification model of
            ``torchvision.models`` (:data:`SUPPORTED_TORCHVISION`),
            ``"timm/<arch>"`` for any timm model (built with
            ``timm.create_model(arch, pretrained=False, num_classes=0)``), or a
            network itself (see :func:`backbone_from_module`; recorded as
            ``"module/<ClassName>"``, so a checkpoint of it needs the module again
            to be loaded).
        small_input: Adapt the stem to 28-64 px images: stride-1 first convolution and
            no early max-pool. torchvision resnets (and resnext, wide resnet) get a
            3x3 stride-1 ``conv1``; other torchvision models get stride 1 in their
            first convolution when it has stride 2 and lose a max-pool directly
            after it (patchify stems and vgg are refused); timm
            models get stride 1 in their stem convolution (``conv_stem``, ``conv1``
            or, failing those, the first strided convolution) and lose ``maxpool`` /
            ``stem.pool`` where present.
        width_multiplier: Channel width multiplier, for architectures that have one
            (torchvision ``mobilenet_v2``; timm models that accept
            ``channel_multiplier``). ``None`` builds the default width.
        weights: Path of a local weights file to load, see :func:`load_weights`.

    Returns:
        The backbone, in training mode.

    Raises:
        ValueError: If the name is unknown, the architecture has no width multiplier,
            its stem cannot be adapted for small inputs, or the weights file does not
            match the network.
        FileNotFoundError: If ``weights`` does not exist.

    Examples:
        >>> backbone = build_backbone("timm/resnet18", small_input=True)
        >>> backbone(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 512])
        >>> build_backbone("torchvision/mobilenet_v2", width_multiplier=0.5).feature_dim
        1280
    """
    if isinstance(name, nn.Module):
        if small_input or width_multiplier is not None or weights is not None:
            raise InputError(
                "small_input, width_multiplier and weights apply to backbone names; "
                "a backbone module is used as it is (adapt and load it yourself)."
            )
        return backbone_from_module(name)
    if not isinstance(name, str):
        raise InputError(
            f"backbone must be a name or an nn.Module, got {type(name).__name__}."
        )
    if name.startswith(MODULE_PREFIX):
        raise InputError(
            f"backbone {name!r} was a Python module when this model was saved; pass "
            f"the module again (e.g. MCP.load_from_checkpoint(path, "
            f"backbone={name[len(MODULE_PREFIX) :]}(...)))."
        )
    if width_multiplier is not None and not width_multiplier > 0:
        raise InputError(f"width_multiplier must be positive, got {width_multiplier}")
    library, _, arch = name.partition("/")
    if library == "torchvision" and arch in SUPPORTED_TORCHVISION:
        net, feature_dim = _build_torchvision(
            name, arch, small_input=small_input, width_multiplier=width_multiplier
        )
    elif library == "timm" and arch and timm.is_model(arch):
        net, feature_dim = _build_timm(
            name, arch, small_input=small_input, width_multiplier=width_multiplier
        )
    else:
        raise InputError(_unknown_name_message(name))
    backbone = Backbone(net, feature_dim=feature_dim, name=name)
    if weights is not None:
        load_weights(backbone, weights)
    return backbone


def load_weights(backbone: Backbone, path: str | os.PathLike[str]) -> None:
    """Loads a local weights file into a backbone, strictly.

    The file is read as tensors only (:func:`lightly_mcp.io.model_files.read_tensors`,
    ``weights_only=True``) and may hold:

    - a state dict of the network (``features.0.0.weight``),
    - a state dict of a :class:`Backbone` (``net.features.0.0.weight``),
    - a Lightning checkpoint, a dict with a ``state_dict`` entry; when its keys carry a
      ``backbone.`` prefix only those keys are used (so heads and momentum copies
      stored beside the backbone are skipped).

    Classifier keys (``fc.*``, ``classifier.*``) are ignored when the network has no
    parameters there.

    Args:
        backbone: The backbone to load into, in place.
        path: Path of the weights file.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be read as a state dict, holds NaN or
            infinite weights, or its keys or shapes do not match the network (one
            line naming the file, the counts of missing and unexpected keys, shape
            mismatches and a few examples).
    """
    file = Path(path)
    if not file.is_file():
        from lightly_mcp.io.files import not_a_file

        raise FileNotFoundError(
            f"weights file '{file}' for {backbone.name} {not_a_file(file)}"
        )
    loaded = read_tensors(file, "give a state_dict or checkpoint of tensors")
    state_dict = _extract_state_dict(loaded, file)
    from lightly_mcp.io.model_files import check_finite_weights

    check_finite_weights(state_dict, file, "weights file")

    expected = backbone.net.state_dict()
    state_dict = {
        key: value
        for key, value in state_dict.items()
        if key in expected or key.split(".", 1)[0] not in _CLASSIFIER_PREFIXES
    }
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: file {list(value.shape)} vs model {list(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(_count_with_examples(missing, "missing key"))
        if unexpected:
            problems.append(_count_with_examples(unexpected, "unexpected key"))
        if mismatched:
            problems.append(_count_with_examples(mismatched, "shape mismatch"))
        raise InputError(
            f"weights file '{file}' does not match {backbone.name}: "
            + ", ".join(problems)
        )
    backbone.net.load_state_dict(state_dict, strict=True)


def _build_torchvision(
    name: str, arch: str, *, small_input: bool, width_multiplier: float | None
) -> tuple[nn.Module, int]:
    """Builds a torchvision classification network without its classifier.

    The classifier is the last layer producing the class scores (``fc``,
    ``classifier[-1]``, ``heads.head``, squeezenet's final convolution): it becomes
    ``nn.Identity``, so the features are what feeds it (as timm's ``num_classes=0``).

    Args:
        name: Full backbone name, for messages.
        arch: A name of :data:`SUPPORTED_TORCHVISION`.
        small_input: Adapt the stem to small images.
        width_multiplier: Width multiplier, only for ``mobilenet_v2``.

    Returns:
        The network and its feature dimension.

    Raises:
        ValueError: If a width multiplier is given for an architecture without one,
            or the stem cannot be adapted for small inputs.
    """
    kwargs: dict[str, Any] = {"weights": None, "num_classes": _PROBE_CLASSES}
    if arch == "mobilenet_v2":
        kwargs["width_mult"] = 1.0 if width_multiplier is None else width_multiplier
    elif width_multiplier is not None:
        raise InputError(
            f"{name} has no width multiplier (width_multiplier={width_multiplier}); "
            "torchvision/mobilenet_v2 and some timm models have one"
        )
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    net = torchvision.models.get_model(arch, **kwargs)
    _remove_classifier(name, net)
    if small_input:
        _adapt_torchvision_stem(name, net)
    size = _SMALL_INPUT_PROBE_SIZE if small_input else 224
    feature_dim = _probe_output_dim(net, (3, size, size))
    if feature_dim is None:
        raise InputError(
            f"small_input is not supported for {name}: the model does not run on "
            f"{size}x{size} images once its stem has stride 1"
        )
    return net, feature_dim


def _remove_classifier(name: str, net: nn.Module) -> None:
    """Replaces the layer that produces the class scores by ``nn.Identity``."""
    found = [
        module_name
        for module_name, module in net.named_modules()
        if (isinstance(module, nn.Linear) and module.out_features == _PROBE_CLASSES)
        or (isinstance(module, nn.Conv2d) and module.out_channels == _PROBE_CLASSES)
    ]
    if len(found) != 1:
        raise InputError(f"cannot find the classifier of {name} (found {found})")
    _set_submodule(net, found[0], nn.Identity())
    # Dropout right before it belongs to the classifier (features stay deterministic);
    # a classifier Sequential left with nothing else becomes one nn.Identity.
    parent_name, _, child = found[0].rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    if isinstance(parent, nn.Sequential):
        index = list(parent._modules).index(child)
        while index > 0 and isinstance(parent[index - 1], nn.Dropout):
            parent[index - 1] = nn.Identity()
            index -= 1
        if parent_name and all(isinstance(m, nn.Identity) for m in parent):
            _set_submodule(net, parent_name, nn.Identity())
    else:  # googlenet, inception_v3: self.dropout(x) before self.fc(x)
        for dropout_name, module in list(parent.named_children()):
            if isinstance(module, nn.Dropout):
                setattr(parent, dropout_name, nn.Identity())


def _adapt_torchvision_stem(name: str, net: nn.Module) -> None:
    """The small-input stem of a torchvision network, modified in place.

    ResNets (and ResNeXt, Wide ResNet) get the CIFAR stem: a 3x3 stride-1 ``conv1``
    and no max-pool. Other networks get stride 1 in their first convolution when it
    has stride 2 and lose a max-pool that directly follows it (before any other
    convolution), as shufflenet, densenet, squeezenet and googlenet have.

    Raises:
        ValueError: If the first strided convolution does not have stride 2
            (patchify stems: convnext, vision transformers, alexnet) or there is
            none (vgg).
    """
    if isinstance(net, torchvision.models.ResNet):
        # The CIFAR stem: a 3x3 stride-1 conv instead of 7x7 stride 2, no max-pool.
        conv1 = nn.Conv2d(
            3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        # Same initialisation as torchvision gives its convolutions.
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        net.conv1 = conv1
        net.maxpool = nn.Identity()
        return
    stem_name, stem = _first_strided_conv(net, prefix="")
    _stride_two_stem(name, stem_name, stem).stride = (1, 1)
    after_stem = False
    for module_name, module in net.named_modules():
        if module is stem:
            after_stem = True
        elif after_stem and isinstance(module, nn.Conv2d):
            break
        elif after_stem and isinstance(module, nn.MaxPool2d):
            _set_submodule(net, module_name, nn.Identity())
            break


def _build_timm(
    name: str, arch: str, *, small_input: bool, width_multiplier: float | None
) -> tuple[nn.Module, int]:
    """Builds a timm network without classifier (``num_classes=0``).

    Args:
        name: Full backbone name, for messages.
        arch: timm model name.
        small_input: Adapt the stem to small images.
        width_multiplier: Passed as ``channel_multiplier`` to ``timm.create_model``.

    Returns:
        The network and its feature dimension.

    Raises:
        ValueError: If the model has no (working) channel multiplier, or its stem
            cannot be adapted for small inputs.
    """
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if width_multiplier is None:
        net = timm.create_model(arch, **kwargs)
    else:
        net = _create_timm_with_width(name, arch, width_multiplier, kwargs)

    _channel_agnostic_blur(net)
    stem_conv_name = _adapt_timm_stem(name, net) if small_input else ""

    # Prefer head_hidden_size: some models (mobilenetv3, ...) apply a head
    # convolution after pooling, so their output is larger than num_features
    # (mobilenetv3_small_100: num_features 576, output 1024).
    hidden_size = getattr(net, "head_hidden_size", None)
    num_features = getattr(net, "num_features", 0)
    attribute_dim = int(hidden_size) if hidden_size else int(num_features)
    if small_input:
        size = _SMALL_INPUT_PROBE_SIZE
        out_dim = _probe_output_dim(net, (3, size, size))
        if out_dim is None:
            raise InputError(
                f"small_input is not supported for {name}: the model does not run "
                f"on {size}x{size} images once the stride of its stem convolution "
                f"'{stem_conv_name}' is set to 1"
            )
    else:
        pretrained_cfg: Mapping[str, Any] = getattr(net, "pretrained_cfg", None) or {}
        input_size = tuple(pretrained_cfg.get("input_size", (3, 224, 224)))
        out_dim = _probe_output_dim(net, input_size)
    feature_dim = attribute_dim if out_dim is None else out_dim
    return net, feature_dim


@torch.no_grad()
def _channel_agnostic_blur(net: nn.Module) -> None:
    """Lets timm's anti-aliasing blurs take any number of channels.

    ``BlurPool2d`` filters every channel with the same fixed binomial filter, stored
    once per channel in a (non-persistent) buffer, so its channel count is fixed and
    a pruned network no longer runs. With ``channels=None`` it expands one filter to
    its input's channels: the same output, and the blur follows pruning.
    """
    for module in net.modules():
        if isinstance(module, BlurPool2d) and module.channels is not None:
            module.channels = None
            filt = module.get_buffer("filt")[:1].clone()
            module.register_buffer("filt", filt, persistent=False)


def _create_timm_with_width(
    name: str, arch: str, width_multiplier: float, kwargs: Mapping[str, Any]
) -> nn.Module:
    """Creates a timm model with ``channel_multiplier``, checking that it takes effect.

    Args:
        name: Full backbone name, for messages.
        arch: timm model name.
        width_multiplier: The channel multiplier.
        kwargs: Other ``timm.create_model`` arguments.

    Returns:
        The model.

    Raises:
        ValueError: If the model does not accept ``channel_multiplier``, cannot be
            built with this value, or silently ignores it.
    """
    no_multiplier = (
        f"{name} has no width multiplier (timm.create_model does not accept "
        f"channel_multiplier for '{arch}'); torchvision/mobilenet_v2 and timm models "
        "such as efficientnetv2_s or efficientnet_b0_gn have one"
    )
    try:
        net: nn.Module = timm.create_model(
            arch, channel_multiplier=width_multiplier, **kwargs
        )
    except TypeError as error:
        # "unexpected keyword argument" (the model has no multiplier) or "got
        # multiple values" (the model name fixes it, e.g. mobilenetv2_100).
        raise InputError(no_multiplier) from error
    except (AssertionError, ValueError, RuntimeError) as error:
        raise InputError(
            f"{name} cannot be built with width_multiplier={width_multiplier}: "
            f"{describe_error(error)}"
        ) from error
    if width_multiplier != 1.0:
        # Models that take **kwargs may accept the argument and ignore it. Compare
        # with the default width, built on the meta device (no memory, no init).
        with torch.device("meta"):
            default = timm.create_model(arch, **kwargs)
        if count_parameters(default) == count_parameters(net):
            raise InputError(no_multiplier)
    return net


def _adapt_timm_stem(name: str, net: nn.Module) -> str:
    """Sets the stem convolution of a timm model to stride 1 and drops its max-pool.

    Args:
        name: Full backbone name, for messages.
        net: The timm model, modified in place.

    Returns:
        The qualified name of the stem convolution.

    Raises:
        ValueError: If no stride-2 stem convolution is found (e.g. patchify stems of
            vision transformers and ConvNeXt, stride 4 or more).
    """
    conv_name, found = _find_timm_stem_conv(net)
    conv = _stride_two_stem(name, conv_name, found)
    # Padding stays as is: for odd kernels 'same'-style padding (k - 1) // 2 does not
    # depend on the stride, and timm's Conv2dSame pads dynamically from self.stride.
    conv.stride = (1, 1)
    for pool_name in ("maxpool", "stem.pool"):
        if _has_submodule(net, pool_name):
            _set_submodule(net, pool_name, nn.Identity())
    return conv_name


def _find_timm_stem_conv(net: nn.Module) -> tuple[str, nn.Conv2d | None]:
    """Finds the stem convolution of a timm model.

    Args:
        net: The timm model.

    Returns:
        The qualified name and the convolution, or ``("", None)`` if the model has no
        strided convolution.
    """
    # efficientnet / mobilenet families call it conv_stem; resnets call it conv1 (an
    # nn.Conv2d, or an nn.Sequential for deep stems such as resnet50d).
    for attr in ("conv_stem", "conv1"):
        module = getattr(net, attr, None)
        if isinstance(module, nn.Module):
            found = _first_strided_conv(module, prefix=attr)
            if found[1] is not None:
                return found
    # Fallback for other families (regnet stem.conv, byobnet stem.conv, dla, ...): the
    # first strided Conv2d in module order. timm registers stems first, so module
    # order is execution order here; the result is checked by a probe forward.
    return _first_strided_conv(net, prefix="")


def _stride_two_stem(name: str, conv_name: str, conv: nn.Conv2d | None) -> nn.Conv2d:
    """The stem convolution that ``small_input`` makes stride 1; refuses a network
    without one and patchify stems (stride 4 or more).
    """
    if conv is None:
        raise InputError(
            f"small_input is not supported for {name}: it has no strided convolution"
        )
    if conv.stride != (2, 2):
        raise InputError(
            f"small_input is not supported for {name}: its stem convolution "
            f"'{conv_name}' has stride {tuple(conv.stride)} (a patchify stem); "
            "only stride-2 stems are adapted"
        )
    return conv


def _first_strided_conv(module: nn.Module, prefix: str) -> tuple[str, nn.Conv2d | None]:
    """Returns the first ``nn.Conv2d`` with a stride other than 1, in module order.

    Args:
        module: Where to search (the module itself included).
        prefix: Qualified name of ``module``.

    Returns:
        The qualified name and the convolution, or ``("", None)`` if there is none.
    """
    for sub_name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, nn.Conv2d) and tuple(sub.stride) != (1, 1):
            return sub_name, sub
    return "", None


def _probe_output_dim(net: nn.Module, input_size: tuple[int, ...]) -> int | None:
    """The size of the flattened output of :func:`_probe_output` (None if the
    forward fails).
    """
    out = _probe_output(net, input_size)
    return None if out is None else int(out.flatten(1).shape[1])


def _probe_output(net: nn.Module, input_size: tuple[int, ...]) -> Tensor | None:
    """Runs a shape-only forward on the meta device and returns its (meta) output.

    Parameters and buffers are swapped for meta tensors with ``functional_call``, so
    the probe costs no compute, allocates nothing and leaves the network untouched.

    Args:
        net: The network.
        input_size: ``(C, H, W)`` of the probe image (batch 1).

    Returns:
        The output, or ``None`` if the forward fails or returns no tensor.
    """
    state = {
        key: torch.empty_like(value, device="meta")
        for key, value in itertools.chain(
            net.named_parameters(remove_duplicate=False),
            net.named_buffers(remove_duplicate=False),
        )
    }
    try:
        # eval mode: batch norm refuses a batch of one in training mode
        with eval_mode(net), torch.device("meta"), torch.no_grad():
            out = torch.func.functional_call(net, state, (torch.empty(1, *input_size),))
    except Exception:  # noqa: BLE001 - any failure means "does not run"
        return None
    if not isinstance(out, Tensor):
        return None
    return out


def _extract_state_dict(loaded: object, file: Path) -> dict[str, Tensor]:
    """Finds the network's state dict in a loaded weights file.

    Args:
        loaded: What ``torch.load`` returned.
        file: The file, for messages.

    Returns:
        The state dict with ``backbone.`` and ``net.`` prefixes removed.

    Raises:
        ValueError: If the file holds no state dict.
    """
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor)
        for key, value in loaded.items()
    ):
        raise InputError(
            f"weights file '{file}' holds no state dict (a mapping from parameter "
            f"names to tensors, or a checkpoint with a 'state_dict' entry), got "
            f"{type(loaded).__name__}"
        )
    state_dict: dict[str, Tensor] = dict(loaded)
    # Lightning checkpoints hold the whole LightningModule: keep the backbone only
    # (backbone_momentum.*, projection_head.*, ... do not start with "backbone.").
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = _strip_prefix(
            {k: v for k, v in state_dict.items() if k.startswith("backbone.")},
            "backbone.",
        )
    # A Backbone's own state dict: net.<network key>.
    if state_dict and all(key.startswith("net.") for key in state_dict):
        state_dict = _strip_prefix(state_dict, "net.")
    return state_dict


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Removes a prefix from the keys that carry it.

    Args:
        state_dict: State dict.
        prefix: Prefix to remove.

    Returns:
        A new state dict.
    """
    return {
        key[len(prefix) :] if key.startswith(prefix) else key: value
        for key, value in state_dict.items()
    }


def _count_with_examples(items: list[str], noun: str) -> str:
    """Formats ``"3 missing keys (a, b, c)"`` with at most a few examples.

    Args:
        items: The items to count.
        noun: Singular noun, pluralised with "es"/"s" when there are several.

    Returns:
        The formatted text.
    """
    count = len(items)
    if count != 1:
        noun += "es" if noun.endswith("h") else "s"
    examples = ", ".join(items[:_MAX_EXAMPLES])
    if count > _MAX_EXAMPLES:
        examples += ", ..."
    return f"{count} {noun} ({examples})"


def _unknown_name_message(name: str) -> str:
    """Builds the error message for a backbone name that cannot be built.

    Args:
        name: The unknown name.

    Returns:
        One line naming the supported prefixes and an example.
    """
    library, _, arch = name.partition("/")
    reason = ""
    if library == "timm" and arch:
        reason = " (no such timm model)"
    elif library == "torchvision" and arch:
        reason = " (no such torchvision model)"
    shown = name if len(name) <= 30 else name[:29] + "…"
    return (
        f"unknown backbone.name '{shown}'{reason}; use torchvision/NAME or "
        f"timm/NAME, e.g. {_EXAMPLE_NAMES[0]}"
    )


def _has_submodule(root: nn.Module, target: str) -> bool:
    """Tells whether a dotted submodule path exists.

    Args:
        root: The root module.
        target: Dotted path, e.g. ``"stem.pool"``.

    Returns:
        Whether ``root.get_submodule(target)`` succeeds.
    """
    try:
        root.get_submodule(target)
    except AttributeError:
        return False
    return True


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Replaces the submodule at a dotted path.

    Args:
        root: The root module.
        target: Dotted path of an existing submodule.
        module: The replacement.
    """
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
