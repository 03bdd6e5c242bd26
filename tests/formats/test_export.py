from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import lightly_mcp.formats.export as export_module
from lightly_mcp.errors import InputError
from lightly_mcp.formats.export import (
    CHECK_TOLERANCE,
    ExportError,
    compact_and_check,
    compact_from_checkpoint,
    export,
    export_masks,
)
from lightly_mcp.formats.folding import conv_norm_pairs
from lightly_mcp.formats.loading import load_mcp_checkpoint
from lightly_mcp.formats.runtimes import load_program
from lightly_mcp.methods.checkpoints import CheckpointError
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.moco_v2 import MoCoV2
from lightly_mcp.pruning.compaction import compact
from lightly_mcp.pruning.masks import output_feature_index, round_masks
from lightly_mcp.pruning.measure import count_macs, count_parameters
from tests.helpers import TINY, loader, trainer

BACKBONES = ("torchvision/mobilenet_v2", "torchvision/resnet18", "timm/efficientnet_b0")
SMALLEST = "torchvision/mobilenet_v2"
SIZE = 16


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=120)  # noqa: SIM115


def _tiny(backbone: str) -> dict[str, Any]:
    return {
        **TINY,
        "backbone": backbone,
        "backbone_kwargs": {"small_input": True},
        "input_size": SIZE,
    }


def _mcp_checkpoint(root: Path, backbone: str, steps: int) -> Path:
    """A tiny MCP checkpoint after ``steps`` steps (an ADMM update due every step)."""
    torch.manual_seed(0)
    model = MCP(
        **_tiny(backbone),
        pruning_ratio=0.5,
        round_to=8,
        frq=0,
        dr=0,
        admm_interval=1,
        admm_interval_unit="steps",
    )
    fit = trainer(root, max_steps=steps)
    fit.fit(model, loader(n=8, size=SIZE))
    path = root / f"{backbone.replace('/', '_')}_{steps}.ckpt"
    fit.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {backbone: _mcp_checkpoint(root, backbone, 1) for backbone in BACKBONES}


@pytest.fixture(scope="module")
def exported(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("exported")
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        for backbone, path in checkpoints.items():
            # Counting at 224 px with stride-1 stems is slow; the smallest model
            # keeps the real deployment resolution.
            resolution = 224 if backbone == SMALLEST else 32
            patch.setattr(export_module, "DEPLOY_RESOLUTION", resolution)
            out_dir = root / backbone.replace("/", "_")
            report = export(path, out_dir, latency=False, console=_quiet())
            out[backbone] = (out_dir, report)
    return out


def _load_pt(out_dir: Path) -> nn.Module:
    model = torch.load(out_dir / "model.pt", weights_only=False)
    assert isinstance(model, nn.Module)
    return model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_compact_export_matches_subnet_and_formats(
    backbone: str,
    checkpoints: dict[str, Path],
    exported: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    out_dir, report = exported[backbone]
    assert json.loads((out_dir / "report.json").read_text()) == report
    compact_model = _load_pt(out_dir)
    assert not compact_model.training
    assert all(p.requires_grad for p in compact_model.parameters())
    # What is shipped is folded: no norm is left, every one was folded.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in compact_model.modules())
    assert report["bn_folded"]["compact"] > 0
    assert report["bn_folded"]["dense"] == report["bn_folded"]["compact"]

    mcp = load_mcp_checkpoint(checkpoints[backbone])
    subnet = mcp.subnet.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = subnet(x)
        got = compact_model(x)
    # Export's own criterion, relative to the output scale (the subnet's statistics
    # were recalibrated on a few tiny images at the end of training, which makes some
    # outputs large; float32 summation order then differs by ~2e-5 of the scale).
    scale = max(1.0, float(expected.abs().max()))
    assert (got - expected).abs().max() <= CHECK_TOLERANCE * scale

    # Sizes against an independent compaction of the reloaded model.
    independent = compact(
        mcp.backbone_momentum,
        mcp.groups,
        mcp.subnet.masks,
        torch.randn(1, 3, SIZE, SIZE),
    )
    # Parameters are the architecture's (norms included), not the folded model's.
    assert report["compact"]["params"] == count_parameters(independent)
    assert report["compact"]["params"] != count_parameters(compact_model)
    # ... and the file's (folded) count is reported beside it.
    assert report["compact"]["params_deployed"] == count_parameters(compact_model)
    assert report["dense"]["params_deployed"] < report["dense"]["params"]
    assert report["dense"]["params"] == count_parameters(mcp.backbone_momentum)
    assert report["compact"]["params"] < report["dense"]["params"]
    assert report["params_removed"] == pytest.approx(
        1 - count_parameters(independent) / count_parameters(mcp.backbone_momentum)
    )
    assert report["compact"]["macs"] == count_macs(independent, SIZE)
    assert report["macs_ratio"] == pytest.approx(
        report["dense"]["macs"] / report["compact"]["macs"]
    )
    assert report["compact"]["feature_dim"] == got.shape[-1]
    assert report["dense"]["feature_dim"] == mcp.backbone_momentum.feature_dim

    # Report fields.
    assert report["backbone"] == backbone
    assert report["resolution"] == SIZE
    assert report["pruning_ratio"] == 0.5
    assert report["equivalence_max_abs_err"] <= 1e-4 * max(
        1, report["equivalence_output_scale"]
    )
    assert report["bn_recalibrated"] is False
    assert report["round_to"] is None
    assert report["aligned_to"] == 8  # MCP chose multiples of 8: no widening
    assert report["checkpoint"] == str(checkpoints[backbone])
    assert report["threads"] == torch.get_num_threads()
    assert report["torch_version"] == torch.__version__
    for key in ("device", "mac_counter"):
        assert report[key]
    for side in ("dense", "compact"):
        assert report[side]["latency_ms"] == {"bs1": None, "bs64": None}
        assert report[side]["at_224"]["latency_ms"] == {"bs1": None, "bs64": None}
        assert report[side]["at_224"]["macs"] > report[side]["macs"]
    assert report["speedup"] == {
        "bs1": None,
        "bs64": None,
        "at_224": {"bs1": None, "bs64": None},
    }
    assert report["alignment"] is None  # not timed
    kept = report["kept_channels"]
    assert [k["group"] for k in kept] == [g.root for g in mcp.groups]
    assert mcp.hparams["round_to"] == 8  # aligned counts
    for entry, group in zip(kept, mcp.groups):
        assert entry["kept"] == group.num_kept(0.5, 8)
        aligned = entry["kept"] % 8 == 0 or entry["kept"] == group.num_channels
        assert aligned or group.num_channels < 8  # smaller groups keep n_g
        assert entry["total"] == group.num_channels

    # The torch.export program reloads without pickle and agrees with model.pt.
    assert report["files"]["written"][0] == "model.pt2"
    assert "model.ts" not in report["files"]["written"]
    assert report["files"]["torchscript"].startswith("not asked for")
    program = load_program(out_dir / "model.pt2")
    with torch.no_grad():
        assert (program(x) - got).abs().max() <= 1e-5 * scale
        assert program(x[:1]).shape == got[:1].shape  # dynamic batch axis

    # ONNX, when it was written, agrees too (with another batch size).
    if "model.onnx" in report["files"]["written"]:
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert np.abs(onnx_out - got.numpy()).max() <= 1e-4 * scale
    else:
        assert report["files"]["onnx"].startswith("failed: ")


def test_macs_at_224_are_counted_at_224(
    exported: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    out_dir, report = exported[SMALLEST]
    assert report["compact"]["at_224"]["macs"] == count_macs(_load_pt(out_dir), 224)


def test_latency_speedup_is_the_latency_ratio(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 24)  # keep it fast
    # That by default only the training resolution is timed is checked end to end
    # by tests/app/test_recipe_keys.py (export.latency_repeats).
    report = export(
        checkpoints[SMALLEST],
        tmp_path / "out",
        latency=True,
        latency_repeats=2,
        latency_at_224=True,
        console=_quiet(),
    )
    dense, comp, speed = report["dense"], report["compact"], report["speedup"]
    for key in ("bs1", "bs64"):
        assert dense["latency_ms"][key] > 0 and comp["latency_ms"][key] > 0
        # Best against best: each network's latency is its fastest form's.
        for side in (dense, comp, dense["at_224"], comp["at_224"]):
            by_form = side["latency_ms_by_form"]
            assert {"eager", "torch.export", "onnxruntime"} <= set(by_form)
            times = {form: value[key] for form, value in by_form.items()}
            assert side["fastest_form"][key] == min(times, key=times.__getitem__)
            assert side["latency_ms"][key] == min(times.values())
        assert speed[key] == pytest.approx(
            dense["latency_ms"][key] / comp["latency_ms"][key]
        )
        assert speed["at_224"][key] == pytest.approx(
            dense["at_224"]["latency_ms"][key] / comp["at_224"]["latency_ms"][key]
        )
        # Alignment: the compact model widened to 16 channels, under ONNX Runtime
        # (not to 8: MCP's round_to chose multiples of 8 already); the fastest is
        # the lowest latency.
        alignment = report["alignment"]
        assert alignment["runtime"] == "onnxruntime"
        assert set(alignment["latency_ms"]) == {"none", "16"}
        times = {m: value[key] for m, value in alignment["latency_ms"].items()}
        assert alignment["fastest"][key] == min(times, key=times.__getitem__)
        assert alignment["macs"]["none"] == comp["macs"]
        assert alignment["macs"]["none"] < alignment["macs"]["16"]
    assert alignment["advice"].startswith(
        ("under ONNX Runtime, --round-to", "the trained")
    )


def test_a_mask_no_admm_update_trained_is_reported(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 32)
    monkeypatch.setattr(torch.onnx, "export", None)  # (slow; tested above)
    # Three steps with an ADMM update every step: a mask that was trained.
    trained = _mcp_checkpoint(tmp_path, SMALLEST, 3)
    report = export(trained, tmp_path / "a", latency=False, console=_quiet())
    assert report["admm_updates"] >= 1 and report["untrained_mask"] is None
    # The fixture's checkpoint stopped after one step, before its first update.
    console = Console(record=True, width=200, file=open("/dev/null", "w"))  # noqa: SIM115
    report = export(
        checkpoints[SMALLEST], tmp_path / "out", latency=False, console=console
    )
    assert report["admm_updates"] == 0
    assert "ran no ADMM update" in report["untrained_mask"]
    assert f"warning: {report['untrained_mask']}" in console.export_text()
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["untrained_mask"] == report["untrained_mask"]


def test_interrupted_export_leaves_no_partial_folder(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "write_json_atomic", fail)
    out_dir = tmp_path / "exports" / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        export(checkpoints[SMALLEST], out_dir, latency=False, console=_quiet())
    assert not out_dir.exists()
    assert list(out_dir.parent.iterdir()) == []


def test_onnx_failure_is_recorded_not_raised(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", fail)
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 32)
    report = export(
        checkpoints[SMALLEST], tmp_path / "out", latency=False, console=_quiet()
    )
    assert report["files"]["onnx"] == "failed: RuntimeError: unsupported operator"
    assert report["files"]["written"] == ["model.pt2", "model.pt"]
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_torchscript_only_when_asked_for(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 32)
    monkeypatch.setattr(torch.onnx, "export", None)  # (slow; tested above)
    out = tmp_path / "out"
    report = export(
        checkpoints[SMALLEST], out, latency=False, torchscript=True, console=_quiet()
    )
    assert report["files"]["written"] == ["model.pt2", "model.pt", "model.ts"]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = _load_pt(out)(x)
        got = torch.jit.load(str(out / "model.ts"))(x)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))


def test_existing_output_folder_is_refused_unless_overwrite(
    checkpoints: dict[str, Path],
    exported: dict[str, tuple[Path, dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(checkpoints[SMALLEST], out_dir, latency=False, console=_quiet())
    assert (out_dir / "keep.txt").exists()
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 32)
    # --overwrite replaces a previous export, never files an export did not write.
    with pytest.raises(ExportError, match=r"export did not write \(keep.txt\)"):
        export(checkpoints[SMALLEST], out_dir, overwrite=True, latency=False)
    assert (out_dir / "keep.txt").read_text() == "x"
    (out_dir / "keep.txt").unlink()
    for _ in range(2):  # into the empty folder, then over that export
        export(
            checkpoints[SMALLEST],
            out_dir,
            latency=False,
            overwrite=True,
            console=_quiet(),
        )
    assert (out_dir / "report.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_never_deletes_its_input_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    inside = out_dir / "mcp.ckpt"
    inside.write_bytes(checkpoints[SMALLEST].read_bytes())
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="lies inside the output folder"):
            export(inside, out_dir, overwrite=overwrite, latency=False)
        with pytest.raises(ExportError, match="lies inside the output folder"):
            export(inside, tmp_path, overwrite=overwrite, latency=False)
    assert inside.read_bytes() == checkpoints[SMALLEST].read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["mcp.ckpt"]


def test_checkpoint_of_another_backbone_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ExportError) as info:
        export(
            checkpoints[SMALLEST],
            tmp_path / "out",
            expected_backbone="torchvision/resnet18",
            latency=False,
            console=_quiet(),
        )
    assert "torchvision/mobilenet_v2" in str(info.value)
    assert "torchvision/resnet18" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_moco_v2_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    moco = MoCoV2(**{**TINY, "backbone": SMALLEST})
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(moco, loader(n=8, size=SIZE))
    path = tmp_path / "moco.ckpt"
    fit.save_checkpoint(path)
    with pytest.raises(ExportError, match="MoCo v2 checkpoint"):
        export(path, tmp_path / "out", latency=False, console=_quiet())
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_gives_the_checkpoint_error(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(checkpoints[SMALLEST].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        export(path, tmp_path / "out", latency=False, console=_quiet())
    assert not (tmp_path / "out").exists()


def test_round_to_keeps_multiples_and_matches_widened_subnet(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 32)
    path = checkpoints[SMALLEST]
    # The counts MCP chose are multiples of 8 (its round_to): widen to 16.
    report = export(
        path, tmp_path / "out", round_to=16, latency=False, console=_quiet()
    )
    assert report["round_to"] == 16
    mcp = load_mcp_checkpoint(path)
    widened = round_masks(mcp.backbone_momentum, mcp.groups, mcp.subnet.masks, 16)
    some_widened = False
    for entry, group, trained, mask in zip(
        report["kept_channels"], mcp.groups, mcp.subnet.masks, widened
    ):
        assert entry["kept"] == int(mask.sum())
        assert entry["kept"] % 16 == 0 or entry["kept"] == group.num_channels
        assert bool(mask[trained].all())  # trained channels stay
        some_widened |= entry["kept"] > int(trained.sum())
    assert some_widened
    compact_model = _load_pt(tmp_path / "out")
    subnet = copy.deepcopy(mcp.subnet)  # the trained statistics, widened masks
    subnet.set_masks(widened)
    subnet.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = subnet(x)
        scale = max(1.0, float(expected.abs().max()))
        assert (compact_model(x) - expected).abs().max() <= CHECK_TOLERANCE * scale


def test_round_masks_adds_highest_norm_dropped_channels() -> None:
    from lightly_mcp.pruning.groups import ChannelGroup, GroupMember

    conv = nn.Conv2d(1, 6, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([6.0, 1, 5, 2, 4, 3]).view(6, 1, 1, 1))
    encoder = nn.Sequential(conv)
    group = ChannelGroup("0", 6, (GroupMember("0.weight", 0, tuple(range(6))),))
    mask = torch.tensor([False, True, False, False, False, False])
    (widened,) = round_masks(encoder, [group], [mask], 4)
    assert widened.tolist() == [True, True, True, False, True, False]
    (same,) = round_masks(encoder, [group], [widened], 4)
    assert torch.equal(same, widened)
    (capped,) = round_masks(encoder, [group], [mask], 8)
    assert int(capped.sum()) == 6
    assert mask.sum() == 1  # input unchanged


def test_bn_recalibration_changes_running_stats(
    checkpoints: dict[str, Path],
    exported: dict[str, tuple[Path, dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 32)
    report = export(
        checkpoints[SMALLEST],
        tmp_path / "out",
        recalibrate=loader(n=16, size=SIZE, batch_size=8),
        recalibration_batches=2,
        latency=False,
        console=_quiet(),
    )
    assert report["bn_recalibrated"] is True
    shipped = _load_pt(tmp_path / "out")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(shipped(x), _load_pt(exported[SMALLEST][0])(x))
    # The norms before folding: rebuilt from the checkpoint with the same batches.
    recalibrated = compact_from_checkpoint(
        checkpoints[SMALLEST],
        recalibrate=loader(n=16, size=SIZE, batch_size=8),
        recalibration_batches=2,
        fold=False,
    )
    plain = compact_from_checkpoint(checkpoints[SMALLEST], fold=False)
    with torch.no_grad():
        expected = recalibrated(x)
        assert (shipped(x) - expected).abs().max() <= CHECK_TOLERANCE * max(
            1.0, float(expected.abs().max())
        )
    assert not recalibrated.training
    norms = [
        (a, b)
        for a, b in zip(recalibrated.modules(), plain.modules())
        if isinstance(a, nn.BatchNorm2d)
    ]
    assert norms
    assert any(not torch.allclose(a.running_mean, b.running_mean) for a, b in norms)
    for a, b in norms:
        assert a.momentum == b.momentum  # restored after the cumulative average
        assert int(a.num_batches_tracked) == 2


# --- a pruned feature dimension (keep_output_dim=False) -----------------------------
@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    small = {"small_input": False, "width_multiplier": 0.5}  # fast
    model = MCP(
        **{**_tiny(SMALLEST), "backbone_kwargs": small},
        pruning_ratio=0.5,
        round_to=8,
        keep_output_dim=False,
        frq=0,
        dr=0,
        admm_interval=1,
        admm_interval_unit="steps",
    )
    fit = trainer(root, max_steps=1)
    fit.fit(model, loader(n=8, size=SIZE))
    path = root / "narrow.ckpt"
    fit.save_checkpoint(path)
    return path


def test_export_with_a_pruned_feature_dimension(
    narrow_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "DEPLOY_RESOLUTION", 32)
    monkeypatch.setattr(torch.onnx, "export", None)  # (slow; tested above)
    out_dir = tmp_path / "out"
    report = export(narrow_checkpoint, out_dir, latency=False, console=_quiet())
    mcp = load_mcp_checkpoint(narrow_checkpoint)
    dense_dim = mcp.backbone_momentum.feature_dim
    # Exactly one group carries the output features, one feature per channel.
    (output_group,) = [g for g in mcp.groups if g.output_features]
    assert sorted(f for _, f in output_group.output_features) == list(range(dense_dim))
    kept, dropped = output_feature_index(mcp.groups, mcp.subnet.masks, dense_dim)
    assert len(kept) == output_group.num_kept(0.5, 8)
    assert report["dense"]["feature_dim"] == dense_dim
    assert report["compact"]["feature_dim"] == len(kept) < dense_dim
    compact_model = _load_pt(out_dir)
    assert compact_model.feature_dim == len(kept)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = mcp.subnet.eval()(x)
        got = load_program(out_dir / "model.pt2")(x)
    assert expected[:, dropped].abs().max() == 0
    assert expected[:, kept].abs().max() > 0.1  # not a comparison of zeros
    scale = max(1.0, float(expected.abs().max()))
    # Folding rounds in float32 (the export's self-check, in float64, holds to
    # CHECK_TOLERANCE); the float32 program against the float32 masked forward of
    # this one-step model (small BatchNorm variances) differs by up to ~1.5e-4 of
    # the output scale with aligned counts.
    assert (got - expected[:, kept]).abs().max() <= 4 * CHECK_TOLERANCE * scale


def test_pruned_feature_dimension_self_check_still_catches_errors(
    narrow_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_compact = export_module.compact

    def corrupted(*args: Any, **kwargs: Any) -> nn.Module:
        model = real_compact(*args, **kwargs)
        last_norm = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        with torch.no_grad():
            last_norm.bias[0] += 1.0  # a kept output channel
        return model

    monkeypatch.setattr(export_module, "compact", corrupted)
    with pytest.raises(ExportError, match="does not match the masked momentum"):
        export(narrow_checkpoint, tmp_path / "a", latency=False, console=_quiet())
    monkeypatch.setattr(export_module, "compact", real_compact)

    def swapped(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kept, dropped = output_feature_index(*args)
        return dropped, kept  # a wrong mapping of output features

    monkeypatch.setattr(export_module, "output_feature_index", swapped)
    with pytest.raises(ExportError, match="dropped output features are not zero"):
        export(narrow_checkpoint, tmp_path / "b", latency=False, console=_quiet())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backbone", BACKBONES)
def test_dense_and_compact_networks_fold_the_same_pairs(
    checkpoints: dict[str, Path], backbone: str
) -> None:
    """The export traces the dense network once to find the BatchNorm layers to
    fold and folds the compact one with the same pairs: pruning channels must not
    change which convolution feeds which norm."""
    model = load_mcp_checkpoint(checkpoints[backbone])
    masks = export_masks(model)
    assert any(not bool(m.all()) for m in masks)  # something is pruned
    example = torch.randn(2, 3, SIZE, SIZE)
    compact_model = compact_and_check(model, masks, fold=False).model
    dense_pairs = conv_norm_pairs(export_module._deployed_dense(model), example)
    assert len(dense_pairs) > 0
    assert conv_norm_pairs(compact_model, example) == dense_pairs


def test_export_from_the_trained_module_equals_export_from_its_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """``export(module)`` (e.g. right after ``Trainer.fit``) writes what the export of
    the module's checkpoint writes, and leaves the module as it was."""
    import lightly_mcp

    module = load_mcp_checkpoint(checkpoints[SMALLEST]).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    from_module = lightly_mcp.export(
        module, tmp_path / "module", latency=False, console=_quiet()
    )
    from_file = export(
        checkpoints[SMALLEST], tmp_path / "file", latency=False, console=_quiet()
    )
    assert from_module["checkpoint"] == "in memory (an MCP module)"
    for key in ("compact", "dense", "kept_channels", "params_removed", "macs_ratio"):
        assert from_module[key] == from_file[key], key
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        a = load_program(tmp_path / "module" / "model.pt2")(x)
        b = load_program(tmp_path / "file" / "model.pt2")(x)
    assert torch.equal(a, b)
    assert module.training
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ExportError, match="trained with backbone 'torchvision/mobil"):
        export(module, tmp_path / "other", expected_backbone="torchvision/resnet18")
    with pytest.raises(InputError, match="takes an MCP checkpoint path or an MCP mod"):
        export(MoCoV2(**TINY), tmp_path / "moco")  # type: ignore[arg-type]
