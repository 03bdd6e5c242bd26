"""Tests of lightly_mcp.methods.transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image

from lightly_mcp.methods.transforms import NormalizeBatch, eval_pixels, eval_transform


def test_eval_transform() -> None:
    image = Image.new("L", (40, 20), 128)
    out = eval_transform(16)(image)
    assert out.shape == (3, 16, 16)
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(3, 1, 1)
    torch.testing.assert_close(out, ((128 / 255 - mean) / std).expand(3, 16, 16))


def images() -> list[Image.Image]:
    """Images of every kind a data set gives: grayscale, RGB, RGBA, 16-bit,
    palette; square, wide and tall."""
    g = np.random.default_rng(0)
    gray = Image.fromarray(g.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    rgb = Image.fromarray(g.integers(0, 256, (20, 37, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(g.integers(0, 256, (41, 19, 4), dtype=np.uint8), "RGBA")
    deep = Image.fromarray(g.integers(0, 65535, (17, 23), dtype=np.uint16))
    return [gray, rgb, rgba, deep, rgb.convert("P")]


@pytest.mark.parametrize("size", [8, 32])
def test_batched_normalisation_gives_the_eval_transform_values(size: int) -> None:
    samples = [(eval_pixels(size)(image), i) for i, image in enumerate(images())]
    assert all(pixels.dtype == torch.uint8 for pixels, _ in samples)
    batch = NormalizeBatch()(samples)
    expected = torch.stack([eval_transform(size)(image) for image in images()])
    assert torch.equal(batch[0], expected)
    assert torch.equal(batch[1], torch.arange(5))
