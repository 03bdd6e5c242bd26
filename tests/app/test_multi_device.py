"""`lightly-mcp` on several CPU processes (gloo), as `--devices N` launches them:
only rank 0 writes, every rank ends with the command, and a stage in which no
training step can run is an error (issue 17, item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import TINY_RECIPE

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _recipe(tmp_path: Path, subset: int, batch: int) -> Path:
    recipe = {
        **TINY_RECIPE,
        "data": {**TINY_RECIPE["data"], "subset": subset},
        "pretrain": {**TINY_RECIPE["pretrain"], "batch_size": batch},
        "mcp": {**TINY_RECIPE["mcp"], "batch_size": batch},
        "eval": {
            "train_subset": 64,
            "test_subset": 32,
            "linear_epochs": 1,
            "baselines": False,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _lightly_mcp(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lightly_mcp", *args, "--device", "cpu", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def test_run_on_several_processes_writes_once_and_every_rank_exits(
    tmp_path: Path,
) -> None:
    # Three ranks: two of them not rank 0, and a world size that is not a power of
    # two (two ranks took as long again and checked nothing three do not).
    devices = 3
    out = tmp_path / "run"
    # 2 steps per rank and epoch: 32 images and a batch of 16 on every rank.
    recipe = _recipe(tmp_path, subset=32 * devices, batch=16)
    result = _lightly_mcp(
        "run", str(recipe), "--out", str(out), "--devices", str(devices)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    deadline = time.time() + 5  # a process takes a moment to disappear
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(out)) == [], "a rank outlived the command"
    for stage in ("pretrain", "prune"):
        done = json.loads((out / stage / "done.json").read_text())
        assert torch.load(done["checkpoint"], weights_only=True)["global_step"] == 2
        assert not (out / stage / ".final.ckpt.tmp").exists()
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["compact"]["knn_top1"] <= 1.0
    assert (out / "export" / "model.pt2").is_file()
    assert (out / "eval" / "eval.json").is_file()
    assert "Traceback" not in result.stderr


def test_a_stage_without_a_training_step_is_an_error(tmp_path: Path) -> None:
    """64 images over 3 ranks (21 each) cannot fill a batch of 24 anywhere: refused
    before the launcher starts the other ranks (no process is started here)."""
    from lightly_mcp.app import pipeline
    from lightly_mcp.app.recipe import RecipeError, load_recipe

    recipe = load_recipe(
        _recipe(tmp_path, subset=64, batch=24),
        ["trainer.accelerator=cpu", "trainer.devices=3"],
    )
    out = tmp_path / "too_small"
    with pytest.raises(RecipeError) as info:
        pipeline.pretrain(recipe, out, progress=False)
    message = str(info.value)
    assert "too small" in message and "64 images" in message
    assert "batch of 24 on each of 3 device(s)" in message
    assert "pretrain.batch_size" in message
    assert not (out / "pretrain" / "done.json").exists()
    assert not (out / "pretrain" / "final.ckpt").exists()
