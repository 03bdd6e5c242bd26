"""Tests of lightly_mcp.transforms."""

from __future__ import annotations

import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image

from lightly_mcp.transforms import eval_transform


def test_eval_transform() -> None:
    image = Image.new("L", (40, 20), 128)
    out = eval_transform(16)(image)
    assert out.shape == (3, 16, 16)
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(3, 1, 1)
    torch.testing.assert_close(out, ((128 / 255 - mean) / std).expand(3, 16, 16))
