"""``LabeledImages``, the dataset every kind gives; ``ArrayImages``, in-memory images.

Every dataset kind gives items ``(transform(image), label)`` where ``image`` is a PIL
image and ``label`` an ``int`` (``-1`` where the dataset has no labels), wrapped in
``LabeledImages`` so that all kinds expose the same ``num_classes``, ``has_labels``,
``kind`` and ``describe()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

ImageTransform = Callable[[Image.Image], Any]


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
