"""Image files in and out as HxWx3 uint8 RGB arrays, with one-line errors.

Aerial scenes are huge (DOTA has 20000x20000 images), so PIL's decompression-bomb guard
(about 179 megapixels by default) is replaced by edgekit's own pixel budget, checked from
the file header before anything is decoded: 400 megapixels (a DOTA scene, 1.2 GB as RGB)
unless ``EDGEKIT_MAX_IMAGE_PIXELS`` says otherwise. Larger scenes are read window by
window from rasters instead of decoded whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from edgekit.errors import EdgekitError
from edgekit.fileio import atomic_target

DEFAULT_MAX_IMAGE_PIXELS = 20000 * 20000
Image.MAX_IMAGE_PIXELS = None  # edgekit's own budget below replaces PIL's warning-then-error guard

# Fast PNG (level 1 is ~3x faster than the default 6 and ~10% larger); high-quality JPEG.
_SAVE_OPTIONS = {"PNG": {"compress_level": 1}, "JPEG": {"quality": 92}}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# What PIL raises for files it cannot read: unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), broken chunks (SyntaxError, ValueError), bombs.
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _check_exists(path: Path):
    if not path.is_file():
        raise EdgekitError(f"image {path} not found; check the path")


def max_image_pixels() -> int:
    """The pixel budget of one decoded image (``EDGEKIT_MAX_IMAGE_PIXELS``, default 400 MP)."""
    text = os.environ.get("EDGEKIT_MAX_IMAGE_PIXELS")
    if text is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise EdgekitError(f"EDGEKIT_MAX_IMAGE_PIXELS must be a positive integer, got {text!r}")
    return value


def _check_budget(path: Path, img: Image.Image) -> None:
    w, h = img.size
    budget = max_image_pixels()
    if w * h > budget:
        raise EdgekitError(f"image {path} claims {w} x {h} px ({w * h / 1e6:.0f} MP, about {w * h * 3 / 1e9:.1f} GB "
                           f"decoded), over the {budget / 1e6:.0f} MP budget; tile it with a raster tool, or raise "
                           f"EDGEKIT_MAX_IMAGE_PIXELS if the machine has the memory")


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 RGB array (grey, palette, RGBA and 16-bit
    converted); the size in the header is checked against the pixel budget first."""
    path = Path(path)
    _check_exists(path)
    try:
        with Image.open(path) as img:
            _check_budget(path, img)
            img.load()
            return _to_rgb_array(img)
    except _READ_ERRORS as e:
        raise EdgekitError(f"cannot read image {path}: {_one_line(e)}; the file is corrupt or not an image") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    path = Path(path)
    _check_exists(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except _READ_ERRORS as e:
        raise EdgekitError(f"cannot read image {path}: {_one_line(e)}; the file is corrupt or not an image") from None
    return h, w


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High-bit-depth grey (common for satellite products): PIL's convert("RGB") would
        # clip everything above 255 to white, so rescale by the type's range instead.
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        grey = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def save_image(path: str | Path, array: np.ndarray) -> Path:
    """Write an HxW or HxWx3/4 uint8 array; the format follows the suffix; atomic."""
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"save_image expects an HxW or HxWx3/4 uint8 array, got {array.dtype} {array.shape}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise EdgekitError(f"cannot save image {path}: unknown suffix '{path.suffix}'; use one of {', '.join(IMAGE_SUFFIXES)}")
    with atomic_target(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
    return path


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
