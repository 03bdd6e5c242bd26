"""Tests of lightly_mcp.data.torchvision_sources on tiny CIFAR and STL-10 files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightly_mcp.data import build_dataset, eval_transform
from lightly_mcp.errors import DatasetError
from tests.data.writers import (
    as_array,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_stl10,
)


def test_cifar10_without_download(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    train = build_dataset("cifar10", root=tmp_path)
    test = build_dataset("cifar10", root=tmp_path, train=False)
    assert (len(train), len(test)) == (10, 3)
    assert (
        train.num_classes == 10
        and train.has_labels
        and train.classes == written["names"]
    )
    images, labels = written["train"]
    for i in range(len(train)):
        image, label = train[i]
        assert image.mode == "RGB" and image.size == (32, 32)
        np.testing.assert_array_equal(as_array(image), images[i])
        assert label == labels[i]
    assert test.targets == written["test"][1]
    assert train.describe() == f"cifar10 train: 10 images, 10 classes, from {tmp_path}"


def test_cifar100_without_download(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    train = build_dataset("cifar100", root=tmp_path, transform=eval_transform(8))
    assert train.num_classes == 100 and len(train) == 4
    assert train.targets == written["train"][1]
    image, label = train[0]
    assert image.shape == (3, 8, 8) and label == 99
    test = build_dataset("cifar100", root=tmp_path, train=False)
    np.testing.assert_array_equal(as_array(test[1][0]), written["test"][0][1])
    assert test.targets == [3, 98]


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "stl10"])
def test_torchvision_missing_files_mention_download(tmp_path: Path, kind: str) -> None:
    with pytest.raises(DatasetError, match="download: true") as info:
        build_dataset(kind, root=tmp_path / "empty")
    message = str(info.value)
    assert str(tmp_path / "empty") in message and "\n" not in message


def test_cifar10_partial_and_corrupt(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(
        DatasetError, match=r"data_batch_3 missing in .*cifar-10-batches-py"
    ):
        build_dataset("cifar10", root=tmp_path)
    # The test split does not need the train batches.
    assert len(build_dataset("cifar10", root=tmp_path, train=False)) == 3
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read .*test_batch"):
        build_dataset("cifar10", root=tmp_path, train=False)


def test_stl10(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    train = build_dataset("stl10", root=tmp_path)
    test = build_dataset("stl10", root=tmp_path, train=False)
    assert (len(train), len(test)) == (3, 2)
    assert train.num_classes == 10 and train.classes == [f"name{i}" for i in range(10)]
    assert train.targets == [0, 9, 3] and test.targets == [0, 9]
    for ds, split in ((train, "train"), (test, "test")):
        for i in range(len(ds)):
            image, _ = ds[i]
            assert image.mode == "RGB" and image.size == (96, 96)
            np.testing.assert_array_equal(as_array(image), written[split][0][i])
    both = build_dataset("stl10", root=tmp_path, stl10_unlabeled=True)
    assert len(both) == 5 and both.targets == [0, 9, 3, -1, -1]
    np.testing.assert_array_equal(as_array(both[4][0]), written["unlabeled"][0][1])
    assert both.describe().startswith("stl10 train+unlabeled: 5 images, 10 classes")


def test_stl10_without_unlabeled_file_and_corrupt(tmp_path: Path) -> None:
    write_stl10(tmp_path, unlabeled=False)
    assert len(build_dataset("stl10", root=tmp_path)) == 3
    with pytest.raises(DatasetError, match="unlabeled_X.bin missing in .*stl10_binary"):
        build_dataset("stl10", root=tmp_path, stl10_unlabeled=True)
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"x" * 100)
    with pytest.raises(DatasetError, match="cannot read .*test_X.bin"):
        build_dataset("stl10", root=tmp_path, train=False)


def test_download_flag_uses_present_files_offline(tmp_path: Path) -> None:
    # With every file present, download=True must not touch the network.
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    write_stl10(tmp_path)
    write_fashion_mnist(tmp_path / "fm")
    assert len(build_dataset("cifar10", root=tmp_path, download=True)) == 10
    assert len(build_dataset("cifar100", root=tmp_path, download=True)) == 4
    assert len(build_dataset("stl10", root=tmp_path, train=False, download=True)) == 2
    assert len(build_dataset("fashion_mnist", root=tmp_path / "fm", download=True)) == 5
