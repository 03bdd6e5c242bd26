"""One process per output folder (issue 17, item 2): the lock on OUT/.lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightly_mcp.app.cli import main
from lightly_mcp.app.run_folder import OutputFolderError, output_lock
from tests.helpers import TINY_RECIPE

HOLD = """
import sys, time
from pathlib import Path
from lightly_mcp.app.run_folder import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_on_the_same_output_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        for command in ("run", "pretrain", "prune"):
            assert main([command, str(recipe), "--out", str(out), "--quiet"]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1, lines
            assert f"'{out}' is in use" in lines[0]
            assert f"pid {holder.pid}" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        # A crash (SIGKILL) of the holder releases the lock: no stale lock remains.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with output_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputFolderError, match=f"pid {os.getpid()}"):
            with output_lock(out):
                pass


def test_lock_is_released_when_the_command_ends(tmp_path: Path) -> None:
    out = tmp_path / "run"
    start = time.time()
    with output_lock(out):
        pass
    with output_lock(out):  # taken again at once
        pass
    assert time.time() - start < 5


def test_a_failed_command_leaves_no_folder_it_created(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), output_lock(out):
        raise RuntimeError("preflight failed")
    assert not out.exists()
    out.mkdir()
    with pytest.raises(RuntimeError), output_lock(out):  # not created: kept
        raise RuntimeError("preflight failed")
    assert out.is_dir()
