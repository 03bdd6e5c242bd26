"""The inference-speed benchmark's functions on a tiny network: every form is built,
checked and timed, and the summaries are what they claim (the fastest form is the
minimum, the speedup is the ratio of the fastest latencies, fractions of peak follow
from MACs). Speed itself is measured by ``benchmarks/inference_speed.py``, not here."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from benchmarks import inference_speed as bench
from lightly_mcp.pruning.measure import count_macs

PEAK = 1e10  # FLOP/s, only the arithmetic is checked


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = tiny_net()
    assert bench.randomise_batchnorm(dense, seed=0) == 2
    variants, kept = bench.compact_variants(
        dense.eval(), 0.5, round_tos=(4,), example=torch.randn(1, 3, 16, 16)
    )
    assert list(variants) == ["dense", "compact", "compact_round4"]
    assert all(n % 4 == 0 for n in kept["compact_round4"])
    assert sum(kept["compact"]) < sum(kept["compact_round4"])
    return variants


@pytest.fixture(scope="module")
def result(models: dict[str, nn.Module]) -> dict[str, Any]:
    settings = [bench.Setting(1, 16, repeats=2, warmup=1), bench.Setting(2, 16, 2, 1)]
    forms = ("eager", "eager channels_last", "torch.export", "onnxruntime")
    return bench.run_benchmark(
        models,
        settings,
        forms=forms,
        peak_flops_per_s=PEAK,
        fold_example=torch.randn(2, 3, 16, 16),
    )


def test_every_form_is_folded_checked_and_timed(
    models: dict[str, nn.Module], result: dict[str, Any]
) -> None:
    assert result["folding"]["dense"]["norms_folded"] == 2
    assert list(result["settings"]) == ["bs1@16", "bs2@16"]
    for setting in result["settings"].values():
        latency = setting["latency_ms"]
        built = {"eager", "eager channels_last", "torch.export", "onnxruntime"}
        built -= set(result["skipped_forms"].get("dense@16", {}))
        assert set(latency["dense"]) == {bench.REFERENCE, *built}
        assert set(latency["compact"]) == set(latency["dense"])
        # The round_to variants: only their forms, the unfolded one only checked.
        assert bench.REFERENCE not in latency["compact_round4"]
        assert set(latency["compact_round4"]) <= set(bench.ROUND_FORMS)
        for model_errors in setting["relative_error_vs_unfolded"].values():
            assert max(model_errors.values()) < 1e-4
        assert setting["failed"] == {}


def test_summaries_are_what_they_claim(
    models: dict[str, nn.Module], result: dict[str, Any]
) -> None:
    for key, setting in result["settings"].items():
        latency, batch = setting["latency_ms"], setting["batch"]
        for model, forms in latency.items():
            best = setting["fastest"][model]
            assert best["ms"] == min(forms.values())
            assert forms[best["form"]] == best["ms"]
        ratio = setting["fastest"]["dense"]["ms"] / setting["fastest"]["compact"]["ms"]
        assert setting["speedup_best_vs_best"] == pytest.approx(ratio)
        for form, value in setting["speedup_same_form"].items():
            assert value == pytest.approx(
                latency["dense"][form] / latency["compact"][form]
            )
        for model, forms in latency.items():
            macs = count_macs(models[model], setting["size"])
            for form, ms in forms.items():
                fraction = 2 * macs * batch / (ms / 1e3) / PEAK
                got = setting["achieved"][model][form]["fraction_of_peak"]
                assert got == pytest.approx(fraction)
        peak = setting["fraction_of_peak_fastest"]
        assert peak["dense_over_compact"] == pytest.approx(
            peak["dense"] / peak["compact"]
        )
        for align in setting["alignment"].values():
            assert align["ms"][align["fastest"]] == min(align["ms"].values())
            assert set(align["ms"]) == {"compact", "compact_round4"}
        assert f"{key} dense/compact fraction of peak <= 2" in result["targets"]


def test_markdown_names_the_fastest_forms(result: dict[str, Any]) -> None:
    sizes = {"dense": {"params": 10, "macs@16": 100}}
    sizes["compact"] = {"params": 5, "params_removed": 0.5, "macs@16": 50}
    sizes["compact_round4"] = {"params": 6, "params_removed": 0.4, "macs@16": 60}
    full = {**result, "peak": {"flops_per_s": PEAK, "size": 64}, "sizes": sizes}
    text = bench.markdown(full)
    assert "**fastest, best vs best**" in text
    best = result["settings"]["bs2@16"]
    assert f"**{best['speedup_best_vs_best']:.2f}**" in text
    assert "## Alignment" in text and "| 4 |" in text


def test_a_failing_compile_is_recorded_not_timed(
    models: dict[str, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: nn.Module) -> Any:
        def run(x: Tensor) -> Tensor:
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(bench, "compiled_runner", broken)
    result = bench.run_benchmark(
        {k: models[k] for k in ("dense", "compact")},
        [bench.Setting(1, 16, 1, 0)],
        forms=("eager", "torch.compile"),
        peak_flops_per_s=PEAK,
        fold_example=torch.randn(2, 3, 16, 16),
    )
    setting = result["settings"]["bs1@16"]
    assert "no compiler here" in setting["failed"]["dense"]["torch.compile"]
    assert "torch.compile" not in setting["latency_ms"]["dense"]
    assert setting["fastest"]["dense"]["form"] in ("eager", bench.REFERENCE)


def test_targets_and_settings() -> None:
    settings = bench.make_settings([1, 64], [32, 224], 20, 10, 5)
    assert [(s.key, s.repeats) for s in settings] == [
        ("bs1@32", 20),
        ("bs64@32", 10),
        ("bs1@224", 20),
        ("bs64@224", 5),
    ]
    summary = {
        "bs64@224": {
            "speedup_best_vs_best": 4.5,
            "fraction_of_peak_fastest": {"dense_over_compact": 2.5},
        },
        "bs1@224": {
            "speedup_best_vs_best": 2.0,
            "fraction_of_peak_fastest": {"dense_over_compact": 1.5},
        },
    }
    got = bench.targets(summary)
    assert got["bs64@224 best-vs-best >= 4"]["met"]
    assert not got["bs1@224 best-vs-best >= 3"]["met"]
    assert not got["bs64@224 dense/compact fraction of peak <= 2"]["met"]
    assert got["bs1@224 dense/compact fraction of peak <= 2"]["met"]


def test_peak_flops_is_a_rate() -> None:
    peak = bench.peak_flops(size=64, repeats=2, warmup=1)
    assert peak["best_s"] <= peak["median_s"]
    assert math.isclose(peak["flops_per_s"], 2 * 64**3 / peak["best_s"])
