"""The deployed forms: torch.export programs read without pickle, ONNX, timing."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from lightly_mcp.errors import InputError, UnsafeCheckpointError
from lightly_mcp.formats.runtimes import (
    ExportedNetwork,
    deployed_forms,
    export_program,
    load_program,
    save_program,
)

SIZE = 8


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    """Copies the archive ``src`` to ``dst`` with some entries replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            inner = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(inner, zin.read(info.filename)))


def test_program_round_trip_with_any_batch(tmp_path: Path) -> None:
    net = _net()
    save_program(export_program(net, SIZE), tmp_path / "model.pt2")
    loaded = load_program(tmp_path / "model.pt2")
    assert isinstance(loaded, ExportedNetwork)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))
    # eval()/train() are accepted (the program's own module refuses them).
    assert loaded.eval() is loaded and not loaded.training


@pytest.mark.parametrize("where", ["sample inputs", "a weight"])
def test_a_program_with_pickled_code_is_refused_unrun(
    tmp_path: Path, where: str
) -> None:
    save_program(export_program(_net(), SIZE), tmp_path / "good.pt2")
    marker = tmp_path / "PWNED"
    if where == "sample inputs":
        replace = {"data/sample_inputs/model.pt": _pickled(_Payload(marker))}
    else:  # a weight marked as pickled, holding the payload
        with zipfile.ZipFile(tmp_path / "good.pt2") as z:
            name = next(n for n in z.namelist() if n.endswith("weights_config.json"))
            config = json.loads(z.read(name))
        entry = config["config"]["0.bias"]
        entry["use_pickle"] = True
        replace = {
            f"data/weights/{entry['path_name']}": _pickled(_Payload(marker)),
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
        }
    _rewrite(tmp_path / "good.pt2", tmp_path / "evil.pt2", replace)
    with pytest.raises(UnsafeCheckpointError, match="is not a program lightly-mcp"):
        load_program(tmp_path / "evil.pt2")
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, InputError)  # exit code 2


def test_missing_program_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No torch.export program"):
        load_program(tmp_path / "none.pt2")


def test_deployed_forms_compute_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    runners, skipped = deployed_forms(net, SIZE)
    assert skipped == {}
    assert set(runners) == {"eager", "torch.export", "onnxruntime"}
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = net(x)
        for form, run in runners.items():
            assert torch.allclose(run(x), expected, atol=1e-6), form


def test_a_form_that_cannot_be_built_is_skipped_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", fail)
    runners, skipped = deployed_forms(_net(), SIZE)
    assert set(runners) == {"eager", "torch.export"}
    assert skipped == {
        "onnxruntime": "ExportError: ONNX export failed: RuntimeError: unsupported "
        "operator"
    }
