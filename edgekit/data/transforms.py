"""Model-input preparation (letterbox + ImageNet normalisation) and box-consistent
geometric augmentation.

Letterbox: scale the longer side to ``size`` keeping the aspect ratio, pad bottom/right
with zeros; boxes are multiplied by the same ``scale`` and never shifted, so dividing by
``scale`` maps predictions back to the original image.

Augmentation: flips and 90-degree rotations only, the symmetry group of the square tile
(aerial imagery has no "up"); they move pixels exactly, so boxes stay exact, rotated
boxes included.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from edgekit.rotated import canonical_rboxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """HxWx3 uint8 -> (size x size x 3 uint8, scale) with the image in the top-left corner."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    if (nh, nw) == (size, size):
        return np.ascontiguousarray(image), scale
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[:nh, :nw] = image
    return out, scale


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] (or [B, 3, H, W]) -> float, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 array -> uint8 tensor [3, H, W]."""
    if not image.flags.writeable:  # arrays viewing PIL images are read-only; torch wants to own writable memory
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def to_model_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, float]:
    """An HxWx3 uint8 image -> (normalised float tensor [3, size, size], letterbox scale)."""
    boxed, scale = letterbox(image, size)
    return normalize(to_tensor(boxed)), scale


def hflip(image: torch.Tensor, boxes: torch.Tensor, rboxes: torch.Tensor | None = None):
    """Mirror left-right; image [C, H, W], boxes [N, 4] xyxy in its pixels; -> (image, boxes),
    or (image, boxes, rboxes) when rotated boxes [N, 5] (:mod:`edgekit.rotated`) are given."""
    w = image.shape[-1]
    out = image.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if rboxes is None:
        return out
    cx, cy, bw, bh, angle = rboxes.unbind(1)
    return (*out, canonical_rboxes(torch.stack([w - cx, cy, bw, bh, -angle], dim=1)))


def vflip(image: torch.Tensor, boxes: torch.Tensor, rboxes: torch.Tensor | None = None):
    """Mirror top-bottom (rotated boxes as in :func:`hflip`)."""
    h = image.shape[-2]
    out = image.flip(-2), torch.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], dim=1)
    if rboxes is None:
        return out
    cx, cy, bw, bh, angle = rboxes.unbind(1)
    return (*out, canonical_rboxes(torch.stack([cx, h - cy, bw, bh, -angle], dim=1)))


def rot90(image: torch.Tensor, boxes: torch.Tensor, k: int = 1, rboxes: torch.Tensor | None = None):
    """Rotate by k * 90 degrees counter-clockwise (as torch.rot90 on the H, W axes); rotated
    boxes as in :func:`hflip`."""
    for _ in range(k % 4):
        w = image.shape[-1]
        # Counter-clockwise: pixel (x, y) moves to (y, W - x), a direction (cos a, sin a) to angle a - pi/2.
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)
        if rboxes is not None:
            cx, cy, bw, bh, angle = rboxes.unbind(1)
            rboxes = canonical_rboxes(torch.stack([cy, w - cx, bw, bh, angle - math.pi / 2], dim=1))
        image = torch.rot90(image, 1, dims=(-2, -1))
    return (image, boxes) if rboxes is None else (image, boxes, rboxes)


def random_flip_rotate(image: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator | None = None,
                       rboxes: torch.Tensor | None = None):
    """One of the 8 flips/rotations of the square, uniformly (torch RNG, so DataLoader workers differ);
    rotated boxes, when given, move with the pixels too (a third returned item)."""
    choice = int(torch.randint(0, 8, (1,), generator=generator))
    if choice & 4:
        image, boxes, *rest = hflip(image, boxes, rboxes)
        rboxes = rest[0] if rest else None
    return rot90(image, boxes, choice & 3, rboxes)
