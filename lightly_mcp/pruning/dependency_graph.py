"""torch-pruning's dependency graph, with a linear group search and traceable forms.

Two additions to ``torch_pruning.DependencyGraph``, both used whenever
``lightly_mcp.pruning.groups`` traces a backbone (so that groups, checks and compaction
see the same graph):

- :class:`DependencyGraph` finds a group by propagating each (channel, root channel)
  pair once. torch-pruning revisits a layer whenever it is reached with another set
  of indices, which is exponential in the depth of sliced or concatenated residuals
  (rexnet: ``cat([x[:, :c] + shortcut, x[:, c:]])`` in every block) and does not
  end on index mappings that grow along a cycle. The union it would reach is the
  same: every index mapping maps each index on its own.
- :func:`traceable_forms` swaps, while tracing, the forward of blocks whose tensor
  algebra torch-pruning misreads for one with the same channel dependencies (and
  different values, which tracing does not use): timm's selective kernel (paths
  stacked on a new dimension, attention logits viewed per path) and global-context
  attention (a spatial softmax applied by ``matmul``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch_pruning as tp
from timm.layers import GlobalContext, SelectiveKernel
from torch import Tensor, nn
from torch_pruning import _helpers
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.index_mapping import update_index_mapping
from torch_pruning.pruner import function


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's graph whose group search visits every channel pair once."""

    def get_pruning_group(
        self, module: nn.Module, pruning_fn: Callable[..., Any], idxs: Sequence[int]
    ) -> Group:
        """The group of ``module``'s channels ``idxs`` (as torch-pruning's).

        A worklist of (layer, pruning function) keys, each with the (index, root
        index) pairs not propagated yet: a layer is processed again only for pairs
        that are new to it. Items keep, per index, the first root index reaching it
        (as torch-pruning's merge does).
        """
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if (
            isinstance(module, tp.ops.TORCH_CONV)
            and module.groups == module.out_channels
            and module.out_channels > 1
        ):
            pruning_fn = function.prune_depthwise_conv_out_channels
        update_index_mapping(self)
        root_node = self.module2node[module]
        key = (root_node, pruning_fn)
        start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
        deps = {key: Dependency(pruning_fn, pruning_fn, root_node, root_node)}
        seen: dict[Any, dict[Any, None]] = {key: dict.fromkeys(start)}
        pending = {key: start}
        stack = [key]
        while stack:
            key = stack.pop()
            indices = pending.pop(key)
            dep = deps[key]
            for new_dep in dep.target.dependencies:
                if not new_dep.is_triggered_by(dep.handler):
                    continue
                mapped = indices
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        mapped = mapping(mapped)
                if not mapped:
                    continue
                new_key = (new_dep.target, new_dep.handler)
                deps.setdefault(new_key, new_dep)
                known = seen.setdefault(new_key, {})
                fresh = [i for i in dict.fromkeys(mapped) if i not in known]
                if not fresh:
                    continue
                known.update(dict.fromkeys(fresh))
                if new_key in pending:
                    pending[new_key].extend(fresh)
                else:
                    pending[new_key] = fresh
                    stack.append(new_key)
        group = Group()
        for key, dep in deps.items():
            target = dep.target.module
            if isinstance(target, nn.Parameter) and any(
                target is p for p in self.ignored_params
            ):
                continue
            first: dict[int, int] = {}
            for index in seen[key]:
                first.setdefault(index.idx, index.root_idx)
            group.add_dep(dep, list(first))
            group[len(group) - 1].root_idxs = list(first.values())
        group._DG = self
        return group


def _selective_kernel(module: SelectiveKernel, x: Tensor) -> Tensor:
    """The channel dependencies of ``SelectiveKernel.forward``: paths and their
    per-path attention logits (``fc_select``'s chunks) multiplied channel-wise.
    """
    if module.split_input:
        parts = torch.split(x, module.in_channels // module.num_paths, 1)
        paths = [op(part) for op, part in zip(module.paths, parts)]
    else:
        paths = [op(x) for op in module.paths]
    attn = module.attn
    logits = sum(paths[1:], paths[0]).mean((2, 3), keepdim=True)
    logits = attn.fc_select(attn.act(attn.bn(attn.fc_reduce(logits))))
    weights = torch.split(logits, logits.shape[1] // module.num_paths, 1)
    out = paths[0] * weights[0]
    for path, weight in zip(paths[1:], weights[1:]):
        out = out + path * weight
    return out


def _global_context(module: GlobalContext, x: Tensor, side: list[Tensor]) -> Tensor:
    """The channel dependencies of ``GlobalContext.forward``: the context is a
    per-channel spatial pooling of ``x``; the one-channel attention map weighs
    positions, not channels (returned beside the output, so it is traced).
    """
    if module.conv_attn is not None:
        side.append(module.conv_attn(x))
    context = x.mean(dim=(2, 3), keepdim=True)
    if module.mlp_scale is not None:
        x = x * module.gate(module.mlp_scale(context))
    if module.mlp_add is not None:
        x = x + module.mlp_add(context)
    return x


@contextmanager
def traceable_forms(model: nn.Module) -> Iterator[list[Tensor]]:
    """Gives the blocks torch-pruning misreads a traceable forward while inside.

    Yields:
        A list that collects tensors to trace beside the model's output (branches
        that the traceable form does not use).
    """
    side: list[Tensor] = []
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, SelectiveKernel):
                form = partial(_selective_kernel, module)
            elif isinstance(module, GlobalContext):
                form = partial(_global_context, module, side=side)
            else:
                continue
            module.forward = form  # type: ignore[method-assign]
            patched.append(module)
        yield side
    finally:
        for module in patched:
            del module.forward


def refresh_traceable_forms(model: nn.Module) -> None:
    """Sets the channel counts a selective kernel splits by from its pruned paths."""
    for module in model.modules():
        if isinstance(module, SelectiveKernel):
            conv = module.paths[0].get_submodule("conv")
            assert isinstance(conv, nn.Conv2d)
            module.in_channels = conv.in_channels * (
                module.num_paths if module.split_input else 1
            )
            module.out_channels = conv.out_channels
