"""MoCo v2 views for training and the deterministic transform for evaluation,
configurable for small and grayscale images.

The evaluation transform comes in two equal forms: :func:`eval_transform` (one PIL
image to a normalised tensor) and, for loaders, :func:`eval_pixels` per image with
:class:`NormalizeBatch` as the loader's ``collate_fn``, which converts and normalises
whole batches (the same float32 operations, so the same values; about 4x less time
per image than per-image ``ToTensor`` and ``Normalize`` at 32 px).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightly.transforms import MoCoV2Transform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T


class ToRGB:
    """Converts any PIL image (grayscale, RGBA, 16-bit, palette) to 3-channel RGB."""

    def __call__(self, image: Image.Image) -> Image.Image:  # noqa: D102
        if image.mode == "RGB":
            return image
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit or float grayscale: rescale to 8 bits before converting.
            image = image.point(lambda v: v * (255.0 / 65535.0)).convert("L")
        return image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MCPTransform:
    """Two MoCo v2 views of an image (lightly's ``MoCoV2Transform``).

    For images of at most 64 px Gaussian blur is off by default (as lightly's CIFAR-10
    settings), and every input is converted to RGB first so that grayscale datasets
    such as Fashion-MNIST feed 3-channel backbones.

    Args:
        input_size: Side of the random resized crops.
        gaussian_blur: Blur probability; ``None`` picks 0.0 for ``input_size <= 64``
            and MoCo v2's 0.5 otherwise.
        **kwargs: Passed to ``lightly.transforms.MoCoV2Transform`` (e.g. ``min_scale``,
            ``cj_strength``, ``normalize``).
    """

    def __init__(
        self, input_size: int = 224, gaussian_blur: float | None = None, **kwargs: Any
    ) -> None:
        if gaussian_blur is None:
            gaussian_blur = 0.0 if input_size <= 64 else 0.5
        self.to_rgb = ToRGB()
        self.views = MoCoV2Transform(
            input_size=input_size, gaussian_blur=gaussian_blur, **kwargs
        )

    def __call__(self, image: Image.Image) -> Any:
        """Returns the list of two augmented views."""
        return self.views(self.to_rgb(image))


def build_transform(input_size: int = 224, **kwargs: Any) -> MCPTransform:
    """The transform for MoCo v2 and MCP at ``input_size`` (see ``MCPTransform``)."""
    return MCPTransform(input_size=input_size, **kwargs)


def eval_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic transform for evaluation (kNN, linear probe, export checks).

    Converts to RGB (``ToRGB``, as the training views), resizes the shorter side to
    ``input_size`` (bilinear) and centre-crops a square, then ``ToTensor`` and the
    ImageNet normalisation that ``MoCoV2Transform`` uses.

    Args:
        input_size: Side of the output images.

    Returns:
        A callable mapping a PIL image to a ``(3, input_size, input_size)`` tensor.
    """
    transform: Callable[[Image.Image], torch.Tensor] = T.Compose(
        [
            ToRGB(),
            T.Resize(input_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"]),
        ]
    )
    return transform


def eval_pixels(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The geometric part of :func:`eval_transform`: a PIL image to a ``uint8``
    tensor ``(3, input_size, input_size)``; :class:`NormalizeBatch` does the rest
    on whole batches.
    """
    return T.Compose(
        [
            ToRGB(),
            T.Resize(input_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(input_size),
            T.PILToTensor(),
        ]
    )


class NormalizeBatch:
    """A loader's ``collate_fn`` that finishes :func:`eval_pixels` on the batch:
    ``uint8`` images to float in ``[0, 1]`` and the ImageNet normalisation, the
    values of :func:`eval_transform` (``torch.equal``).

    The first item of each sample is the image; the rest (labels, names) are
    collated as ``default_collate`` does.
    """

    def __init__(self) -> None:
        self.mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)

    def __call__(self, samples: Sequence[Any]) -> Any:
        """The collated batch, its images normalised."""
        batch = list(default_collate(list(samples)))
        images = batch[0].to(torch.get_default_dtype()).div(255)
        batch[0] = images.sub_(self.mean).div_(self.std)
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
