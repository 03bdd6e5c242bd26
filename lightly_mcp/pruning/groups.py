"""Channel groups: the coupled output channels of a backbone.

Structured pruning removes output channels, and channels are coupled: a residual add
ties the channels of every branch that feeds it, a depthwise convolution ties its input
and output channels, a norm layer follows its convolution. A *channel group* is one
such set of coupled channels, found once by tracing the network with torch-pruning's
``DependencyGraph``. Everything else in MCP (the ADMM projection, the momentum-subnet
mask, compaction and reports) speaks in groups and channel indices; the masks over
the groups live in ``lightly_mcp.pruning.masks``.

A group's *output-side members* are the parameters that produce its channels: conv or
linear output rows and biases, depthwise conv filters, norm-layer weights and biases.
They are addressed by parameter name and channel index, so the same groups apply to the
query encoder and to its momentum copy (which share one architecture), and a parameter
after a concatenation can carry slices of several groups. A grouped convolution ties
the channels at the same position of its convolution groups (``ChannelGroup.units``).

A backbone that cannot be pruned exactly (masking a channel and removing it give
different networks) is refused here, when the groups are traced, with one line naming
the construct and the module (:class:`UnsupportedBackboneError`).

Reference:
    Momentum Contrastive Pruning, Section 3.4 (ADMM on the encoder), and
    DepGraph: Towards Any Structural Pruning, CVPR 2023 (torch-pruning).
"""

from __future__ import annotations

import ctypes
import math
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch_pruning as tp
from timm.layers import (
    CecaModule,
    EcaModule,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from torch import Tensor, nn
from torch_pruning.dependency.index_mapping import (
    _SplitIndexMapping,
    update_index_mapping,
)

from lightly_mcp.errors import (
    InputError,
    NoPrunableGroupsError,
    UnsupportedBackboneError,
    describe_error,
)
from lightly_mcp.pruning.dependency_graph import DependencyGraph, traceable_forms
from lightly_mcp.pruning.measure import eval_mode

# Norm layers that mix channels: zeroing one channel changes the output of the others,
# so a masked forward is not equivalent to removing the channel. Groups that contain
# them are left unpruned.
_CHANNEL_MIXING_LAYERS: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.MultiheadAttention,
)


# Convolutions that standardise their weight over the input channels (NF-Nets, BiT):
# removing an input channel changes the statistics of every output row, so masking
# is not equivalent to removal.
_WEIGHT_STANDARDISED_CONVS: tuple[type[nn.Module], ...] = (
    StdConv2d,
    StdConv2dSame,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
)

DEFAULT_TIME_LIMIT = 60.0
"""Seconds that tracing a backbone's channel groups may take before it is refused."""

WORKING_BACKBONES = (
    "torchvision/resnet18, torchvision/mobilenet_v2, torchvision/efficientnet_b0, "
    "torchvision/densenet121, timm/resnext26ts, timm/regnety_002, "
    "timm/cspresnet50, timm/ghostnet_100"
)
"""Backbones that prune exactly (checked by the zoo test); refusals name the first."""


class _TimeLimitExceeded(BaseException):
    """Raised asynchronously in a thread whose time limit ran out."""


_T = TypeVar("_T")


def _thread_cpu_clock() -> int | None:
    """The CPU-time clock of the calling thread (None where the platform has none)."""
    try:
        clock = time.pthread_getcpuclockid(threading.get_ident())
        time.clock_gettime(clock)
    except (AttributeError, OSError):
        return None
    return clock


def call_with_time_limit(function: Callable[[], _T], seconds: float | None) -> _T:
    """Calls ``function()`` and interrupts it after ``seconds`` of its CPU time.

    The limit counts the CPU time of the calling thread where the platform has a
    per-thread CPU clock (Linux), so a loaded machine (other jobs, a low priority)
    does not make a call fail that would finish; wall-clock time elsewhere. The
    interruption is an exception raised in the calling thread (any thread, not only
    the main one) at its next Python bytecode, so it stops pure-Python loops such as
    torch-pruning's group search, not a single long C call.

    Raises:
        TimeoutError: If the call took longer than ``seconds``.
    """
    if seconds is None:
        return function()
    if not seconds > 0:
        raise InputError(f"time_limit must be > 0 seconds or None, got {seconds}.")
    thread_id = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"inside": True, "fired": False}
    clock = _thread_cpu_clock()
    stop = threading.Event()

    def interrupt() -> None:
        with lock:
            if state["inside"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    thread_id, ctypes.py_object(_TimeLimitExceeded)
                )
                state["fired"] = True

    def watch_cpu_time() -> None:
        assert clock is not None
        try:
            start = time.clock_gettime(clock)
            while not stop.wait(min(0.05, seconds / 4)):
                if time.clock_gettime(clock) - start >= seconds:
                    interrupt()
                    return
        except OSError:  # the thread has ended
            return

    watcher: threading.Thread | threading.Timer
    if clock is None:
        watcher = threading.Timer(seconds, interrupt)
    else:
        watcher = threading.Thread(target=watch_cpu_time)
    watcher.daemon = True
    watcher.start()
    try:
        try:
            return function()
        finally:
            stop.set()
            if isinstance(watcher, threading.Timer):
                watcher.cancel()
            with lock:
                state["inside"] = False
                if state["fired"]:  # clear an exception not delivered yet
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, None)
    except _TimeLimitExceeded:
        what = "of CPU time" if clock is not None else ""
        raise TimeoutError(f"took longer than {seconds:g} s {what}".strip()) from None


@dataclass(frozen=True)
class GroupMember:
    """One output-side parameter of a channel group.

    Attributes:
        param_name: Name of the parameter in the backbone (``named_parameters()``).
        dim: Dimension of the parameter that indexes output channels.
        channel_index: For every channel of the group (in group order), the index
            along ``dim`` of this parameter. Usually ``0, 1, ..., C - 1``; a slice
            of the parameter when it also carries other groups' channels (a norm
            layer after a concatenation).
    """

    param_name: str
    dim: int
    channel_index: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled output channels and the parameters that produce them.

    Attributes:
        root: Name of the module (a conv or linear layer) whose output channels
            define the group; used to replay the group on a copy of the backbone.
        num_channels: Number of coupled channels ``C_g``.
        members: The output-side parameters of the group.
        output_features: For a group that reaches the backbone's output (only found
            with ``keep_output_dim=False``), pairs ``(channel, feature)``: the
            group channel and the index along dimension 1 of the backbone's output
            that carries it (as traced by torch-pruning). Empty otherwise.
        units: Channels that are kept or dropped together, all of one size, or
            empty when every channel is its own unit. A grouped convolution ties
            the channels at the same position of each of its convolution groups,
            so that every convolution group keeps the same channels (as
            torch-pruning prunes grouped convolutions).

    A member parameter may also carry channels of other groups (a norm layer after
    a concatenation): its ``channel_index`` then covers only this group's slice.
    """

    root: str
    num_channels: int
    members: tuple[GroupMember, ...]
    output_features: tuple[tuple[int, int], ...] = ()
    units: tuple[tuple[int, ...], ...] = ()

    @property
    def num_units(self) -> int:
        """Number of units (channels when there are no tied channels)."""
        return len(self.units) if self.units else self.num_channels

    @property
    def unit_size(self) -> int:
        """Channels per unit."""
        return len(self.units[0]) if self.units else 1

    def num_kept(self, pruning_ratio: float, round_to: int = 1) -> int:
        """Channels kept at a pruning ratio: ``max(1, C_g - floor(r * C_g))``.

        With tied channels, that count of units: ``unit_size * max(1, U - floor(r
        * U))``. With ``round_to``, that count aligned to a multiple of
        ``lcm(unit_size, round_to)`` by :func:`align_kept_channels` (hardware-aligned
        pruning: whole units, channel counts the kernels of a runtime are fast on);
        where that multiple is the whole group or more, the unaligned count.
        """
        kept = self.unit_size * num_kept_channels(self.num_units, pruning_ratio)
        step = math.lcm(self.unit_size, validate_round_to(round_to))
        if step > round_to and step >= self.num_channels:
            # Whole units leave no aligned count below the group's size (a grouped
            # convolution of 3 convolution groups: multiples of 24 in 24 channels):
            # the requested count, unaligned, rather than no pruning at all.
            return kept
        return align_kept_channels(self.num_channels, kept, step)

    def unit_of_channel(self) -> Tensor:
        """For every channel, the index of its unit (int64, shape ``[C_g]``)."""
        if not self.units:
            return torch.arange(self.num_channels)
        index = torch.empty(self.num_channels, dtype=torch.long)
        for u, unit in enumerate(self.units):
            index[list(unit)] = u
        return index

    def mask_of_units(self, kept_units: Tensor) -> Tensor:
        """The channel mask (bool ``[C_g]``) keeping the given unit indices."""
        unit_mask = torch.zeros(self.num_units, dtype=torch.bool)
        unit_mask[kept_units.cpu()] = True
        return unit_mask[self.unit_of_channel()]

    def top_mask(self, scores: Tensor, num_kept: int) -> Tensor:
        """Keeps the ``num_kept`` channels of largest total score, whole units.

        Args:
            scores: A score per channel (``[C_g]``); a unit scores the sum.
            num_kept: Channels to keep, a multiple of ``unit_size``.
        """
        unit_of = self.unit_of_channel().to(scores.device)
        unit_scores = torch.zeros(
            self.num_units, dtype=scores.dtype, device=scores.device
        ).index_add_(0, unit_of, scores)
        keep = torch.topk(unit_scores, num_kept // self.unit_size, sorted=False)
        return self.mask_of_units(keep.indices).to(scores.device)

    def splits_units(self, mask: Tensor) -> bool:
        """Whether a channel mask keeps part of a unit (invalid for compaction)."""
        if not self.units:
            return False
        unit_of = self.unit_of_channel()
        kept = torch.zeros(self.num_units, dtype=torch.long).index_add_(
            0, unit_of, mask.cpu().long()
        )
        return bool(((kept != 0) & (kept != self.unit_size)).any())

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the member parameters."""
        return tuple(member.param_name for member in self.members)


def validate_pruning_ratio(pruning_ratio: float) -> float:
    """Returns the ratio as float or raises a ValueError if it is outside [0, 1)."""
    if not isinstance(pruning_ratio, (int, float)) or isinstance(pruning_ratio, bool):
        raise InputError(
            f"pruning_ratio must be a number in [0, 1), got {pruning_ratio!r}."
        )
    if not 0.0 <= pruning_ratio < 1.0:
        raise InputError(
            f"pruning_ratio must be in [0, 1) (the fraction of channels removed in "
            f"every group), got {pruning_ratio}."
        )
    return float(pruning_ratio)


def num_kept_channels(num_channels: int, pruning_ratio: float) -> int:
    """Number of channels a group keeps: ``max(1, C - floor(r * C))``.

    Args:
        num_channels: Channels ``C`` in the group.
        pruning_ratio: Fraction ``r`` of channels removed, in [0, 1).
    """
    ratio = validate_pruning_ratio(pruning_ratio)
    # The small epsilon keeps e.g. floor(0.3 * 10) at 3 despite float rounding.
    return max(1, num_channels - math.floor(ratio * num_channels + 1e-9))


def validate_round_to(round_to: int) -> int:
    """Returns ``round_to`` or raises an InputError if it is not an integer >= 1."""
    if isinstance(round_to, bool) or not (isinstance(round_to, int) and round_to >= 1):
        raise InputError(
            f"round_to must be an integer >= 1 (1: no alignment), got {round_to!r}."
        )
    return round_to


def align_kept_channels(num_channels: int, kept: int, multiple: int) -> int:
    """The kept-channel count nearest to ``kept`` that is a multiple of ``multiple``.

    The rule of hardware-aligned pruning: a group of ``C`` channels keeps the
    multiple of ``multiple`` nearest to the requested count (ties: the larger), never
    fewer than ``multiple`` and never more than ``C``; the whole group (``C``) is
    also a candidate when ``C`` is not a multiple (it is the dense layer's width).
    Rounding to the nearest count keeps the parameters close to the requested
    counts' (MobileNetV2 width 0.5: within 1.2 points of the fraction removed at
    r = 0.2 to 0.92); MACs less so, since small groups at high resolution cannot go
    below ``multiple``. A parameter target is met by ``solve_pruning_ratio(...,
    round_to=...)``. A group smaller than ``multiple`` cannot be aligned and keeps
    ``kept``.

    Args:
        num_channels: Channels ``C`` in the group.
        kept: The requested count, in ``[1, C]`` (a multiple of the group's unit).
        multiple: The channel multiple (``lcm(unit_size, round_to)``), >= 1.

    Examples:
        >>> [align_kept_channels(192, n, 8) for n in (154, 156, 3)]
        [152, 160, 8]
        >>> align_kept_channels(20, 18, 8), align_kept_channels(4, 2, 8)
        (20, 2)
    """
    if multiple <= 1 or num_channels < multiple:
        return kept
    candidates = [k * multiple for k in range(1, num_channels // multiple + 1)]
    if num_channels % multiple:
        candidates.append(num_channels)
    return min(candidates, key=lambda count: (abs(count - kept), -count))


def default_example_inputs(input_size: int = 64) -> Tensor:
    """A dummy RGB batch used to trace image backbones."""
    return torch.randn(1, 3, input_size, input_size)


def build_dependency_graph(
    model: nn.Module, example_inputs: Tensor | None = None
) -> tp.DependencyGraph:
    """Traces ``model`` with torch-pruning, leaving its state as it was.

    torch-pruning needs gradients to trace and switches the model to eval mode; this
    enables ``requires_grad`` while tracing and restores both afterwards. Tracing in
    eval mode also leaves BatchNorm running statistics untouched. Blocks that
    torch-pruning misreads are traced in an equivalent form
    (:func:`lightly_mcp.pruning.dependency_graph.traceable_forms`).
    """
    if example_inputs is None:
        example_inputs = default_example_inputs()
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with eval_mode(model), traceable_forms(model) as side:
            graph = DependencyGraph()
            failed = False
            try:
                with torch.enable_grad():
                    graph.build_dependency(
                        model,
                        example_inputs=example_inputs,
                        forward_fn=lambda m, x: [m(x), *side],
                        verbose=False,
                    )
            except Exception:
                # Its last step, the index mappings, can fail on the chunk sizes of
                # a split that _fix_split_index_mapping corrects (timm cs3darknet).
                if not getattr(graph, "module2node", None):
                    raise
                failed = True
            _fix_split_index_mapping(graph, force=failed)
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    return graph


def _fix_split_index_mapping(graph: tp.DependencyGraph, force: bool = False) -> None:
    """Maps every consumer of a channel split to the chunk it really reads.

    torch-pruning assumes that the i-th consumer of a split reads its i-th chunk and
    that ``split(size)`` has as many chunks as consumers. Neither holds when a chunk
    has several consumers (CSP stages: ``xs, xb = x.split(c // 2)``, ``xb`` feeds a
    block and its residual add), so groups reached through the split were mapped to
    the wrong channels. The chunk a consumer reads is recorded by autograd (the
    ``output_nr`` of its edge to the split); this sets torch-pruning's own split
    index mappings from it, with the chunk sizes from the split's saved arguments,
    and recomputes the concatenations' offsets (always with ``force``). Splits whose
    consumers read several chunks are left as torch-pruning traced them (the
    exactness check judges them).
    """
    fixed = False
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or not node.enable_index_mapping:
            continue
        grad_fn = node.grad_fn
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if getattr(grad_fn, "_saved_dim", None) != 1 or sizes is None:
            continue
        total = int(sizes[1])
        if hasattr(grad_fn, "_saved_split_sizes"):
            chunks = [int(c) for c in grad_fn._saved_split_sizes]
        elif hasattr(grad_fn, "_saved_split_size"):
            size = int(grad_fn._saved_split_size)
            chunks = [size] * (total // size) + ([total % size] if total % size else [])
        else:
            continue
        offsets = [0]
        for chunk in chunks:
            offsets.append(offsets[-1] + chunk)
        chunk_of: dict[Any, int] = {}
        for out_node in node.outputs:
            edges = getattr(out_node.grad_fn, "next_functions", ())
            numbers = {int(nr) for fn, nr in edges if fn is grad_fn}
            if len(numbers) != 1:
                break
            chunk_of[out_node] = numbers.pop()
        else:
            node.module.split_sizes = [chunks[chunk_of[n]] for n in node.outputs]
            node.module.offsets = offsets
            for out_node, k in chunk_of.items():
                for dep in node.dependencies:
                    if dep.target is out_node:
                        dep.index_mapping[0] = _SplitIndexMapping(
                            offset=offsets[k : k + 2], reverse=False
                        )
                for dep in out_node.dependencies:
                    if dep.target is node:
                        dep.index_mapping[0] = _SplitIndexMapping(
                            offset=offsets[k : k + 2], reverse=True
                        )
            node.enable_index_mapping = False  # torch-pruning must not redo it
            fixed = True
    if fixed or force:
        for node in graph.module2node.values():
            if node.type == tp.ops.OPTYPE.CONCAT:
                node.module.concat_sizes = None
        update_index_mapping(graph)


def _out_channel_dim(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1
    return 0


def _members_of(
    tp_group: Any, graph: tp.DependencyGraph, module_names: Mapping[nn.Module, str]
) -> tuple[list[GroupMember], tuple[tuple[int, int], ...] | None, bool]:
    """Output-side members of a torch-pruning group.

    Returns:
        (members, output_features, mixes_channels), where ``output_features`` are
        the ``(channel, output feature)`` pairs when the group reaches the output
        (torch-pruning's output node), else None.
    """
    members: dict[tuple[str, int], GroupMember] = {}
    output_features: tuple[tuple[int, int], ...] | None = None
    mixes_channels = False
    for item in tp_group.items:
        module = item.dep.target.module
        if isinstance(module, tp.ops._OutputOp):
            root_idxs = item.root_idxs if item.root_idxs is not None else item.idxs
            pairs = {(int(c), int(f)) for c, f in zip(root_idxs, item.idxs)}
            output_features = tuple(sorted(pairs | set(output_features or ())))
            continue
        if isinstance(module, _CHANNEL_MIXING_LAYERS):
            mixes_channels = True
        if not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if not isinstance(module, nn.Module) or module not in module_names:
            continue  # torch-pruning's placeholder ops (add, cat, ...)
        dim = _out_channel_dim(module)
        size = None
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() <= dim:
                continue
            if size is None:
                size = param.shape[dim]
            if param.shape[dim] != size:
                continue
            full_name = f"{module_names[module]}.{param_name}".lstrip(".")
            for k, channel_index in enumerate(_channel_indices(item, size)):
                members[(full_name, k)] = GroupMember(full_name, dim, channel_index)
    return list(members.values()), output_features, mixes_channels


def _channel_indices(item: Any, size: int | None = None) -> list[tuple[int, ...]]:
    """A member's channel indices in group order, once per copy of the group.

    A layer can produce every channel of a group several times and nothing else
    (a selective kernel's ``fc_select``: one attention logit per path and channel,
    ``size`` outputs in all): then it is a member once per copy, each with one index
    per group channel.
    """
    order = sorted(zip(item.root_idxs, item.idxs))
    roots = [int(root) for root, _ in order]
    copies = len(order) // max(len(set(roots)), 1)
    if (
        copies > 1
        and len(order) == (size if size is not None else len(order))
        and roots == [r for r in dict.fromkeys(roots) for _ in range(copies)]
    ):
        return [tuple(int(idx) for _, idx in order[k::copies]) for k in range(copies)]
    return [tuple(int(idx) for _, idx in order)]


# timm's spatial self-attention layers in CNNs are named too (lambda, halo, bottleneck
# and non-local attention); SE-style gates (SplitAttn, EffectiveSE, ...) are not.
_ATTENTION_CLASS = re.compile(
    r"(Attention|SelfAttn|^LambdaLayer|^HaloAttn|^BottleneckAttn|^NonLocalAttn"
    r"|^BatNonLocalAttn)$"
)


def _attention_modules(model: nn.Module) -> list[str]:
    """Names of attention layers (e.g. timm's ``Attention``, ``MultiheadAttention``).

    Their query/key/value channels are coupled through heads and softmax in ways the
    dependency graph does not express, so masking them is not equivalent to removal.
    """
    return [
        f"{name or type(model).__name__} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        or _ATTENTION_CLASS.search(type(module).__name__)
    ]


def _modules_returning_output(model: nn.Module, example_inputs: Tensor) -> set[str]:
    """Names of modules whose output tensor is (a view of) the model's output.

    torch-pruning marks the group reaching the output with an output node, except
    when the last layer's output is returned directly (e.g. a final Linear).
    """
    # Keep the outputs alive until the comparison: a freed tensor's memory may be
    # reused by a later one, which would make storage pointers collide.
    outputs: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, Tensor):
                outputs[name] = out

        handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            out = model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, Tensor):
        return set()
    ptr = out.untyped_storage().data_ptr()
    return {
        name
        for name, tensor in outputs.items()
        if tensor.untyped_storage().data_ptr() == ptr
    }


def backbone_label(model: nn.Module) -> str:
    """How messages name a backbone: its ``name`` (``Backbone``) or its class."""
    name = getattr(model, "name", None)
    return name if isinstance(name, str) and name else type(model).__name__


def unsupported(model: nn.Module, construct: str) -> UnsupportedBackboneError:
    """The one-line refusal of a backbone, naming the construct and working ones."""
    return UnsupportedBackboneError(
        f"{backbone_label(model)} cannot be pruned exactly by MCP: {construct}; "
        f"use another, e.g. {WORKING_BACKBONES.split(', ')[0]}."
    )


def _refuse_unsupported_layers(model: nn.Module) -> None:
    """Refuses layers whose channels can never be masked and removed alike."""
    for name, module in model.named_modules():
        if isinstance(module, (EcaModule, CecaModule)):
            raise unsupported(
                model,
                f"ECA channel attention in {name}",
            )
        if isinstance(module, _WEIGHT_STANDARDISED_CONVS):
            raise unsupported(
                model,
                f"weight-standardised convolution in {name}",
            )


def _construct_of(tp_group: Any) -> str:
    """Names the operation that routes channels between groups (for messages)."""
    kinds = {
        tp.ops._ConcatOp: "concatenation",
        tp.ops._SplitOp: "split",
        tp.ops._SliceOp: "channel slice",
    }
    for item in tp_group.items:
        for kind, text in kinds.items():
            if isinstance(item.dep.target.module, kind):
                return text
    return "concatenation or split"


def route_of(model: nn.Module, root: str, example_inputs: Tensor) -> str:
    """Where a group's channels pass a split, concatenation or slice (for messages).

    Returns:
        E.g. ``"it passes a split before net.layer1.0.convs.0"``, or ``""`` when
        the group passes none.
    """
    graph = build_dependency_graph(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    module = model.get_submodule(root)
    pruner = graph.get_pruner_of_module(module)
    channels = list(range(pruner.get_out_channels(module)))
    tp_group = graph.get_pruning_group(module, pruner.prune_out_channels, channels)
    for item in tp_group.items:
        node = item.dep.target
        if not isinstance(
            node.module, (tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._SliceOp)
        ):
            continue
        after = [names[n.module] for n in node.outputs if n.module in names]
        where = f" before {after[0]}" if after else ""
        return f"it passes a {_construct_of(tp_group)}{where}"
    return ""


def _is_grouped_convolution(module: Any) -> bool:
    """A convolution with several groups that is not depthwise."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and not module.groups == module.in_channels == module.out_channels
    )


def _units_of(
    tp_group: Any,
    graph: tp.DependencyGraph,
    num_channels: int,
    module_names: Mapping[nn.Module, str],
) -> tuple[tuple[int, ...], ...] | str:
    """The channels grouped convolutions tie together, or why they cannot be.

    A grouped convolution with ``G`` groups of ``w`` channels (on its input or its
    output side) ties the group channels at the same position ``i % w`` of each
    convolution group: they are kept or dropped together, so every convolution group
    keeps the same positions (what torch-pruning's surgery of grouped convolutions
    assumes).

    Returns:
        The units (empty if the group has no grouped convolution), or a message
        naming the grouped convolution whose channels this group cannot tie.
    """
    parent = list(range(num_channels))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    grouped = False
    for item in tp_group.items:
        module = item.dep.target.module
        if isinstance(module, tp.ops._SplitOp):
            # A split into equal chunks whose size is fixed in the forward code
            # (res2net's width): every chunk must keep the same positions.
            offsets = module.offsets or []
            chunks = {b - a for a, b in zip(offsets, offsets[1:])}
            if len(offsets) > 2 and len(chunks) == 1 and len(item.idxs) == offsets[-1]:
                (width,) = chunks
                by_chunk: dict[int, list[int]] = {}
                root_idxs = item.root_idxs if item.root_idxs is not None else item.idxs
                for channel, index in zip(root_idxs, item.idxs):
                    by_chunk.setdefault(int(index) % width, []).append(int(channel))
                for channels in by_chunk.values():
                    for channel in channels[1:]:
                        parent[find(channel)] = find(channels[0])
                grouped = True
            continue
        if not _is_grouped_convolution(module):
            continue
        grouped = True
        name = module_names.get(module, type(module).__name__)
        out_side = graph.is_out_channel_pruning_fn(item.dep.handler)
        size = module.out_channels if out_side else module.in_channels
        width = size // module.groups
        root_idxs = item.root_idxs if item.root_idxs is not None else item.idxs
        by_position: dict[int, list[int]] = {}
        for channel, index in zip(root_idxs, item.idxs):
            by_position.setdefault(int(index) % width, []).append(int(channel))
        for channels in by_position.values():
            if len(set(channels)) != module.groups:
                return (
                    f"grouped convolution in {name} (groups={module.groups}) takes "
                    "channels of several channel groups"
                )
            for channel in channels[1:]:
                parent[find(channel)] = find(channels[0])
    if not grouped:
        return ()
    units: dict[int, list[int]] = {}
    for channel in range(num_channels):
        units.setdefault(find(channel), []).append(channel)
    sizes = {len(unit) for unit in units.values()}
    if len(sizes) != 1:
        return (
            "grouped convolutions tie the channels of the group of "
            f"{module_names[tp_group[0].dep.target.module]} into sets of different "
            f"sizes {sorted(sizes)}"
        )
    return tuple(sorted(tuple(unit) for unit in units.values()))


def _rooted_at_fewest_channels(tp_group: Any, graph: tp.DependencyGraph) -> Any:
    """The same group, traced from its layer with the fewest output channels.

    torch-pruning roots a group at the first layer it meets; a layer producing every
    channel of the group several times (a selective kernel's ``fc_select``) would
    make the group look twice as wide as the layers it feeds. Other groups are
    returned as they are.
    """
    root = tp_group[0].dep.target.module
    fewest = len(tp_group[0].idxs)
    for item in tp_group.items:
        module = item.dep.target.module
        if not isinstance(module, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
            continue
        if not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if len(item.idxs) < fewest:
            root, fewest = module, len(item.idxs)
    first = tp_group[0].dep.target.module
    if root is first:
        return tp_group
    pruner = graph.get_pruner_of_module(root)
    channels = list(range(pruner.get_out_channels(root)))
    rerooted = graph.get_pruning_group(root, pruner.prune_out_channels, channels)
    for item in rerooted.items:
        if item.dep.target.module is first and graph.is_out_channel_pruning_fn(
            item.dep.handler
        ):
            copies = _channel_indices(item, len(tp_group[0].idxs))
            if len(copies) > 1 and len(copies) * fewest == len(tp_group[0].idxs):
                return rerooted  # the first layer produces every channel k times
    return tp_group


def _trace_groups(
    model: nn.Module,
    example_inputs: Tensor,
    keep_output_dim: bool,
    output_modules: set[str],
) -> list[ChannelGroup]:
    """The groups of torch-pruning's dependency graph, as ``ChannelGroup``s."""
    graph = build_dependency_graph(model, example_inputs)
    module_names = {module: name for name, module in model.named_modules()}
    groups: list[ChannelGroup] = []
    claimed: dict[tuple[str, int], str] = {}
    for tp_group in graph.get_all_groups():
        tp_group = _rooted_at_fewest_channels(tp_group, graph)
        members, output_features, mixes_channels = _members_of(
            tp_group, graph, module_names
        )
        if mixes_channels or not members:
            continue
        for member in members:
            if output_features is None and (
                member.param_name.rsplit(".", 1)[0] in output_modules
            ):
                # The layer's own output is returned: its channels are the features.
                output_features = tuple(enumerate(member.channel_index))
        if output_features is not None and keep_output_dim:
            continue
        root = module_names[tp_group[0].dep.target.module]
        num_channels = len(tp_group[0].idxs)
        if any(len(m.channel_index) != num_channels for m in members):
            continue  # partial coupling torch-pruning cannot express as one group
        units = _units_of(tp_group, graph, num_channels, module_names)
        if isinstance(units, str):
            raise unsupported(model, units)
        for member in members:
            size = model.get_parameter(member.param_name).shape[member.dim]
            if max(member.channel_index) >= size:
                raise unsupported(
                    model,
                    f"{_construct_of(tp_group)} before "
                    f"{member.param_name.rsplit('.', 1)[0]} (torch-pruning maps the "
                    f"group of {root} to its channel {max(member.channel_index)} of "
                    f"{size})",
                )
            for index in member.channel_index:
                key = (member.param_name, index)
                if key in claimed:
                    raise unsupported(
                        model,
                        f"{_construct_of(tp_group)} before "
                        f"{member.param_name.rsplit('.', 1)[0]} (its channel {index} "
                        f"belongs to the groups of {claimed[key]} and {root})",
                    )
                claimed[key] = root
        groups.append(
            ChannelGroup(
                root, num_channels, tuple(members), output_features or (), units
            )
        )
    return groups


# torch-pruning's index-mapping functions and the construct each one traces.
_INDEX_MAPPINGS = {
    "update_reshape_index_mapping": "its channel reshape (e.g. a channel shuffle)",
    "update_concat_index_mapping": "its concatenation",
    "update_split_index_mapping": "its channel split",
    "update_slice_index_mapping": "its channel slice",
}


def _failed_construct(error: BaseException) -> str:
    """The construct whose tracing raised ``error`` in torch-pruning, or "it"."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        construct = _INDEX_MAPPINGS.get(frame.f_code.co_name)
        if construct is not None:
            return construct
    return "it"


def trace_channel_groups(
    model: nn.Module,
    example_inputs: Tensor | None = None,
    keep_output_dim: bool = True,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> list[ChannelGroup]:
    """Traces the coupled output-channel groups of a backbone (without checking
    that pruning them is exact:
    :func:`lightly_mcp.pruning.prunable_groups.find_channel_groups` does both).

    A backbone whose channels cannot be pruned exactly is refused here, before any
    training, with one line naming the construct and the module: weight-standardised
    convolutions, attention layers, constructs torch-pruning cannot trace, graphs
    whose tracing takes longer than ``time_limit`` (CPU time of the tracing thread,
    see :func:`call_with_time_limit`).

    Args:
        model: The backbone (maps images to features).
        example_inputs: A batch to trace the model with. Defaults to one random
            64x64 RGB image.
        keep_output_dim: If True, the group that reaches the backbone's output is not
            pruned, so the feature dimension stays the same.
        time_limit: CPU seconds the tracing may take (``None``: no limit).

    Returns:
        The prunable groups, in a deterministic order (by root module name).

    Raises:
        UnsupportedBackboneError: If the backbone cannot be pruned exactly.
        NoPrunableGroupsError: If the backbone has no prunable group (for example
            attention models, which are not supported yet).
        InputError: If the backbone does not run on ``example_inputs``.
    """
    attention = _attention_modules(model)
    if attention:
        raise NoPrunableGroupsError(
            f"{backbone_label(model)} contains attention layers ({attention[0]}); "
            "MCP prunes convolutional channels and attention models (ViTs) are not "
            "supported yet. Use a CNN backbone such as 'torchvision/mobilenet_v2' "
            "or 'timm/resnet18'."
        )
    _refuse_unsupported_layers(model)
    if example_inputs is None:
        example_inputs = default_example_inputs()
    try:
        output_modules = _modules_returning_output(model, example_inputs)
    except Exception as error:  # noqa: BLE001 - any failure: it does not run
        raise InputError(
            f"{backbone_label(model)} does not run on inputs of shape "
            f"{tuple(example_inputs.shape)}: {describe_error(error)}"
        ) from error
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        with eval_mode(model):  # also if the time limit skips the tracer's restoring
            groups = call_with_time_limit(
                lambda: _trace_groups(
                    model, example_inputs, keep_output_dim, output_modules
                ),
                time_limit,
            )
    except UnsupportedBackboneError:
        raise
    except TimeoutError as error:
        # The interruption may have skipped build_dependency_graph's restoring.
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise unsupported(
            model,
            f"tracing its channel groups {error} (torch-pruning's tracing or group "
            "search does not finish on its graph)",
        ) from None
    except Exception as error:  # noqa: BLE001 - torch-pruning's internal errors
        raise unsupported(
            model,
            f"torch-pruning cannot trace {_failed_construct(error)} "
            f"({describe_error(error)})",
        ) from error
    if not groups:
        raise NoPrunableGroupsError(
            f"{backbone_label(model)} has no prunable channel group. MCP prunes "
            "convolutional channels; attention models (ViTs) and networks whose "
            "channels all pass through LayerNorm/GroupNorm are not supported yet. "
            "Use a CNN backbone such as 'torchvision/mobilenet_v2' or 'timm/resnet18'."
        )
    groups.sort(key=lambda g: g.root)
    return groups


def channel_scores(tensors: Mapping[str, Tensor], group: ChannelGroup) -> Tensor:
    """Squared L2 norm of every channel of a group over all its output-side members.

    Args:
        tensors: Parameter-shaped tensors by parameter name (e.g. ``θ + U``).
        group: The group.

    Returns:
        A float tensor of shape ``[C_g]``.
    """
    score: Tensor | None = None
    for member in group.members:
        tensor = tensors[member.param_name]
        per_index = (
            tensor.detach().movedim(member.dim, 0).reshape(tensor.shape[member.dim], -1)
        )
        per_index = per_index.pow(2).sum(dim=1)
        index = torch.as_tensor(member.channel_index, device=tensor.device)
        contribution = per_index[index]
        score = contribution if score is None else score + contribution
    assert score is not None
    return score


def member_mask(
    member: GroupMember, group_mask: Tensor, param_shape: Sequence[int]
) -> Tensor:
    """The 0/1 multiplier of a member parameter for a group's channel mask.

    Args:
        member: The member parameter.
        group_mask: Boolean mask over the group's channels (True = kept).
        param_shape: Shape of the parameter.

    Returns:
        A float tensor broadcastable to ``param_shape``.
    """
    size = param_shape[member.dim]
    multiplier = torch.ones(size, dtype=torch.float32, device=group_mask.device)
    index = torch.as_tensor(member.channel_index, device=group_mask.device)
    multiplier[index] = group_mask.to(multiplier.dtype)
    view = [1] * len(param_shape)
    view[member.dim] = size
    return multiplier.view(view)
