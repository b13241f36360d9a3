"""Caption-safe paired augmentation: drawn per triplet in the loader, applied to whole batches in the step.

A caption describes the target relative to the reference ("darker", "longer sleeves"), so a triplet's
reference, target and look-mate negatives all get the same random transform. The loader's workers only
draw its parameters (seeded by seed, epoch and item, so runs repeat across worker counts and --resume)
and ship uint8 pixels at `working_size` (1.5x the model's input); the training step applies the transform
to the whole batch with a few tensor operations on the model's device and resizes it to the input size.
Done per image in Pillow by the workers, the same work took more CPU than a 2-core demo step's own
backward could spare, and a GPU would wait on it.

Why oversampled: a shift of a fraction of a pixel resampled at the model's input size blurs every
training image (bilinear) or breaks its edges (nearest), while val and catalog images are plain
antialiased resizes. On 64-px garments that blur erases what tells necklines apart. The affine runs at
the larger size with nearest sampling, as Pillow's affine did on the decoded photo, and the antialiased
resize to the input size then gives pixels as sharp as the eval transform's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

# One row of parameters per triplet, in this order.
PARAMS = ("flip", "scale", "tx", "ty", "brightness", "contrast", "saturation", "hue")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's and torchvision's greyscale
OVERSAMPLE = 1.5  # the demo's 64-px model augments its 96-px images at their own size


def working_size(image_size: int) -> int:
    """The side at which training pixels are shipped and augmented, for a model input of `image_size`."""
    return math.ceil(image_size * OVERSAMPLE)


class PairAugment:
    """Draws a triplet's transform: a horizontal flip, a small affine (translation, scale, background-
    coloured fill) and a brightness/contrast change. No hue or saturation jitter by default, because a
    hue shift would make "is red" false (`color` > 0 adds it, for the seed's recipe: saturation ±color,
    hue ±color/4)."""

    def __init__(
        self,
        translate: float = 0.04,
        scale: tuple[float, float] = (0.95, 1.05),
        jitter: float = 0.1,
        color: float = 0.0,
    ):
        self.translate, self.scale, self.jitter, self.color = translate, scale, jitter, color

    def draw(self, rng: random.Random) -> torch.Tensor:
        """The parameters (PARAMS) of one triplet's transform, from `rng`."""
        flip = rng.random() < 0.5
        scale = rng.uniform(*self.scale)
        brightness = rng.uniform(1 - self.jitter, 1 + self.jitter)
        contrast = rng.uniform(1 - self.jitter, 1 + self.jitter)
        tx, ty = rng.uniform(-self.translate, self.translate), rng.uniform(-self.translate, self.translate)
        saturation, hue = 1.0, 0.0
        # Drawn only when asked for, so the default recipe's random stream (its captions) is unchanged.
        if self.color:
            saturation, hue = rng.uniform(1 - self.color, 1 + self.color), rng.uniform(-1, 1) * self.color / 4
        return torch.tensor([float(flip), scale, tx, ty, brightness, contrast, saturation, hue])


@torch.no_grad()
def augment_pixels(
    pixels: torch.Tensor, params: torch.Tensor, resize: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """(n, 3, H, W) pixels in 0..255 (uint8 or float) and (n, len(PARAMS)) rows -> float32 in 0..255,
    resized by `resize` (the training step's: the model's `pixel_pipeline.resize_tensors`).

    Row i's flip, then its affine about the centre (a shift of tx, ty image sizes, a zoom of `scale`;
    nearest-pixel sampling as Pillow's affine, the uncovered border filled with the flipped image's
    top-left pixel: the background extended, not a black frame), then `resize`, then brightness, contrast (about the image's mean grey), saturation and hue, each
    clamped to 0..255 as Pillow and torchvision do.
    """
    x = pixels.to(torch.float32)
    p = params.to(x.device, torch.float32)
    flip, scale, tx, ty, brightness, contrast, saturation, hue = p.unbind(1)
    sign = 1.0 - 2.0 * flip
    # affine_grid maps each output pixel to the input point it shows, in [-1, 1] units (a shift of tx
    # image widths is 2 tx): the inverse of "scale about the centre, then shift", through the flip.
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sign / scale, -sign * 2 * tx / scale
    theta[:, 1, 1], theta[:, 1, 2] = 1 / scale, -2 * ty / scale
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = torch.where(flip.bool()[:, None], x[:, :, 0, -1], x[:, :, 0, 0])[:, :, None, None]
    x = F.grid_sample(x - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False) + fill
    if resize is not None:
        x = resize(x)

    x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0, 255)
    luma = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
    mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * contrast.view(-1, 1, 1, 1) + mean).clamp_(0, 255)
    if bool((saturation != 1).any()):
        grey = (x * luma).sum(1, keepdim=True)
        x = ((x - grey) * saturation.view(-1, 1, 1, 1) + grey).clamp_(0, 255)
    for i in torch.nonzero(hue).flatten().tolist():  # the seed's recipe only; one hue per image
        x[i] = TF.adjust_hue(x[i] / 255, float(hue[i])) * 255
    return x
