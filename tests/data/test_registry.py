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
