"""Fashion-MNIST from its idx files (``.gz`` or plain), parsed with numpy.

The files of the Debian package ``dataset-fashion-mnist`` in
``/usr/share/datasets/fashion-mnist`` (``FASHION_MNIST_ROOT``), or of any folder given
as ``root``; torchvision downloads them with ``download=True``.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torchvision import datasets as tv_datasets

from lightly_mcp.data.labeled_images import ArrayImages, LabeledImages
from lightly_mcp.errors import DatasetError, clipped, describe_flat

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs its idx files.

The default root, read when a dataset is built: to change it, set it here, on
``lightly_mcp.data.fashion_mnist`` (the name ``lightly_mcp.data`` re-exports is a
copy).
"""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


#: Largest data an idx file may declare (1 GiB: about 20 times Fashion-MNIST's
#: training images); more is refused before anything is decompressed.
MAX_IDX_BYTES = 2**30


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Reads an idx file (``.gz`` or plain) of unsigned bytes into a numpy array.

    The idx format: a big-endian 32-bit magic number ``0x0000 08 nd`` (``0x08`` for
    unsigned bytes, ``nd`` the number of dimensions: 2051 for images ``(N, H, W)``,
    2049 for labels ``(N,)``), ``nd`` big-endian 32-bit sizes, then the data.

    The header is read first and only the data it declares (at most
    ``MAX_IDX_BYTES``) is read after it, so a gzip bomb is never decompressed whole.

    Args:
        path: The file; gzip-compressed when its name ends in ``.gz``.
        expected_magic: ``IDX_IMAGES_MAGIC`` (2051) or ``IDX_LABELS_MAGIC`` (2049).

    Returns:
        A read-only uint8 array of the shape given in the header.

    Raises:
        DatasetError: The file cannot be read, has another magic number, declares
            more than ``MAX_IDX_BYTES``, or its size does not match its header. The
            message names the file.
    """
    path = Path(path)
    what = {IDX_IMAGES_MAGIC: "images", IDX_LABELS_MAGIC: "labels"}.get(
        expected_magic, "idx"
    )
    try:
        gz = path.name.endswith(".gz")
        with gzip.open(path, "rb") if gz else open(path, "rb") as stream:
            head = stream.read(4)
            if len(head) < 4:
                raise DatasetError(
                    f"corrupt idx file {path}: too short for a header; replace it"
                )
            magic = int.from_bytes(head, "big")
            if magic != expected_magic:
                raise DatasetError(
                    f"corrupt idx file {path}: magic number {magic}, expected "
                    f"{expected_magic} ({what}); replace it"
                )
            ndim = magic & 0xFF
            sizes = stream.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise DatasetError(
                    f"corrupt idx file {path}: truncated header; replace it"
                )
            shape = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4"))
            size = math.prod(shape)
            if size > MAX_IDX_BYTES:
                raise DatasetError(
                    f"idx file {path}: its header gives {size} bytes, more than the "
                    f"{MAX_IDX_BYTES} allowed; is it the right file?"
                )
            data = stream.read(size)
            extra = len(stream.read(1))
    except (OSError, EOFError, zlib.error) as error:
        why = clipped(describe_flat(error), 40)
        raise DatasetError(
            f"corrupt idx file {path}: cannot read it ({why}); replace it"
        ) from error
    if len(data) != size or extra:
        held = "more" if extra else f"{len(data)}"
        raise DatasetError(
            f"corrupt idx file {path}: its header gives {size} bytes, the file holds "
            f"{held}; replace it"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find_idx(folders: Sequence[Path], stem: str) -> Path | None:
    """The first ``stem.gz`` or ``stem`` file in ``folders``."""
    for folder in folders:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
            if os.path.lexists(folder / name) and not (folder / name).is_dir():
                raise DatasetError(
                    f"{folder / name} is not a regular file (a FIFO, device, socket "
                    "or broken link); replace it"
                )
    return None


def _fashion_mnist_files(root: Path, train: bool) -> tuple[Path | None, Path | None]:
    """The image and label idx files of a split; ``None`` where missing.

    Looks in ``root`` and in ``root/FashionMNIST/raw`` (where torchvision downloads).
    """
    prefix = "train" if train else "t10k"
    folders = [root, root / "FashionMNIST" / "raw"]
    return (
        _find_idx(folders, f"{prefix}-images-idx3-ubyte"),
        _find_idx(folders, f"{prefix}-labels-idx1-ubyte"),
    )


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The folder of the idx files: ``root``, or ``FASHION_MNIST_ROOT`` if ``None``."""
    return Path(root).expanduser() if root is not None else FASHION_MNIST_ROOT


def fashion_mnist_installed(root: str | Path | None = None) -> bool:
    """Whether the idx files of both splits are in ``fashion_mnist_root(root)``."""
    folder = fashion_mnist_root(root)
    train = _fashion_mnist_files(folder, train=True)
    test = _fashion_mnist_files(folder, train=False)
    return all(path is not None for path in train + test)


def build_fashion_mnist(
    root: str | Path | None, train: bool, download: bool
) -> LabeledImages:
    """Fashion-MNIST's train or test split as ``LabeledImages`` of mode "L" images.

    Args:
        root: Folder of the idx files (or of ``FashionMNIST/raw``); ``None`` for
            ``FASHION_MNIST_ROOT``.
        train: The train split (``train-*``), else the test split (``t10k-*``).
        download: Fetch missing files with torchvision.

    Returns:
        The split, with its 10 class names.

    Raises:
        DatasetError: Files missing (and not downloaded), or corrupt.
    """
    root = fashion_mnist_root(root)
    split = "train" if train else "test"
    prefix = "train" if train else "t10k"
    images_path, labels_path = _fashion_mnist_files(root, train)
    if (images_path is None or labels_path is None) and download:
        try:
            tv_datasets.FashionMNIST(str(root), train=train, download=True)
        except Exception as error:
            raise DatasetError(
                f"fashion_mnist: downloading to {root} failed ({describe_flat(error)})"
            ) from error
        images_path, labels_path = _fashion_mnist_files(root, train)
    if images_path is None or labels_path is None:
        raise DatasetError(
            f"fashion_mnist {split} not found: no {prefix}-*-ubyte[.gz] in {root}; "
            "apt-get install dataset-fashion-mnist, or set data.root"
        )
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(
            f"fashion_mnist {split} in {images_path.parent}: {len(images)} images "
            f"({images_path.name}) but {len(labels)} labels ({labels_path.name})"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(
            f"corrupt idx file {labels_path}: label {int(labels.max())} out of range "
            f"0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return LabeledImages(
        ArrayImages(images, labels),
        labels,
        kind="fashion_mnist",
        split=split,
        source=str(images_path.parent),
        num_classes=len(FASHION_MNIST_CLASSES),
        classes=FASHION_MNIST_CLASSES,
    )
