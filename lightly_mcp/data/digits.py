"""scikit-learn's bundled 8x8 digits (no files needed), split 80/20 by a fixed
permutation: the quickstart's fallback where Fashion-MNIST is not installed.
"""

from __future__ import annotations

import numpy as np

from lightly_mcp.data.labeled_images import ArrayImages, LabeledImages

DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SPLIT_SEED = 0


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


def build_digits(train: bool) -> LabeledImages:
    """The digits' train or test split as ``LabeledImages`` of 8x8 mode "L" images.

    Args:
        train: The train split, else the test split (see ``digits_split_indices``).

    Returns:
        The split, pixel values scaled from 0..16 to 0..255, classes ``"0"``..``"9"``.
    """
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
