"""A per-user cache of the evaluation baselines (raw pixels, random init).

The baselines shown beside the models depend on the evaluation images and settings,
not on the run: every run of a recipe on the same data computes the same numbers. They
are kept in one small JSON file per data set and settings, in the user's cache folder
(``$LIGHTLY_MCP_CACHE``, else ``$XDG_CACHE_HOME/lightly-mcp``, else
``~/.cache/lightly-mcp``; ``LIGHTLY_MCP_CACHE=off`` turns the cache off), under
``baselines/``. A run folder would not do: runs go to new folders, and a re-run of the
same folder already skips its finished evaluation.

An entry is found by a key of everything but the images (the data's description, the
evaluation settings, the random-init backbone and seed, the versions of torch, lightly
and lightly-mcp, the device type) and holds a SHA-256 of the evaluation images and
labels as they were evaluated (:class:`DataDigest`). An entry whose digest differs
from the data seen now (files changed under the same name) is recomputed, so a cached
number is always one of the data evaluated. Entries are plain JSON (nothing is
unpickled); an unreadable or malformed entry counts as missing, an unwritable cache
folder as no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lightly_mcp
from lightly_mcp.io.files import write_json_atomic

#: Environment variable naming the cache folder ("off" or empty: no cache).
CACHE_ENV = "LIGHTLY_MCP_CACHE"
#: Bumped when the baselines' computation changes, so old entries are not reused.
FORMAT = 1


def cache_dir() -> Path | None:
    """The folder of cached baselines, or None when the cache is turned off."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lightly-mcp"


class DataDigest:
    """A SHA-256 of image and label batches (dtype, shape and bytes), in order.

    Examples:
        >>> digest = DataDigest()
        >>> digest.update(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
        >>> len(digest.hexdigest())
        64
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, images: Tensor, labels: Tensor) -> None:
        """Adds one batch."""
        for tensor in (images, labels):
            tensor = tensor.detach().cpu().contiguous()
            self._sha.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            self._sha.update(tensor.numpy().tobytes())

    def hexdigest(self) -> str:
        """The digest of the batches added so far."""
        return self._sha.hexdigest()


def baseline_key(identity: dict[str, Any]) -> str:
    """The entry name for ``identity`` (JSON-ready), with the library versions."""
    full = {
        **identity,
        "format": FORMAT,
        "torch": torch.__version__,
        "lightly": version("lightly"),
        "lightly_mcp": lightly_mcp.__version__,
    }
    text = json.dumps(full, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_path(key: str) -> Path | None:
    """Where the entry of ``key`` lives (None: cache off)."""
    folder = cache_dir()
    return None if folder is None else folder / "baselines" / f"{key}.json"


def read_baselines(key: str) -> tuple[dict[str, Any], str] | None:
    """The cached baselines of ``key`` (those of the entry that are well formed, by
    name) and the data digest they were computed on; None when there is no readable
    entry or it holds none.
    """
    path = entry_path(key)
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    baselines, digest = entry.get("baselines"), entry.get("data_digest")
    if entry.get("key") != key or not isinstance(digest, str):
        return None
    if not isinstance(baselines, dict):
        return None
    usable = {
        name: result
        for name, result in baselines.items()
        if isinstance(result, dict) and isinstance(result.get("knn_top1"), float)
    }
    return (usable, digest) if usable else None


def write_baselines(
    key: str, identity: dict[str, Any], digest: str, baselines: dict[str, Any]
) -> Path | None:
    """Stores the baselines of ``key``; returns the file (None: not stored)."""
    path = entry_path(key)
    if path is None:
        return None
    entry = {
        "key": key,
        "identity": identity,
        "data_digest": digest,
        "baselines": baselines,
    }
    try:
        write_json_atomic(path, entry)
    except OSError:
        return None
    return path
