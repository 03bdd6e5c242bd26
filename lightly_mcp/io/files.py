"""Writing output files so that an interrupted run never leaves a partial one.

Every file the project writes goes through :func:`atomic_write`: the bytes go to a
temporary file in the same folder, are flushed to the disk (``fsync``) and the
temporary file is renamed over the target. A kill, a crash or a full disk leaves
either the old file or the new one, never a mix, and no temporary file. The rename
replaces a symbolic link at the target itself: nothing is ever written through a
link. A full disk, an exceeded quota or a read-only file system is an
:class:`~lightly_mcp.errors.OutputFolderError` naming the folder (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lightly_mcp.errors import OutputFolderError

#: ``errno`` values that mean the disk, not the program, refused a write.
DISK_ERRORS: dict[int, str] = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is too large for the file system",
}


def not_a_file(path: str | os.PathLike[str]) -> str:
    """Why ``path`` is not a regular file, for messages: ``"does not exist"``,
    ``"is a folder"`` or ``"is not a regular file (a FIFO, device or socket)"``.

    Examples:
        >>> not_a_file("/dev/null")
        'is not a regular file (a FIFO, device or socket)'
    """
    if os.path.isdir(path):
        return "is a folder"
    if os.path.exists(path):
        return "is not a regular file (a FIFO, device or socket)"
    return "does not exist"


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask); temporary
    files from ``tempfile.mkstemp`` are 0o600 and get this mode before the rename.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def disk_error(
    error: OSError, path: str | os.PathLike[str]
) -> OutputFolderError | None:
    """The one-line error for a write the disk refused (``DISK_ERRORS``), or None
    for any other ``OSError``.
    """
    why = DISK_ERRORS.get(error.errno or 0)
    if why is None:
        return None
    return OutputFolderError(
        f"cannot write '{path}': {why} (nothing half-written); free space or use "
        "another --out."
    )


@contextlib.contextmanager
def disk_errors_named(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turns a disk-refused write (``DISK_ERRORS``) in the block into
    :class:`OutputFolderError` naming ``path``; other errors pass through.
    """
    try:
        yield
    except OSError as error:
        mapped = disk_error(error, path)
        if mapped is None:
            raise
        raise mapped from error


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]
) -> None:
    """Writes ``path`` atomically: ``write(file)`` fills a temporary file in the
    same folder, which is flushed to the disk and renamed to ``path``.

    A symbolic link at ``path`` is replaced, never written through. On any error
    (a full disk included) the previous ``path`` is intact and the temporary file
    is removed.

    Raises:
        OutputFolderError: When the disk refuses the write (full, quota, read-only).
    """
    path = Path(path)
    with disk_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.chmod(tmp, default_file_mode())
            with os.fdopen(fd, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Flushes a folder's entries (the rename) to the disk, where supported."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda file: file.write(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Writes JSON to ``path`` atomically (see :func:`atomic_write`)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    write_text_atomic(path, text)
