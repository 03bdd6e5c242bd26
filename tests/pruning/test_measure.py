from __future__ import annotations

from typing import Any

import pytest
import torch
from lightly.models.batchnorm import SplitBatchNorm
from torch import nn

from lightly_mcp.pruning.measure import (
    count_macs,
    count_parameters,
    eval_mode,
    measure_latency,
)
from tests.conftest import TinyConvNet


def _mixed_tree() -> nn.Module:
    """A network in training mode with one frozen (eval) block inside."""
    net = TinyConvNet().train()
    net.block.eval()
    net.block[0].train()  # a training layer inside the eval block
    return net


def _modes(net: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in net.named_modules()}


def test_eval_mode_restores_a_mixed_tree_exactly() -> None:
    net = _mixed_tree()
    before = _modes(net)
    with eval_mode(net) as inside:
        assert inside is net
        assert not any(_modes(net).values())
    assert _modes(net) == before


def test_eval_mode_restores_when_the_body_raises() -> None:
    net = _mixed_tree()
    before = _modes(net)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert _modes(net) == before


def test_eval_mode_does_not_switch_eval_layers_again() -> None:
    # Switching a SplitBatchNorm to eval averages its per-split statistics; one that
    # was already in eval keeps its statistics untouched.
    training, frozen = SplitBatchNorm(4, 2), SplitBatchNorm(4, 2)
    for norm in (training, frozen):
        with torch.no_grad():
            norm.running_mean.copy_(torch.arange(8.0))
    frozen.training = False  # eval, statistics not averaged
    with eval_mode(nn.Sequential(training, frozen)):
        pass
    assert training.training and not frozen.training
    assert torch.equal(training.running_mean, torch.tensor([2.0, 3.0, 4.0, 5.0] * 2))
    assert torch.equal(frozen.running_mean, torch.arange(8.0))


class _Hidden(nn.Module):
    """Runs a module it does not register, like ``MomentumSubnet`` its encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_hidden"] = nn.BatchNorm1d(2)

    @property
    def hidden(self) -> nn.Module:
        hidden = self.__dict__["_hidden"]
        assert isinstance(hidden, nn.Module)
        return hidden

    def train(self, mode: bool = True) -> _Hidden:
        super().train(mode)
        self.hidden.train(mode)
        return self


def test_eval_mode_restores_what_train_overrides_keep() -> None:
    inner = _Hidden()
    net = nn.Sequential(inner).train()
    with eval_mode(net):
        assert not inner.hidden.training
    assert inner.hidden.training


def test_count_macs_leaves_every_mode_unchanged() -> None:
    net = _mixed_tree()
    before = _modes(net)
    count_macs(net, 8)
    assert _modes(net) == before


def test_measure_latency_times_every_model_interleaved() -> None:
    order: list[str] = []

    def model(name: str) -> Any:
        return lambda x: order.append(name)

    ms = measure_latency({"a": model("a"), "b": model("b")}, (1, 3, 4, 4), 3, warmup=1)
    assert set(ms) == {"a", "b"}
    assert order == ["a", "b"] + ["a", "b"] * 3


def test_measure_latency_reads_the_given_clock() -> None:
    ticks = iter(range(100))  # one second per reading

    def clock() -> float:
        return float(next(ticks))

    models = {"a": nn.Identity(), "b": nn.Identity()}
    times = measure_latency(models, (1, 2), repeats=3, warmup=0, clock=clock)
    assert times == {"a": 1000.0, "b": 1000.0}
    assert next(ticks) == 12  # two readings per run, 3 repeats of 2 models


def test_counting() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    assert count_parameters(conv) == 108
    assert count_macs(conv, input_size=5) == 108 * 25
    net = TinyConvNet().train()
    count_macs(net, 8)
    assert net.training
