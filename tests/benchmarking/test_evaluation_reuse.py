"""Tests of the cheaper evaluation: one data pass for all networks, the masked subnet
reused when it is the compact model, the baselines cached per data set.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightly_mcp.app import pipeline
from lightly_mcp.benchmarking import baseline_cache, evaluation
from lightly_mcp.benchmarking.evaluation import (
    embed,
    embed_models,
    evaluate_backbone,
    evaluate_backbones,
)
from lightly_mcp.errors import ExportError, InputError
from lightly_mcp.formats.runtimes import OnnxRuntimeNetwork
from tests.tiny import tiny_recipe


class Counting(Dataset):
    """A dataset that counts how often each item is loaded."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.loads = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        self.loads += 1
        return self.inner[i]


def count_images(model: nn.Module) -> list[int]:
    """Registers a hook adding each forward's batch size to the returned list."""
    seen = [0]

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[0] += len(args[0])

    model.register_forward_pre_hook(hook)
    return seen


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def labelled(n: int, seed: int = 0) -> Counting:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 6, 6, generator=g)
    return Counting(TensorDataset(images, torch.arange(n) % 3))


def test_embed_models_loads_each_image_once_for_all_models() -> None:
    data = labelled(10)
    nets = {"a": small_net(0), "b": small_net(1)}
    seen = {name: count_images(net) for name, net in nets.items()}
    features, labels = embed_models(nets, DataLoader(data, batch_size=4))
    assert data.loads == 10  # one pass, whatever the number of models
    assert seen["a"] == [10] and seen["b"] == [10]
    assert torch.equal(labels, torch.arange(10) % 3)
    for name, net in nets.items():
        alone, _ = embed(net, DataLoader(labelled(10), batch_size=4))
        assert torch.equal(features[name], alone)


def test_evaluate_backbones_equals_one_model_at_a_time() -> None:
    nets = {"a": small_net(0), "b": small_net(1)}
    train, test = labelled(30), labelled(12, seed=1)
    together = evaluate_backbones(
        nets, DataLoader(train, batch_size=8), DataLoader(test), k=5, linear_epochs=3
    )
    for name, net in nets.items():
        assert together[name] == evaluate_backbone(
            net, DataLoader(train, batch_size=8), DataLoader(test), k=5, linear_epochs=3
        )


# --- pipeline.evaluate on the tiny run ------------------------------------------------
@pytest.fixture
def counted_data(monkeypatch: pytest.MonkeyPatch) -> list[Counting]:
    """Makes pipeline.evaluate's datasets count their loads."""
    made: list[Counting] = []
    original = pipeline.evaluation_data

    def counting(recipe: Any, on: str = "in_domain") -> Any:
        train, test, description, has_labels = original(recipe, on)
        loaders = []
        for loader in (train, test):
            made.append(Counting(loader.dataset))
            loaders.append(
                DataLoader(
                    made[-1],
                    batch_size=loader.batch_size,
                    collate_fn=loader.collate_fn,
                )
            )
        return loaders[0], loaders[1], description, has_labels

    monkeypatch.setattr(pipeline, "evaluation_data", counting)
    return made


def tiny_networks(tiny_pruned: Path, tiny_exported: Path) -> dict[str, nn.Module]:
    recipe = tiny_recipe()
    networks = pipeline.load_backbone_for_eval(tiny_pruned, recipe)
    report = pipeline.read_json(tiny_exported / "export" / "report.json")
    networks["compact"] = pipeline.exported_compact(
        recipe, tiny_pruned, tiny_exported, report
    )
    return networks


def test_evaluate_passes_once_and_reuses_the_subnet(
    tiny_pruned: Path,
    tiny_exported: Path,
    counted_data: list[Counting],
    tmp_path: Path,
) -> None:
    # In PyTorch, so that forward hooks count the images each network sees.
    recipe = tiny_recipe({"eval.baselines": True, "eval.runtime": "torch"})
    networks = tiny_networks(tiny_pruned, tiny_exported)
    report = pipeline.read_json(tiny_exported / "export" / "report.json")
    why = pipeline.subnet_same_as_compact(networks["subnet"], report)
    assert why is not None and why.startswith("subnet = compact")
    seen = {name: count_images(net) for name, net in networks.items()}
    results = pipeline.evaluate(
        networks,
        recipe,
        tmp_path / "eval.json",
        progress=False,
        baselines=True,
        same_as={"subnet": ("compact", why)},
    )
    train, test = counted_data
    images = len(train) + len(test)
    assert train.loads == len(train) and test.loads == len(test)
    assert seen == {"dense": [images], "subnet": [0], "compact": [images]}
    models = results["models"]
    assert list(models) == ["dense", "subnet", "compact"]
    assert models["subnet"] == {
        **models["compact"],
        "evaluated": False,
        "same_as": "compact",
        "note": why,
    }
    assert set(results["baselines"]) == {"random_init", "raw_pixels"}
    assert results["evaluated"].startswith(
        f"evaluated dense, compact in PyTorch; {why}"
    )
    assert results["runtime"] == dict.fromkeys(
        ["dense", "compact", "random_init"], "torch"
    )
    assert json.loads((tmp_path / "eval.json").read_text()) == results


def test_the_subnet_is_evaluated_when_it_can_differ(
    tiny_pruned: Path, tiny_exported: Path
) -> None:
    subnet = tiny_networks(tiny_pruned, tiny_exported)["subnet"]
    report = pipeline.read_json(tiny_exported / "export" / "report.json")
    assert pipeline.subnet_same_as_compact(subnet, report) is not None
    # BatchNorm statistics re-estimated at export: the compact model differs.
    recalibrated = {**report, "bn_recalibrated": True}
    assert pipeline.subnet_same_as_compact(subnet, recalibrated) is None
    # Masks widened at export (to all channels: round_to larger than any group).
    widened = {**report, "round_to": 4096}
    assert pipeline.subnet_same_as_compact(subnet, widened) is None
    # keep_output_dim=False: a group reaching the output drops a feature (the
    # subnet has a zero feature the compact model does not have).
    # (a group that drops a channel: aligned counts may keep a small group whole)
    g = next(i for i, mask in enumerate(subnet.masks) if not bool(mask.all()))
    first = subnet.groups[g]
    dropped = int((~subnet.masks[g]).nonzero()[0])
    subnet.groups[g] = replace(first, output_features=((dropped, 0),))
    assert pipeline.subnet_same_as_compact(subnet, report) is None
    kept = int(subnet.masks[g].nonzero()[0])
    subnet.groups[g] = replace(first, output_features=((kept, 0),))
    assert pipeline.subnet_same_as_compact(subnet, report) is not None
    # Not a masked subnet at all.
    assert pipeline.subnet_same_as_compact(nn.Identity(), report) is None


def record_baseline_builds(
    monkeypatch: pytest.MonkeyPatch, cache: Path
) -> list[list[str]]:
    """Points the baseline cache at ``cache``; the returned list gets the names of
    every build of baseline models."""
    monkeypatch.setenv(baseline_cache.CACHE_ENV, str(cache))
    built: list[list[str]] = []
    original = pipeline._baseline_models

    def recording(recipe: Any, device: str, names: Any) -> dict[str, nn.Module]:
        built.append(list(names))
        return original(recipe, device, names)

    monkeypatch.setattr(pipeline, "_baseline_models", recording)
    return built


def test_baselines_are_cached_per_data_set(
    tiny_pruned: Path,
    tiny_exported: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = tiny_recipe({"eval.baselines": True, "eval.linear_epochs": 1})
    built = record_baseline_builds(monkeypatch, tmp_path / "cache")
    compact = {"compact": tiny_networks(tiny_pruned, tiny_exported)["compact"]}

    def run() -> dict[str, Any]:
        return pipeline.evaluate(
            compact, recipe, tmp_path / "eval.json", progress=False, baselines=True
        )

    first = run()
    entries = list((tmp_path / "cache" / "baselines").glob("*.json"))
    assert len(built) == 1 and len(entries) == 1
    assert "baselines computed (cached in" in first["evaluated"]
    second = run()
    assert len(built) == 1  # not recomputed
    assert second["baselines"] == first["baselines"]
    assert second["models"] == first["models"]
    assert f"baselines from the cache {entries[0]}" in second["evaluated"]
    # Other images under the same description: the digest differs, recomputed.
    entry = json.loads(entries[0].read_text())
    entry["data_digest"] = "0" * 64
    entry["baselines"]["raw_pixels"]["knn_top1"] = 0.123
    entries[0].write_text(json.dumps(entry))
    third = run()
    assert len(built) == 2 and third["baselines"] == first["baselines"]
    assert json.loads(entries[0].read_text())["data_digest"] == first["data_digest"]
    # An unreadable entry counts as missing.
    entries[0].write_text("{not json")
    assert run()["baselines"] == first["baselines"] and len(built) == 3
    # Other settings: another entry.
    other = tiny_recipe({"eval.baselines": True, "eval.k": 3})
    pipeline.evaluate(
        compact, other, tmp_path / "eval.json", progress=False, baselines=True
    )
    assert len(list((tmp_path / "cache" / "baselines").glob("*.json"))) == 2
    # Cache turned off: nothing read or written.
    monkeypatch.setenv(baseline_cache.CACHE_ENV, "off")
    assert "(cache off)" in run()["evaluated"] and len(built) == 5


def test_baselines_asked_by_name_are_computed_and_cached_one_by_one(
    tiny_pruned: Path,
    tiny_exported: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = tiny_recipe({"eval.linear_epochs": 1})
    built = record_baseline_builds(monkeypatch, tmp_path / "cache")
    compact = {"compact": tiny_networks(tiny_pruned, tiny_exported)["compact"]}

    def run(baselines: Any) -> dict[str, Any]:
        return pipeline.evaluate(
            compact, recipe, tmp_path / "eval.json", progress=False, baselines=baselines
        )

    raw = run(["raw_pixels"])
    assert built == [["raw_pixels"]] and list(raw["baselines"]) == ["raw_pixels"]
    assert "baselines computed (cached in" in raw["evaluated"]
    # Both asked: only the missing one is computed, the cached one reused.
    both = run(True)
    assert built == [["raw_pixels"], ["random_init"]]
    assert list(both["baselines"]) == ["raw_pixels", "random_init"]
    assert both["baselines"]["raw_pixels"] == raw["baselines"]["raw_pixels"]
    assert "baselines raw_pixels from the cache" in both["evaluated"]
    assert "random_init computed (cached in" in both["evaluated"]
    # The entry now holds both: either alone comes from it, nothing computed.
    (entry,) = (tmp_path / "cache" / "baselines").glob("*.json")
    assert set(json.loads(entry.read_text())["baselines"]) == {
        "raw_pixels",
        "random_init",
    }
    alone = run(["random_init"])
    assert len(built) == 2 and alone["baselines"] == {
        "random_init": both["baselines"]["random_init"]
    }
    assert f"baselines from the cache {entry}" in alone["evaluated"]
    # Computed from scratch, the same numbers as from the cache.
    monkeypatch.setenv(baseline_cache.CACHE_ENV, "off")
    fresh = run(True)
    assert (
        fresh["baselines"] == both["baselines"] and "(cache off)" in fresh["evaluated"]
    )
    # None asked: none computed, none reported.
    none = run(False)
    assert "baselines" not in none and len(built) == 3
    with pytest.raises(InputError, match="Unknown baseline 'pixels'"):
        run(["pixels"])


def test_onnx_runtime_evaluation_matches_pytorch(
    tiny_pruned: Path,
    tiny_exported: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``eval.runtime: auto`` on the CPU embeds with ONNX Runtime (the compact model
    from the export's own model.onnx), with PyTorch's scores."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv(baseline_cache.CACHE_ENV, "off")
    report = pipeline.read_json(tiny_exported / "export" / "report.json")
    results = {}
    for runtime in ("torch", "auto"):
        recipe = tiny_recipe({"eval.runtime": runtime, "eval.baselines": True})
        networks = pipeline.load_backbone_for_eval(tiny_pruned, recipe)
        networks["compact"] = pipeline.exported_compact(
            recipe,
            tiny_pruned,
            tiny_exported,
            report,
            evaluation.resolved_runtime(runtime, "cpu"),
        )
        if runtime == "auto":
            assert isinstance(networks["compact"], OnnxRuntimeNetwork)
        results[runtime] = pipeline.evaluate(
            networks,
            recipe,
            tmp_path / f"{runtime}.json",
            progress=False,
            baselines=True,
        )
    torch_run, onnx_run = results["torch"], results["auto"]
    assert onnx_run["runtime"] == {
        "dense": "onnxruntime",
        "subnet": "onnxruntime",
        "compact": "onnxruntime",
        "random_init": "onnxruntime",
    }
    assert onnx_run["evaluated"].startswith(
        "evaluated dense, subnet, compact in ONNX Runtime"
    )
    for name, scores in torch_run["models"].items():
        assert onnx_run["models"][name]["knn_top1"] == pytest.approx(
            scores["knn_top1"], abs=0.05
        )
    assert onnx_run["data_digest"] == torch_run["data_digest"]
    assert onnx_run["baselines"]["raw_pixels"] == torch_run["baselines"]["raw_pixels"]


def test_onnx_features_equal_pytorch_features() -> None:
    pytest.importorskip("onnxruntime")
    nets = {"a": small_net(0), "b": small_net(1), "pixels": nn.Flatten()}
    placed, used = evaluation.in_runtime(nets, "onnxruntime", 6)
    assert used == {"a": "onnxruntime", "b": "onnxruntime"}
    assert placed["pixels"] is nets["pixels"]
    assert all(net.training for net in nets.values())  # modes restored
    loader = DataLoader(labelled(10), batch_size=4)
    onnx_features, labels = embed_models(placed, loader)
    torch_features, same_labels = embed_models(nets, loader)
    assert torch.equal(labels, same_labels)
    for name in nets:
        torch.testing.assert_close(
            onnx_features[name], torch_features[name], rtol=1e-5, atol=1e-5
        )


def test_a_network_onnx_cannot_export_stays_in_pytorch_under_auto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("onnxruntime")

    def refuse(model: nn.Module, size: int) -> nn.Module:
        raise ExportError("ONNX export failed: no symbolic for op X")

    monkeypatch.setattr(evaluation, "onnx_network", refuse)
    net = small_net(0)
    placed, used = evaluation.in_runtime({"a": net}, "auto", 6)
    assert placed["a"] is net
    assert used == {"a": "torch (ONNX export failed: no symbolic for op X)"}
    with pytest.raises(
        InputError,
        match=r"'eval.runtime' is onnxruntime, but a does "
        r"not export to ONNX \(ONNX export failed: no symbolic",
    ):
        evaluation.in_runtime({"a": net}, "onnxruntime", 6)
    assert evaluation.in_runtime({"a": net}, "torch", 6) == ({"a": net}, {"a": "torch"})


def test_runtime_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    resolve = evaluation.resolved_runtime
    assert resolve("auto", "cpu") == "onnxruntime"
    assert resolve("auto", "cuda") == "torch"
    assert resolve("torch", "cpu") == "torch"
    with pytest.raises(
        InputError,
        match="runs on the CPU, but the evaluation runs on "
        "cuda; set eval.runtime: auto or torch",
    ):
        resolve("onnxruntime", "cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert resolve("auto", "cpu") == "torch"
    with pytest.raises(
        InputError,
        match=r"onnxruntime is not installed: pip install "
        r"'lightly-mcp\[onnx\]', or set eval.runtime: auto",
    ):
        resolve("onnxruntime", "cpu")
