"""Hostile model files: nothing from a model file is ever run.

Each ``torch.export`` payload below is a small edit of a real ``model.pt2`` that
PyTorch itself turns into code when the program is loaded or called (``guards_code``
is ``exec()``-ed, shape expressions are ``sympify``-ed, a node's target is any
operator); each must be refused at the command line (exit 2, one line of at most
200 characters) without its marker file appearing. TorchScript is code as well:
refused without ``--trust-pickle`` and never loaded by ``run`` on its own.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightly_mcp.app import pipeline
from lightly_mcp.app.cli import main
from lightly_mcp.errors import UnsafeCheckpointError
from lightly_mcp.formats.export import _save_torchscript
from lightly_mcp.formats.runtimes import export_program, save_program
from lightly_mcp.io.model_files import load_program, shown_path
from tests.helpers import MAX_MESSAGE, message_length
from tests.tiny import tiny_recipe, write_tiny

SIZE = 16
PREFIX = "lightly-mcp: error: "


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real program, as ``save_program`` writes it."""
    path = tmp_path_factory.mktemp("program") / "model.pt2"
    save_program(export_program(_net(), SIZE), path)
    return path


def _tamper(
    src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Copies the archive ``src`` to ``dst`` with its ``model.json`` edited."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json") and edit is not None:
                model = json.loads(data)
                edit(model)
                data = json.dumps(model).encode()
            zout.writestr(info.filename, data)
    return dst


def _refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one error line of a command that must exit 2."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    message = lines[0].removeprefix(PREFIX)
    assert message_length(message) <= MAX_MESSAGE, message
    assert "weights_only=False" not in message
    return message


# --- the payloads: each creates ``marker`` when PyTorch runs it -------------------
def _guards_code(marker: Path) -> Callable[[dict[str, Any]], None]:
    def edit(model: dict[str, Any]) -> None:
        model["guards_code"] = [
            f"__import__('pathlib').Path('{marker}').touch() is None"
        ]

    return edit


def _shape_expression(marker: Path) -> Callable[[dict[str, Any]], None]:
    def edit(model: dict[str, Any]) -> None:
        payload = f" + 0*__import__('pathlib').Path('{marker}').write_text('x')"
        for meta in model["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] += payload

    return edit


def _from_file_node(marker: Path) -> Callable[[dict[str, Any]], None]:
    """An ``aten.from_file(marker, shared=True)`` node feeding the first conv's bias."""

    def edit(model: dict[str, Any]) -> None:
        graph = model["graph_module"]["graph"]
        inputs = [
            ("filename", {"as_string": str(marker)}),
            ("shared", {"as_bool": True}),
            ("size", {"as_int": 4}),
        ]
        node = {
            "target": "torch.ops.aten.from_file.default",
            "inputs": [{"name": n, "arg": a, "kind": 1} for n, a in inputs],
            "outputs": [{"as_tensor": {"name": "payload"}}],
            "metadata": {},
            "is_hop_single_tensor_return": None,
            "name": "payload",
        }
        meta = graph["tensor_values"]["p_0_bias"]
        graph["tensor_values"]["payload"] = dict(meta, requires_grad=False)
        graph["nodes"].insert(0, node)
        bias = graph["nodes"][1]["inputs"][2]
        assert bias["name"] == "bias"
        bias["arg"]["as_tensor"]["name"] = "payload"

    return edit


PAYLOADS = {
    "guards_code": _guards_code,
    "shape expression": _shape_expression,
    "aten.from_file node": _from_file_node,
}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_program_that_would_run_code_is_refused_unrun(
    program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], payload: str
) -> None:
    marker = tmp_path / "PWNED"
    evil = _tamper(program, tmp_path / "evil.pt2", PAYLOADS[payload](marker))
    recipe = write_tiny(tmp_path)
    argv = ["evaluate", str(evil), str(recipe), "--out", str(tmp_path / "out")]
    message = _refusal(capsys, [*argv, "--quiet"])
    assert message.startswith(f"'{shown_path(evil)}' is not a program lightly-mcp")
    assert message.endswith("export it again with lightly-mcp export.")
    assert not marker.exists()
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.parametrize(
    "edit, why",
    [
        (
            lambda m: m["graph_module"]["graph"]["nodes"][0].update(
                target="torch.serialization.os.system"
            ),
            "operator torch.serialization.os.system",
        ),
        (
            lambda m: m["graph_module"]["graph"]["nodes"][0].update(
                target="torch.ops.aten.save.default"
            ),
            "operator aten.save.default takes a string",
        ),
        (
            lambda m: m["graph_module"]["module_call_graph"][0]["signature"].update(
                in_spec='[1, {"__enum__": true, "fqn": "antigravity:x", "name": "y"}]'
            ),
            "a tree spec other than one tensor in and out",
        ),
        (
            lambda m: m["graph_module"]["graph"]["custom_obj_values"].update(
                obj={"name": "obj", "class_fqn": "__torch__.torch.classes.x"}
            ),
            "custom objects (TorchBind), which run code",
        ),
        (lambda m: m.update(extra_field=1), "unknown field program.extra_field"),
        (
            lambda m: m["range_constraints"].update({"__import__('os')": {}}),
            "unexpected symbol",
        ),
    ],
    ids=["os.system", "aten.save", "tree spec", "torchbind", "unknown field", "range"],
)
def test_fields_that_reach_code_or_are_unknown_are_refused(
    program: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], why: str
) -> None:
    evil = _tamper(program, tmp_path / "evil.pt2", edit)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_program(evil)
    assert f"is not a program lightly-mcp writes ({why}" in str(refused.value)


def test_unknown_archive_entries_are_refused(program: Path, tmp_path: Path) -> None:
    """An AOTInductor library (``dlopen``-ed by torch.export.load) or any other
    entry save_program never writes.
    """
    evil = tmp_path / "evil.pt2"
    shutil.copyfile(program, evil)
    with zipfile.ZipFile(evil, "a") as archive:
        top = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{top}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UnsafeCheckpointError, match="unknown entry 'data/aotinductor"):
        load_program(evil)


def test_a_checked_program_still_computes_the_same(program: Path) -> None:
    net, loaded = _net(), load_program(program)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))


def test_a_truncated_program_is_one_line_and_exit_2(
    program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_tiny(tmp_path)
    for cut in (100, program.stat().st_size // 2):
        broken = tmp_path / f"cut{cut}.pt2"
        broken.write_bytes(program.read_bytes()[:cut])
        argv = ["evaluate", str(broken), str(recipe), "--out", str(tmp_path / "o")]
        message = _refusal(capsys, argv)
        assert message == (
            f"'{shown_path(broken)}' cannot be read safely: truncated, corrupt or not "
            "a torch.export program; export it again with lightly-mcp export."
        )


def test_a_program_with_a_cut_weight_file_is_one_line_without_a_traceback(
    program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "model.pt2"
    with zipfile.ZipFile(program) as zin, zipfile.ZipFile(broken, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            cut = info.filename.endswith("/weights/weight_0")
            zout.writestr(info, data[:4] if cut else data)
    recipe = write_tiny(tmp_path)
    argv = ["evaluate", str(broken), str(recipe), "--out", str(tmp_path / "o")]
    assert "not a torch.export program" in _refusal(capsys, argv)


def test_paths_that_are_not_files_say_what_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "x.ckpt"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/null")):
        for argv in (["inspect", str(path)], ["export", str(path), "--out", "e"]):
            message = _refusal(capsys, argv)
            assert f"'{path}' is not a regular file" in message
            assert "does not exist" not in message
    folder = tmp_path / "weights"
    folder.mkdir()
    recipe = write_tiny(tmp_path / "w", {"backbone.weights": str(folder)})
    out = str(tmp_path / "out")
    message = _refusal(capsys, ["run", str(recipe), "--out", out, "--dry-run"])
    assert f"weights file '{folder}'" in message and "is a folder" in message


def test_a_short_junk_file_with_a_newline_in_its_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "bad\nname.ckpt"
    junk.write_bytes(b"junk")  # the unpickler's LONG_BINGET, then the end
    message = _refusal(capsys, ["inspect", str(junk)])
    assert "bad\\nname.ckpt' cannot be read safely" in message


# --- TorchScript -------------------------------------------------------------------
class _WritesFile(nn.Module):
    """TorchScript whose forward creates (or overwrites) a file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: Tensor) -> Tensor:
        torch.from_file(self.marker, shared=True, size=4)
        return x.flatten(1)


def _malicious_torchscript(path: Path, marker: Path) -> Path:
    torch.jit.script(_WritesFile(str(marker))).save(str(path))
    return path


def test_torchscript_is_refused_without_trust_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    recipe = write_tiny(tmp_path)
    folder = tmp_path / "export"
    folder.mkdir()
    scripted = _malicious_torchscript(folder / "model.ts", marker)
    out = ["--out", str(tmp_path / "out"), "--quiet"]
    message = _refusal(capsys, ["evaluate", str(scripted), str(recipe), *out])
    assert message == (
        f"'{shown_path(scripted)}' cannot be read safely: it is TorchScript, which "
        "runs code; evaluate model.pt2 or a checkpoint, or pass --trust-pickle if "
        "you trust it."
    )
    message = _refusal(capsys, ["evaluate", str(folder), str(recipe), *out])
    assert message.startswith(f"'{shown_path(folder)}' has no model.pt2")
    assert message.endswith(
        "has no model.pt2 to evaluate; its model.ts is code: give that file with "
        "--trust-pickle if you trust it."
    )
    assert not marker.exists()


def test_torchscript_loads_with_trust_pickle(tmp_path: Path) -> None:
    net = _net()
    torch.jit.trace(net, torch.randn(1, 3, SIZE, SIZE)).save(str(tmp_path / "model.ts"))
    x = torch.randn(2, 3, SIZE, SIZE)
    for given in (tmp_path / "model.ts", tmp_path):  # the file, or its folder
        networks = pipeline.load_backbone_for_eval(given, None, trust_pickle=True)  # type: ignore[arg-type]
        with torch.no_grad():
            assert torch.allclose(networks["compact"](x), net(x), atol=1e-6)


def test_export_checks_the_torchscript_bytes_it_writes(tmp_path: Path) -> None:
    """The self-check reloads the traced bytes from memory: a file swapped in at
    the path between the write and the check is never loaded.
    """
    loaded: list[Any] = []
    original = torch.jit.load

    def record(f: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(f)
        return original(f, *args, **kwargs)

    net = _net()
    path = tmp_path / "model.ts"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.jit, "load", record)
        note = _save_torchscript(net, path, SIZE)
    assert note.startswith("ok (traced")
    assert loaded and all(isinstance(f, io.BytesIO) for f in loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]  # no temporary left
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(original(str(path))(x), net(x), atol=1e-6)


# --- run continuing a folder whose export was swapped -------------------------------
def test_run_never_loads_a_torchscript_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export whose report lists model.ts (and has no model.pt2): the compact
    model is rebuilt from the checkpoint, the model.ts never loaded.
    """
    marker = tmp_path / "PWNED"
    (tmp_path / "export").mkdir()
    _malicious_torchscript(tmp_path / "export" / "model.ts", marker)
    rebuilt = nn.Identity()
    calls: list[Path] = []

    def rebuild(checkpoint: Path, **kwargs: Any) -> nn.Module:
        calls.append(checkpoint)
        return rebuilt

    monkeypatch.setattr(pipeline, "compact_from_checkpoint", rebuild)
    report = {"files": {"written": ["model.pt", "model.ts"]}}
    checkpoint = tmp_path / "final.ckpt"
    compact = pipeline.exported_compact(tiny_recipe(), checkpoint, tmp_path, report)
    assert compact is rebuilt and calls == [checkpoint]
    assert not marker.exists()


def test_run_refuses_a_swapped_program(program: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    (tmp_path / "export").mkdir()
    _tamper(program, tmp_path / "export" / "model.pt2", _guards_code(marker))
    report = {"files": {"written": ["model.pt2"]}}
    checkpoint = tmp_path / "final.ckpt"
    with pytest.raises(UnsafeCheckpointError, match="guards_code") as refused:
        compact = pipeline.exported_compact(tiny_recipe(), checkpoint, tmp_path, report)
        compact(torch.randn(2, 3, SIZE, SIZE))
    assert message_length(str(refused.value)) <= MAX_MESSAGE
    assert not marker.exists()


# --- refusal lines of pickles ----------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_pickle_refusals_are_short_and_never_advise_weights_only_false(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / ("a-long-folder-name-" * 8) / "evil.ckpt"
    evil.parent.mkdir()
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, evil)
    recipe = write_tiny(tmp_path)
    weights = write_tiny(tmp_path / "w", {"backbone.weights": str(evil)})
    out = ["--out", str(tmp_path / "out")]
    for argv in (
        ["inspect", str(evil)],
        ["export", str(evil), *out],
        ["evaluate", str(evil), str(recipe), *out],
        ["pretrain", str(weights), *out],
    ):
        message = _refusal(capsys, argv)
        assert "/evil.ckpt' cannot be read safely: unpickling it runs code; " in message
    assert not marker.exists()
