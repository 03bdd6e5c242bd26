"""Tests of lightly_mcp.methods.batched_views: lightly's MoCo v2 views, made on the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightly_mcp.methods.batched_views import NUM_PARAMS, BatchedViews, collate_for
from lightly_mcp.methods.resumable_data import SeededItems
from lightly_mcp.methods.transforms import MCPTransform


def _images(mode: str, n: int, size: int) -> list[Image.Image]:
    """Smooth random images (a colour and a gradient per image, plus noise)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    images = []
    for _ in range(n):
        base = rng.uniform(40, 215, (1, 1, 3)) + rng.uniform(-60, 60, (1, 1, 3)) * ramp
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        images.append(image.convert("L") if mode == "L" else image)
    return images


def _views(transform: object, images: list[Image.Image]) -> list[torch.Tensor]:
    """Both views of every image, each image's RNG seeded by its index (as
    ``SeededItems`` does), stacked per view.
    """
    if isinstance(transform, BatchedViews):
        items = []
        for i, image in enumerate(images):
            torch.manual_seed(i)
            items.append((transform(image), i))
        views, labels = transform.collate(items)
        assert labels.tolist() == list(range(len(images)))
        return list(views)
    out = []
    for i, image in enumerate(images):
        torch.manual_seed(i)
        out.append(transform(image))  # type: ignore[operator]
    return [torch.stack([views[v] for views in out]) for v in range(2)]


@pytest.mark.parametrize(("mode", "size"), [("L", 28), ("RGB", 32), ("RGB", 48)])
def test_views_equal_lightlys_image_by_image(mode: str, size: int) -> None:
    """Every image gets lightly's parameters (same RNG, same draws), so its batched
    views equal lightly's PIL views up to PIL's 8-bit rounding and HSV quantisation.
    One draw per batch, or per-image draws in another order, differ by ≫ 0.1.
    """
    images = _images(mode, 48, size)
    options = dict(input_size=32, min_scale=0.3)
    reference = _views(MCPTransform(**options), images)  # type: ignore[arg-type]
    batched = _views(BatchedViews(**options), images)  # type: ignore[arg-type]
    # Mean |difference| per image, in normalised units (0.0175 is one 8-bit level).
    tolerance = 0.01 if mode == "L" else 0.05
    for ours, theirs in zip(batched, reference):
        assert ours.shape == theirs.shape == (48, 3, 32, 32)
        per_image = (ours - theirs).abs().mean(dim=(1, 2, 3))
        assert float(per_image.max()) < tolerance, per_image
        # Same per-image statistics (the colour jitter's effect on each image).
        torch.testing.assert_close(
            ours.mean(dim=(1, 2, 3)), theirs.mean(dim=(1, 2, 3)), atol=tolerance, rtol=0
        )
        torch.testing.assert_close(
            ours.std(dim=(1, 2, 3)), theirs.std(dim=(1, 2, 3)), atol=0.05, rtol=0.05
        )


def test_parameters_follow_the_recipes_distribution() -> None:
    """Per-image draws: crop scale and aspect ratio in range and spread, flip,
    jitter and grayscale rates, jitter factors in lightly's MoCo v2 ranges.
    """
    views = BatchedViews(input_size=32, min_scale=0.3)
    image = _images("RGB", 1, 32)[0]
    torch.manual_seed(0)
    params = torch.stack([views.draw(image) for _ in range(2000)])
    assert params.shape == (2000, NUM_PARAMS)
    area = params[:, 2] * params[:, 3] / (32 * 32)
    ratio = params[:, 3] / params[:, 2]
    assert 0.25 < float(area.min()) < 0.35 and float(area.max()) == 1.0
    assert 0.55 < float(area.mean()) < 0.75  # uniform scale in [0.3, 1]
    assert 0.6 < float(ratio.min()) and float(ratio.max()) < 1.5
    rates = params[:, [4, 5, 6, 15]].mean(0)
    torch.testing.assert_close(
        rates, torch.tensor([0.5, 0.0, 0.8, 0.2]), atol=0.04, rtol=0
    )
    jittered = params[params[:, 6] > 0]
    factors = jittered[:, 11:15]
    for column, (low, high) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        values = factors[:, column]
        assert low <= float(values.min()) and float(values.max()) <= high
        assert float(values.std()) > 0.8 * (high - low) / 12**0.5 * 0.9
    orders = jittered[:, 7:11].long()
    assert all(sorted(order.tolist()) == [0, 1, 2, 3] for order in orders)
    assert len({tuple(order.tolist()) for order in orders}) == 24  # all orders


def test_gray_images_skip_only_the_no_op_colour_operations() -> None:
    """On a one-channel batch, brightness and contrast apply and saturation, hue and
    grayscale are skipped: the same views as the image converted to RGB first.
    """
    views = BatchedViews(input_size=32, min_scale=0.3)
    images = _images("L", 16, 28)
    gray = _views(views, images)
    rgb = _views(views, [image.convert("RGB") for image in images])
    for a, b in zip(gray, rgb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Brightness and contrast did change the images: not the plain crops.
    torch.manual_seed(0)
    pixels, params = views(images[0])
    params[:, 6] = 0  # no jitter
    plain = views.apply(pixels[None], params[None, 0])
    assert not torch.allclose(plain, gray[0][:1], atol=1e-3)


def test_seeded_items_and_collate_for() -> None:
    views = BatchedViews(input_size=16)

    class Images(torch.utils.data.Dataset):
        transform = views

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[object, int]:
            return self.transform(_images("RGB", 4, 20)[i]), i

    items = SeededItems(Images(), seed=3)
    assert collate_for(items) == views.collate
    assert collate_for(_images) is None
    first, again = items[(0, 1)], items[(0, 1)]
    assert torch.equal(first[0][1], again[0][1])
    assert not torch.equal(first[0][1], items[(1, 1)][0][1])  # the next epoch
    with pytest.raises(ValueError, match="do not blur"):
        BatchedViews(input_size=96)
