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

from lightly_mcp.errors import DatasetError

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
        #: With :meth:`keep_classes`: the base classes kept, in label order.
        self.kept_classes: list[int] | None = None
        #: Number of classes of the full dataset (before :meth:`keep_classes`).
        self.base_num_classes = num_classes
        self._label_map: np.ndarray | None = None

    def keep_classes(self, wanted: Sequence[int | str]) -> None:
        """Keeps only the items of these classes, relabelled ``0..len(wanted)-1``.

        The labels choose the images and nothing else: the kept classes are
        renumbered in the order of their original ids (``[5, 1]`` gives class 1 the
        label 0 and class 5 the label 1), and ``classes`` and ``num_classes``
        describe the kept ones. Call it before drawing a ``subset`` (which then draws
        from the kept items); ``build_dataset(classes=...)`` does both.

        Args:
            wanted: Class ids (``0..num_classes-1``) or class names, distinct.

        Raises:
            DatasetError: The dataset has no labels, a class is unknown, a class is
                named twice, or no class is given.
        """
        name = f"{self.kind} {self.split}".strip()
        if not self.has_labels or self.base_num_classes is None:
            raise DatasetError(
                f"{name} has no labels, so no classes can be chosen; remove "
                "'classes' or use a dataset with class sub-folders"
            )
        if not wanted:
            raise DatasetError("classes: give at least one class id or name")
        names = self.classes or []
        ids: list[int] = []
        for item in wanted:
            if isinstance(item, str) and item in names:
                ids.append(names.index(item))
            elif (
                isinstance(item, int)
                and not isinstance(item, bool)
                and 0 <= item < self.base_num_classes
            ):
                ids.append(item)
            else:
                known = f"; names: {', '.join(names)}" if names else ""
                raise DatasetError(
                    f"{name} has no class {item!r}: give ids "
                    f"0..{self.base_num_classes - 1}"
                    f"{known}"
                )
        if len(set(ids)) != len(ids):
            raise DatasetError(f"classes {list(wanted)!r} name a class twice")
        ids.sort()
        label_map = np.full(self.base_num_classes, -1, dtype=np.int64)
        label_map[ids] = np.arange(len(ids))
        keep = label_map[self.base_labels.clip(0)] >= 0
        keep &= self.base_labels >= 0
        self.indices = [int(i) for i in np.flatnonzero(keep)]
        self._label_map = label_map
        self.kept_classes = ids
        self.classes = [names[i] for i in ids] if names else None
        self.num_classes = len(ids)

    def label_of(self, base_label: int) -> int:
        """The label an item of the base dataset gets (after :meth:`keep_classes`)."""
        if self._label_map is None or base_label < 0:
            return int(base_label)
        return int(self._label_map[base_label])

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
        return image, self.label_of(int(label))

    @property
    def base_size(self) -> int:
        """Number of items of the full dataset, before ``subset`` (after
        :meth:`keep_classes`: the items of the kept classes).
        """
        return (
            len(self.pool) if self.kept_classes is not None else len(self.base_labels)
        )

    @property
    def pool(self) -> list[int]:
        """Indices into ``base`` that a ``subset`` is drawn from: all items, or the
        items of the kept classes.
        """
        if self.kept_classes is not None:
            mask = np.isin(self.base_labels, self.kept_classes)
            return [int(i) for i in np.flatnonzero(mask)]
        return list(range(len(self.base_labels)))

    @property
    def targets(self) -> list[int]:
        """Labels of all items in order (``-1`` where unlabelled), without decoding."""
        if self.indices is None:
            return [self.label_of(int(v)) for v in self.base_labels]
        return [self.label_of(int(self.base_labels[i])) for i in self.indices]

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
        if self.kept_classes is not None:
            name += (
                f" classes {_id_ranges(self.kept_classes)} of {self.base_num_classes}"
            )
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


def _id_ranges(ids: Sequence[int]) -> str:
    """``[0, 1, 2, 4]`` as ``"0-2,4"``."""
    parts: list[str] = []
    start = previous = ids[0]
    for i in list(ids[1:]) + [None]:
        if i is not None and i == previous + 1:
            previous = i
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if i is not None:
            start = previous = i
    return ",".join(parts)


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
