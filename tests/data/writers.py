"""Writers of the on-disk formats of the dataset kinds, for tiny test datasets."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


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
