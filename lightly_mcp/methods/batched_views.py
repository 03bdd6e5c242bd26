"""MoCo v2 views of small images, augmented on the batch instead of image by image.

lightly's ``MoCoV2Transform`` augments every image on its own with PIL, in the process
that loads it (≈ 0.4 ms per view at 32 px, a fifth of a CPU training step of the
quickstart). :class:`BatchedViews` splits it in two:

- per image, in the dataset's ``__getitem__`` (so under ``SeededItems``' seeded RNG,
  in the main process or a worker): the image as a ``uint8`` tensor, and the random
  parameters of both views, drawn by the very transforms of lightly's
  ``MoCoV2Transform`` (``make_params`` of torchvision's ``RandomResizedCrop`` and
  ``ColorJitter``, the probabilities of the flips, of the jitter and of the grayscale)
  in lightly's order, from the same RNG: an image gets the parameters lightly's
  transform would draw for it;
- per batch, in the DataLoader's ``collate_fn``: the crops resized with PIL's bilinear
  filter (antialiased like PIL, as separable per-image resampling matrices, flips
  included), the colour jitter in each image's own order, grayscale and
  normalisation, on one float tensor.

Grayscale images (one channel, e.g. Fashion-MNIST) stay one channel until the
normalisation: saturation, hue and grayscale conversion leave an image with equal
RGB channels unchanged (PIL computes them exactly so), so they are skipped; brightness
and contrast still apply. Gaussian blur and rotation are not batched: views with them
(e.g. blur above 64 px) keep lightly's per-image transform.

Examples:
    >>> views = BatchedViews(input_size=32, min_scale=0.3)
    >>> loader = DataLoader(dataset_with(views), batch_size=128,
    ...                     collate_fn=views.collate)
    >>> (query_view, key_view), labels = next(iter(loader))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from lightly_mcp.methods.transforms import MCPTransform, ToRGB

#: Per-view parameters: crop top, left, height, width, horizontal flip, vertical
#: flip, jitter applied, the 4 jitter operations in order, brightness, contrast,
#: saturation, hue factors, grayscale.
_TOP, _LEFT, _HEIGHT, _WIDTH, _HFLIP, _VFLIP, _JITTER = range(7)
_ORDER = slice(7, 11)
_FACTORS = slice(11, 15)
_GRAY = 15
NUM_PARAMS = 16


class BatchedViews:
    """Two MoCo v2 views per image, the augmentation done on the batch.

    Same options as :class:`lightly_mcp.methods.transforms.MCPTransform` (lightly's
    ``MoCoV2Transform``), whose transforms draw the parameters. Use an instance as
    the dataset's transform and :meth:`collate` as the DataLoader's ``collate_fn``.

    Args:
        input_size: Side of the random resized crops.
        **kwargs: Options of ``MCPTransform`` (e.g. ``min_scale``, ``cj_strength``).

    Raises:
        ValueError: If the views use Gaussian blur or rotation (not batched).
    """

    def __init__(self, input_size: int = 32, **kwargs: Any) -> None:
        reference = MCPTransform(input_size=input_size, **kwargs)
        view = reference.views.transforms[0]
        steps = list(view.transform.transforms)
        crop, hflip, vflip, rotate, jitter, gray, blur, _, *normalize = steps
        if not isinstance(crop, v2.RandomResizedCrop) or not isinstance(
            jitter, v2.RandomApply
        ):
            raise ValueError(f"unexpected MoCoV2Transform steps: {steps}")
        if getattr(blur, "prob", 0.0) > 0 or getattr(rotate, "prob", 0.0) > 0:
            raise ValueError(
                "batched views do not blur or rotate; use MCPTransform for views with "
                "gaussian_blur or rr_prob > 0"
            )
        self.input_size = input_size
        self.crop = crop
        self.hflip_p = float(hflip.p)
        self.vflip_p = float(vflip.p)
        self.jitter_p = float(jitter.p)
        self.color_jitter: v2.ColorJitter = jitter.transforms[0]
        self.gray_p = float(gray.p)
        mean, std = (
            (normalize[0].mean, normalize[0].std)
            if normalize
            else ([0.0] * 3, [1.0] * 3)
        )
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.to_rgb = ToRGB()

    # --- per image ------------------------------------------------------------------
    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        """The image as ``uint8`` ``(C, H, W)`` (C = 1 for mode "L") and the
        ``(2, NUM_PARAMS)`` parameters of its two views.
        """
        if image.mode != "L":
            image = self.to_rgb(image)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        return pixels, torch.stack([self.draw(image), self.draw(image)])

    def draw(self, image: Image.Image) -> Tensor:
        """One view's parameters, drawn as lightly's transform draws them."""
        params = torch.zeros(NUM_PARAMS)
        box = self.crop.make_params([image])
        params[:4] = torch.tensor(
            [box["top"], box["left"], box["height"], box["width"]], dtype=torch.float
        )
        # torchvision's _RandomApplyTransform: applied unless rand >= p.
        params[_HFLIP] = float(torch.rand(1) < self.hflip_p)
        params[_VFLIP] = float(torch.rand(1) < self.vflip_p)
        if torch.rand(1) < self.jitter_p:
            jitter = self.color_jitter.make_params([])
            params[_JITTER] = 1.0
            params[_ORDER] = jitter["fn_idx"].float()
            names = ("brightness", "contrast", "saturation", "hue")
            neutral = (1.0, 1.0, 1.0, 0.0)
            params[_FACTORS] = torch.tensor(
                [
                    value
                    if (value := jitter[f"{name}_factor"]) is not None
                    else default
                    for name, default in zip(names, neutral)
                ]
            )
        params[_GRAY] = float(torch.rand(1) < self.gray_p)
        return params

    # --- per batch ------------------------------------------------------------------
    def collate(self, items: Sequence[Any]) -> list[Any]:
        """``[[query_views, key_views], labels, ...]`` from ``((pixels, params),
        label, ...)`` items, as the default collate of lightly's views gives them.
        """
        images = [item[0][0] for item in items]
        params = torch.stack([item[0][1] for item in items])
        batch = _stack(images)
        views = [self.apply(batch, params[:, v]) for v in range(params.shape[1])]
        rest = [
            torch.utils.data.default_collate([item[i] for item in items])
            for i in range(1, len(items[0]))
        ]
        return [views, *rest]

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """Views of ``images`` (``uint8`` ``(N, C, H, W)``, C 1 or 3) with
        ``params`` ``(N, NUM_PARAMS)``: normalised float ``(N, 3, size, size)``.

        Pixels stay on PIL's 8-bit levels between the operations (rounded after the
        resize, truncated after every blend, as PIL's ``Image.blend``), so that the
        views match lightly's in mean, not only in distribution.
        """
        x = self.resized_crops(images.float(), params).round()  # 8-bit, as PIL
        x = self.color(x, params) / 255.0
        x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def resized_crops(self, x: Tensor, params: Tensor) -> Tensor:
        """Crops resized as PIL's bilinear ``resize`` does (antialiased when
        shrinking), then flipped: ``rows @ x @ columsᵀ`` per image.
        """
        size = self.input_size
        rows = _resampling(params[:, _TOP], params[:, _HEIGHT], x.shape[-2], size)
        cols = _resampling(params[:, _LEFT], params[:, _WIDTH], x.shape[-1], size)
        cols = torch.where(params[:, _HFLIP, None, None] > 0, cols.flip(1), cols)
        rows = torch.where(params[:, _VFLIP, None, None] > 0, rows.flip(1), rows)
        return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)

    def color(self, x: Tensor, params: Tensor) -> Tensor:
        """Colour jitter in every image's order, then random grayscale (pixels in
        0..255).
        """
        rgb = x.shape[1] == 3
        jittered = params[:, _JITTER] > 0
        order = params[:, _ORDER].long()
        factors = params[:, _FACTORS]
        x = x.clone()
        for position in range(4):
            for op in range(4) if rgb else range(2):  # gray: brightness, contrast
                chosen = (jittered & (order[:, position] == op)).nonzero()[:, 0]
                if len(chosen):
                    x[chosen] = _ADJUST[op](x[chosen], factors[chosen, op])
        if rgb:
            chosen = (params[:, _GRAY] > 0).nonzero()[:, 0]
            if len(chosen):
                x[chosen] = _luma(x[chosen]).expand(-1, 3, -1, -1)
        return x


def _stack(images: list[Tensor]) -> Tensor:
    """``uint8`` images as one batch: gray ones expanded when others are RGB, smaller
    ones zero-padded (crops never reach the padding).
    """
    channels = max(image.shape[0] for image in images)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = torch.zeros(len(images), channels, height, width, dtype=torch.uint8)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    return batch


def _resampling(start: Tensor, length: Tensor, full: int, size: int) -> Tensor:
    """``(N, size, full)`` matrices resampling ``[start, start + length)`` of an axis
    of ``full`` pixels to ``size``, with PIL's bilinear (triangle) filter: support
    scaled by the shrink factor, taps clipped to the crop, weights normalised.
    """
    scale = (length / size)[:, None, None]
    support = scale.clamp(min=1.0)
    centre = (torch.arange(size, dtype=torch.float)[None, :, None] + 0.5) * scale
    position = (
        torch.arange(full, dtype=torch.float)[None, None, :] - start[:, None, None]
    )
    weights = (1.0 - ((position + 0.5 - centre) / support).abs()).clamp(min=0.0)
    inside = (position >= 0) & (position < length[:, None, None])
    weights = weights * inside
    return weights / weights.sum(-1, keepdim=True)


def _per_image(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)


def _luma(x: Tensor) -> Tensor:
    """PIL's ``convert("L")`` of 8-bit RGB levels (its fixed-point ITU-R 601-2)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 0x8000) / 65536)[:, None]


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: truncated, clipped to 0..255."""
    f = _per_image(factor)
    return torch.floor((degenerate + f * (x - degenerate)).clamp(0.0, 255.0))


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    # PIL blends with the mean of the grayscale image rounded to an integer level.
    mean = torch.floor(_luma(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean, x, factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(_luma(x), x, factor)


def _hue(x: Tensor, factor: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(x / 255.0)
    h, s, v = hsv.unbind(1)
    h = torch.remainder(h + factor.view(-1, 1, 1), 1.0)
    return (_hsv_to_rgb(torch.stack([h, s, v], dim=1)) * 255.0).round()


#: ColorJitter's operations, by the index of its ``fn_idx`` order.
_ADJUST = (_brightness, _contrast, _saturation, _hue)


def collate_for(dataset: Any) -> Any:
    """The ``collate_fn`` a loader of ``dataset`` needs: :meth:`BatchedViews.collate`
    when its transform (also through ``Subset`` / ``SeededItems``) is a
    :class:`BatchedViews`, else None (PyTorch's default).
    """
    while dataset is not None:
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, BatchedViews):
            return transform.collate
        dataset = getattr(dataset, "dataset", None)
    return None
