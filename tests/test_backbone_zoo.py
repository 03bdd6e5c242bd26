"""Backbones by name: which prune exactly and which are refused before training."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightly_mcp.cli import main
from tests.tiny import write_tiny


def test_cli_refuses_an_unprunable_backbone_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_tiny(
        tmp_path,
        {"backbone.name": "timm/nf_resnet26", "backbone.width_multiplier": None},
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "lightly-mcp: error: the prune stage would fail: timm/nf_resnet26 cannot be "
        "pruned exactly by MCP: weight-standardised convolution in net.stem.conv"
    )
    assert "found by the preflight before any training" in lines[0]
    assert not out.exists()
