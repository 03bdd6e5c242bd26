"""torchvision's CIFAR-10, CIFAR-100 and STL-10, trusting a user-supplied copy.

Files are downloaded only with ``download=True`` (``download: true`` in a recipe). A
user-supplied copy is trusted: its files are checked for existence, not against
torchvision's md5 sums, so corrupt files fail with a clear error when parsed. CIFAR's
pickled files are read with :func:`load_array_pickle`, which runs no code from them.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from torchvision import datasets as tv_datasets
from torchvision.datasets import cifar as tv_cifar

from lightly_mcp.data.labeled_images import LabeledImages
from lightly_mcp.errors import DatasetError

DEFAULT_ROOT = Path("data")
"""Root of ``cifar10``, ``cifar100`` and ``stl10`` when none is given."""


def _cifar_required(cls: type[Any], train: bool) -> list[str]:
    """Files a CIFAR split needs in ``cls.base_folder``."""
    split_list = cls.train_list if train else cls.test_list
    return [name for name, _ in split_list] + [cls.meta["filename"]]


def _stl10_required(split: str) -> list[str]:
    """Files an STL-10 split needs in ``stl10_binary``."""
    files = {
        "train": ["train_X.bin", "train_y.bin"],
        "train+unlabeled": ["train_X.bin", "train_y.bin", "unlabeled_X.bin"],
        "unlabeled": ["unlabeled_X.bin"],
        "test": ["test_X.bin", "test_y.bin"],
    }
    return files[split]


def _missing(folder: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if not (folder / name).is_file()]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: what CIFAR's python files hold.

    Any other global a pickle names (a function it would call: code) is refused, so
    a dataset file never runs code.
    """

    ALLOWED = frozenset(
        (module, name)
        for package in ("numpy.core", "numpy._core")
        for module, name in (
            (f"{package}.multiarray", "_reconstruct"),
            (f"{package}.numeric", "_frombuffer"),
        )
    ) | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        """The allowed numpy globals; anything else raises ``UnpicklingError``."""
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"it names the global {module}.{name}: a CIFAR file holds only "
                "arrays and lists, and code is never run from a data file"
            )
        return super().find_class(module, name)


def load_array_pickle(file: Any, encoding: str = "ASCII", **kwargs: Any) -> Any:
    """``pickle.load`` restricted to plain data and numpy arrays (the one reader of
    CIFAR's files; torchvision's ``CIFAR10`` calls it through :func:`_arrays_only`).
    """
    return _ArrayUnpickler(file, encoding=encoding, **kwargs).load()


@contextmanager
def _arrays_only() -> Iterator[None]:
    """Restricts torchvision's CIFAR reader (its ``pickle.load``) to arrays."""
    original = tv_cifar.pickle
    tv_cifar.pickle = SimpleNamespace(load=load_array_pickle)
    try:
        yield
    finally:
        tv_cifar.pickle = original


class TrustedCIFAR10(tv_datasets.CIFAR10):
    """torchvision's CIFAR-10 with an existence check instead of md5 sums, and no
    code run from its files.

    torchvision compares every file with the md5 sum of the official archive; here a
    user-supplied copy is trusted (only the files of the requested split and the
    meta file must exist), and corrupt files fail when they are unpickled. They are
    unpickled with :func:`load_array_pickle`: a file naming any global other than
    numpy's array constructors is refused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _arrays_only():
            super().__init__(*args, **kwargs)

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return not _missing(folder, _cifar_required(type(self), self.train))

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as meta_file:
            data = load_array_pickle(meta_file, encoding="latin1")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class TrustedCIFAR100(TrustedCIFAR10):
    """torchvision's CIFAR-100 (fine labels) with an existence check, as above."""

    base_folder = tv_datasets.CIFAR100.base_folder
    url = tv_datasets.CIFAR100.url
    filename = tv_datasets.CIFAR100.filename
    tgz_md5 = tv_datasets.CIFAR100.tgz_md5
    train_list = tv_datasets.CIFAR100.train_list
    test_list = tv_datasets.CIFAR100.test_list
    meta = tv_datasets.CIFAR100.meta


class TrustedSTL10(tv_datasets.STL10):
    """torchvision's STL-10 with an existence check instead of md5 sums.

    Only the files of the requested split must exist (``unlabeled_X.bin`` only for
    the unlabelled splits); a user-supplied copy is trusted and corrupt files fail
    when they are parsed.
    """

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return not _missing(folder, _stl10_required(self.split))


def build_torchvision(
    kind: str,
    root: str | Path | None,
    train: bool,
    download: bool,
    stl10_unlabeled: bool = False,
) -> LabeledImages:
    """A split of ``cifar10``, ``cifar100`` or ``stl10`` as ``LabeledImages``.

    Args:
        kind: ``"cifar10"``, ``"cifar100"`` or ``"stl10"``.
        root: The folder holding ``cifar-10-batches-py``, ``cifar-100-python`` or
            ``stl10_binary``; ``None`` for ``DEFAULT_ROOT``.
        train: Train split, else test split.
        download: Fetch missing files with torchvision; never done otherwise.
        stl10_unlabeled: For ``stl10`` with ``train=True``: the ``train+unlabeled``
            split (the 100k unlabelled images get label ``-1``).

    Returns:
        The split, with torchvision's class names.

    Raises:
        DatasetError: Files missing (and not downloaded), unreadable, or with labels
            out of range.
    """
    root = Path(root).expanduser() if root is not None else DEFAULT_ROOT
    cls: type[Any]
    if kind == "stl10":
        cls = TrustedSTL10
        split = ("train+unlabeled" if stl10_unlabeled else "train") if train else "test"
        required = _stl10_required(split)
        num_classes = 10
    else:
        cls = TrustedCIFAR10 if kind == "cifar10" else TrustedCIFAR100
        split = "train" if train else "test"
        required = _cifar_required(cls, train)
        num_classes = 10 if kind == "cifar10" else 100
    folder = root / cls.base_folder
    missing = _missing(folder, required)
    if missing and not download:
        raise DatasetError(
            f"{kind} {split}: {_few(missing)} missing in {folder.absolute()}; set "
            "data.root or data.download: true"
        )
    try:
        if kind == "stl10":
            base = cls(str(root), split=split, download=download)
            labels = np.asarray(base.labels, dtype=np.int64)
        else:
            base = cls(str(root), train=train, download=download)
            labels = np.asarray(base.targets, dtype=np.int64)
        if len(labels) != len(base.data):
            raise ValueError(f"{len(base.data)} images but {len(labels)} labels")
    except DatasetError:
        raise
    except Exception as error:
        action = "download or read" if download else "read"
        why = " ".join(str(error).split()) or type(error).__name__
        why = why if len(why) <= 45 else why[:44] + "…"
        raise DatasetError(
            f"{kind} {split}: cannot {action} {_few(required[:1] + ['…'])} in "
            f"{folder} ({why}); replace them"
        ) from error
    if len(labels) and (labels.min() < -1 or labels.max() >= num_classes):
        raise DatasetError(
            f"{kind} {split}: labels in {folder} out of range 0..{num_classes - 1}"
        )
    classes = getattr(base, "classes", None)
    return LabeledImages(
        base,
        labels,
        kind=kind,
        split=split,
        source=str(root),
        num_classes=num_classes,
        classes=classes if classes else None,
    )


def _few(names: Sequence[str]) -> str:
    """The first two names, then ``…`` (messages stay one short line).

    Examples:
        >>> _few(["data_batch_1", "data_batch_2", "test_batch"])
        'data_batch_1, data_batch_2, …'
    """
    return ", ".join([*names[:2], "…"] if len(names) > 2 else names)
