"""The record of the files lightly-mcp wrote in an output folder.

``OUT/.lightly-mcp-manifest.json`` lists, relative to ``OUT``, every file a run
wrote there (or is about to write: a stage claims its files before it starts, so a
killed run's files are listed too), with the SHA-256 of the small record files
(recipes, reports, ``done.json``, ``eval.json``, plots). It is what makes a file
*ours*:

- ``--restart`` (:func:`lightly_mcp.app.run_folder.clear_outputs`) deletes only the
  files listed here, never a file of the user's that happens to match a name;
- a run refuses to overwrite a file at one of its paths that is not listed, or
  whose content is no longer what the run wrote (the user's own ``recipe.yaml``
  given as ``run DIR/recipe.yaml --out DIR``, a ``report.json`` of the user's);
- outputs are reused only when they are ours (see ``lightly_mcp.app.pipeline``).

The manifest is written atomically after each change, by the launcher's rank 0
only (see :func:`lightly_mcp.app.run_folder.is_rank_zero`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightly_mcp.app.ranks import is_rank_zero
from lightly_mcp.errors import OutputFolderError
from lightly_mcp.io.files import write_bytes_atomic, write_json_atomic

MANIFEST = ".lightly-mcp-manifest.json"
#: Files up to this size are hashed when recorded (records, not checkpoints).
HASHED_MAX_BYTES = 16 * 1024 * 1024


def _rank_zero() -> bool:
    return is_rank_zero()


def read_manifest(out: Path) -> dict[str, str | None]:
    """``{relative path: sha256 or None}`` of the files runs wrote in ``out``.

    Raises:
        OutputFolderError: For a manifest that is not one (named, with the fix).
    """
    path = Path(out) / MANIFEST
    if not os.path.lexists(path):
        return {}
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        data = json.loads(path.read_bytes())
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str))
            for k, v in files.items()
        ):
            raise ValueError("bad 'files'")
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputFolderError(
            f"'{path}' is not a lightly-mcp manifest (unreadable or damaged); "
            "delete it and move the run's files out, or use a new --out folder."
        ) from None
    return dict(files)


def _write(out: Path, files: dict[str, str | None]) -> None:
    data: dict[str, Any] = {
        "written_by": "lightly-mcp",
        "files": dict(sorted(files.items())),
    }
    write_json_atomic(Path(out) / MANIFEST, data)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_ours(out: Path, relative: str, files: dict[str, str | None]) -> bool:
    """Whether ``out/relative`` is listed and (for a hashed record) unchanged."""
    if relative not in files:
        return False
    recorded = files[relative]
    path = Path(out) / relative
    if recorded is None or not path.is_file() or path.is_symlink():
        return True
    try:
        return sha256(path) == recorded
    except OSError:
        return False


def _describe(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        return "a folder"
    if path.is_file():
        return "a file"
    return "not a regular file"


def refuse_foreign(out: Path, relatives: Iterable[str]) -> None:
    """Refuses (writing nothing) if any of ``relatives`` exists in ``out`` and is
    not ours (see :func:`is_ours`): a run would overwrite a file of the user's.

    Raises:
        OutputFolderError: Naming the first such file and the ways out.
    """
    out = Path(out)
    files = read_manifest(out)
    for relative in relatives:
        path = out / relative
        if os.path.lexists(path) and not is_ours(out, relative, files):
            raise OutputFolderError(
                f"'{path}' was not written by a lightly-mcp run here "
                f"({_describe(path)}, or changed since) and would be overwritten: "
                "move it out or use another --out."
            )


def claim(out: Path, relatives: Iterable[str]) -> None:
    """Lists ``relatives`` as files this run writes, refusing any that exists and
    is not ours (:func:`refuse_foreign`). Only rank 0 claims.

    Raises:
        OutputFolderError: Naming the first such file and the ways out.
    """
    if not _rank_zero():
        return
    out = Path(out)
    relatives = list(relatives)
    refuse_foreign(out, relatives)
    files = read_manifest(out)
    new = [relative for relative in relatives if relative not in files]
    if new:
        files.update(dict.fromkeys(new))
        _write(out, files)


def record(out: Path, relatives: Iterable[str]) -> None:
    """Lists files this run has written, hashing the small ones (records)."""
    if not _rank_zero():
        return
    out = Path(out)
    files = read_manifest(out)
    for relative in relatives:
        path = out / relative
        digest = None
        if path.is_file() and not path.is_symlink():
            if path.stat().st_size <= HASHED_MAX_BYTES and not relative.endswith(
                (".ckpt", ".pt", ".pt2", ".ts", ".onnx", ".data")
            ):
                digest = sha256(path)
        files[relative] = digest
    _write(out, files)


def forget(out: Path, relatives: Iterable[str]) -> None:
    """Removes entries (files that were deleted) from the manifest."""
    if not _rank_zero():
        return
    files = read_manifest(Path(out))
    gone = [relative for relative in relatives if relative in files]
    for relative in gone:
        del files[relative]
    if gone:
        _write(Path(out), files)


def write_file(out: Path, relative: str, data: bytes) -> Path:
    """Claims ``out/relative``, writes ``data`` there atomically and records its
    hash. Returns the path.
    """
    claim(out, [relative])
    path = Path(out) / relative
    write_bytes_atomic(path, data)
    record(out, [relative])
    return path


def write_json(out: Path, relative: str, data: Any) -> Path:
    """:func:`write_file` of ``data`` as indented JSON."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return write_file(out, relative, text.encode("utf-8"))


def files_under(out: Path, folder: str) -> set[str]:
    """The regular files under ``out/folder`` (relative to ``out``), links and
    all, without following linked folders.
    """
    root = Path(out) / folder
    found: set[str] = set()
    if not root.is_dir() or root.is_symlink():
        return found
    for directory, subfolders, names in os.walk(root):
        for name in names:
            found.add(os.path.relpath(os.path.join(directory, name), out))
        subfolders[:] = [
            s for s in subfolders if not os.path.islink(os.path.join(directory, s))
        ]
    return found
