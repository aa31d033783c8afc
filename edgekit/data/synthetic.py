"""The built-in synthetic aerial data set: a learnable stand-in for DOTA that ships with
the code (no download), so the demo and the tests can train and evaluate end to end.

Each image is a textured ground (terrain tint, low-frequency variation, fields, roads,
buildings as distractors) with 4-10 objects of five DOTA classes drawn as rotated
polygons at any orientation: planes (fuselage, swept wings and tail), ships (elongated
pointed hulls), storage tanks (discs with a rim), small vehicles (short rectangles) and
large vehicles (long rectangles with a cab). Sizes, colours and brightness vary, objects
barely overlap, and a little blur and sensor noise is added. The label of an object is
the rotated rectangle that bounds the drawn shape (axis-aligned for round tanks, whose
orientation is undefined), written in DOTA format.

Every image is drawn from its own numpy Generator seeded by (seed, split, index), so the
same seed gives byte-identical label files and images, and any image can be regenerated
alone.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edgekit.data.dota import DotaAnnotation, DotaObject, write_dota_labels
from edgekit.data.images import save_image

SYNTHETIC_CLASSES = ("plane", "ship", "storage-tank", "small-vehicle", "large-vehicle")
IMAGESOURCE = "edgekit-synthetic"
GSD = 0.5  # nominal metres per pixel: a 40 px plane is 20 m long

_TERRAINS = np.array([[96, 118, 70], [128, 124, 92], [150, 138, 110], [118, 116, 110], [84, 100, 74]], float)
_ROOFS = np.array([[150, 150, 150], [170, 95, 75], [205, 200, 190], [110, 105, 100], [160, 140, 110]], float)
_CAR_COLORS = np.array([[235, 235, 235], [30, 30, 35], [170, 30, 30], [40, 60, 150], [175, 178, 182],
                        [200, 180, 60]], float)
_SHIP_COLORS = np.array([[225, 225, 220], [150, 150, 150], [120, 40, 35], [40, 50, 80], [60, 60, 60]], float)


def _color(rng, base, spread: float = 0.12) -> tuple[int, int, int]:
    """A base colour with brightness and per-channel variation."""
    c = np.asarray(base, float) * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, 6, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _transform(points, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Each shape returns (parts, (hx, hy), oriented): parts are (geometry, colour) in local
# coordinates (x along the object's length, y across it), a geometry being a polygon's
# vertex list or a circle's radius; (hx, hy) are the half-extents of the rectangle
# bounding all parts; the first part is the silhouette that casts the shadow.

def _plane(rng, s):
    length = rng.uniform(28, 58) * s
    span = length * rng.uniform(0.85, 1.1)
    body = length * rng.uniform(0.10, 0.14)
    hx, hy = length / 2, span / 2
    sweep = length * rng.uniform(0.08, 0.2)
    chord = length * rng.uniform(0.16, 0.22)
    wing_x = length * rng.uniform(0.0, 0.12)
    tail_span = span * rng.uniform(0.3, 0.4)
    color = _color(rng, [225, 225, 228] if rng.random() < 0.75 else [150, 155, 160])
    parts = [
        ([(hx, 0), (hx - body, -body / 2), (-hx, -body / 2), (-hx, body / 2), (hx - body, body / 2)], color),
        ([(wing_x + chord / 2, -body / 2), (wing_x - sweep, -hy), (wing_x - sweep - chord * 0.5, -hy),
          (wing_x - chord / 2, -body / 2)], color),
        ([(wing_x + chord / 2, body / 2), (wing_x - sweep, hy), (wing_x - sweep - chord * 0.5, hy),
          (wing_x - chord / 2, body / 2)], color),
        ([(-hx + chord * 0.6, 0), (-hx + chord * 0.1, -tail_span / 2), (-hx, -tail_span / 2), (-hx, tail_span / 2),
          (-hx + chord * 0.1, tail_span / 2)], color),
    ]
    return parts, (hx, hy), True


def _ship(rng, s):
    length = rng.uniform(24, 56) * s
    width = length / rng.uniform(3.2, 5.5)
    hx, hy = length / 2, width / 2
    bow = length * rng.uniform(0.18, 0.3)
    hull = _color(rng, _SHIP_COLORS[rng.integers(len(_SHIP_COLORS))])
    deck = _color(rng, [200, 200, 195] if sum(hull) < 400 else [90, 90, 95])
    parts = [([(-hx, -hy), (hx - bow, -hy), (hx, 0), (hx - bow, hy), (-hx, hy)], hull),
             (_rect(-hx * 0.85, -hy * 0.55, -hx * 0.35, hy * 0.55), deck)]
    return parts, (hx, hy), True


def _storage_tank(rng, s):
    d = rng.uniform(16, 42) * s
    r = d / 2
    inner = _color(rng, [215, 212, 205] if rng.random() < 0.7 else [160, 165, 160])
    rim = _color(rng, np.array(inner) * rng.uniform(0.5, 0.65))
    return [(r, rim), (r * rng.uniform(0.72, 0.85), inner)], (r, r), False


def _small_vehicle(rng, s):
    length = rng.uniform(13, 19) * s
    width = length * rng.uniform(0.45, 0.55)
    hx, hy = length / 2, width / 2
    body = _color(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))])
    glass = _color(rng, [45, 55, 65], 0.2)
    return [(_rect(-hx, -hy, hx, hy), body), (_rect(hx * 0.25, -hy * 0.8, hx * 0.55, hy * 0.8), glass)], (hx, hy), True


def _large_vehicle(rng, s):
    length = rng.uniform(28, 46) * s
    width = rng.uniform(8, 12) * s
    hx, hy = length / 2, width / 2
    cab = _color(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))])
    trailer = _color(rng, [205, 205, 200] if rng.random() < 0.6 else [110, 115, 125])
    gap = length * 0.04
    cab_len = length * rng.uniform(0.16, 0.22)
    return [(_rect(hx - cab_len, -hy * 0.9, hx, hy * 0.9), cab),
            (_rect(-hx, -hy, hx - cab_len - gap, hy), trailer)], (hx, hy), True


_SHAPES = {"plane": _plane, "ship": _ship, "storage-tank": _storage_tank,
           "small-vehicle": _small_vehicle, "large-vehicle": _large_vehicle}


def _background(rng, size: int) -> Image.Image:
    base = _TERRAINS[rng.integers(len(_TERRAINS))] * rng.uniform(0.85, 1.15)
    # Mostly brightness variation with a little hue drift, as in real ground.
    low = (rng.normal(0, 1, (6, 6, 1)) * rng.uniform(6, 14) + rng.normal(0, 3, (6, 6, 3))) + base
    img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 5)):  # fields: large quadrilaterals in a nearby tint
        cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(0.15, 0.45) * size]
        angles = np.sort(rng.uniform(0, 2 * np.pi, 4))
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        draw.polygon(pts, fill=_color(rng, base * rng.uniform(0.8, 1.2), 0.1))
    for _ in range(rng.integers(0, 3)):  # roads: straight strips across the image
        width = rng.uniform(5, 12) * size / 256
        p0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        d = np.array([math.cos(angle), math.sin(angle)]) * size * 1.5
        draw.line([tuple(p0 - d), tuple(p0 + d)], fill=_color(rng, [105, 105, 108], 0.15), width=max(2, round(width)))
    return img


def _overlap(a, b) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _place(rng, size: int, hx: float, hy: float, angle: float, taken: list, max_overlap: float, tries: int = 30):
    """A centre where the rotated rectangle lies inside the image and barely overlaps ``taken``."""
    ex = abs(hx * math.cos(angle)) + abs(hy * math.sin(angle))
    ey = abs(hx * math.sin(angle)) + abs(hy * math.cos(angle))
    margin = 2.0
    if 2 * (ex + margin) >= size or 2 * (ey + margin) >= size:
        return None
    for _ in range(tries):
        cx = rng.uniform(ex + margin, size - ex - margin)
        cy = rng.uniform(ey + margin, size - ey - margin)
        box = (cx - ex, cy - ey, cx + ex, cy + ey)
        if all(_overlap(box, t) <= max_overlap for t in taken):
            return cx, cy, box
    return None


def _draw_buildings(rng, draw, size: int, s: float, taken: list):
    for _ in range(rng.integers(0, 4)):
        hx, hy = rng.uniform(10, 24, 2) * s
        angle = rng.uniform(0, np.pi) if rng.random() < 0.5 else 0.0
        spot = _place(rng, size, hx, hy, angle, taken, 0.0, tries=5)
        if spot is None:
            continue
        cx, cy, box = spot
        roof = _color(rng, _ROOFS[rng.integers(len(_ROOFS))])
        shadow = tuple(int(v * 0.45) for v in roof)
        draw.polygon(_transform(_rect(-hx, -hy, hx, hy), angle, cx + 2 * s, cy + 2 * s), fill=shadow)
        draw.polygon(_transform(_rect(-hx, -hy, hx, hy), angle, cx, cy), fill=roof)
        taken.append(box)


def synthetic_sample(rng: np.random.Generator, image_size: int = 256) -> tuple[np.ndarray, DotaAnnotation]:
    """One image (HxWx3 uint8) and its DOTA annotation."""
    s = image_size / 256
    img = _background(rng, image_size)
    draw = ImageDraw.Draw(img)
    buildings: list = []
    _draw_buildings(rng, draw, image_size, s, buildings)
    taken = list(buildings)
    objects = []
    for _ in range(rng.integers(4, 11)):
        label = SYNTHETIC_CLASSES[rng.integers(len(SYNTHETIC_CLASSES))]
        parts, (hx, hy), oriented = _SHAPES[label](rng, s)
        angle = rng.uniform(0, 2 * np.pi) if oriented else 0.0
        spot = _place(rng, image_size, hx, hy, angle, taken, 0.05)
        if spot is None:
            continue
        cx, cy, box = spot
        taken.append(box)
        shadow = tuple(int(v * 0.45) for v in _ground_color(img, cx, cy))
        _draw_part(draw, parts[0][0], angle, cx + 1.5 * s, cy + 1.5 * s, shadow)
        for part, color in parts:
            _draw_part(draw, part, angle, cx, cy, color)
        poly = _transform(_rect(-hx, -hy, hx, hy), angle, cx, cy)
        objects.append(DotaObject(tuple(round(v, 1) for xy in poly for v in xy), label, 0))
    # Optics blur as a 3x3 kernel of random strength (a Gaussian blur costs 4x more), then
    # luminance sensor noise.
    side = float(rng.uniform(0.3, 1.0))
    img = img.filter(ImageFilter.Kernel((3, 3), [side * side, side, side * side, side, 1.0, side,
                                                 side * side, side, side * side]))
    noise = rng.standard_normal((image_size, image_size, 1), dtype=np.float32) * np.float32(rng.uniform(2, 6))
    noisy = np.asarray(img, dtype=np.float32) + noise
    return np.clip(noisy, 0, 255).astype(np.uint8), DotaAnnotation(objects, IMAGESOURCE, GSD / s)


def _ground_color(img: Image.Image, cx: float, cy: float) -> tuple[int, int, int]:
    """The ground colour under a point (shadows are a darker version of it)."""
    x = min(max(int(cx), 0), img.width - 1)
    y = min(max(int(cy), 0), img.height - 1)
    return img.getpixel((x, y))


def _draw_part(draw, part, angle, cx, cy, color):
    if isinstance(part, float):
        draw.ellipse([cx - part, cy - part, cx + part, cy + part], fill=color)
    else:
        draw.polygon(_transform(part, angle, cx, cy), fill=color)


def generate_split(folder, count: int, image_size: int, seed: int, split_id: int, image_format: str = "jpg") -> dict:
    """Write ``count`` images + DOTA labels into folder/images and folder/labelTxt."""
    folder = Path(folder)
    per_class = dict.fromkeys(SYNTHETIC_CLASSES, 0)
    for i in range(count):
        rng = np.random.default_rng([seed, split_id, i])
        image, annotation = synthetic_sample(rng, image_size)
        name = f"S{split_id}{i:05d}"
        save_image(folder / "images" / f"{name}.{image_format}", image)
        write_dota_labels(folder / "labelTxt" / f"{name}.txt", annotation)
        for obj in annotation.objects:
            per_class[obj.label] += 1
    return per_class


def generate_synthetic_dataset(root, num_train: int = 480, num_val: int = 120, image_size: int = 256,
                               seed: int = 0, image_format: str = "jpg") -> dict:
    """Write root/train and root/val (DOTA folders); replaces existing splits. Returns a summary.

    Images are JPEG (quality 92) by default: PNG encoding of noisy texture costs ten times
    more and was most of the generation time; pass image_format="png" for lossless files.
    """
    root = Path(root)
    t0 = time.perf_counter()
    summary = {"root": str(root), "classes": list(SYNTHETIC_CLASSES), "image_size": image_size, "seed": seed}
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        final = root / split
        tmp = root / f".{split}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        (tmp / "labelTxt").mkdir()
        try:
            objects = generate_split(tmp, count, image_size, seed, split_id, image_format)
            summary[split] = {"images": count, "objects": objects}
            old = root / f".{split}.old{os.getpid()}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - t0
    return summary
