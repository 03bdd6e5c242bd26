"""Any folder of images, with class sub-folders or without labels.

With ``train/`` and ``val/`` (or ``test/``) sub-folders those are the two splits;
otherwise a labelled folder is split by a fixed 80/20 split of every class, so that
evaluation never tests on the training images.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from lightly_mcp.data.labeled_images import LabeledImages
from lightly_mcp.errors import DatasetError, describe_flat

logger = logging.getLogger(__name__)

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

IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_SPLIT_SEED = 0
HELD_OUT_FOLDERS = ("val", "test")
"""Sub-folders (beside ``train/``) that hold an image folder's evaluation images."""


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
                f"imagefolder: no image files (.png, .jpg, …) in {self.root} "
                f"({self.skipped_non_image} other files); set data.root to a folder "
                "of images"
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
                f"imagefolder: none of the {len(corrupt)} images in {self.root} can "
                f"be opened (e.g. {corrupt[0].relative_to(self.root)}); replace them"
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
                path = os.path.join(dirpath, name)
                # A FIFO or device named like an image would block or never end
                # when opened: only regular files (or links to them) are images.
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and (
                    os.path.isfile(path)
                ):
                    files.append(Path(path))
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
                        f"({describe_flat(error)}); using the next image instead, "
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


def build_imagefolder(
    root: str | Path | None,
    class_folders: bool | None,
    verify: bool,
    train: bool = True,
) -> LabeledImages:
    """The train or evaluation images of a folder as ``LabeledImages``.

    Args:
        root: The folder; required.
        class_folders: Whether sub-folders are classes; ``None`` detects it (see
            ``ImageFiles``).
        verify: Check every image file when building.
        train: The ``train/`` sub-folder, else ``val/`` (or ``test/``) when both
            exist; otherwise, for a labelled folder, the two sides of a fixed 80/20
            split of every class (see ``imagefolder_split_indices``); an unlabelled
            folder is not split.

    Returns:
        The images, with the class names of the training images.

    Raises:
        DatasetError: No ``root``, a labelled folder without a class of two or
            more images to hold out, or see ``ImageFiles``.
    """
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
