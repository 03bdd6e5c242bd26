from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_readme_trainer_example_runs_and_shrinks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runpy.run_path(str(EXAMPLES / "mcp_trainer.py"), run_name="__main__")
    dense, compact = capsys.readouterr().out.strip().splitlines()[-1].split(" -> ")
    assert int(compact.split()[0]) < 0.25 * int(dense)
