"""Tests of lightly_mcp.data.fashion_mnist on tiny idx files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightly_mcp.data import build_dataset, eval_transform
from lightly_mcp.errors import DatasetError
from tests.data.writers import as_array, write_fashion_mnist, write_idx


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path: Path, gz: bool) -> None:
    written = write_fashion_mnist(tmp_path, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        ds = build_dataset("fashion_mnist", root=tmp_path, train=train)
        images, labels = written[prefix]
        assert len(ds) == len(images)
        assert ds.kind == "fashion_mnist" and ds.has_labels and ds.num_classes == 10
        for i in range(len(ds)):
            image, label = ds[i]
            assert isinstance(image, Image.Image)
            assert image.mode == "L" and image.size == (28, 28)
            np.testing.assert_array_equal(as_array(image), images[i])
            assert label == labels[i] and isinstance(label, int)
        assert ds.targets == [int(v) for v in labels]
    ds = build_dataset("fashion_mnist", root=tmp_path)
    assert (
        ds.describe() == f"fashion_mnist train: 5 images, 10 classes, from {tmp_path}"
    )
    ds = build_dataset("fashion-MNIST", root=tmp_path, train=False)
    assert ds.describe().startswith("fashion_mnist test: 3 images, 10 classes")


def test_fashion_mnist_other_image_size_and_transform(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, size=7)
    ds = build_dataset("fashion_mnist", root=tmp_path, transform=eval_transform(16))
    image, _ = ds[0]
    assert image.shape == (3, 16, 16)
    raw = build_dataset("fashion_mnist", root=tmp_path)[0][0]
    assert raw.size == (7, 7)


def test_fashion_mnist_bad_magic_names_the_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(bad, np.zeros((2, 28, 28), np.uint8), 1234)
    with pytest.raises(
        DatasetError,
        match="corrupt idx file .*train-images-idx3-ubyte.gz.*magic number 1234",
    ):
        build_dataset("fashion_mnist", root=tmp_path)
    # The test split is unaffected.
    assert len(build_dataset("fashion_mnist", root=tmp_path, train=False)) == 3


def test_fashion_mnist_truncated_and_not_gzip(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(
        DatasetError, match="train-images-idx3-ubyte: its header gives 3920 bytes"
    ):
        build_dataset("fashion_mnist", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        build_dataset("fashion_mnist", root=tmp_path, train=False)


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), 2049)
    with pytest.raises(DatasetError, match=r"5 images \(train-images.*\) but 4 labels"):
        build_dataset("fashion_mnist", root=tmp_path)


def test_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="not found") as info:
        build_dataset("fashion_mnist", root=missing)
    message = str(info.value)
    assert str(missing) in message and "dataset-fashion-mnist" in message
    assert "\n" not in message
