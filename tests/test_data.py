"""Tests of lightly_mcp.data on tiny datasets written in each on-disk format."""

from __future__ import annotations

import gzip
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch.utils.data import DataLoader

from lightly_mcp import data as data_module
from lightly_mcp.data import (
    SUPPORTED_KINDS,
    DatasetError,
    build_dataset,
    default_dataset_kind,
    digits_split_indices,
    eval_transform,
)
from lightly_mcp.transforms import build_transform

# ----------------------------------------------------------------------------------
# Writers of the on-disk formats.
# ----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_fashion_mnist(
    root: Path, n_train: int = 5, n_test: int = 3, size: int = 28, gz: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, 2049)
        out[prefix] = (images, labels)
    return out


def cifar_images(n: int, seed: int) -> np.ndarray:
    """``n`` random 32x32 RGB images as (N, 32, 32, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def to_cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 2, n_test: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = [], []
    for b in range(1, 6):
        images = cifar_images(per_batch, seed=b)
        labels = [(b + i) % 10 for i in range(per_batch)]
        dump(
            folder / f"data_batch_{b}",
            {"data": to_cifar_rows(images), "labels": labels},
        )
        train_images.append(images)
        train_labels += labels
    test_images = cifar_images(n_test, seed=99)
    test_labels = [9, 0, 5][:n_test]
    dump(
        folder / "test_batch",
        {"data": to_cifar_rows(test_images), "labels": test_labels},
    )
    names = [f"class{i}" for i in range(10)]
    dump(folder / "batches.meta", {"label_names": names})
    return {
        "train": (np.concatenate(train_images), train_labels),
        "test": (test_images, test_labels),
        "names": names,
    }


def write_cifar100(root: Path, n_train: int = 4, n_test: int = 2) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_images, test_images = cifar_images(n_train, 1), cifar_images(n_test, 2)
    train_labels = [99, 0, 42, 7][:n_train]
    test_labels = [3, 98][:n_test]
    dump(
        folder / "train",
        {
            "data": to_cifar_rows(train_images),
            "fine_labels": train_labels,
            "coarse_labels": [0] * n_train,
        },
    )
    dump(
        folder / "test",
        {
            "data": to_cifar_rows(test_images),
            "fine_labels": test_labels,
            "coarse_labels": [0] * n_test,
        },
    )
    dump(
        folder / "meta",
        {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"c{i}" for i in range(20)],
        },
    )
    return {"train": (train_images, train_labels), "test": (test_images, test_labels)}


def write_stl_images(path: Path, images: np.ndarray) -> None:
    # STL-10 stores each image channel-major and column-major: (N, 3, W, H).
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())


def write_stl10(root: Path, unlabeled: bool = True) -> dict:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 3), ("test", 2)):
        images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        labels = np.array([1, 10, 4][:n], dtype=np.uint8)  # 1-based on disk
        write_stl_images(folder / f"{split}_X.bin", images)
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        out[split] = (images, labels.astype(np.int64) - 1)
    if unlabeled:
        images = rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
        write_stl_images(folder / "unlabeled_X.bin", images)
        out["unlabeled"] = (images, None)
    (folder / "class_names.txt").write_text(
        "\n".join(f"name{i}" for i in range(10)) + "\n"
    )
    return out


def save_image(
    path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 20), value: int = 100
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        image = Image.fromarray(np.full(size[::-1], value * 257, dtype=np.uint16))
    elif mode == "P":
        image = Image.new("RGB", size, (value, 20, 200)).convert("P")
    else:
        image = Image.new(
            mode, size, value if mode in ("L", "1") else (value,) * len(mode)
        )
    image.save(path)
    return path


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ----------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------


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
        DatasetError, match="train-images-idx3-ubyte.*header gives shape"
    ):
        build_dataset("fashion_mnist", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        build_dataset("fashion_mnist", root=tmp_path, train=False)


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), 2049)
    with pytest.raises(DatasetError, match="5 images but .* 4 labels"):
        build_dataset("fashion_mnist", root=tmp_path)


def test_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="not found") as info:
        build_dataset("fashion_mnist", root=missing)
    message = str(info.value)
    assert str(missing) in message and "dataset-fashion-mnist" in message
    assert "\n" not in message


def test_default_dataset_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "FASHION_MNIST_ROOT", tmp_path / "absent")
    assert default_dataset_kind() == "digits"
    write_fashion_mnist(tmp_path / "fm")
    monkeypatch.setattr(data_module, "FASHION_MNIST_ROOT", tmp_path / "fm")
    assert default_dataset_kind() == "fashion_mnist"
    ds = build_dataset(default_dataset_kind())  # the default root
    assert (
        ds.describe()
        == f"fashion_mnist train: 5 images, 10 classes, from {tmp_path / 'fm'}"
    )


# ----------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ----------------------------------------------------------------------------------


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
    with pytest.raises(DatasetError, match=r"missing: data_batch_3\)"):
        build_dataset("cifar10", root=tmp_path)
    # The test split does not need the train batches.
    assert len(build_dataset("cifar10", root=tmp_path, train=False)) == 3
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read .*test_batch"):
        build_dataset("cifar10", root=tmp_path, train=False)


# ----------------------------------------------------------------------------------
# STL-10
# ----------------------------------------------------------------------------------


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
    with pytest.raises(DatasetError, match="missing: unlabeled_X.bin"):
        build_dataset("stl10", root=tmp_path, stl10_unlabeled=True)
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"x" * 100)
    with pytest.raises(DatasetError, match="cannot read .*test_X.bin"):
        build_dataset("stl10", root=tmp_path, train=False)


# ----------------------------------------------------------------------------------
# imagefolder
# ----------------------------------------------------------------------------------


def test_imagefolder_with_classes(tmp_path: Path) -> None:
    for i in range(3):
        save_image(tmp_path / "zebra" / f"{i}.png", value=10 * i)
    save_image(tmp_path / "ant" / "nested" / "a.JPG")
    save_image(tmp_path / "ant" / "b.bmp")
    ds = build_dataset("imagefolder", root=tmp_path)
    test = build_dataset("imagefolder", root=tmp_path, train=False)
    assert ds.has_labels and ds.num_classes == 2 and ds.classes == ["ant", "zebra"]
    assert test.classes == ds.classes
    # No train/ and val/ folders: a fixed 80/20 split of every class (at least one
    # image held out per class of two or more).
    assert (len(ds), len(test)) == (3, 2)
    assert sorted(ds.targets) == [0, 1, 1] and sorted(test.targets) == [0, 1]
    assert not set(ds.base.paths) & set(test.base.paths)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == ds.targets
    paths = ds.base.paths + test.base.paths
    assert sorted(p.parent.name for p in paths if p.parent.parent == tmp_path) == [
        "ant",
        "zebra",
        "zebra",
        "zebra",
    ]
    assert ds.describe().startswith(
        f"imagefolder train: 3 images, 2 classes, from {tmp_path} (the 80 % of each "
        "class not held out: fixed split, seed 0"
    )
    assert "20 % of each class held out for evaluation" in test.describe()
    again = build_dataset("imagefolder", root=tmp_path, train=False)
    assert again.base.paths == test.base.paths  # fixed


def test_imagefolder_with_train_and_val_folders(tmp_path: Path) -> None:
    for cls in ("ant", "bee", "cat"):
        save_image(tmp_path / "train" / cls / "1.png")
        save_image(tmp_path / "train" / cls / "2.png")
    save_image(tmp_path / "val" / "cat" / "v.png")  # val lacks ant and bee
    train = build_dataset("imagefolder", root=tmp_path)
    val = build_dataset("imagefolder", root=tmp_path, train=False)
    assert len(train) == 6 and train.targets == [0, 0, 1, 1, 2, 2]
    assert len(val) == 1 and val.targets == [2] and val.num_classes == 3
    assert val.describe() == (
        f"imagefolder val: 1 images, 3 classes, from {tmp_path / 'val'}"
    )
    save_image(tmp_path / "val" / "dog" / "d.png")
    with pytest.raises(DatasetError, match="dog/, which is not a class"):
        build_dataset("imagefolder", root=tmp_path, train=False)


def test_imagefolder_class_folder_linked_into_another(tmp_path: Path) -> None:
    for i in range(3):
        save_image(tmp_path / "a" / f"{i}.png", value=10 * i)
        save_image(tmp_path / "c" / f"{i}.png", value=10 * i)
    (tmp_path / "b").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "c" / "more").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.warns(UserWarning, match="through links in more than one class"):
        files = data_module.ImageFiles(tmp_path)
    # As torchvision's ImageFolder: b's images are read (as class b), and so are
    # the ones c/more links to (as class c); no label is lost.
    assert files.classes == ["a", "b", "c"]
    assert sorted(files.labels.tolist()) == [0] * 3 + [1] * 3 + [2] * 6
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    with pytest.warns(UserWarning):
        assert len(data_module.ImageFiles(tmp_path)) == 12  # a cycle is not entered


def test_imagefolder_without_classes(tmp_path: Path) -> None:
    save_image(tmp_path / "top.png")
    save_image(tmp_path / "a" / "x.jpeg")
    save_image(tmp_path / "b" / "deep" / "y.webp")
    ds = build_dataset("imagefolder", root=tmp_path)
    assert not ds.has_labels and ds.num_classes is None and ds.classes is None
    assert len(ds) == 3 and ds.targets == [-1, -1, -1]
    assert all(ds[i][1] == -1 for i in range(3))
    assert "no labels" in ds.describe()
    # A single sub-folder is no class structure either, unless asked for.
    single = tmp_path / "single"
    save_image(single / "only" / "1.png")
    save_image(single / "only" / "2.png")
    assert not build_dataset("imagefolder", root=single).has_labels
    forced = build_dataset("imagefolder", root=single, class_folders=True)
    assert forced.num_classes == 1 and forced.targets == [0]  # and 1 held out
    with pytest.raises(DatasetError, match="directly in"):
        build_dataset("imagefolder", root=tmp_path, class_folders=True)
    assert not build_dataset(
        "imagefolder", root=tmp_path / "a", class_folders=False
    ).has_labels


def test_imagefolder_skips_corrupt_and_non_images(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(3):
            save_image(tmp_path / cls / f"{i}.png", value=40 * i)
    (tmp_path / "cat" / "broken.png").write_bytes(
        b"\x89PNG\r\n\x1a\n definitely not png"
    )
    (tmp_path / "dog" / "empty.jpg").write_bytes(b"")
    (tmp_path / "dog" / "notes.txt").write_text("hello")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"junk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset("imagefolder", root=tmp_path, transform=build_transform(16))
    summary = [w for w in caught if "corrupt" in str(w.message)]
    assert len(summary) == 1
    assert "2 corrupt" in str(summary[0].message) and "broken.png" in str(
        summary[0].message
    )
    assert ds.skipped_corrupt == 2 and ds.skipped_non_image == 1
    assert len(ds) == 4 and ds.num_classes == 2  # one image per class held out
    assert "skipped 2 corrupt and 1 non-image files" in ds.describe()
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=0)
    seen = 0
    for (view_a, view_b), labels in loader:
        assert view_a.shape[1:] == (3, 16, 16) and view_b.shape == view_a.shape
        assert set(labels.tolist()) <= {0, 1}
        seen += len(labels)
    assert seen == 4 and ds.load_failures == 0


def test_imagefolder_load_failure_falls_back(tmp_path: Path) -> None:
    for i in range(4):
        save_image(tmp_path / f"{i}.png", value=50 * i)
    ds = build_dataset("imagefolder", root=tmp_path, transform=eval_transform(8))
    (tmp_path / "1.png").write_bytes(b"broken after the check")
    (tmp_path / "3.png").unlink()
    with pytest.warns(UserWarning, match="cannot load"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 4 and all(x.shape == (3, 8, 8) for x, _ in items)
    assert ds.load_failures == 2
    # Index 1 fell back to 2, index 3 wrapped around to 0.
    assert torch.equal(items[1][0], items[2][0]) and torch.equal(
        items[3][0], items[0][0]
    )
    batches = list(DataLoader(ds, batch_size=3))
    assert sum(len(b[1]) for b in batches) == 4


@pytest.mark.parametrize(
    "mode, suffix",
    [
        ("L", ".png"),
        ("RGBA", ".png"),
        ("I;16", ".png"),
        ("P", ".gif"),
        ("LA", ".png"),
        ("1", ".bmp"),
        ("RGB", ".tiff"),
        ("CMYK", ".jpg"),
    ],
)
def test_imagefolder_modes_load_through_transforms(
    tmp_path: Path, mode: str, suffix: str
) -> None:
    save_image(tmp_path / f"img{suffix}", mode=mode, size=(24, 20))
    raw = build_dataset("imagefolder", root=tmp_path)[0][0]
    assert isinstance(raw, Image.Image)
    for transform in (build_transform(16), eval_transform(16)):
        out, label = build_dataset("imagefolder", root=tmp_path, transform=transform)[0]
        views = out if isinstance(out, list) else [out]
        for view in views:
            assert view.shape == (3, 16, 16) and view.dtype == torch.float32
            assert torch.isfinite(view).all()
        assert label == -1


def test_sixteen_bit_is_rescaled(tmp_path: Path) -> None:
    save_image(tmp_path / "white.png", mode="I;16", value=255)  # 65535
    save_image(tmp_path / "sub" / "gray.png", mode="I;16", value=0)
    ds = build_dataset("imagefolder", root=tmp_path, transform=eval_transform(4))
    white = ds[1][0]  # sorted: sub/gray.png, white.png
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(3, 1, 1)
    torch.testing.assert_close(white, ((1 - mean) / std).expand(3, 4, 4))
    torch.testing.assert_close(ds[0][0], ((0 - mean) / std).expand(3, 4, 4))


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path / 'missing'}.*does not exist"):
        build_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(DatasetError, match="needs root"):
        build_dataset("imagefolder")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images found .*\.png .*\.jpg") as info:
        build_dataset("imagefolder", root=empty)
    assert "1 other files ignored" in str(info.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"nope")
    with (
        pytest.raises(DatasetError, match="could be opened"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        build_dataset("imagefolder", root=broken)


def test_unknown_kind_lists_kinds() -> None:
    with pytest.raises(DatasetError, match="unknown dataset kind 'mnist'") as info:
        build_dataset("mnist")
    for kind in SUPPORTED_KINDS:
        assert kind in str(info.value)


# ----------------------------------------------------------------------------------
# subset and eval transform
# ----------------------------------------------------------------------------------


def test_subset() -> None:
    full = build_dataset("digits")
    a = build_dataset("digits", subset=100, seed=1)
    b = build_dataset("digits", subset=100, seed=1)
    c = build_dataset("digits", subset=100, seed=2)
    assert len(a) == 100 and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 100 and max(a.indices) < len(full)
    assert a.targets == [full.targets[i] for i in a.indices]
    np.testing.assert_array_equal(as_array(a[5][0]), as_array(full[a.indices[5]][0]))
    assert a.describe().startswith(
        "digits train: 100 of 1438 images (random subset, seed 1)"
    )
    assert len(build_dataset("digits", subset=len(full))) == len(full)
    with pytest.raises(DatasetError, match="subset=5000 is larger than digits train"):
        build_dataset("digits", subset=5000)
    with pytest.raises(DatasetError, match="positive"):
        build_dataset("digits", subset=0)


def test_subset_of_files(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=20)
    a = build_dataset("fashion_mnist", root=tmp_path, subset=6, seed=3)
    b = build_dataset("fashion_mnist", root=tmp_path, subset=6, seed=3)
    assert [np.asarray(a[i][0]).tolist() for i in range(6)] == [
        np.asarray(b[i][0]).tolist() for i in range(6)
    ]
    with pytest.raises(IndexError):
        a[6]


def test_eval_transform() -> None:
    image = Image.new("L", (40, 20), 128)
    out = eval_transform(16)(image)
    assert out.shape == (3, 16, 16)
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(3, 1, 1)
    torch.testing.assert_close(out, ((128 / 255 - mean) / std).expand(3, 16, 16))


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
