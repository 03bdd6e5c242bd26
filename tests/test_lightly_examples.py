"""The lightly-style examples (``examples/*/mcp.py``) run end to end, a few steps each.

Each example runs as a script in its own process (as a user would run it), shrunk by
its environment variables, in a temporary working directory.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
QUICK = {
    "MCP_EXAMPLE_STEPS": "3",
    "MCP_EXAMPLE_SUBSET": "64",
    "MCP_EXAMPLE_BATCH_SIZE": "16",
}


def run_example(folder: str, tmp_path: Path, **env: str) -> str:
    """Runs ``examples/<folder>/mcp.py`` and returns its stdout; fails on exit != 0."""
    script = EXAMPLES / folder / "mcp.py"
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", **QUICK, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def check_output(out: str) -> None:
    """Finite final loss, the kept-channel assertion passed, the model shrank."""
    loss = re.search(r"^final loss: (\S+)$", out, re.MULTILINE)
    assert loss is not None, out
    assert math.isfinite(float(loss.group(1)))
    assert re.search(r"^kept channels per group: \[[\d, ]+\] .*ok\)$", out, re.M), out
    params = re.search(r"^parameters: dense ([\d,]+) -> compact ([\d,]+)$", out, re.M)
    assert params is not None, out
    dense, compact = (int(v.replace(",", "")) for v in params.groups())
    assert compact < 0.5 * dense


def test_pytorch_example(tmp_path: Path) -> None:
    out = run_example("pytorch", tmp_path)
    check_output(out)
    error = re.search(r"max abs error: (\S+)$", out, re.MULTILINE)
    assert error is not None and float(error.group(1)) < 1e-4


def test_pytorch_lightning_example(tmp_path: Path) -> None:
    check_output(run_example("pytorch_lightning", tmp_path))


def test_pytorch_lightning_distributed_example_two_cpu_processes(
    tmp_path: Path,
) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch was built without the gloo backend for distributed CPU")
    out = run_example(
        "pytorch_lightning_distributed",
        tmp_path,
        MCP_EXAMPLE_DEVICES="2",
        CUDA_VISIBLE_DEVICES="",  # two CPU processes even where GPUs exist
    )
    check_output(out)
    assert "processes: 2, all with the same mask" in out
