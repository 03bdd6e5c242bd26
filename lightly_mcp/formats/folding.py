"""BatchNorm folding: what is deployed computes ``conv`` where training computed
``BatchNorm(conv)``.

In eval mode a BatchNorm that directly follows a convolution is an affine map per
channel, so it can be folded into the convolution's weight and bias:
``w' = w · γ/√(σ² + ε)`` and ``b' = (b − μ) · γ/√(σ² + ε) + β``. The folded network
computes the same function with one pass over the activations less per layer, which
on a CPU is often the largest single deployment speedup (see
``benchmarks/RESULTS_inference.md``).

Which convolution feeds which norm is read from the network's ``torch.export`` graph,
not guessed from module order: a pair is folded only when the convolution's weight
is a parameter used by that one convolution, its output goes only into the norm, and
the norm's weight, bias and statistics are its module's own (used once). Norms
after anything else (a concatenation, a weight-standardised convolution, a norm
applied twice) are left in place.

Examples:
    >>> import torchvision
    >>> net = torchvision.models.mobilenet_v2(num_classes=10).eval()
    >>> fold_batchnorm(net, torch.randn(2, 3, 32, 32))
    52
    >>> sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.fx import Node

from lightly_mcp.errors import ExportError, InputError, describe_error

#: The graph operators of an eval-mode BatchNorm.
_NORM_OPS = (
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
)
#: The graph operators of a convolution.
_CONV_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)


@dataclass(frozen=True)
class ConvNorm:
    """A convolution and the BatchNorm that directly follows it (module names)."""

    conv: str
    norm: str


def fold_batchnorm(
    model: nn.Module, example: Tensor, pairs: Sequence[ConvNorm] | None = None
) -> int:
    """Folds every BatchNorm that directly follows a convolution into it, in place.

    ``nn.BatchNorm2d`` layers become ``nn.Identity``; timm's ``BatchNormAct2d`` keeps
    what it applies after normalising (its dropout and activation). A convolution
    without a bias gets one. Other norms are left as they are.

    Args:
        model: A network in eval mode (folding uses the running statistics).
        example: An input the network accepts, to trace it with ``torch.export``.
        pairs: The pairs to fold, as :func:`conv_norm_pairs` found them on a network
            with the same graph (e.g. the dense network a compact one was cut from:
            pruning channels changes no connection), to save tracing this one.
            ``None`` traces ``model``.

    Returns:
        The number of norms folded.

    Raises:
        InputError: If the model is in train mode.
        ExportError: If the network cannot be traced with ``torch.export``, or a
            given pair does not name a convolution and a BatchNorm of ``model``.
    """
    if pairs is None:
        pairs = conv_norm_pairs(model, example)
    # Every pair is checked before anything is folded: a refused pair changes nothing.
    modules = dict(model.named_modules())
    resolved: list[tuple[str, nn.Conv2d, nn.BatchNorm2d]] = []
    for pair in pairs:
        conv, norm = modules.get(pair.conv), modules.get(pair.norm)
        if not (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and conv.out_channels == norm.num_features
        ):
            raise ExportError(
                f"Cannot fold '{pair.norm}' into '{pair.conv}': the network has no "
                "such convolution and BatchNorm of equal width (pairs found on a "
                "network with another graph); fold it without given pairs."
            )
        resolved.append((pair.norm, conv, norm))
    for norm_name, conv, norm in resolved:
        _fold_into(conv, norm)
        parent_name, _, child = norm_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _after_norm(norm))
    return len(resolved)


def conv_norm_pairs(model: nn.Module, example: Tensor) -> list[ConvNorm]:
    """The (convolution, BatchNorm) pairs of ``model`` that can be folded.

    Raises:
        InputError: If the model is in train mode.
        ExportError: If the network cannot be traced with ``torch.export``.
    """
    training = [name for name, m in model.named_modules() if m.training]
    if training:
        where = f"'{training[0]}'" if training[0] else "the model"
        raise InputError(
            f"BatchNorm is folded with running statistics, but {where} is in train "
            "mode; call model.eval() first."
        )
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,))
    except Exception as error:  # noqa: BLE001 - any tracing failure
        raise ExportError(
            f"Cannot trace the network with torch.export to fold its BatchNorm "
            f"layers: {describe_error(error)[:300]}"
        ) from error
    signature = program.graph_signature
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    modules = dict(model.named_modules())

    def own(node: object, suffix: str) -> str | None:
        """The module owning the parameter or buffer ``node`` if it is used once."""
        if not isinstance(node, Node) or node.op != "placeholder":
            return None
        name = names.get(node.name)
        if name is None or not name.endswith(suffix) or len(node.users) != 1:
            return None
        return name[: -len(suffix)]

    pairs = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in _NORM_OPS:
            continue
        conv_node = node.args[0]
        if not (
            isinstance(conv_node, Node)
            and conv_node.target in _CONV_OPS
            and len(conv_node.users) == 1
        ):
            continue
        conv_name = own(conv_node.args[1], ".weight")
        norm_name = own(node.args[3], ".running_mean")
        if conv_name is None or norm_name is None:
            continue
        conv, norm = modules.get(conv_name), modules.get(norm_name)
        if not (
            isinstance(conv, nn.Conv2d)
            and type(norm) in (nn.BatchNorm2d, BatchNormAct2d)
            and _uses_own_tensors(node, norm_name, own)
            and _conv_bias_is_own(conv_node, conv, conv_name, own)
        ):
            continue
        pairs.append(ConvNorm(conv_name, norm_name))
    return pairs


def _uses_own_tensors(node: Node, norm_name: str, own: object) -> bool:
    """Whether the norm op's weight, bias and variance are its module's, used once."""
    checks = ((1, ".weight"), (2, ".bias"), (4, ".running_var"))
    for position, suffix in checks:
        arg = node.args[position]
        if arg is None and suffix != ".running_var":
            continue  # affine=False
        if own(arg, suffix) != norm_name:  # type: ignore[operator]
            return False
    return True


def _conv_bias_is_own(conv_node: Node, conv: nn.Conv2d, name: str, own: object) -> bool:
    """Whether the convolution op's bias is the module's (or both have none)."""
    bias = conv_node.args[2] if len(conv_node.args) > 2 else None
    if bias is None:
        return conv.bias is None
    return own(bias, ".bias") == name  # type: ignore[operator]


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    assert norm.running_mean is not None and norm.running_var is not None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    if conv.weight.shape[0] != scale.numel():
        raise ExportError(
            f"A convolution with {conv.weight.shape[0]} output channels feeds a "
            f"BatchNorm of {scale.numel()} channels."
        )
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = nn.Parameter(
        bias * scale + shift, requires_grad=conv.weight.requires_grad
    )


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What replaces a folded norm: nothing, or what ``BatchNormAct2d`` applies next."""
    if isinstance(norm, BatchNormAct2d):
        return nn.Sequential(norm.drop, norm.act)
    return nn.Identity()
