"""Tests of lightly_mcp.data.imagefolder on tiny folders of image files."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch.utils.data import DataLoader

from lightly_mcp.data import build_dataset, eval_transform
from lightly_mcp.data.imagefolder import ImageFiles
from lightly_mcp.errors import DatasetError
from lightly_mcp.methods.transforms import build_transform
from tests.data.writers import save_image


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
        files = ImageFiles(tmp_path)
    # As torchvision's ImageFolder: b's images are read (as class b), and so are
    # the ones c/more links to (as class c); no label is lost.
    assert files.classes == ["a", "b", "c"]
    assert sorted(files.labels.tolist()) == [0] * 3 + [1] * 3 + [2] * 6
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    with pytest.warns(UserWarning):
        assert len(ImageFiles(tmp_path)) == 12  # a cycle is not entered


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
    with pytest.raises(DatasetError, match=r"no image files \(\.png, \.jpg") as info:
        build_dataset("imagefolder", root=empty)
    assert "(1 other files)" in str(info.value)
    assert len(str(info.value)) <= 200
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"nope")
    with (
        pytest.raises(
            DatasetError, match=r"none of the 1 images .* can be opened \(e.g. a.png\)"
        ),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        build_dataset("imagefolder", root=broken)
