"""End-to-end tests of the `lightly-mcp` command line on a tiny recipe (digits)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightly_mcp.app.cli import main
from lightly_mcp.app.pipeline import load_backbone_for_eval
from tests.helpers import MAX_MESSAGE, TINY_RECIPE, message_length


def write_recipe(directory: Path, **sections: dict) -> Path:
    recipe = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_RECIPE.items()
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(directory)
    out = directory / "run"
    assert (
        main(
            ["run", str(recipe), "--out", str(out), "--quiet", "--set", "mcp.rho=0.02"]
        )
        == 0
    )
    return out


def test_run_writes_every_output(finished_run: Path) -> None:
    out = finished_run
    for path in [
        "recipe.yaml",
        "report.json",
        "pretrain/final.ckpt",
        "pretrain/done.json",
        "pretrain/logs/metrics.csv",
        "prune/final.ckpt",
        "prune/done.json",
        "prune/logs/metrics.csv",
        "export/model.pt2",
        "export/model.pt",
        "export/report.json",
        "eval/eval.json",
        "plots/losses.png",
        "plots/transition.png",
        "plots/kept_channels.png",
    ]:
        assert (out / path).is_file(), path
    assert any((out / "pretrain" / "tensorboard").iterdir())
    report = json.loads((out / "report.json").read_text())
    for key in [
        "backbone",
        "pruning_ratio",
        "resolution",
        "dense",
        "compact",
        "speedup",
        "equivalence_max_abs_err",
        "kept_channels",
        "torch_version",
        "threads",
        "device",
        "stages",
        "baselines",
        "data",
    ]:
        assert key in report, key
    for name in ("dense", "compact"):
        assert 0.0 <= report[name]["knn_top1"] <= 1.0
        assert 0.0 <= report[name]["linear_top1"] <= 1.0
    assert report["compact"]["params"] < report["dense"]["params"]
    # The first line of the summary says the result plainly, from these numbers.
    removed = 100 * (1 - report["compact"]["params"] / report["dense"]["params"])
    knn = 100 * (report["compact"]["knn_top1"] - report["dense"]["knn_top1"])
    assert report["headline"].startswith(f"compact: {removed:.1f} % fewer parameters")
    assert f"kNN {knn:+.1f} / linear " in report["headline"]
    assert set(report["stages"]) == {"pretrain", "prune", "export", "evaluate"}
    assert "digits" in report["data"]
    # The masked momentum subnet and the exported compact model agree.
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    models = evaluation["models"]
    assert models["subnet"]["knn_top1"] == pytest.approx(models["compact"]["knn_top1"])
    # --set reached the recipe that was run.
    assert yaml.safe_load((out / "recipe.yaml").read_text())["mcp"]["rho"] == 0.02


def test_run_resumes_after_a_stage_is_deleted(
    finished_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    recipe = finished_run / "recipe.yaml"
    pretrain_mtime = (out / "pretrain" / "final.ckpt").stat().st_mtime
    shutil.rmtree(out / "export")
    (out / "eval" / "eval.json").unlink()
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["pretrain"] < 1.0 and report["stages"]["prune"] < 1.0
    assert (out / "export" / "model.pt").is_file()
    assert (out / "pretrain" / "final.ckpt").stat().st_mtime == pretrain_mtime


def _evaluate(model: Path, recipe: Path, out: Path, *flags: str) -> dict:
    argv = ["evaluate", str(model), str(recipe), "--out", str(out), "--quiet"]
    assert main([*argv, *flags]) == 0
    return json.loads((out / "eval.json").read_text())["models"]


def test_evaluate_command(finished_run: Path, tmp_path: Path) -> None:
    recipe = finished_run / "recipe.yaml"
    export = finished_run / "export"
    program = _evaluate(export / "model.pt2", recipe, tmp_path / "pt2")
    assert set(program) == {"compact"}
    assert program["compact"]["settings"]["k"] == 200
    # A folder means its model.pt2; model.pt only with --trust-pickle.
    assert _evaluate(export, recipe, tmp_path / "dir") == program
    pickled = _evaluate(export / "model.pt", recipe, tmp_path / "pt", "--trust-pickle")
    assert pickled["compact"]["knn_top1"] == program["compact"]["knn_top1"]


def test_evaluate_command_with_a_transfer_evaluation(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = finished_run / "recipe.yaml"
    out = tmp_path / "transfer"
    argv = ["evaluate", str(finished_run / "export"), str(recipe), "--out", str(out)]
    assert main([*argv, "--quiet", "--set", "eval.transfer=[digits]"]) == 0
    results = json.loads((out / "eval.json").read_text())
    digits = results["transfer"]["digits"]
    assert digits["data"].startswith("digits train: ")
    assert results["provenance"]["eval"]["transfer"] == ["digits"]
    knn = digits["models"]["compact"]["knn_top1"]
    printed = capsys.readouterr().out
    assert f"digits: compact: kNN top-1 {knn:.4f}" in printed


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _refuse_unsafe_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any torch.load(weights_only=False) fail the test."""
    original = torch.load

    def guarded(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("weights_only") is not False, "unpickled a file"
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)


def test_evaluate_refuses_a_pickled_model_without_trust_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path)
    marker = tmp_path / "PWNED"
    (tmp_path / "evil").mkdir()
    torch.save(_Payload(marker), tmp_path / "evil" / "model.pt")
    out = str(tmp_path / "out")
    message = _error(
        capsys,
        ["evaluate", str(tmp_path / "evil" / "model.pt"), str(recipe), "--out", out],
    )
    assert "evil/model.pt' cannot be read safely" in message
    assert "runs code" in message
    assert "model.pt2" in message and "--trust-pickle" in message
    message = _error(
        capsys, ["evaluate", str(tmp_path / "evil"), str(recipe), "--out", out]
    )
    assert "has no model.pt2" in message and "--trust-pickle" in message
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_checkpoint_named_pt_is_read_without_unpickling(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed = tmp_path / "mcp.pt"
    shutil.copyfile(finished_run / "prune" / "final.ckpt", renamed)
    _refuse_unsafe_torch_load(monkeypatch)
    networks = load_backbone_for_eval(renamed, None, trust_pickle=True)  # type: ignore[arg-type]
    assert set(networks) == {"dense", "subnet"}


@pytest.mark.parametrize("program_written", [True, False])
def test_run_never_unpickles_the_exported_model(
    finished_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    program_written: bool,
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "PWNED"
    torch.save(_Payload(marker), out / "export" / "model.pt")
    (out / "eval" / "eval.json").unlink()
    if not program_written:  # rebuilt from the checkpoint instead
        (out / "export" / "model.pt2").unlink()
        report = json.loads((out / "export" / "report.json").read_text())
        report["files"]["written"].remove("model.pt2")
        # A changed report is no longer the run's own (manifest): it is reused only
        # as an export of this run's checkpoint (one made by hand).
        report["checkpoint"] = str(out / "prune" / "final.ckpt")
        (out / "export" / "report.json").write_text(json.dumps(report))
    _refuse_unsafe_torch_load(monkeypatch)
    assert main(["run", str(out / "recipe.yaml"), "--out", str(out), "--quiet"]) == 0
    assert not marker.exists()
    models = json.loads((out / "eval" / "eval.json").read_text())["models"]
    before = json.loads((finished_run / "eval" / "eval.json").read_text())["models"]
    assert models["compact"]["knn_top1"] == before["compact"]["knn_top1"]
    assert models["compact"]["feature_dim"] == before["compact"]["feature_dim"]


def test_run_with_a_pruned_feature_dimension(
    finished_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "narrow"
    shutil.copytree(finished_run / "pretrain", out / "pretrain")  # reuse pretraining
    argv = ["run", str(finished_run / "recipe.yaml"), "--out", str(out), "--quiet"]
    assert main([*argv, "--set", "mcp.keep_output_dim=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    dense_dim = report["dense"]["feature_dim"]
    compact_dim = report["compact"]["feature_dim"]
    assert compact_dim < dense_dim
    models = json.loads((out / "eval" / "eval.json").read_text())["models"]
    assert models["compact"]["feature_dim"] == compact_dim
    assert models["subnet"]["feature_dim"] == dense_dim  # zeros where pruned
    assert models["subnet"]["knn_top1"] == pytest.approx(models["compact"]["knn_top1"])


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_gives_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished_run: Path
) -> None:
    recipe = write_recipe(tmp_path)
    out = str(tmp_path / "out")
    assert "does not exist" in _error(
        capsys, ["run", str(tmp_path / "nope.yaml"), "--out", out]
    )
    assert "unknown key 'mcp.ratio'" in _error(
        capsys, ["run", str(recipe), "--out", out, "--set", "mcp.ratio=0.5"]
    )
    assert "pruning_ratio' must be in [0, 1)" in _error(
        capsys, ["run", str(recipe), "--out", out, "--set", "mcp.pruning_ratio=1.5"]
    )
    assert "larger than the training set" in _error(
        capsys,
        ["pretrain", str(recipe), "--out", out, "--set", "pretrain.batch_size=512"],
    )
    assert "torchvision/" in _error(
        capsys,
        ["pretrain", str(recipe), "--out", out, "--set", "backbone.name=foo/bar"],
    )
    assert "does not exist" in _error(
        capsys,
        ["prune", str(recipe), "--from", str(tmp_path / "missing.ckpt"), "--out", out],
    )
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"garbage")
    assert "cannot be read safely" in _error(
        capsys, ["export", str(broken), "--out", str(tmp_path / "exp")]
    )
    other = write_recipe(tmp_path, backbone={"name": "torchvision/resnet34"})
    message = _error(
        capsys,
        [
            "prune",
            str(other),
            "--from",
            str(finished_run / "pretrain" / "final.ckpt"),
            "--out",
            out,
        ],
    )
    assert "mobilenet_v2" in message and "resnet34" in message


def test_help_documents_set_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--set mcp.pruning_ratio=0.5" in " ".join(capsys.readouterr().out.split())


def test_version_and_help_without_ignored_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightly-mcp {version('lightly-mcp')}"
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    # export trains nothing: no accelerator or devices to choose.
    for flag in ("--device", "--devices", "--accelerator", "--set"):
        assert flag not in text, flag
    assert "--quiet" in text and "--out OUT" in text
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--accelerator ACCELERATOR, --device ACCELERATOR" in text
    assert "--print-recipe" in text


def test_print_recipe_shows_the_resolved_recipe_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightly_mcp.app.recipe import load_recipe

    recipe = write_recipe(tmp_path)
    argv = ["run", str(recipe), "--set", "mcp.pruning_ratio=0.45", "--print-recipe"]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["mcp"]["pruning_ratio"] == 0.45
    assert printed["trainer"]["accelerator"] == "cpu"
    expected = load_recipe(
        recipe, ["mcp.pruning_ratio=0.45", "trainer.accelerator=cpu"]
    )
    assert printed == expected.to_dict()
    assert main([*argv, "--accelerator", "cpu", "--out", str(tmp_path / "o")]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed
    assert not (tmp_path / "o").exists()
    # Without --print-recipe, --out is required (argparse's usage error, exit 2).
    with pytest.raises(SystemExit) as exited:
        main(["run", str(recipe)])
    assert exited.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    # A bad --set is refused as without --print-recipe.
    assert "unknown key 'mcp.ratio'" in _error(
        capsys, ["prune", str(recipe), "--set", "mcp.ratio=1", "--print-recipe"]
    )


def test_unlabelled_image_folder_runs_and_skips_evaluation(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    generator = __import__("random").Random(0)
    for i in range(40):
        color = tuple(generator.randrange(256) for _ in range(3))
        Image.new("RGB", (20, 20), color=color).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    recipe = write_recipe(
        tmp_path,
        data={"kind": "imagefolder", "root": str(folder), "subset": None},
        eval={"train_subset": None, "test_subset": None, "baselines": False},
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "no labels" in report["evaluation"]
    assert "knn_top1" not in report["compact"]
    assert (out / "export" / "model.pt").is_file()


def test_cli_silences_library_warnings_but_not_mcp_warnings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import warnings

    from lightly_mcp.app.cli import quiet_third_party_warnings
    from lightly_mcp.errors import MCPWarning

    monkeypatch.setenv("PYTHONWARNINGS", "")
    with warnings.catch_warnings(record=True) as caught:
        quiet_third_party_warnings()
        warnings.warn("library noise", UserWarning, stacklevel=1)
        warnings.warn("the ADMM mask is oscillating", MCPWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["the ADMM mask is oscillating"]


def test_cli_hides_lightnings_info_lines_in_a_fresh_process() -> None:
    """Lightning sets its loggers to INFO when it is imported, which undid the
    silencing done before its import ("GPU available: False", "Tip: ...")."""
    import sys

    code = (
        "import logging\n"
        "from lightly_mcp.app.cli import quiet_third_party_warnings\n"
        "quiet_third_party_warnings()\n"
        "import pytorch_lightning\n"
        "print(logging.getLogger('pytorch_lightning').getEffectiveLevel(),"
        " logging.getLogger('lightning_fabric').getEffectiveLevel())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == [str(logging.ERROR)] * 2


# --- one recipe per output folder (issue 17, item 2) --------------------------------
def test_run_into_a_folder_of_another_recipe_is_refused(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    before = {
        name: (out / name).read_bytes() for name in ("report.json", "recipe.yaml")
    }
    argv = ["run", str(out / "recipe.yaml"), "--out", str(out), "--quiet"]
    message = _error(capsys, [*argv, "--set", "mcp.pruning_ratio=0.3"])
    assert f"'{out}'" in message and "another recipe" in message
    assert "mcp.pruning_ratio 0.5 there, 0.3 now" in message
    assert "new --out" in message and "--restart" in message
    after = {name: (out / name).read_bytes() for name in ("report.json", "recipe.yaml")}
    assert after == before  # neither the report nor the recorded recipe changed


def test_keys_that_do_not_change_results_are_not_compared(finished_run: Path) -> None:
    from lightly_mcp.app.recipe import load_recipe
    from lightly_mcp.app.run_folder import STAGES, check_recipe

    recipe = load_recipe(
        finished_run / "recipe.yaml",
        ["trainer.devices=2", "data.num_workers=3", "trainer.log_every_n_steps=7"],
    )
    check_recipe(recipe, finished_run, STAGES)  # no error


def test_resuming_a_checkpoint_of_another_pruning_ratio_is_refused(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "interrupted"
    shutil.copytree(finished_run / "pretrain", out / "pretrain")
    (out / "prune").mkdir()
    for name in ("last.ckpt", "recipe.yaml"):  # prune interrupted: no done.json
        shutil.copyfile(finished_run / "prune" / name, out / "prune" / name)
    argv = ["run", str(finished_run / "recipe.yaml"), "--out", str(out), "--quiet"]
    argv += ["--set", "mcp.pruning_ratio=0.3"]
    message = _error(capsys, argv)
    assert "prune stage of another recipe" in message
    assert "mcp.pruning_ratio 0.5 there, 0.3 now" in message
    # Without the recorded recipe its outputs cannot be checked: refused too.
    (out / "prune" / "recipe.yaml").unlink()
    message = _error(capsys, argv)
    assert "holds prune/last.ckpt but its recorded recipe prune/recipe.yaml" in message
    assert "is missing" in message and "--restart" in message
    assert message_length(message) <= MAX_MESSAGE
    assert not (out / "prune" / "done.json").exists()


def test_restart_clears_only_what_runs_wrote(
    finished_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / "notes.txt").write_text("mine")
    (out / "prune" / "mine.txt").write_text("mine")
    pretrain_mtime = (out / "pretrain" / "final.ckpt").stat().st_mtime
    argv = ["prune", str(finished_run / "recipe.yaml"), "--out", str(out), "--quiet"]
    argv += ["--from", str(out / "pretrain" / "final.ckpt"), "--restart"]
    argv += ["--set", "mcp.pruning_ratio=0.3", "--set", "mcp.max_steps=1"]
    assert main(argv) == 0
    done = json.loads((out / "prune" / "done.json").read_text())
    assert done["pruning_ratio"] == 0.3
    # The later stages, made from the old prune stage, are gone; other files stay.
    for stale in ("export", "eval", "plots", "report.json", "recipe.yaml"):
        assert not (out / stale).exists(), stale
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "prune" / "mine.txt").read_text() == "mine"
    assert (out / "pretrain" / "final.ckpt").stat().st_mtime == pretrain_mtime


def test_image_folder_evaluation_uses_held_out_images(tmp_path: Path) -> None:
    """Random noise in 3 class folders: with the training images as the test set,
    raw-pixel kNN was 1.000; held-out images give chance level."""
    import numpy as np
    from PIL import Image

    from lightly_mcp.app.assemble import evaluation_data
    from lightly_mcp.app.recipe import recipe_from_dict
    from lightly_mcp.benchmarking.evaluation import raw_pixel_baseline

    generator = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        (tmp_path / "noise" / label).mkdir(parents=True)
        for i in range(10):
            pixels = generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "noise" / label / f"{i}.png")
    recipe = recipe_from_dict(
        {
            "data": {"kind": "imagefolder", "root": str(tmp_path / "noise")},
            "eval": {"batch_size": 64},
        }
    )
    train, test, description, labelled = evaluation_data(recipe)
    assert labelled
    bank = set(train.dataset.base.paths)
    held_out = set(test.dataset.base.paths)
    assert len(bank) == 24 and len(held_out) == 6 and not bank & held_out
    assert "20 % of each class held out for evaluation" in description
    result = raw_pixel_baseline(train, test, k=5)
    assert result["knn_top1"] < 1.0


def test_more_bad_input_gives_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished_run: Path
) -> None:
    recipe = write_recipe(tmp_path)
    out = str(tmp_path / "out")
    for text in ("", "# nothing but a comment\n", "{}\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        assert "is empty" in _error(capsys, ["run", str(empty), "--out", out])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    checkpoint = str(finished_run / "prune" / "final.ckpt")
    for argv in (
        ["run", str(recipe), "--out", str(a_file)],
        ["evaluate", checkpoint, str(recipe), "--out", str(a_file)],
        ["export", checkpoint, "--out", str(a_file / "below")],
    ):
        assert "give a folder" in _error(capsys, argv)
    assert a_file.read_text() == "x"
    assert "--devices must be a number of devices" in _error(
        capsys, ["pretrain", str(recipe), "--out", out, "--devices", "abc"]
    )
    if not torch.cuda.is_available():
        assert "torch sees no CUDA GPU" in _error(
            capsys, ["pretrain", str(recipe), "--out", out, "--device", "cuda"]
        )
    prune = ["prune", str(recipe), "--from", str(finished_run), "--out", out]
    message = _error(capsys, prune)
    assert "is a folder, not a checkpoint file" in message
    assert "pretrain/final.ckpt" in message
    message = _error(
        capsys, ["export", str(finished_run / "prune"), "--out", str(tmp_path / "e")]
    )
    assert "is a folder" in message and "final.ckpt" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "e").exists()
    # A folder nobody may write to (immutable: even root cannot).
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode:
        return  # no chattr here
    try:
        for argv in (
            ["run", str(recipe), "--out", str(frozen)],
            ["evaluate", checkpoint, str(recipe), "--out", str(frozen / "eval")],
        ):
            assert "cannot write to --out" in _error(capsys, argv)
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)
