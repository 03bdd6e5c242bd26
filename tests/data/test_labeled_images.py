"""Tests of lightly_mcp.data.labeled_images: one dataset type for every kind."""

from __future__ import annotations

import numpy as np
import pytest

from lightly_mcp.data.labeled_images import ArrayImages, LabeledImages, _id_ranges
from lightly_mcp.errors import DatasetError


def _images(labels: list[int]) -> LabeledImages:
    images = np.arange(len(labels) * 4, dtype=np.uint8).reshape(len(labels), 2, 2)
    return LabeledImages(
        ArrayImages(images, np.asarray(labels)),
        labels,
        kind="toy",
        split="train",
        source="memory",
        num_classes=4,
        classes=["a", "b", "c", "d"],
    )


def test_keep_classes_relabels_in_id_order_and_maps_every_access() -> None:
    data = _images([0, 3, 1, 3, 2, 0])
    assert data.base_size == 6 and data.pool == list(range(6))
    data.keep_classes(["d", 1])
    assert data.kept_classes == [1, 3] and data.classes == ["b", "d"]
    assert (data.num_classes, data.base_num_classes) == (2, 4)
    assert data.indices == [1, 2, 3]
    assert data.targets == [1, 0, 1]  # class 1 -> 0, class 3 -> 1
    assert [data[i][1] for i in range(len(data))] == [1, 0, 1]
    np.testing.assert_array_equal(np.asarray(data[1][0]), np.asarray(data.base[2][0]))
    assert data.base_size == 3 and data.pool == [1, 2, 3]
    assert [data.label_of(i) for i in range(4)] == [-1, 0, -1, 1]
    assert (
        data.describe()
        == "toy train classes 1,3 of 4: 3 images, 2 classes, from memory"
    )


def test_keep_classes_refuses_what_it_cannot_keep() -> None:
    with pytest.raises(
        DatasetError, match=r"toy train has no class 4: give ids 0\.\.3"
    ):
        _images([0, 1]).keep_classes([4])
    with pytest.raises(DatasetError, match="names: a, b, c, d"):
        _images([0, 1]).keep_classes(["e"])
    unlabelled = LabeledImages(
        ArrayImages(np.zeros((2, 2, 2), np.uint8), np.full(2, -1)),
        [-1, -1],
        kind="imagefolder",
        split="",
        source="/x",
        num_classes=None,
    )
    with pytest.raises(DatasetError, match="imagefolder has no labels"):
        unlabelled.keep_classes([0])


@pytest.mark.parametrize(
    ("ids", "text"),
    [([0], "0"), ([0, 1, 2, 3, 4], "0-4"), ([0, 2, 3, 7], "0,2-3,7"), ([5, 9], "5,9")],
)
def test_id_ranges(ids: list[int], text: str) -> None:
    assert _id_ranges(ids) == text
