"""Tests of lightly_mcp.data.default_kind (``kind: auto``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightly_mcp.data import build_dataset, default_dataset_kind
from lightly_mcp.data import fashion_mnist as fashion_mnist_module
from tests.data.writers import write_fashion_mnist


def test_default_dataset_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist_module, "FASHION_MNIST_ROOT", tmp_path / "absent")
    assert default_dataset_kind() == "digits"
    write_fashion_mnist(tmp_path / "fm")
    monkeypatch.setattr(fashion_mnist_module, "FASHION_MNIST_ROOT", tmp_path / "fm")
    assert default_dataset_kind() == "fashion_mnist"
    ds = build_dataset(default_dataset_kind())  # the default root
    assert (
        ds.describe()
        == f"fashion_mnist train: 5 images, 10 classes, from {tmp_path / 'fm'}"
    )
