"""Hostile files for the reliability sweep (``sweep.py``): pickles that run code,
TorchScript modules that write files, tampered ``torch.export`` archives, broken
dataset files.

Every payload only creates or overwrites a *marker* file whose path the sweep gives
(inside the case's sentinel folder), so code execution shows as a changed sentinel
folder and does no harm. The TorchScript modules live in this file because
``torch.jit.script`` needs their source.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shlex
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Payload:
    """Unpickling it runs ``touch MARKER`` (code from the file)."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def torch_pickle(path: Path, marker: Path, kind: str = "checkpoint") -> None:
    """``torch.save`` of a payload: inside a Lightning-like checkpoint dict
    (``checkpoint``), as a state dict value (``state_dict``) or bare (``bare``).
    """
    if kind == "checkpoint":
        obj: Any = {"state_dict": {}, "hyper_parameters": {}, "x": Payload(marker)}
    elif kind == "state_dict":
        obj = {"conv.weight": torch.zeros(1), "evil": Payload(marker)}
    else:
        obj = Payload(marker)
    torch.save(obj, path)


def plain_pickle(path: Path, marker: Path) -> None:
    """A plain ``pickle.dump`` of a payload (e.g. a CIFAR batch file)."""
    with open(path, "wb") as f:
        pickle.dump({"data": Payload(marker), "labels": [0]}, f)


# --- TorchScript ---------------------------------------------------------------------
class WritesOnForward(nn.Module):
    """Creates (or overwrites) ``path`` on every forward, via ``torch.from_file``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.proj = nn.Linear(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
        return self.proj(x.mean((2, 3))) + t.sum().float() * 0


class WritesOnLoad(nn.Module):
    """Creates ``path`` when loaded (its ``__setstate__``) and on forward."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        torch.from_file(state[0], shared=True, size=16, dtype=torch.uint8)
        self.path = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
        return x.mean((2, 3)).repeat(1, 3) + t.sum().float() * 0


class Harmless(nn.Module):
    """A TorchScript model that only computes (a benign ``model.ts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean((2, 3)))


def torchscript(path: Path, marker: Path | None, on: str = "forward") -> None:
    """Writes a scripted module: a payload on ``forward`` or ``load``, or harmless
    (``marker`` None).
    """
    module: nn.Module
    if marker is None:
        module = Harmless()
    elif on == "forward":
        module = WritesOnForward(str(marker))
    else:
        module = WritesOnLoad(str(marker))
    torch.jit.script(module).save(str(path))


# --- torch.export archives -----------------------------------------------------------
def rewrite_zip(
    src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]
) -> None:
    """Copies a zip archive entry by entry through ``edit`` (None drops an entry)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


def _edit_model_json(fn: Callable[[dict[str, Any]], None]) -> Callable[..., Any]:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            fn(program)
            return json.dumps(program).encode()
        return data

    return edit


def pt2_guards(src: Path, dst: Path, marker: Path) -> None:
    """``model.pt2`` with a guard that runs ``touch MARKER`` on every forward."""
    code = f"__import__('os').system('touch {marker}') == 0"
    rewrite_zip(src, dst, _edit_model_json(lambda p: p.update(guards_code=[code])))


def pt2_unknown_field(src: Path, dst: Path) -> None:
    """``model.pt2`` whose program JSON has a field no writer produces."""
    rewrite_zip(
        src, dst, _edit_model_json(lambda p: p.update(extra_code="print('hi')"))
    )


def pt2_truncated(src: Path, dst: Path, fraction: float = 0.5) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])


def pt2_garbage_json(src: Path, dst: Path) -> None:
    """``model.pt2`` whose program JSON is not JSON."""
    rewrite_zip(
        src,
        dst,
        lambda name, data: b"{not json" if name.endswith("models/model.json") else data,
    )


def pt2_drop_weights(src: Path, dst: Path) -> None:
    """``model.pt2`` without its weight files."""
    rewrite_zip(
        src, dst, lambda name, data: None if "/weights/weight_" in name else data
    )


def pt2_wrong_weight(src: Path, dst: Path) -> None:
    """``model.pt2`` with its first weight file shortened to 4 bytes."""
    rewrite_zip(
        src,
        dst,
        lambda name, data: data[:4] if name.endswith("/weights/weight_0") else data,
    )


def pt2_pickled_sample(src: Path, dst: Path, marker: Path) -> None:
    """``model.pt2`` whose sample-inputs entry is a pickle that runs code."""
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    payload = buffer.getvalue()
    rewrite_zip(
        src,
        dst,
        lambda name, data: payload if name.endswith("sample_inputs/model.pt") else data,
    )


def zip_of(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)


# --- datasets ------------------------------------------------------------------------
def idx_bytes(shape: tuple[int, ...], magic: int, data: bytes | None = None) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in shape
    )
    if data is None:
        n = 1
        for d in shape:
            n *= d
        data = bytes(i % 251 for i in range(n))
    return header + data


def fashion_mnist(
    root: Path,
    n: int = 64,
    size: int = 28,
    labels: bytes | None = None,
    override: dict[str, bytes] | None = None,
) -> None:
    """A small Fashion-MNIST folder (plain idx files); ``override`` replaces files."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx_bytes((n, size, size), 2051)
        )
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(
            idx_bytes(
                (n,),
                2049,
                labels if labels is not None else bytes(i % 10 for i in range(n)),
            )
        )
    for name, data in (override or {}).items():
        (root / name).unlink(missing_ok=True)
        (root / name).write_bytes(data)


def gzip_bomb(path: Path, header: bytes, megabytes: int) -> None:
    """A gzip file: ``header`` then ``megabytes`` MiB of zeros (compresses ~1000:1)."""
    chunk = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(megabytes):
            f.write(chunk)


def png_bomb(path: Path, width: int = 60000, height: int = 60000) -> None:
    """A PNG whose header declares ``width`` x ``height`` pixels (a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + bytes(width)
    body = zlib.compress(row * 4, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", body)
        + chunk(b"IEND", b"")
    )


def png(path: Path, size: int = 20, seed: int = 0) -> None:
    from PIL import Image

    data = bytes((seed * 31 + i) % 256 for i in range(size * size * 3))
    Image.frombytes("RGB", (size, size), data).save(path)
