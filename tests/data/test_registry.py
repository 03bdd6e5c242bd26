"""Tests of lightly_mcp.data.registry: the kinds by name, the subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightly_mcp.data import SUPPORTED_KINDS, build_dataset
from lightly_mcp.errors import DatasetError
from tests.data.writers import as_array, write_fashion_mnist


def test_unknown_kind_lists_kinds() -> None:
    with pytest.raises(DatasetError, match="unknown dataset kind 'mnist'") as info:
        build_dataset("mnist")
    for kind in SUPPORTED_KINDS:
        assert kind in str(info.value)


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


def test_classes_keep_only_their_images_relabelled() -> None:
    full = build_dataset("digits")
    kept = build_dataset("digits", classes=[7, 2])
    base = np.asarray(full.targets)
    assert kept.kept_classes == [2, 7] and kept.num_classes == 2
    assert kept.classes == ["2", "7"]
    assert len(kept) == int(np.isin(base, [2, 7]).sum())
    # Every item is one of the chosen classes, relabelled in the order of the ids.
    assert [int(base[i]) for i in kept.indices] == [
        {0: 2, 1: 7}[label] for label in kept.targets
    ]
    assert {kept[i][1] for i in range(len(kept))} == {0, 1}
    np.testing.assert_array_equal(
        as_array(kept[3][0]), as_array(full[kept.indices[3]][0])
    )
    assert kept.describe().startswith(f"digits train classes 2,7 of 10: {len(kept)}")
    by_name = build_dataset("digits", classes=["2", "7"])
    assert by_name.indices == kept.indices


def test_classes_then_subset_draws_from_the_kept_images() -> None:
    kept = build_dataset("digits", classes=[0, 1, 2, 3, 4])
    a = build_dataset("digits", classes=[0, 1, 2, 3, 4], subset=50, seed=1)
    assert len(a) == 50 and set(a.indices) <= set(kept.indices)
    assert set(a.targets) <= set(range(5))
    assert a.describe().startswith(
        f"digits train classes 0-4 of 10: 50 of {len(kept)} images"
    )
    clamped = build_dataset(
        "digits", classes=[0, 1, 2, 3, 4], subset=10**6, clamp_subset=True
    )
    assert clamped.indices == kept.indices
    with pytest.raises(DatasetError, match=f"larger than .*\\({len(kept)} images\\)"):
        build_dataset("digits", classes=[0, 1, 2, 3, 4], subset=len(kept) + 1)


def test_held_out_classes_never_share_an_image_with_the_kept_ones(
    tmp_path: Path,
) -> None:
    write_fashion_mnist(tmp_path, n_train=60, n_test=20)
    for train in (True, False):
        seen = build_dataset(
            "fashion_mnist", root=tmp_path, train=train, classes=[0, 1, 2, 3, 4]
        )
        held = build_dataset(
            "fashion_mnist", root=tmp_path, train=train, classes=[5, 6, 7, 8, 9]
        )
        full = build_dataset("fashion_mnist", root=tmp_path, train=train)
        assert not set(seen.indices) & set(held.indices)
        assert sorted(seen.indices + held.indices) == list(range(len(full)))
        assert {full.targets[i] for i in seen.indices} <= {0, 1, 2, 3, 4}
        assert {full.targets[i] for i in held.indices} <= {5, 6, 7, 8, 9}


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([10], "digits train has no class 10: give ids 0..9"),
        (["cat"], "has no class 'cat'"),
        ([True], "has no class True"),
        ([1, "1"], "name a class twice"),
        ([], "at least one class"),
    ],
)
def test_bad_classes_are_refused(classes: list, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        build_dataset("digits", classes=classes)


def test_classes_of_an_unlabelled_folder_are_refused(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(DatasetError, match="has no labels, so no classes"):
        build_dataset("imagefolder", root=tmp_path, classes=[0])
