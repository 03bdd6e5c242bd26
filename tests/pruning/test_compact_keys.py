"""Keys from the physically pruned momentum subnet equal the masked forward's.

The compact copy (``lightly_mcp.pruning.compact_keys``) must give the masked subnet's keys and
leave its BatchNorm statistics as the masked forward does, in train and eval mode and
across a mask change; the masked forward takes over when the copy cannot be built or
does not agree. ADMM's Z and U are saved as one tensor and older checkpoints load.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lightly_mcp.pruning.compact_keys as compact_keys_module
from lightly_mcp.errors import InputError, MCPWarning
from lightly_mcp.methods.backbones import build_backbone
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.pruning.admm import ADMMRegularizer
from lightly_mcp.pruning.batchnorm import use_split_batchnorm
from lightly_mcp.pruning.compact_keys import CompactKeys
from lightly_mcp.pruning.masks import GroupMasks
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet
from lightly_mcp.pruning.prunable_groups import find_channel_groups
from tests.conftest import ConcatNet, GroupedConvNet, TinyConvNet, randomize_batchnorm
from tests.helpers import TINY, loader, trainer


def _backbone(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: build_backbone(name, small_input=True, **kwargs)


ENCODERS: dict[str, tuple[Callable[[], nn.Module], int, bool]] = {
    # name: (encoder, SplitBatchNorm splits (0: plain BatchNorm), keep_output_dim)
    "resnet18": (_backbone("torchvision/resnet18"), 0, True),
    "mobilenet_v2": (
        _backbone("torchvision/mobilenet_v2", width_multiplier=0.5),
        0,
        True,
    ),
    "mobilenet_v2_split_bn": (
        _backbone("torchvision/mobilenet_v2", width_multiplier=0.5),
        2,
        True,
    ),
    "mobilenet_v2_output_pruned": (
        _backbone("torchvision/mobilenet_v2", width_multiplier=0.5),
        0,
        False,
    ),
    "resnet18_split_bn_output_pruned": (_backbone("torchvision/resnet18"), 4, False),
    # MoCo's 8 splits and 1x1 maps at the end (ImageNet stem at 16 px): the check
    # batch needs two images per split, as the training batch has.
    "mobilenet_v2_8_splits_1x1_maps": (
        lambda: build_backbone(
            "torchvision/mobilenet_v2", small_input=False, width_multiplier=0.5
        ),
        8,
        True,
    ),
    "tiny_depthwise_residual": (TinyConvNet, 0, True),
    "grouped_conv": (GroupedConvNet, 2, True),
    "concatenation": (ConcatNet, 0, True),
}


def _pair(name: str) -> tuple[MomentumSubnet, MomentumSubnet, list, int]:
    """A compact-keys subnet and a masked one on identical float64 encoders."""
    build, splits, keep_output_dim = ENCODERS[name]
    torch.manual_seed(0)
    encoder = randomize_batchnorm(build())
    if splits:
        use_split_batchnorm(encoder, splits)
    encoder = encoder.double()
    example = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    groups = find_channel_groups(encoder, example, keep_output_dim=keep_output_dim)
    masks = GroupMasks.random(groups, 0.73, seed=1)
    compact = MomentumSubnet(encoder, groups, masks, compact_keys=True).train()
    masked = MomentumSubnet(copy.deepcopy(encoder), groups, masks).train()
    return compact, masked, groups, max(splits, 1)


def _momentum_step(a: nn.Module, b: nn.Module, seed: int) -> None:
    """The same change of both encoders' weights (as a momentum update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            noise = 0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.add_(noise)
            q.add_(noise)


def _assert_same_statistics(a: MomentumSubnet, b: MomentumSubnet) -> None:
    for (name, x), y in zip(
        a.buffers_dict().items(), b.buffers_dict().values(), strict=True
    ):
        assert (x.double() - y.double()).abs().max() <= 1e-5, name


@pytest.mark.parametrize("name", list(ENCODERS))
def test_compact_keys_equal_masked_keys_in_train_and_eval_across_a_mask_change(
    name: str,
) -> None:
    compact, masked, groups, splits = _pair(name)
    generator = torch.Generator().manual_seed(2)

    def batch() -> Tensor:
        return torch.randn(4 * splits, 3, 16, 16, generator=generator).double()

    def compare() -> None:
        x = batch()
        with torch.no_grad():
            got, expected = compact(x), masked(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5
        assert expected.abs().max() > 0.1  # not a comparison of zeros
        assert compact.compact_failure is None
        assert compact._compact is not None  # the compact copy computed the keys

    for step in range(3):  # train mode: batch statistics, running statistics
        compare()
        _momentum_step(compact.encoder, masked.encoder, seed=step)
    _assert_same_statistics(compact, masked)
    built = compact._compact
    changed = GroupMasks.random(groups, 0.73, seed=5)
    compact.set_masks(changed)
    masked.set_masks(changed)
    for step in range(2):
        compare()
        _momentum_step(compact.encoder, masked.encoder, seed=10 + step)
    assert compact._compact is not built  # rebuilt for the new mask
    _assert_same_statistics(compact, masked)
    compact.eval()
    masked.eval()
    compare()
    _assert_same_statistics(compact, masked)
    for (key, x), y in zip(
        compact.state_dict().items(), masked.state_dict().values(), strict=True
    ):
        assert (x.double() - y.double()).abs().max() <= 1e-5, key


def test_compact_keys_under_inference_mode_as_in_an_evaluation() -> None:
    """Evaluation runs the subnet under ``torch.inference_mode``: the copy is still
    built (its surgery traces autograd) and then also trains afterwards."""
    compact, masked, _, _ = _pair("mobilenet_v2")
    compact.eval()
    masked.eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.inference_mode():
        got = compact(x)
        expected = masked(x)
    assert compact.compact_failure is None and compact._compact is not None
    assert torch.allclose(got, expected, atol=1e-5)
    compact.train()
    masked.train()
    with torch.no_grad():  # a later training step writes into the same copy
        assert torch.allclose(compact(x), masked(x), atol=1e-5)
    assert compact.compact_failure is None


def test_output_features_dropped_by_the_mask_are_zero() -> None:
    compact, masked, _, _ = _pair("mobilenet_v2_output_pruned")
    with torch.no_grad():
        keys = compact(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    assert compact._compact is not None
    index = compact._compact.output_index
    assert index is not None and len(index) < keys.shape[1]
    dropped = torch.ones(keys.shape[1], dtype=torch.bool)
    dropped[index] = False
    assert torch.equal(keys[:, dropped], torch.zeros_like(keys[:, dropped]))


def test_statistics_are_written_back_when_read_and_saved() -> None:
    compact, masked, _, _ = _pair("resnet18")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        compact(x)
        masked(x)
    assert compact._compact_ahead  # the copy holds the newer statistics ...
    saved = compact.state_dict()  # ... until they are read
    assert not compact._compact_ahead
    for key, value in masked.state_dict().items():
        assert torch.allclose(saved[key].double(), value.double(), atol=1e-6), key
    with torch.no_grad():
        compact(x)
        masked(x)
    assert torch.allclose(compact.stat_1, masked.stat_1, atol=1e-6)
    # A loaded state wins over statistics the copy held.
    with torch.no_grad():
        compact(x)
    compact.load_state_dict(saved)
    for key, value in saved.items():
        assert torch.equal(compact.state_dict()[key], value), key


def test_falls_back_with_a_warning_when_the_copy_cannot_be_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compact, masked, _, _ = _pair("tiny_depthwise_residual")

    def refuse(*args: object, **kwargs: object) -> nn.Module:
        raise RuntimeError("this backbone cannot be compacted")

    monkeypatch.setattr(compact_keys_module, "compact", refuse)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with pytest.warns(MCPWarning, match="could not be built.*cannot be compacted"):
        with torch.no_grad():
            got = compact(x)
    with torch.no_grad():
        assert torch.equal(got, masked(x))
    assert "cannot be compacted" in str(compact.compact_failure)
    _assert_same_statistics(compact, masked)


def test_falls_back_with_a_warning_when_the_copy_disagrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compact, masked, _, _ = _pair("tiny_depthwise_residual")
    build = CompactKeys.__init__

    def corrupted(self: CompactKeys, *args: object, **kwargs: object) -> None:
        build(self, *args, **kwargs)  # type: ignore[arg-type]
        name, tensor, index = self._weights[0]
        assert index is not None
        self._weights[0] = (name, tensor, index.flip(0))  # a wrong index map

    monkeypatch.setattr(CompactKeys, "__init__", corrupted)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with pytest.warns(MCPWarning, match="does not reproduce the masked forward"):
        with torch.no_grad():
            got = compact(x)
    with torch.no_grad():
        assert torch.equal(got, masked(x))
    _assert_same_statistics(compact, masked)


def test_gradients_into_the_encoder_use_the_masked_forward() -> None:
    compact, _, _, _ = _pair("tiny_depthwise_residual")
    compact.eval()
    compact.encoder.requires_grad_(True)
    out = compact(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    out.sum().backward()
    assert compact._compact is None  # not built: the masked forward ran
    assert any(p.grad is not None for p in compact.encoder.parameters())


def _fit(tmp_path: Path, compact_keys: bool, **kwargs: object) -> MCP:
    torch.manual_seed(0)
    model = MCP(
        **TINY,
        pruning_ratio=0.5,
        frq=0,
        dr=0,
        admm_interval=2,
        admm_interval_unit="steps",
        rho=0.5,
        input_size=16,
        compact_keys=compact_keys,
        **kwargs,  # type: ignore[arg-type]
    )
    trainer(tmp_path, max_steps=5).fit(model, loader())
    return model


def test_mcp_trains_the_same_with_compact_and_masked_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    forward = CompactKeys.__call__

    def counted(self: CompactKeys, x: Tensor) -> Tensor:
        calls[0] += 1
        return forward(self, x)

    monkeypatch.setattr(CompactKeys, "__call__", counted)
    compact = _fit(tmp_path / "compact", True, split_batch_norm=2)
    assert calls[0] == 5  # every step's keys came from the compact copy
    masked = _fit(tmp_path / "masked", False, split_batch_norm=2)
    assert calls[0] == 5
    assert compact.subnet.uses_compact_keys() and compact.subnet.compact_failure is None
    assert not masked.subnet.uses_compact_keys()
    assert compact.hparams["compact_keys"] and not masked.hparams["compact_keys"]
    assert int(compact.admm.num_updates) == 2
    for (name, a), b in zip(
        compact.state_dict().items(), masked.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name


def test_compact_keys_option_is_checked() -> None:
    with pytest.raises(InputError, match="compact_keys must be true or false"):
        MCP(**TINY, compact_keys="yes")  # type: ignore[arg-type]


# --- ADMM state in checkpoints ---------------------------------------------------------
def _admm_after_updates() -> tuple[ADMMRegularizer, nn.Module]:
    torch.manual_seed(0)
    encoder = build_backbone("torchvision/resnet18", small_input=True)
    groups = find_channel_groups(encoder, torch.randn(1, 3, 16, 16))
    admm = ADMMRegularizer(encoder, groups, 0.73, rho=0.1, rho_growth=1.5)
    for _ in range(3):
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
        admm.update(encoder)
    return admm, encoder


def test_z_and_u_are_saved_as_one_tensor_and_restored_exactly() -> None:
    admm, encoder = _admm_after_updates()
    # U is exactly zero where Z keeps θ + U: the supports are disjoint.
    kept = admm.group_masks.multipliers(admm.z())
    for name in admm.param_names:
        assert not bool((admm.u()[name] * kept[name]).any()), name
    state = admm.state_dict()
    assert not any(k.startswith(("z_", "u_")) for k in state)
    assert len([k for k in state if k.startswith("zu_")]) == len(admm.param_names)
    old_bytes = sum(2 * z.numel() * z.element_size() for z in admm.z().values())
    new_bytes = sum(
        v.numel() * v.element_size() for k, v in state.items() if "zu_" in k
    )
    assert new_bytes == old_bytes / 2
    groups = admm.groups
    restored = ADMMRegularizer(encoder, groups, 0.73, rho=0.1, rho_growth=1.5)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name in admm.param_names:
        assert torch.equal(restored.z()[name], admm.z()[name]), name
        assert torch.equal(restored.u()[name], admm.u()[name]), name
    for a, b in zip(restored.masks, admm.masks, strict=True):
        assert torch.equal(a, b)
    assert restored.rho == admm.rho
    assert float(restored(encoder)) == float(admm(encoder))  # Z − U refreshed


def test_previous_checkpoint_format_loads() -> None:
    admm, encoder = _admm_after_updates()
    # The format of every checkpoint before this one: full-size z_{i} and u_{i}.
    old = {
        "rho_value": admm.rho_value.clone(),
        "num_updates": admm.num_updates.clone(),
    }
    for g, mask in enumerate(admm.masks):
        old[f"mask_{g}"] = mask.clone()
    for i, name in enumerate(admm.param_names):
        old[f"z_{i}"] = admm.z()[name].clone()
        old[f"u_{i}"] = admm.u()[name].clone()
    restored = ADMMRegularizer(encoder, admm.groups, 0.73, rho=0.1, rho_growth=1.5)
    restored.load_state_dict(old)
    for name in admm.param_names:
        assert torch.equal(restored.z()[name], admm.z()[name]), name
        assert torch.equal(restored.u()[name], admm.u()[name]), name
    # State whose supports overlap (older runs) is saved in that format again.
    with torch.no_grad():
        next(iter(restored.u().values())).add_(1e-9)
    state = restored.state_dict()
    assert "z_0" in state and "u_0" in state and "zu_1" in state
