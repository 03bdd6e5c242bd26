"""The datasets of the pipeline behind one entry point, ``build_dataset``.

Every kind gives items ``(transform(image), label)`` where ``image`` is a PIL image
and ``label`` an ``int`` (``-1`` where the dataset has no labels), wrapped in
``LabeledImages`` so that all kinds expose the same ``num_classes``, ``has_labels``,
``kind`` and ``describe()``.

Kinds:
    ``fashion_mnist``: the idx files (``.gz`` or plain) of the Debian package
        ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist`` or any
        folder given as ``root``; parsed with numpy.
    ``digits``: scikit-learn's bundled 8x8 digits (no files needed), split 80/20 by
        a fixed permutation.
    ``cifar10``, ``cifar100``, ``stl10``: torchvision's datasets. Files are downloaded
        only with ``download=True`` (``download: true`` in a recipe). A user-supplied
        copy is trusted: its files are checked for existence, not against
        torchvision's md5 sums, so corrupt files fail with a clear error when parsed.
    ``imagefolder``: any folder of images, with class sub-folders or without labels.
        With ``train/`` and ``val/`` (or ``test/``) sub-folders those are the two
        splits; otherwise a labelled folder is split by a fixed 80/20 split of every
        class, so that evaluation never tests on the training images.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from lightly_mcp.transforms import _ToRGB

logger = logging.getLogger(__name__)

SUPPORTED_KINDS: tuple[str, ...] = (
    "fashion_mnist",
    "digits",
    "cifar10",
    "cifar100",
    "stl10",
    "imagefolder",
)
"""The values accepted as ``kind`` by ``build_dataset``."""

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs its idx files."""

DEFAULT_ROOT = Path("data")
"""Root of ``cifar10``, ``cifar100`` and ``stl10`` when none is given."""

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)
"""File extensions (case-insensitive) that ``imagefolder`` reads as images."""

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

DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SPLIT_SEED = 0

IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_SPLIT_SEED = 0
HELD_OUT_FOLDERS = ("val", "test")
"""Sub-folders (beside ``train/``) that hold an image folder's evaluation images."""

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

ImageTransform = Callable[[Image.Image], Any]


class DatasetError(ValueError):
    """A dataset cannot be built: missing or corrupt files, or a bad argument."""


def _one_line(error: BaseException) -> str:
    """``'TypeName: message'`` of an exception, with whitespace collapsed."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --------------------------------------------------------------------------------------
# The common wrapper.
# --------------------------------------------------------------------------------------


class LabeledImages(Dataset[tuple[Any, int]]):
    """A base dataset of ``(PIL image, label)`` items with a transform and a subset.

    Args:
        base: Dataset whose items are ``(PIL image, int label)``.
        labels: The label of every item of ``base`` (``-1`` for unlabelled items), so
            that ``targets`` needs no image decoding.
        kind: The dataset kind, e.g. ``"fashion_mnist"``.
        split: ``"train"``, ``"test"``, ``"train+unlabeled"`` or ``""`` (folders).
        source: Where the data came from (a folder, or a description).
        num_classes: Number of classes; ``None`` when the dataset has no labels.
        classes: Class names, if known.
        transform: Applied to every PIL image; ``None`` returns the PIL image.
        indices: Indices into ``base`` that form this dataset; ``None`` for all.
        subset_seed: Seed that drew ``indices`` (only shown by ``describe``).

    Attributes:
        has_labels: Whether the items carry class labels (``num_classes`` is set).
    """

    def __init__(
        self,
        base: Dataset[Any],
        labels: Sequence[int] | np.ndarray,
        *,
        kind: str,
        split: str,
        source: str,
        num_classes: int | None,
        classes: Sequence[str] | None = None,
        transform: ImageTransform | None = None,
        indices: Sequence[int] | None = None,
        subset_seed: int | None = None,
    ) -> None:
        self.base = base
        self.base_labels = np.asarray(labels, dtype=np.int64)
        self.kind = kind
        self.split = split
        self.source = source
        self.num_classes = num_classes
        self.has_labels = num_classes is not None
        self.classes = list(classes) if classes is not None else None
        self.transform = transform
        self.indices = list(indices) if indices is not None else None
        self.subset_seed = subset_seed
        #: A subset that was asked for but exceeded the dataset (all items used).
        self.subset_clamped_from: int | None = None
        #: Why this dataset was chosen, when it is a fallback (see ``describe``).
        self.fallback_note: str | None = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base_labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        base_index = self.indices[index] if self.indices is not None else index
        image, label = self.base[base_index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)

    @property
    def base_size(self) -> int:
        """Number of items of the full dataset, before ``subset``."""
        return len(self.base_labels)

    @property
    def targets(self) -> list[int]:
        """Labels of all items in order (``-1`` where unlabelled), without decoding."""
        if self.indices is None:
            return [int(v) for v in self.base_labels]
        return [int(self.base_labels[i]) for i in self.indices]

    @property
    def skipped_corrupt(self) -> int:
        """Image files skipped at construction because they failed to open."""
        return int(getattr(self.base, "skipped_corrupt", 0))

    @property
    def skipped_non_image(self) -> int:
        """Files ignored at construction because of their extension."""
        return int(getattr(self.base, "skipped_non_image", 0))

    @property
    def load_failures(self) -> int:
        """Images that failed to load in ``__getitem__`` (replaced by the next one).

        Counted per process: DataLoader workers keep their own counts.
        """
        return int(getattr(self.base, "load_failures", 0))

    def describe(self) -> str:
        """One line saying what this dataset is.

        Returns:
            E.g. ``"fashion_mnist train: 60000 images, 10 classes, from
            /usr/share/datasets/fashion-mnist"``.
        """
        name = f"{self.kind} {self.split}" if self.split else self.kind
        if self.indices is not None and len(self.indices) != self.base_size:
            count = (
                f"{len(self)} of {self.base_size} images "
                f"(random subset, seed {self.subset_seed})"
            )
        elif self.subset_clamped_from is not None:
            count = (
                f"all {len(self)} images (a subset of {self.subset_clamped_from} was "
                "asked for, more than the dataset has)"
            )
        else:
            count = f"{len(self)} images"
        classes = (
            f"{self.num_classes} classes"
            if self.num_classes is not None
            else "no labels"
        )
        text = f"{name}: {count}, {classes}, from {self.source}"
        skipped = []
        if self.skipped_corrupt:
            skipped.append(f"{self.skipped_corrupt} corrupt")
        if self.skipped_non_image:
            skipped.append(f"{self.skipped_non_image} non-image")
        if skipped:
            text += f" (skipped {' and '.join(skipped)} files)"
        if self.fallback_note:
            text += f" ({self.fallback_note})"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


# --------------------------------------------------------------------------------------
# Fashion-MNIST (idx files) and digits (scikit-learn): in-memory uint8 arrays.
# --------------------------------------------------------------------------------------


class ArrayImages(Dataset[tuple[Image.Image, int]]):
    """In-memory grayscale images ``(N, H, W)`` uint8 with labels, as mode "L".

    Args:
        images: Array of shape ``(N, H, W)``, dtype uint8.
        labels: Array of shape ``(N,)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(np.ascontiguousarray(self.images[index]))
        return image, int(self.labels[index])


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Reads an idx file (``.gz`` or plain) of unsigned bytes into a numpy array.

    The idx format: a big-endian 32-bit magic number ``0x0000 08 nd`` (``0x08`` for
    unsigned bytes, ``nd`` the number of dimensions: 2051 for images ``(N, H, W)``,
    2049 for labels ``(N,)``), ``nd`` big-endian 32-bit sizes, then the data.

    Args:
        path: The file; gzip-compressed when its name ends in ``.gz``.
        expected_magic: ``IDX_IMAGES_MAGIC`` (2051) or ``IDX_LABELS_MAGIC`` (2049).

    Returns:
        A read-only uint8 array of the shape given in the header.

    Raises:
        DatasetError: The file cannot be read, has another magic number, or its size
            does not match its header. The message names the file.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as gz_file:
                data = gz_file.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as error:
        raise DatasetError(
            f"corrupt idx file {path}: cannot read it ({_one_line(error)})"
        ) from error
    what = {IDX_IMAGES_MAGIC: "images", IDX_LABELS_MAGIC: "labels"}.get(
        expected_magic, "idx"
    )
    if len(data) < 4:
        raise DatasetError(
            f"corrupt idx file {path}: {len(data)} bytes, too short for a header"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetError(
            f"corrupt idx file {path}: magic number {magic}, expected "
            f"{expected_magic} ({what})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"corrupt idx file {path}: truncated header")
    shape = tuple(
        int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    )
    size = math.prod(shape)
    if len(data) - header != size:
        raise DatasetError(
            f"corrupt idx file {path}: the header gives shape {shape} ({size} bytes) "
            f"but the file holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folders: Sequence[Path], stem: str) -> Path | None:
    """The first ``stem.gz`` or ``stem`` file in ``folders``."""
    for folder in folders:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
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


def _build_fashion_mnist(root: Path, train: bool, download: bool) -> LabeledImages:
    split = "train" if train else "test"
    prefix = "train" if train else "t10k"
    images_path, labels_path = _fashion_mnist_files(root, train)
    if (images_path is None or labels_path is None) and download:
        try:
            tv_datasets.FashionMNIST(str(root), train=train, download=True)
        except Exception as error:
            raise DatasetError(
                f"fashion_mnist: downloading to {root} failed ({_one_line(error)})"
            ) from error
        images_path, labels_path = _fashion_mnist_files(root, train)
    if images_path is None or labels_path is None:
        raise DatasetError(
            f"fashion_mnist {split} not found: expected {prefix}-images-idx3-ubyte"
            f"[.gz] and {prefix}-labels-idx1-ubyte[.gz] in {root} (install the Debian "
            "package dataset-fashion-mnist, point root at a folder with these files, "
            "or set `download: true` in the recipe to fetch them)"
        )
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(
            f"fashion_mnist {split}: {images_path} holds {len(images)} images but "
            f"{labels_path} holds {len(labels)} labels"
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


def digits_split_indices(train: bool) -> np.ndarray:
    """Indices of scikit-learn's digits in the train or test split.

    A fixed permutation (``numpy.random.RandomState(DIGITS_SPLIT_SEED)``, a stream
    that numpy keeps stable) of the 1797 digits; its first ``DIGITS_TRAIN_FRACTION``
    (1438 digits) is the train split, the rest (359) the test split. Each split is
    returned sorted.

    Args:
        train: The train split, else the test split.

    Returns:
        Sorted int64 indices.
    """
    n = 1797
    n_train = int(round(DIGITS_TRAIN_FRACTION * n))
    permutation = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    part = permutation[:n_train] if train else permutation[n_train:]
    return np.sort(part).astype(np.int64)


def _build_digits(train: bool) -> LabeledImages:
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = digits_split_indices(train)
    # Values are 0..16; scale to 0..255 bytes.
    images = np.round(digits.images[indices] * (255.0 / 16.0)).clip(0, 255)
    images = images.astype(np.uint8)
    labels = np.asarray(digits.target[indices], dtype=np.int64)
    return LabeledImages(
        ArrayImages(images, labels),
        labels,
        kind="digits",
        split="train" if train else "test",
        source="scikit-learn load_digits (8x8)",
        num_classes=10,
        classes=[str(d) for d in range(10)],
    )


# --------------------------------------------------------------------------------------
# torchvision datasets, trusting a user-supplied copy.
# --------------------------------------------------------------------------------------


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


class TrustedCIFAR10(tv_datasets.CIFAR10):
    """torchvision's CIFAR-10 with an existence check instead of md5 sums.

    torchvision compares every file with the md5 sum of the official archive; here a
    user-supplied copy is trusted (only the files of the requested split and the
    meta file must exist), and corrupt files fail when they are unpickled.
    """

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return not _missing(folder, _cifar_required(type(self), self.train))

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as meta_file:
            data = pickle.load(meta_file, encoding="latin1")
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


def _build_torchvision(
    kind: str, root: Path, train: bool, download: bool, stl10_unlabeled: bool
) -> LabeledImages:
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
        which = "all" if len(missing) == len(required) else ", ".join(missing)
        raise DatasetError(
            f"{kind} {split} not found: expected {', '.join(required)} in "
            f"{folder.absolute()} "
            f"(missing: {which}); set `download: true` in the recipe "
            "(download=True) to fetch them"
        )
    try:
        if kind == "stl10":
            base = cls(str(root), split=split, download=download)
            labels = np.asarray(base.labels, dtype=np.int64)
            if len(labels) != len(base.data):
                raise ValueError(f"{len(base.data)} images but {len(labels)} labels")
        else:
            base = cls(str(root), train=train, download=download)
            labels = np.asarray(base.targets, dtype=np.int64)
            if len(labels) != len(base.data):
                raise ValueError(f"{len(base.data)} images but {len(labels)} labels")
    except DatasetError:
        raise
    except Exception as error:
        action = "download or read" if download else "read"
        raise DatasetError(
            f"{kind} {split}: cannot {action} the files {', '.join(required)} in "
            f"{folder} ({_one_line(error)})"
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


# --------------------------------------------------------------------------------------
# Folders of image files.
# --------------------------------------------------------------------------------------


def _load_image(path: Path) -> Image.Image:
    """Opens and decodes an image file, applying its EXIF orientation."""
    with Image.open(path) as image:
        image.load()
        try:
            return ImageOps.exif_transpose(image)
        except Exception:
            return image.copy()


class ImageFiles(Dataset[tuple[Image.Image, int]]):
    """The image files under a folder, with class sub-folders or without labels.

    The folder is walked recursively (following links as torchvision's
    ``ImageFolder`` does, so a folder linked into two class folders counts in both,
    with a warning; skipping hidden files and folders, and links back to an
    ancestor). Files with an extension in ``IMAGE_EXTENSIONS`` (case-insensitive) are
    images; other files are ignored and counted in ``skipped_non_image``. Images
    are sorted by relative path.

    Class sub-folders: with ``class_folders=None`` the folder is labelled when no
    image lies directly in it and at least two of its sub-folders hold images; then
    every (non-hidden) sub-folder is a class, labels are indices into the sorted
    folder names, and images in deeper folders belong to their top sub-folder.
    Otherwise all labels are ``-1``. ``class_folders=True`` or ``False`` forces it.

    Corrupt files: with ``verify=True`` every image is opened with PIL and
    ``verify()``-ed once; failures are skipped, counted in ``skipped_corrupt`` and
    reported by one warning. Should an image still fail to load in
    ``__getitem__``, the next loadable one is returned instead and the failure is
    counted in ``load_failures`` (per process), so an epoch never crashes.

    Images are returned in their own mode (grayscale, RGBA, 16-bit, palette, ...);
    the transforms convert them to RGB.

    Args:
        root: The folder.
        class_folders: Whether sub-folders are classes; ``None`` decides as above.
        verify: Check every image at construction.
        classes: The class names (label order) to use instead of the sub-folders'
            (the evaluation folder of a ``train/`` + ``val/`` layout uses those of
            ``train/``); an image in another sub-folder is an error.

    Raises:
        DatasetError: ``root`` is not a folder, holds no images, holds no readable
            image, or ``class_folders=True`` with images directly in ``root``.
    """

    def __init__(
        self,
        root: str | Path,
        class_folders: bool | None = None,
        verify: bool = True,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(f"imagefolder: {self.root} {what}")
        files, self.skipped_non_image = self._scan()
        if not files:
            raise DatasetError(
                f"imagefolder: no images found in {self.root} (searched recursively "
                f"for {' '.join(IMAGE_EXTENSIONS)}, case-insensitive; "
                f"{self.skipped_non_image} other files ignored)"
            )
        self.classes = (
            list(classes)
            if classes is not None
            else self._classes(files, class_folders)
        )
        corrupt: list[Path] = []
        if verify:
            good: list[Path] = []
            for path in files:
                try:
                    with Image.open(path) as image:
                        image.verify()
                    good.append(path)
                except Exception:
                    corrupt.append(path)
            files = good
        self.skipped_corrupt = len(corrupt)
        self.corrupt_files = corrupt
        if not files:
            raise DatasetError(
                f"imagefolder: none of the {len(corrupt)} image files in {self.root} "
                f"could be opened (e.g. {corrupt[0]})"
            )
        if corrupt:
            examples = ", ".join(str(p.relative_to(self.root)) for p in corrupt[:3])
            more = ", ..." if len(corrupt) > 3 else ""
            warnings.warn(
                f"imagefolder {self.root}: skipped {len(corrupt)} corrupt or "
                f"unreadable image file(s) ({examples}{more}) and ignored "
                f"{self.skipped_non_image} non-image file(s)",
                UserWarning,
                stacklevel=2,
            )
        elif self.skipped_non_image:
            logger.info(
                "imagefolder %s: ignored %d non-image file(s)",
                self.root,
                self.skipped_non_image,
            )
        self.paths = files
        if self.classes is None:
            self.labels = np.full(len(files), -1, dtype=np.int64)
        else:
            index = {name: i for i, name in enumerate(self.classes)}
            folders = [p.relative_to(self.root).parts[0] for p in files]
            unknown = sorted(set(folders) - set(index))
            if unknown:
                raise DatasetError(
                    f"imagefolder: {self.root} has images in {unknown[0]}/, which is "
                    f"not a class of the training images ({', '.join(self.classes)})"
                )
            self.labels = np.asarray([index[f] for f in folders], dtype=np.int64)
            self._warn_linked_across_classes()
        self.load_failures = 0
        self._failed: set[int] = set()

    def _scan(self) -> tuple[list[Path], int]:
        """Image files (sorted by relative path) and the number of other files."""
        files: list[Path] = []
        non_image = 0
        # Links are followed as torchvision's ImageFolder follows them (a folder
        # linked into two class folders is read under both); only a link back to a
        # folder's own ancestor (a cycle) is not entered again.
        ancestors: dict[str, frozenset[str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            above = ancestors.get(os.path.dirname(dirpath), frozenset())
            if real in above:  # a link cycle
                dirnames[:] = []
                continue
            ancestors[dirpath] = above | {real}
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(Path(dirpath) / name)
                else:
                    non_image += 1
        files.sort(key=lambda p: p.relative_to(self.root).as_posix())
        return files, non_image

    def _classes(
        self, files: Sequence[Path], class_folders: bool | None
    ) -> list[str] | None:
        """Sorted class folder names, or ``None`` for an unlabelled folder."""
        loose = [p for p in files if p.parent == self.root]
        with_images = {p.relative_to(self.root).parts[0] for p in files} - {
            p.name for p in loose
        }
        if class_folders is None:
            class_folders = not loose and len(with_images) >= 2
        if not class_folders:
            return None
        if loose:
            raise DatasetError(
                f"imagefolder: class_folders is set but {len(loose)} images lie "
                f"directly in {self.root} (e.g. {loose[0].name}); put every image "
                "in a class sub-folder"
            )
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".")
        )

    def _warn_linked_across_classes(self) -> None:
        """Warns when one image file is reached, through links, in two classes."""
        labels_of: dict[str, set[int]] = {}
        for path, label in zip(self.paths, self.labels, strict=True):
            labels_of.setdefault(os.path.realpath(path), set()).add(int(label))
        shared = [real for real, labels in labels_of.items() if len(labels) > 1]
        if shared:
            warnings.warn(
                f"imagefolder {self.root}: {len(shared)} image file(s) are reached "
                f"through links in more than one class folder (e.g. {shared[0]}); "
                "each copy has the label of the folder it is found in, as with "
                "torchvision's ImageFolder",
                UserWarning,
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.paths)
        for step in range(n):
            i = (index + step) % n
            if i in self._failed:
                continue
            try:
                return _load_image(self.paths[i]), int(self.labels[i])
            except Exception as error:
                self._failed.add(i)
                self.load_failures += 1
                if self.load_failures == 1:
                    warnings.warn(
                        f"imagefolder: cannot load {self.paths[i]} "
                        f"({_one_line(error)}); using the next image instead, "
                        "further failures are counted in load_failures",
                        UserWarning,
                        stacklevel=2,
                    )
        raise DatasetError(f"imagefolder: no image in {self.root} can be loaded")


class _ImagePart(Dataset[tuple[Image.Image, int]]):
    """Some of the images of an ``ImageFiles`` (one side of a fixed split)."""

    def __init__(self, files: ImageFiles, indices: Sequence[int]) -> None:
        self.files = files
        self.indices = list(indices)
        self.classes = files.classes
        self.paths = [files.paths[i] for i in self.indices]
        self.labels = files.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.files[self.indices[index]]

    @property
    def skipped_corrupt(self) -> int:
        return self.files.skipped_corrupt

    @property
    def skipped_non_image(self) -> int:
        return self.files.skipped_non_image

    @property
    def load_failures(self) -> int:
        return self.files.load_failures


def imagefolder_split_folders(root: Path) -> tuple[Path, Path] | None:
    """``(root/train, root/val)`` (or ``root/test``) when both exist, else None."""
    train = root / "train"
    if not train.is_dir():
        return None
    for name in HELD_OUT_FOLDERS:
        if (root / name).is_dir():
            return train, root / name
    return None


def imagefolder_split_indices(labels: np.ndarray, train: bool) -> np.ndarray:
    """The fixed split of a labelled image folder without split folders.

    Every class is permuted by one ``numpy.random.RandomState(IMAGEFOLDER_SPLIT_SEED)``
    (classes in order, images by sorted path); ``IMAGEFOLDER_TEST_FRACTION`` of it,
    rounded and at least one image when the class has two or more, is held out for
    evaluation, the rest is the training split.

    Returns:
        Sorted indices of the train or the held-out split.
    """
    state = np.random.RandomState(IMAGEFOLDER_SPLIT_SEED)
    chosen: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[state.permutation(len(members))]
        n_test = 0
        if len(members) >= 2:
            n_test = max(1, int(round(IMAGEFOLDER_TEST_FRACTION * len(members))))
        part = members[n_test:] if train else members[:n_test]
        chosen.extend(int(i) for i in part)
    return np.asarray(sorted(chosen), dtype=np.int64)


def _build_imagefolder(
    root: Path | None, class_folders: bool | None, verify: bool, train: bool = True
) -> LabeledImages:
    if root is None:
        raise DatasetError("imagefolder needs root: the folder of images")
    root = Path(root).expanduser()
    folders = imagefolder_split_folders(root)
    base: ImageFiles | _ImagePart
    if folders is not None:
        train_dir, held_dir = folders
        if train:
            base = ImageFiles(train_dir, class_folders=class_folders, verify=verify)
        else:
            # The class list (and label indices) of the training images.
            classes = ImageFiles(train_dir, class_folders, verify=False).classes
            base = ImageFiles(
                held_dir,
                class_folders=classes is not None,
                verify=verify,
                classes=classes,
            )
        split, source = (train_dir.name if train else held_dir.name), str(base.root)
    else:
        files = ImageFiles(root, class_folders=class_folders, verify=verify)
        base, split, source = files, "", str(files.root)
        if files.classes is not None:
            indices = imagefolder_split_indices(files.labels, train)
            if len(indices) == 0:
                raise DatasetError(
                    f"imagefolder: {root} has no class with two or more images, so "
                    "no image can be held out for evaluation; add images or "
                    "train/ and val/ sub-folders"
                )
            base = _ImagePart(files, indices.tolist())
            percent = int(round(100 * IMAGEFOLDER_TEST_FRACTION))
            split = "train" if train else "test"
            which = (
                f"the {100 - percent} % of each class not held out"
                if train
                else f"{percent} % of each class held out for evaluation"
            )
            source = (
                f"{files.root} ({which}: fixed split, seed {IMAGEFOLDER_SPLIT_SEED}; "
                "no train/ and val/ or test/ sub-folders)"
            )
    return LabeledImages(
        base,
        base.labels,
        kind="imagefolder",
        split=split,
        source=source,
        num_classes=len(base.classes) if base.classes is not None else None,
        classes=base.classes,
    )


# --------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------


def build_dataset(
    kind: str,
    *,
    root: str | Path | None = None,
    train: bool = True,
    transform: ImageTransform | None = None,
    subset: int | None = None,
    seed: int = 0,
    download: bool = False,
    stl10_unlabeled: bool = False,
    class_folders: bool | None = None,
    verify_images: bool = True,
    clamp_subset: bool = False,
) -> LabeledImages:
    """Builds a dataset of ``(transform(image), label)`` items.

    Args:
        kind: One of ``SUPPORTED_KINDS`` (case-insensitive, ``-`` for ``_``):
            ``fashion_mnist``, ``digits``, ``cifar10``, ``cifar100``, ``stl10``,
            ``imagefolder``.
        root: Folder of the data. Defaults: ``FASHION_MNIST_ROOT`` for
            ``fashion_mnist``, ``DEFAULT_ROOT`` (``./data``) for the torchvision
            kinds; required for ``imagefolder``; ignored for ``digits``.
        train: Train split, else test split. For ``digits`` a fixed 80/20 split
            (see ``digits_split_indices``). For ``imagefolder``: the ``train/`` and
            ``val/`` (or ``test/``) sub-folders when both exist; otherwise, for a
            labelled folder, a fixed 80/20 split of every class (see
            ``imagefolder_split_indices``); an unlabelled folder is not split.
        transform: Applied to each PIL image, e.g. ``build_transform(...)`` or
            ``eval_transform(...)``; ``None`` returns the PIL image.
        subset: Keep a random subset of this many items, drawn by a
            ``torch.randperm`` seeded with ``seed`` (kept in dataset order).
        seed: Seed of the subset.
        download: Fetch missing files (``fashion_mnist``, ``cifar10``, ``cifar100``,
            ``stl10``); never done otherwise.
        stl10_unlabeled: For ``stl10`` with ``train=True``: the ``train+unlabeled``
            split (the 100k unlabelled images get label ``-1``).
        class_folders: For ``imagefolder``: whether sub-folders are classes;
            ``None`` detects it (see ``ImageFiles``).
        verify_images: For ``imagefolder``: check every image file when building.
        clamp_subset: A ``subset`` larger than the dataset means all of it
            (``describe()`` says so) instead of an error.

    Returns:
        A ``LabeledImages`` with ``num_classes``, ``has_labels``, ``kind`` and
        ``describe()``.

    Raises:
        DatasetError: Unknown kind, missing or corrupt files, empty folder, or a bad
            ``subset``.
    """
    name = kind.strip().lower().replace("-", "_")
    if name not in SUPPORTED_KINDS:
        raise DatasetError(
            f"unknown dataset kind {kind!r}; supported kinds: "
            f"{', '.join(SUPPORTED_KINDS)}"
        )
    path = Path(root).expanduser() if root is not None else None
    dataset: LabeledImages
    if name == "fashion_mnist":
        dataset = _build_fashion_mnist(path or FASHION_MNIST_ROOT, train, download)
    elif name == "digits":
        dataset = _build_digits(train)
    elif name == "imagefolder":
        dataset = _build_imagefolder(path, class_folders, verify_images, train)
    else:
        dataset = _build_torchvision(
            name, path or DEFAULT_ROOT, train, download, stl10_unlabeled
        )
    dataset.transform = transform
    if subset is not None:
        n = dataset.base_size
        if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
            raise DatasetError(f"subset must be a positive integer, got {subset!r}")
        if subset >= n and clamp_subset:
            dataset.subset_clamped_from = subset if subset > n else None
            return dataset
        if subset > n:
            raise DatasetError(
                f"subset={subset} is larger than {dataset.describe()} ({n} images)"
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=generator)[:subset]
        dataset.indices = sorted(int(i) for i in chosen)
        dataset.subset_seed = seed
    return dataset


def eval_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic transform for evaluation (kNN, linear probe, export checks).

    Converts to RGB (``_ToRGB``, as the training views), resizes the shorter side to
    ``input_size`` (bilinear) and centre-crops a square, then ``ToTensor`` and the
    ImageNet normalisation that ``MoCoV2Transform`` uses.

    Args:
        input_size: Side of the output images.

    Returns:
        A callable mapping a PIL image to a ``(3, input_size, input_size)`` tensor.
    """
    transform: Callable[[Image.Image], torch.Tensor] = T.Compose(
        [
            _ToRGB(),
            T.Resize(input_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
        ]
    )
    return transform


def default_dataset_kind(root: str | Path | None = None) -> str:
    """``"fashion_mnist"`` if its idx files exist, else ``"digits"``.

    Args:
        root: Where to look for Fashion-MNIST's train and test files (default
            ``FASHION_MNIST_ROOT``, the Debian package's folder).

    Returns:
        The kind the quickstart uses (``kind: auto``); ``describe()`` of the built
        dataset says which, and why when it is the digits fallback
        (:func:`fallback_note`).
    """
    folder = Path(root).expanduser() if root is not None else FASHION_MNIST_ROOT
    train = _fashion_mnist_files(folder, train=True)
    test = _fashion_mnist_files(folder, train=False)
    if all(path is not None for path in train + test):
        return "fashion_mnist"
    return "digits"


def fallback_note(root: str | Path | None = None) -> str:
    """What ``describe()`` adds when ``kind: auto`` fell back to digits."""
    folder = Path(root).expanduser() if root is not None else FASHION_MNIST_ROOT
    return (
        f"data.kind auto: no Fashion-MNIST in {folder}, so scikit-learn's digits; "
        "accuracies on digits are not comparable with README's Fashion-MNIST numbers"
    )
