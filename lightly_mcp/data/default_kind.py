"""``kind: auto``: Fashion-MNIST where its files are installed, else digits."""

from __future__ import annotations

from pathlib import Path

from lightly_mcp.data.fashion_mnist import fashion_mnist_installed, fashion_mnist_root


def default_dataset_kind(root: str | Path | None = None) -> str:
    """``"fashion_mnist"`` if its idx files exist, else ``"digits"``.

    Args:
        root: Where to look for Fashion-MNIST's train and test files (default
            ``FASHION_MNIST_ROOT``, the Debian package's folder).

    Returns:
        The kind the quickstart uses (``kind: auto``); ``describe()`` of the built
        dataset says which, and why when it is the digits fallback
        (:func:`fallback_note`).
    """
    return "fashion_mnist" if fashion_mnist_installed(root) else "digits"


def fallback_note(root: str | Path | None = None) -> str:
    """What ``describe()`` adds when ``kind: auto`` fell back to digits."""
    return (
        f"data.kind auto: no Fashion-MNIST in {fashion_mnist_root(root)}, so "
        "scikit-learn's digits; accuracies on digits are not comparable with "
        "README's Fashion-MNIST numbers"
    )
