"""The datasets of the pipeline behind one entry point, ``build_dataset``.

Every kind gives items ``(transform(image), label)`` where ``image`` is a PIL image
and ``label`` an ``int`` (``-1`` where the dataset has no labels), wrapped in
``LabeledImages`` so that all kinds expose the same ``num_classes``, ``has_labels``,
``kind`` and ``describe()``. The kinds, one module each, are looked up by name in
``registry.DATASET_SOURCES``:

    ``fashion_mnist`` (``fashion_mnist.py``): the idx files (``.gz`` or plain) of the
        Debian package ``dataset-fashion-mnist`` in ``/usr/share/datasets/
        fashion-mnist`` or any folder given as ``root``; parsed with numpy.
    ``digits`` (``digits.py``): scikit-learn's bundled 8x8 digits (no files needed),
        split 80/20 by a fixed permutation.
    ``cifar10``, ``cifar100``, ``stl10`` (``torchvision_sources.py``): torchvision's
        datasets. Files are downloaded only with ``download=True`` (``download:
        true`` in a recipe). A user-supplied copy is trusted: its files are checked
        for existence, not against torchvision's md5 sums, so corrupt files fail
        with a clear error when parsed.
    ``imagefolder`` (``imagefolder.py``): any folder of images, with class
        sub-folders or without labels. With ``train/`` and ``val/`` (or ``test/``)
        sub-folders those are the two splits; otherwise a labelled folder is split
        by a fixed 80/20 split of every class, so that evaluation never tests on the
        training images.

``kind: auto`` (``default_kind.py``) is Fashion-MNIST where it is installed, else
digits. The evaluation transform, ``eval_transform``, lives in
``lightly_mcp.methods.transforms`` beside the training views.
"""

from lightly_mcp.data.default_kind import default_dataset_kind, fallback_note
from lightly_mcp.data.digits import (
    DIGITS_SPLIT_SEED,
    DIGITS_TRAIN_FRACTION,
    digits_split_indices,
)
from lightly_mcp.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    read_idx,
)
from lightly_mcp.data.imagefolder import (
    HELD_OUT_FOLDERS,
    IMAGE_EXTENSIONS,
    IMAGEFOLDER_SPLIT_SEED,
    IMAGEFOLDER_TEST_FRACTION,
    ImageFiles,
    imagefolder_split_folders,
    imagefolder_split_indices,
)
from lightly_mcp.data.labeled_images import ArrayImages, ImageTransform, LabeledImages
from lightly_mcp.data.registry import (
    DATASET_SOURCES,
    SUPPORTED_KINDS,
    DatasetSource,
    SourceRequest,
    build_dataset,
)
from lightly_mcp.data.torchvision_sources import (
    DEFAULT_ROOT,
    TrustedCIFAR10,
    TrustedCIFAR100,
    TrustedSTL10,
)
from lightly_mcp.errors import DatasetError
from lightly_mcp.methods.transforms import eval_transform

__all__ = [
    "DATASET_SOURCES",
    "DEFAULT_ROOT",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TRAIN_FRACTION",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "HELD_OUT_FOLDERS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGEFOLDER_SPLIT_SEED",
    "IMAGEFOLDER_TEST_FRACTION",
    "IMAGE_EXTENSIONS",
    "SUPPORTED_KINDS",
    "ArrayImages",
    "DatasetError",
    "DatasetSource",
    "ImageFiles",
    "ImageTransform",
    "LabeledImages",
    "SourceRequest",
    "TrustedCIFAR10",
    "TrustedCIFAR100",
    "TrustedSTL10",
    "build_dataset",
    "default_dataset_kind",
    "digits_split_indices",
    "eval_transform",
    "fallback_note",
    "imagefolder_split_folders",
    "imagefolder_split_indices",
    "read_idx",
]
