"""Compact keys: the momentum subnet's forward on a physically pruned copy.

The momentum subnet (``lightly_mcp.pruning.momentum_subnet``) is the momentum encoder
seen through the ADMM mask. Its reference forward runs the full encoder with the dropped
channels multiplied by zero: all the dense work, most of it thrown away. The mask
changes only at ADMM updates, so between two updates the same keys can come from a
copy with the dropped channels removed for real. :class:`CompactKeys` is that copy:

- its *structure* is built once per mask, by torch-pruning's surgery
  (``lightly_mcp.pruning.compaction.compact``) on a copy of the encoder whose every
  tensor holds its own flat element indices (float64, exact). After the surgery each
  tensor of the compact copy holds the indices of the full-size elements it keeps,
  whatever the surgery did (coupled layers, input-side slices of the next layer,
  depthwise and grouped convolutions, concatenations, per-split statistics of
  lightly's ``SplitBatchNorm``);
- its *weights* are gathered from the momentum encoder's current weights before
  every forward, one ``index_select`` per tensor (:meth:`CompactKeys.load_weights`);
- its *BatchNorm statistics* live in the copy and are gathered from / written back
  to the subnet's full-size statistics (:meth:`load_statistics`,
  :meth:`store_statistics`); the subnet decides when;
- when the group reaching the backbone's output is pruned (``keep_output_dim=False``)
  its output features are scattered back to full size, the dropped ones zero, as the
  masked forward gives them.

Reference:
    Momentum Contrastive Pruning, Sec. 3.4 (the momentum subnet ``φ ⊙ θ_k``);
    DepGraph: Towards Any Structural Pruning, CVPR 2023 (torch-pruning).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from lightly.models.batchnorm import SplitBatchNorm
from torch import Tensor, nn
from torch.func import functional_call

from lightly_mcp.errors import CompactKeysError, describe_error
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.groups import ChannelGroup
from lightly_mcp.pruning.masks import GroupMasks, Masks, output_feature_index

#: Relative tolerance of the check that a freshly built compact copy reproduces the
#: masked forward. The check runs in float64, where both agree to ≈ 1e-12 even with
#: ill-conditioned batch statistics; a wrong index map differs by far more.
CHECK_TOLERANCE = 1e-6

#: Images the check runs on (at most; rounded up to a multiple of the split count of
#: lightly's ``SplitBatchNorm`` layers).
CHECK_IMAGES = 8


class CompactKeys:
    """A physically pruned copy of the momentum subnet for one mask.

    It is not an ``nn.Module`` of the model: it owns no state worth saving (its
    weights are gathered at every forward, its statistics are written back to the
    subnet's) and is rebuilt whenever the mask changes.

    Attributes:
        module: The compact network (its parameters do not require gradients).
        masks: The masks it was built for (copies, on the CPU).

    Examples:
        >>> keys = CompactKeys(encoder, groups, masks, buffer_names, x[:1])
        >>> keys.load_statistics(subnet_statistics)
        >>> keys.load_weights(dict(encoder.named_parameters()))
        >>> out = keys(x)                     # equals the masked forward
        >>> keys.store_statistics(subnet_statistics)
    """

    def __init__(
        self,
        encoder: nn.Module,
        groups: Sequence[ChannelGroup],
        masks: Masks,
        buffer_names: Sequence[str],
        example_inputs: Tensor,
    ) -> None:
        """Builds the compact copy (torch-pruning surgery) and its index maps.

        Args:
            encoder: The momentum encoder (not modified).
            groups: Its channel groups.
            masks: The masks of kept channels.
            buffer_names: The encoder's buffer names, in the order of the subnet's
                statistics (``MomentumSubnet.buffer_names``).
            example_inputs: A batch to trace with (one image is enough).

        Raises:
            CompactKeysError: If the surgery fails or its result cannot be mapped
                back onto the encoder's tensors.
        """
        # Built outside inference mode even when called from one (an evaluation
        # under torch.inference_mode): the surgery traces autograd, and the copy's
        # tensors are written to by later training steps.
        with torch.inference_mode(False), torch.enable_grad():
            self._build(encoder, groups, masks, buffer_names, example_inputs)

    def _build(
        self,
        encoder: nn.Module,
        groups: Sequence[ChannelGroup],
        masks: Masks,
        buffer_names: Sequence[str],
        example_inputs: Tensor,
    ) -> None:
        self.masks = [m.detach().cpu().clone() for m in GroupMasks.of(groups, masks)]
        params = dict(encoder.named_parameters())
        buffers = dict(encoder.named_buffers())
        try:
            tagged = _index_tagged_copy(encoder)
            example = example_inputs[:1].detach().to("cpu", torch.float64).clone()
            structure = compact(tagged, groups, self.masks, example)
        except Exception as error:
            raise CompactKeysError(
                f"torch-pruning could not compact the encoder ({describe_error(error)})"
            ) from error
        self._weights: list[tuple[str, Tensor, Tensor | None]] = []
        for name, tag in structure.named_parameters():
            if name not in params:
                raise CompactKeysError(f"the compact copy has a new parameter '{name}'")
            source = params[name]
            index = _index_map(name, tag, source)
            tensor = torch.empty(tag.shape, dtype=source.dtype, device=source.device)
            self._weights.append((name, tensor, index))
        position = {name: i for i, name in enumerate(buffer_names)}
        self._statistics: list[tuple[int, Tensor, Tensor | None]] = []
        self._statistic_names: list[str] = []
        for module_name, module in structure.named_modules():
            for key, tag in list(module._buffers.items()):
                if tag is None:
                    continue
                name = f"{module_name}.{key}" if module_name else key
                if name not in position:
                    raise CompactKeysError(
                        f"the compact copy has a new buffer '{name}'"
                    )
                statistic = buffers[name]
                index = _index_map(name, tag, statistic)
                tensor = torch.empty(
                    tag.shape, dtype=statistic.dtype, device=statistic.device
                )
                module._buffers[key] = tensor
                self._statistics.append((position[name], tensor, index))
                self._statistic_names.append(name)
        # The real network: the surgery's structure with the encoder's dtypes and
        # devices, its weights filled at every forward (load_weights).
        weights = {name: tensor for name, tensor, _ in self._weights}
        for module_name, module in structure.named_modules():
            for key, tag in list(module._parameters.items()):
                name = f"{module_name}.{key}" if module_name else key
                if tag is None:
                    continue
                if name not in weights:
                    raise CompactKeysError(f"cannot map the shared parameter '{name}'")
                module._parameters[key] = nn.Parameter(
                    weights[name], requires_grad=False
                )
        self.module = structure
        self._training: bool | None = None
        self.output_index: Tensor | None = None
        self.num_features: int | None = None
        if any(group.output_features for group in groups):
            feature_dim = getattr(encoder, "feature_dim", None)
            if not isinstance(feature_dim, int) or isinstance(feature_dim, bool):
                raise CompactKeysError(
                    "the output features are pruned but the encoder has no integer "
                    "'feature_dim' to scatter them back to"
                )
            kept, dropped = output_feature_index(groups, self.masks, feature_dim)
            if len(dropped):
                device = next(iter(params.values())).device
                self.output_index = kept.to(device)
                self.num_features = feature_dim

    # --- state --------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, params: Mapping[str, Tensor]) -> None:
        """Gathers the kept weights from the encoder's current parameters.

        Args:
            params: The encoder's parameters by name (``named_parameters()``).
        """
        for name, tensor, index in self._weights:
            _gather_into(tensor, params[name].detach(), index)

    @torch.no_grad()
    def load_statistics(self, statistics: Sequence[Tensor]) -> None:
        """Gathers the copy's statistics from the subnet's full-size ones.

        Args:
            statistics: The subnet's buffers (``stat_{i}``), in buffer order.
        """
        for i, tensor, index in self._statistics:
            _gather_into(tensor, statistics[i], index)

    @torch.no_grad()
    def store_statistics(self, statistics: Sequence[Tensor]) -> None:
        """Writes the copy's statistics back into the subnet's full-size ones
        (the dropped channels' entries are not touched).

        Args:
            statistics: The subnet's buffers (``stat_{i}``), in buffer order.
        """
        for i, tensor, index in self._statistics:
            target = statistics[i]
            if index is None:
                target.copy_(tensor)
            else:
                target.view(-1).index_copy_(0, index, tensor.reshape(-1))

    def gathered_statistics(self, statistics: Sequence[Tensor]) -> list[Tensor]:
        """What :meth:`load_statistics` would load from ``statistics`` (copies)."""
        return [
            _gather(statistics[i].detach(), index).clone()
            for i, _, index in self._statistics
        ]

    @torch.no_grad()
    def check(
        self,
        encoder: nn.Module,
        multipliers: Mapping[str, Tensor],
        buffer_names: Sequence[str],
        statistics: Sequence[Tensor],
        x: Tensor,
    ) -> str | None:
        """Checks that this copy reproduces the masked forward, in float64.

        Both run on copies of the weights and statistics (nothing is modified), on
        the first :data:`CHECK_IMAGES` images of ``x``, in the encoder's train/eval
        mode; in train mode the updated statistics are compared too.

        Args:
            encoder: The momentum encoder.
            multipliers: The masked forward's 0/1 multipliers by parameter name.
            buffer_names: The encoder's buffer names (order of ``statistics``).
            statistics: The subnet's statistics (``stat_{i}``).
            x: A batch of the forward's inputs.

        Returns:
            None when they agree, else what differs.
        """
        x = _check_batch(encoder, x).to(torch.float64)
        params = {
            name: _as_float64(p.detach()) for name, p in encoder.named_parameters()
        }
        masked = {
            name: param * multipliers[name].to(param) if name in multipliers else param
            for name, param in params.items()
        }
        expected_statistics = [_as_float64(s.detach()) for s in statistics]
        expected: Tensor = functional_call(
            encoder,
            {**masked, **dict(zip(buffer_names, expected_statistics))},
            (x,),
        )
        own = {
            name: _gather(params[name], index).view(tensor.shape)
            for name, tensor, index in self._weights
        }
        own_statistics = [
            _gather(_as_float64(statistics[i].detach()), index).view(tensor.shape)
            for i, tensor, index in self._statistics
        ]
        tensors = {**own, **dict(zip(self._statistic_names, own_statistics))}
        out = self._scatter_output(functional_call(self.module, tensors, (x,)))
        pairs = [("output", out, expected)]
        if self._training:
            pairs += [
                (name, own.reshape(-1), _gather(expected_statistics[i], index))
                for name, own, (i, _, index) in zip(
                    self._statistic_names, own_statistics, self._statistics
                )
            ]
        return _first_difference(pairs)

    def kept_masks_equal(self, masks: Sequence[Tensor]) -> bool:
        """Whether ``masks`` are the masks this copy was built for."""
        return len(masks) == len(self.masks) and all(
            torch.equal(a, b.detach().cpu()) for a, b in zip(self.masks, masks)
        )

    # --- forward ------------------------------------------------------------------
    def set_training(self, mode: bool) -> None:
        """Train or eval mode, without lightly's ``SplitBatchNorm.train`` collating
        the copy's statistics (the subnet collates its own and reloads them).
        """
        if self._training is not mode:
            for module in self.module.modules():
                module.training = mode
            self._training = mode

    def __call__(self, x: Tensor) -> Tensor:
        """The compact forward, scattered back to the encoder's output size."""
        return self._scatter_output(self.module(x))

    def _scatter_output(self, out: Tensor) -> Tensor:
        """Pruned output features back at their places, the dropped ones zero."""
        if self.output_index is None:
            return out
        assert self.num_features is not None
        full = out.new_zeros((out.shape[0], self.num_features, *out.shape[2:]))
        return full.index_copy_(1, self.output_index, out)


def _first_difference(pairs: Sequence[tuple[str, Tensor, Tensor]]) -> str | None:
    """The first ``(what, got, expected)`` whose tensors differ, described."""
    for what, got, expected in pairs:
        if got.shape != expected.shape:
            return f"{what} has shape {tuple(got.shape)}, not {tuple(expected.shape)}"
        if not got.is_floating_point():
            if not torch.equal(got, expected):
                return f"{what} differs"
            continue
        if not got.numel():
            continue
        # (relative to the largest value, or to 1e-3 for values near zero such as
        # fresh running means, where float64 rounding leaves ≈ 1e-18)
        scale = max(float(expected.abs().max()), 1e-3)
        error = float((got - expected).abs().max())
        if not error <= CHECK_TOLERANCE * scale:  # also catches NaN
            return f"{what} differs by {error:.3g} (of {scale:.3g})"
    return None


def _check_batch(encoder: nn.Module, x: Tensor) -> Tensor:
    """The first images of ``x`` for the check: at least :data:`CHECK_IMAGES`, a
    multiple of every ``SplitBatchNorm``'s split count with at least two images per
    split (a split of one image has no batch variance on 1×1 maps), all of ``x`` if
    fewer.
    """
    splits = 1
    for module in encoder.modules():
        if isinstance(module, SplitBatchNorm):
            splits = math.lcm(splits, module.num_splits)
    n = splits * max(2 if splits > 1 else 1, math.ceil(CHECK_IMAGES / splits))
    return x[:n] if n <= len(x) else x


def _as_float64(tensor: Tensor) -> Tensor:
    """A float64 copy of a floating tensor, a copy of any other."""
    return (
        tensor.to(torch.float64, copy=True)
        if tensor.is_floating_point()
        else tensor.clone()
    )


def _gather_into(tensor: Tensor, source: Tensor, index: Tensor | None) -> None:
    """Writes the flat elements ``index`` of ``source`` into ``tensor`` (all of
    them if None), without allocating.
    """
    if index is None:
        tensor.copy_(source)
    else:
        torch.index_select(source.reshape(-1), 0, index, out=tensor.view(-1))


def _gather(source: Tensor, index: Tensor | None) -> Tensor:
    """The flat elements ``index`` of ``source`` (all of them, flat, if None)."""
    flat = source.reshape(-1)
    return flat if index is None else flat.index_select(0, index)


def _index_tagged_copy(encoder: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``encoder`` whose floating tensors hold their own flat
    element indices (exact up to 2**53 elements per tensor).
    """
    tagged = copy.deepcopy(encoder).to("cpu", torch.float64)
    with torch.no_grad():
        for tensor in [*tagged.parameters(), *tagged.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(
                    torch.arange(tensor.numel(), dtype=torch.float64).view(tensor.shape)
                )
    return tagged


def _index_map(name: str, tag: Tensor, source: Tensor) -> Tensor | None:
    """The flat indices into ``source`` held by the compact tensor ``tag`` (None:
    the whole tensor, unchanged).

    Raises:
        CompactKeysError: If ``tag`` does not hold valid indices of ``source``.
    """
    if not tag.is_floating_point():
        if tag.shape != source.shape:
            raise CompactKeysError(f"cannot map the non-float tensor '{name}'")
        return None
    flat = tag.detach().reshape(-1)
    if flat.numel() and not (
        torch.equal(flat, flat.round())
        and float(flat.min()) >= 0
        and float(flat.max()) < source.numel()
    ):
        raise CompactKeysError(f"lost track of the elements of '{name}'")
    index = flat.long()
    if tag.shape == source.shape and torch.equal(
        index, torch.arange(source.numel(), dtype=torch.long)
    ):
        return None
    if index.unique().numel() != index.numel():
        raise CompactKeysError(f"'{name}' maps two elements to one")
    return index.to(source.device)
