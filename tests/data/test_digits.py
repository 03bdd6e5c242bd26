"""Tests of lightly_mcp.data.digits (scikit-learn's digits)."""

from __future__ import annotations

import numpy as np

from lightly_mcp.data import build_dataset, digits_split_indices
from tests.data.writers import as_array


def test_digits_split() -> None:
    train = build_dataset("digits", train=True)
    test = build_dataset("digits", train=False)
    assert (len(train), len(test)) == (1438, 359)
    tr, te = digits_split_indices(True), digits_split_indices(False)
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(1797))
    np.testing.assert_array_equal(tr, digits_split_indices(True))  # deterministic
    assert train.targets == build_dataset("digits").targets
    assert set(train.targets) == set(range(10)) and set(test.targets) <= set(range(10))
    assert train.num_classes == 10 and train.has_labels and train.kind == "digits"
    assert train.describe().startswith("digits train: 1438 images, 10 classes, from ")

    from sklearn.datasets import load_digits

    digits = load_digits()
    image, label = test[0]
    assert image.mode == "L" and image.size == (8, 8)
    expected = np.round(digits.images[te[0]] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(as_array(image), expected)
    assert label == digits.target[te[0]]
    pixels = np.stack([as_array(train[i][0]) for i in range(50)])
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255
