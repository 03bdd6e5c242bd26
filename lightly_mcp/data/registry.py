"""The dataset kinds by name, and ``build_dataset``, the one door to all of them.

As timm's ``create_model``, a name picks the builder: ``DATASET_SOURCES`` maps every
kind to a function of the ``SourceRequest`` (what ``build_dataset`` was asked for)
that builds the full split; ``build_dataset`` then sets the transform and draws the
subset, the same for every kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightly_mcp.data.digits import build_digits
from lightly_mcp.data.fashion_mnist import build_fashion_mnist
from lightly_mcp.data.imagefolder import build_imagefolder
from lightly_mcp.data.labeled_images import ImageTransform, LabeledImages
from lightly_mcp.data.torchvision_sources import build_torchvision
from lightly_mcp.errors import DatasetError


@dataclass(frozen=True)
class SourceRequest:
    """The arguments of ``build_dataset`` that a source reads (see there)."""

    root: Path | None
    train: bool
    download: bool
    stl10_unlabeled: bool
    class_folders: bool | None
    verify_images: bool


DatasetSource = Callable[[SourceRequest], LabeledImages]
"""Builds the full train or test split of one kind, without transform or subset."""

DATASET_SOURCES: dict[str, DatasetSource] = {
    "fashion_mnist": lambda r: build_fashion_mnist(r.root, r.train, r.download),
    "digits": lambda r: build_digits(r.train),
    "cifar10": lambda r: build_torchvision("cifar10", r.root, r.train, r.download),
    "cifar100": lambda r: build_torchvision("cifar100", r.root, r.train, r.download),
    "stl10": lambda r: build_torchvision(
        "stl10", r.root, r.train, r.download, r.stl10_unlabeled
    ),
    "imagefolder": lambda r: build_imagefolder(
        r.root, r.class_folders, r.verify_images, r.train
    ),
}
"""Every dataset kind and the function that builds it."""

SUPPORTED_KINDS: tuple[str, ...] = tuple(DATASET_SOURCES)
"""The values accepted as ``kind`` by ``build_dataset``."""


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
    classes: Sequence[int | str] | None = None,
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
        classes: Keep only the images of these classes (ids or names), relabelled
            ``0..len(classes)-1`` in the order of their ids (see
            ``LabeledImages.keep_classes``); ``subset`` is drawn from them.

    Returns:
        A ``LabeledImages`` with ``num_classes``, ``has_labels``, ``kind`` and
        ``describe()``.

    Raises:
        DatasetError: Unknown kind, missing or corrupt files, empty folder, or a bad
            ``subset``.

    Examples:
        >>> from lightly_mcp.data import build_dataset, eval_transform
        >>> dataset = build_dataset("digits", transform=eval_transform(32))
        >>> dataset.describe()
        'digits train: 1438 images, 10 classes, from scikit-learn load_digits (8x8)'
        >>> image, label = dataset[0]
        >>> tuple(image.shape), label
        ((3, 32, 32), 0)
    """
    name = kind.strip().lower().replace("-", "_")
    source = DATASET_SOURCES.get(name)
    if source is None:
        raise DatasetError(
            f"unknown dataset kind {kind!r}; supported kinds: "
            f"{', '.join(SUPPORTED_KINDS)}"
        )
    dataset = source(
        SourceRequest(
            root=Path(root).expanduser() if root is not None else None,
            train=train,
            download=download,
            stl10_unlabeled=stl10_unlabeled,
            class_folders=class_folders,
            verify_images=verify_images,
        )
    )
    dataset.transform = transform
    if classes is not None:
        dataset.keep_classes(classes)
    if subset is not None:
        pool = dataset.pool
        n = len(pool)
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
        dataset.indices = sorted(pool[int(i)] for i in chosen)
        dataset.subset_seed = seed
    return dataset
