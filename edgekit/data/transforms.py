"""Model-input preparation (letterbox + ImageNet normalisation) and box-consistent
geometric augmentation.

Letterbox: scale the longer side to ``size`` keeping the aspect ratio, pad bottom/right
with zeros; boxes are multiplied by the same ``scale`` and never shifted, so dividing by
``scale`` maps predictions back to the original image.

Augmentation: flips and 90-degree rotations, the symmetry group of the square tile
(aerial imagery has no "up"); they move pixels exactly, so boxes stay exact, rotated
boxes included. Optionally a photometric jitter (brightness, contrast, saturation, hue),
which moves no pixel: sites, seasons, sensors and sun angles differ in color, not in shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from edgekit.rotated import canonical_rboxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def letterbox_content(h: int, w: int, size: int) -> tuple[tuple[int, int], float]:
    """((rows, cols) the image fills in its letterbox, scale) for an h x w image."""
    scale = size / max(h, w)
    return (min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))), scale


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """HxWx3 uint8 -> (size x size x 3 uint8, scale) with the image in the top-left corner."""
    h, w = image.shape[:2]
    (nh, nw), scale = letterbox_content(h, w, size)
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


# RGB <-> YIQ (NTSC): a hue turn is a rotation of the (I, Q) chroma plane, so the whole jitter is one
# 3x3 color matrix plus an offset, applied in one pass.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_LUMA = _RGB_TO_YIQ[0]
HUE_TURN_PER_STRENGTH = math.radians(36.0)  # strength 1 turns hue by up to 36 degrees either way


def color_jitter_matrix(brightness: float, contrast: float, saturation: float, hue: float,
                        mean_luma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M [3, 3], t [3]) such that ``M @ rgb + t`` applies, in this order, a hue turn of ``hue``
    radians, a saturation factor (blend with the pixel's luma), a contrast factor (blend with the
    image's mean luma, ``mean_luma`` in the pixels' unit) and a brightness factor (scale)."""
    c, s = math.cos(hue), math.sin(hue)
    turn = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)
    m = torch.linalg.inv(_RGB_TO_YIQ) @ turn @ _RGB_TO_YIQ
    grey = torch.ones(3, 1, dtype=torch.float64) @ _LUMA[None]  # rgb -> (luma, luma, luma)
    m = saturation * m + (1 - saturation) * grey @ m
    offset = torch.full((3,), (1 - contrast) * mean_luma, dtype=torch.float64)
    return brightness * contrast * m, brightness * offset


def random_color_jitter(image: torch.Tensor, strength: float, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8: brightness, contrast and saturation factors drawn from
    [1 - strength, 1 + strength], hue turned by up to ``strength`` x 36 degrees (torch RNG)."""
    if strength <= 0 or image.numel() == 0:
        return image
    u = torch.rand(4, generator=generator, dtype=torch.float64) * 2 - 1
    b, c, s = (1 + strength * u[:3]).tolist()
    pixels = image.reshape(3, -1).double()
    m, t = color_jitter_matrix(b, c, s, float(u[3]) * strength * HUE_TURN_PER_STRENGTH,
                               float(_LUMA @ pixels.mean(1)))
    out = (m @ pixels + t[:, None]).round_().clamp_(0, 255)
    return out.to(torch.uint8).reshape(image.shape)
