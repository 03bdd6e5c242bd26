"""The channel groups MCP can prune exactly: traced, then checked.

:func:`find_channel_groups` traces a backbone's coupled output-channel groups
(:func:`lightly_mcp.pruning.groups.trace_channel_groups`) and checks, on a float64 copy
with random weights and random masks, that the masked network equals the physically
pruned one (:func:`check_exact`, built on
:func:`lightly_mcp.pruning.compaction.compact`). A backbone that fails is refused before
any training, with the group that breaks it.

Tracing a large graph takes a while (minutes for some timm models on a slow CPU), and
a run builds the same backbone several times (its preflight, MCP, export,
evaluation): the groups found are kept in memory per architecture
(:func:`architecture_key`) and reused, and every tracing says what it traces (the
``lightly_mcp`` logger, which the command line shows).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightly_mcp.errors import describe_error
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import (
    DEFAULT_TIME_LIMIT,
    ChannelGroup,
    backbone_label,
    default_example_inputs,
    route_of,
    trace_channel_groups,
    unsupported,
)
from lightly_mcp.pruning.masks import (
    GroupMasks,
    Masks,
    masked_tensors,
    output_feature_index,
)

CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
"""Largest relative difference between masked and compact outputs that
:func:`check_exact` accepts, by the precision it checks in; a wrongly removed channel
gives differences of order 1."""

CHECK_FLOAT64_MAX_PARAMETERS = 50_000_000
"""Larger backbones are checked in float32 (two float64 copies would need > 800 MB)."""

log = logging.getLogger(__name__)

_traced: dict[Hashable, tuple[ChannelGroup, ...]] = {}
"""The groups found so far in this process, by :func:`architecture_key`."""

_PLAIN = (bool, int, float, str, type(None))


@torch.no_grad()
def _randomise_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights for every parameter (variance ``1 / fan_in``).

    Exactness is a property of the architecture, not of the weights: the check must
    not depend on what a model learned (a model whose trained weights overflow in a
    forward pass would otherwise fail it with NaN).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_floating_point():
                continue
            fan_in = param[0].numel() if param.dim() > 1 else 1
            values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_((values / math.sqrt(fan_in)).to(param.dtype))


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Random affine parameters and running statistics for every BatchNorm layer.

    Fresh layers (weight 1, bias 0, mean 0, var 1) hide errors such as a norm bias
    that is not masked.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        for name, low, scale in (
            ("running_mean", -0.5, 1.0),
            ("running_var", 0.5, 1.5),
            ("weight", 0.7, 0.6),
            ("bias", -0.3, 0.6),
        ):
            tensor = getattr(module, name, None)
            if isinstance(tensor, Tensor) and tensor.is_floating_point():
                values = low + scale * torch.rand(
                    tensor.shape, generator=generator, dtype=torch.float64
                )
                tensor.copy_(values.to(tensor.dtype))


def _mismatch(
    reference: nn.Module,
    groups: Sequence[ChannelGroup],
    masks: Masks,
    x: Tensor,
    tolerance: float,
) -> str | None:
    """Why the compact network differs from the masked one, or None if it does not."""
    params = dict(reference.named_parameters())
    try:
        with torch.no_grad():
            masked = functional_call(
                reference, {**params, **masked_tensors(params, groups, masks)}, (x,)
            )
        pruned = compact(reference, groups, masks, x)
        with torch.no_grad():
            compact_out = pruned(x)
    except Exception as error:  # noqa: BLE001 - any failure is a mismatch
        return f"pruning fails with {describe_error(error)}"
    if not isinstance(masked, Tensor) or not isinstance(compact_out, Tensor):
        return "the backbone does not return a tensor"
    if masked.dim() > 1 and masked.shape[1] != compact_out.shape[1]:
        kept, _ = output_feature_index(groups, masks, masked.shape[1])
        masked = masked[:, kept]
    if masked.shape != compact_out.shape:
        return (
            f"the pruned network's output has shape {tuple(compact_out.shape)}, "
            f"the masked one's {tuple(masked.shape)}"
        )
    scale = float(masked.abs().max())
    difference = float((masked - compact_out).abs().max()) / max(scale, 1e-12)
    if not difference <= tolerance:
        return f"the pruned network differs from the masked one by {difference:.1e}"
    return None


def check_exact(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_inputs: Tensor,
    pruning_ratio: float = 0.5,
    seed: int = 0,
) -> None:
    """Checks that masking and removing channels give the same network.

    A float64 copy of ``model`` on the CPU (float32 above
    :data:`CHECK_FLOAT64_MAX_PARAMETERS`), in eval mode with seeded random weights
    and BatchNorm statistics (the check is about the architecture, not about what the
    model learned), is pruned with random masks at ``pruning_ratio`` and its output on
    ``example_inputs`` compared with the masked copy's (relative difference at most
    :data:`CHECK_TOLERANCE`). When they differ, the groups are bisected to name the
    first one whose pruning alone breaks the equality.

    The global random number generators are left as they were: constructing a
    model with the check draws the same random numbers afterwards as without it.

    Raises:
        UnsupportedBackboneError: If they differ (or pruning fails), naming the group.
    """
    with torch.random.fork_rng(devices=[]):
        _check_exact(model, groups, example_inputs, pruning_ratio, seed)


def _check_exact(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_inputs: Tensor,
    pruning_ratio: float,
    seed: int,
) -> None:
    large = sum(p.numel() for p in model.parameters()) > CHECK_FLOAT64_MAX_PARAMETERS
    dtype = torch.float32 if large else torch.float64
    tolerance = CHECK_TOLERANCE[dtype]
    reference = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
    with torch.no_grad():
        _randomise_weights(reference, seed)
        _randomise_norms(reference, seed)
    x = example_inputs.detach().to(device="cpu", dtype=dtype)
    masks = GroupMasks.random(groups, pruning_ratio, seed)
    reason = _mismatch(reference, groups, masks, x, tolerance)
    if reason is None:
        return
    everything = [torch.ones_like(mask) for mask in masks]

    def only(chosen: Sequence[int]) -> list[Tensor]:
        return [masks[i] if i in chosen else everything[i] for i in range(len(masks))]

    candidates = list(range(len(groups)))
    while len(candidates) > 1:
        half = candidates[: len(candidates) // 2]
        rest = candidates[len(candidates) // 2 :]
        if _mismatch(reference, groups, only(half), x, tolerance) is not None:
            candidates = half
        elif _mismatch(reference, groups, only(rest), x, tolerance) is not None:
            candidates = rest
        else:
            break  # only a combination of groups fails
    if len(candidates) == 1:
        culprit = _mismatch(reference, groups, only(candidates), x, tolerance)
        if culprit is not None:
            root = groups[candidates[0]].root
            try:
                route = route_of(reference, root, x)
            except Exception:  # noqa: BLE001 - the message does without it
                route = ""
            raise unsupported(
                model,
                f"removing channels of the group of {root} is not exact "
                f"({f'{route}; ' if route else ''}{culprit})",
            )
    raise unsupported(model, f"pruning all groups together is not exact ({reason})")


def find_channel_groups(
    model: nn.Module,
    example_inputs: Tensor | None = None,
    keep_output_dim: bool = True,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    check: bool = True,
) -> list[ChannelGroup]:
    """Finds the coupled output-channel groups of a backbone.

    A backbone whose channels cannot be pruned exactly is refused here, before any
    training, with one line naming the construct and the module: weight-standardised
    convolutions, attention layers, constructs torch-pruning cannot trace, graphs
    whose tracing takes longer than ``time_limit``, and (``check``) any group whose
    masked forward differs from the physically pruned network's.

    Args:
        model: The backbone (maps images to features).
        example_inputs: A batch to trace the model with. Defaults to one random
            64x64 RGB image.
        keep_output_dim: If True, the group that reaches the backbone's output is not
            pruned, so the feature dimension stays the same.
        time_limit: Seconds the tracing may take (``None``: no limit).
        check: Prune a float64 copy with random masks at r = 0.5 and check that it
            equals the masked network (:func:`check_exact`).

    The groups of an architecture traced before in this process (same
    :func:`architecture_key`, settings and input shape) are reused without tracing.

    Returns:
        The prunable groups, in a deterministic order (by root module name).

    Raises:
        UnsupportedBackboneError: If the backbone cannot be pruned exactly.
        NoPrunableGroupsError: If the backbone has no prunable group (for example
            attention models, which are not supported yet).
        InputError: If the backbone does not run on ``example_inputs``.

    Examples:
        >>> backbone = torchvision.models.resnet18()
        >>> backbone.fc = torch.nn.Identity()
        >>> groups = find_channel_groups(backbone)
        >>> groups[0].num_channels, groups[0].param_names[:2]
    """
    if example_inputs is None:
        example_inputs = default_example_inputs()
    key = architecture_key(model, example_inputs, keep_output_dim, check)
    if key is not None and key in _traced:
        return list(_traced[key])
    size = "x".join(str(n) for n in example_inputs.shape[2:])
    label = backbone_label(model)
    log.info(f"tracing the channel groups of {label} at {size} px (once per backbone)")
    start = time.perf_counter()
    groups = trace_channel_groups(model, example_inputs, keep_output_dim, time_limit)
    if check:
        check_exact(model, groups, example_inputs)
    seconds = time.perf_counter() - start
    log.info(f"traced {len(groups)} channel groups of {label} in {seconds:.1f} s")
    if key is not None:
        _traced[key] = tuple(groups)
    return groups


def architecture_key(
    model: nn.Module, example_inputs: Tensor, *settings: Hashable
) -> Hashable | None:
    """What the channel groups of ``model`` depend on, or None when unknown.

    The class of every module (its module path and qualified name), its plain
    attributes (strides, kernel sizes, flags such as ``small_input``), the name,
    shape and dtype of every parameter and buffer, the shape of
    ``example_inputs`` and ``settings``: two backbones with the same key trace to the
    same groups, whatever their weights. The groups name parameters and modules, so
    they apply to any model with that key. Functions set on a module instance (a
    replaced ``forward``) count by where they are defined; a model with forward
    hooks has no key (None): its groups are traced every time.
    """
    modules = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        attributes = []
        for attribute, value in sorted(vars(module).items()):
            if attribute.startswith("_") or attribute == "training":
                continue
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(value, _PLAIN) or (
                isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
            ):
                attributes.append((attribute, value))
            elif callable(value):  # a function or class set on the instance
                attributes.append((attribute, _callable_name(value)))
        kind = type(module)
        modules.append(
            (name, f"{kind.__module__}.{kind.__qualname__}", tuple(attributes))
        )
    tensors = tuple(
        (name, tuple(t.shape), str(t.dtype))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    )
    return (tuple(modules), tensors, tuple(example_inputs.shape), settings)


def _callable_name(value: object) -> str:
    """Where a function or class is defined: its module, qualified name and line."""
    function = getattr(value, "__func__", value)  # a bound method's function
    code = getattr(function, "__code__", None)
    line = f":{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
    name = getattr(function, "__qualname__", None) or repr(function)
    return f"{getattr(function, '__module__', '')}.{name}{line}"


def clear_traced_groups() -> None:
    """Forgets the groups found so far (the next call of
    :func:`find_channel_groups` traces again).
    """
    _traced.clear()
