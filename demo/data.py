"""The demo's data: scikit-learn's digits (1,797 8x8 images, 10 classes, shipped with the package).

Pixels are scaled from 0..16 to [-1, 1] (ink = +1). The shipped LoRA's style, "italic negative", is
one the base model never sees: an inverted palette (dark ink on a light ground) and an italic
shear. `STYLES` adds the styles `variants.py` trains other LoRAs in: each alone, and bold strokes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

NUM_DIGITS = 10
STYLE_SHEAR = 0.25  # x += STYLE_SHEAR * y, in grid units: the top leans right
STYLE_NAME = "italic negative"


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 8, 8) in [-1, 1], labels (1797,) int64), in scikit-learn's order."""
    from sklearn.datasets import load_digits as sk_load_digits
    digits = sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def shear(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Slant images in [-1, 1] (background -1 outside the frame)."""
    if amount == 0:
        return images
    theta = torch.tensor([[1.0, amount, 0.0], [0.0, 1.0, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    # Sample ink in [0, 2] so that zero padding is the background.
    return F.grid_sample(images + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


def invert(images: torch.Tensor) -> torch.Tensor:
    return -images


def stylize(images: torch.Tensor) -> torch.Tensor:
    """The LoRA's style: italic shear, then the inverted palette."""
    return invert(shear(images, STYLE_SHEAR))


def style_negatives(images: torch.Tensor) -> torch.Tensor:
    """Half-styled digits (inverted only, slanted only) and plain ones: what is *not* the style."""
    return torch.cat([images, invert(images), shear(images, STYLE_SHEAR)])


def bold(images: torch.Tensor) -> torch.Tensor:
    """Thick strokes: ink spreads one pixel to the right (a 1x2 dilation; 3x3 fills an 8x8 digit)."""
    shifted = F.pad(images[..., :-1], (1, 0), value=-1.0)
    return torch.maximum(images, shifted)


@dataclass(frozen=True)
class Style:
    """A LoRA style: how a digit is rendered in it, and the renderings that do not count as it
    (the style classifier's negatives, which include the plain digit)."""
    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    negatives: Callable[[torch.Tensor], torch.Tensor]


STYLES = {s.name: s for s in (
    Style(STYLE_NAME, stylize, style_negatives),
    Style("italic", lambda x: shear(x, STYLE_SHEAR), lambda x: x),
    Style("negative", invert, lambda x: x),
    Style("bold", bold, lambda x: x),
)}


def lora_subset(labels: torch.Tensor, per_class: int = 2, seed: int = 4) -> torch.Tensor:
    """Indices of the LoRA's training set: `per_class` digits of each class, picked by a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    picked = []
    for digit in range(NUM_DIGITS):
        picked.extend(order[labels[order] == digit][:per_class].tolist())
    return torch.tensor(sorted(picked))


def split(n: int, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices) for the evaluators."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * holdout))
    return order[k:], order[:k]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (ink +1) -> uint8 grey levels with ink white, as the digits are usually shown."""
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
