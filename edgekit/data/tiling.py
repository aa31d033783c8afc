"""Cutting large aerial images into overlapping tiles, and merging detections back.

Tiles follow the DOTA devkit's ImgSplit: windows of ``tile_size`` pixels every
``tile_size - overlap`` pixels, the last window of a row/column moved back to lie flush
with the border (so no window hangs over the edge unless the image is smaller than a
tile; such tiles are zero-padded at the bottom/right).

Object splitting rule (:func:`split_annotation`), with ``f`` = area(polygon ∩ window) /
area(polygon):

* ``f == 0`` (no overlap, or touching only along an edge): dropped;
* ``f >= min_visible``: kept with its own difficult flag;
* ``0 < f < min_visible``: kept, marked difficult (1), so training neither rewards nor
  punishes detecting a small fragment (the devkit writes 2 here; both mean "difficult").

A polygon entirely inside the window is kept unchanged (shifted to tile coordinates).
A cut polygon becomes the visible part: kept as is when it is a quadrilateral, otherwise
its minimum-area enclosing rectangle, clamped to the window. Degenerate (zero-area)
polygons count as fully visible when all their corners are inside the window, else are
dropped. The clipping is written here (Sutherland-Hodgman against a rectangle) rather
than taken from shapely to avoid a heavy dependency for twenty lines.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgekit.boxes import batched_nms
from edgekit.data.dota import DotaAnnotation, DotaObject, read_dota_dataset, write_dota_labels
from edgekit.data.images import load_image, save_image
from edgekit.config import StageConfig, require
from edgekit.errors import EdgekitError
from edgekit.fileio import check_output_dir

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # flush with the border
    return sorted(set(starts))


def tile_windows(height: int, width: int, tile_size: int = 1024, overlap: int = 200) -> list[Window]:
    """Windows (x0, y0, x1, y1) covering every pixel of a height x width image, row-major."""
    if tile_size <= 0 or not 0 <= overlap < tile_size:
        raise EdgekitError(f"tile size {tile_size} and overlap {overlap} are invalid; "
                           f"need tile_size > 0 and 0 <= overlap < tile_size")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    stride = tile_size - overlap
    return [(x0, y0, min(x0 + tile_size, width), min(y0 + tile_size, height))
            for y0 in _starts(height, tile_size, stride) for x0 in _starts(width, tile_size, stride)]


def iter_tiles(image: np.ndarray, tile_size: int = 1024, overlap: int = 200) -> Iterator[tuple[Window, np.ndarray]]:
    """(window, tile) pairs; each tile is tile_size x tile_size, zero-padded at the bottom/right."""
    h, w = image.shape[:2]
    for window in tile_windows(h, w, tile_size, overlap):
        yield window, crop_padded(image, window, tile_size)


def crop_padded(image: np.ndarray, window: Window, tile_size: int) -> np.ndarray:
    x0, y0, x1, y1 = window
    crop = image[y0:y1, x0:x1]
    if crop.shape[:2] == (tile_size, tile_size):
        return np.ascontiguousarray(crop)
    tile = np.zeros((tile_size, tile_size, *image.shape[2:]), dtype=image.dtype)
    tile[:y1 - y0, :x1 - x0] = crop
    return tile


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a polygon given as [K, 2] vertices."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def clip_polygon(points: np.ndarray, window: Window) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon [K, 2] to the rectangle ``window``."""
    x0, y0, x1, y1 = window
    out = [tuple(p) for p in points]
    # Each edge of the window as (axis, bound, keep-if-greater).
    for axis, bound, greater in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if not out:
            break
        inp, out = out, []

        def inside(p):
            return p[axis] >= bound if greater else p[axis] <= bound

        for i, cur in enumerate(inp):
            prev = inp[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(_intersect(prev, cur, axis, bound))
                out.append(cur)
            elif inside(prev):
                out.append(_intersect(prev, cur, axis, bound))
    pts = np.array(out, dtype=np.float64).reshape(-1, 2)
    if len(pts) > 1:  # drop repeated consecutive vertices (a corner exactly on the border)
        keep = np.any(np.abs(pts - np.roll(pts, 1, axis=0)) > 1e-9, axis=1)
        pts = pts[keep]
    return pts


def _intersect(p, q, axis: int, bound: float):
    t = (bound - p[axis]) / (q[axis] - p[axis])
    other = 1 - axis
    r = [0.0, 0.0]
    r[axis] = float(bound)
    r[other] = p[other] + t * (q[other] - p[other])
    return tuple(r)


def min_area_rectangle(points: np.ndarray) -> np.ndarray:
    """The minimum-area rectangle [4, 2] enclosing the points (tested against each hull edge)."""
    hull = _convex_hull(points)
    if len(hull) < 3:
        x1, y1 = points.min(0)
        x2, y2 = points.max(0)
        return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
    best = None
    for i in range(len(hull)):
        edge = hull[(i + 1) % len(hull)] - hull[i]
        norm = np.hypot(*edge)
        if norm < 1e-12:
            continue
        u = edge / norm
        rot = np.array([u, [-u[1], u[0]]])  # rows: axis along the edge, axis across it
        proj = hull @ rot.T
        lo, hi = proj.min(0), proj.max(0)
        area = float(np.prod(hi - lo))
        if best is None or area < best[0]:
            corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
            best = (area, corners @ rot)
    return best[1]


def _convex_hull(points: np.ndarray) -> np.ndarray:
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64))))
    if len(pts) < 3:
        return np.array(pts)

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1])


def split_object(obj: DotaObject, window: Window, min_visible: float = 0.7) -> DotaObject | None:
    """The part of ``obj`` inside ``window`` in tile coordinates, or None (rule in the module doc)."""
    x0, y0, x1, y1 = window
    pts = np.asarray(obj.poly, dtype=np.float64).reshape(4, 2)
    inside_all = bool(np.all((pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)))
    offset = np.array([x0, y0], dtype=np.float64)
    if inside_all:
        return DotaObject(tuple(float(v) for v in (pts - offset).ravel()), obj.label, obj.difficult)
    area = polygon_area(pts)
    if area <= 0:
        return None
    visible = clip_polygon(pts, window)
    fraction = polygon_area(visible) / area
    if fraction <= 0:
        return None
    quad = visible if len(visible) == 4 else min_area_rectangle(visible)
    quad = np.stack([quad[:, 0].clip(x0, x1), quad[:, 1].clip(y0, y1)], axis=1) - offset
    difficult = obj.difficult if fraction >= min_visible else max(obj.difficult, 1)
    return DotaObject(tuple(float(v) for v in quad.ravel()), obj.label, difficult)


def split_annotation(annotation: DotaAnnotation, window: Window, min_visible: float = 0.7) -> DotaAnnotation:
    """The objects of ``annotation`` visible in ``window``, in the window's coordinates."""
    objects = [o for o in (split_object(obj, window, min_visible) for obj in annotation.objects) if o is not None]
    return DotaAnnotation(objects, annotation.imagesource, annotation.gsd)


def tile_name(stem: str, window: Window) -> str:
    """The devkit's tile naming, ``P0706__1__512___0`` (name, scale, x0, y0), so its merge tools apply."""
    return f"{stem}__1__{window[0]}___{window[1]}"


@dataclass
class TileConfig(StageConfig):
    tile_size: int = 1024
    overlap: int = 200
    min_visible: float = 0.7     # objects less visible than this in a tile are kept but marked difficult
    skip_empty: bool = False     # leave out tiles without any object
    progress: bool = True

    def check(self) -> None:
        require(32 <= self.tile_size <= 1 << 15, "tile_size", self.tile_size, "an integer in [32, 32768]")
        require(0 <= self.overlap < self.tile_size, "overlap", self.overlap, "in [0, --tile-size)")
        require(0 <= self.min_visible <= 1, "min_visible", self.min_visible, "a fraction in [0, 1]")


def tile(src, dst, config: TileConfig) -> dict:
    """The tile stage: :func:`tile_dataset` with a checked config; returns the summary."""
    check_output_dir(Path(dst).parent, "destination")
    return tile_dataset(src, dst, config.tile_size, config.overlap, config.min_visible,
                        skip_empty=config.skip_empty, progress=config.progress)


def tile_dataset(src_root, dst_root, tile_size: int = 1024, overlap: int = 200, min_visible: float = 0.7,
                 classes=None, skip_empty: bool = False, progress: bool = True) -> dict:
    """Tile every image of a DOTA folder into a new DOTA folder ``dst_root`` (tiles are PNG).

    The folder is built under a temporary name next to ``dst_root`` and renamed when done.
    ``skip_empty`` leaves out tiles without any object. Returns a summary dict.
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    if dst_root.exists() and (not dst_root.is_dir() or any(dst_root.iterdir())):
        raise EdgekitError(f"destination {dst_root} already exists and is not empty; remove it or choose another")
    items = read_dota_dataset(src_root, classes)
    tmp = dst_root.with_name(f".{dst_root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "labelTxt").mkdir()
    tiles = objects = 0
    try:
        for image_path, annotation in tqdm(items, desc="tile", disable=not progress):
            image = load_image(image_path)
            for window, tile in iter_tiles(image, tile_size, overlap):
                part = split_annotation(annotation, window, min_visible)
                if skip_empty and not part.objects:
                    continue
                name = tile_name(image_path.stem, window)
                save_image(tmp / "images" / f"{name}.png", tile)
                write_dota_labels(tmp / "labelTxt" / f"{name}.txt", part)
                tiles, objects = tiles + 1, objects + len(part.objects)
        if dst_root.exists():
            dst_root.rmdir()
        os.replace(tmp, dst_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"src": str(src_root), "dst": str(dst_root), "images": len(items), "tiles": tiles, "objects": objects,
            "tile_size": tile_size, "overlap": overlap}


def merge_tile_detections(detections, iou_threshold: float = 0.5, rotated: bool = False):
    """Detections from tiles -> (boxes [N, 4], scores [N], labels [N]) in image coordinates.

    ``detections`` is a list of (window, boxes in tile coordinates, scores, labels); boxes
    are shifted by the window origin and duplicates from overlapping tiles removed by
    class-aware NMS. Output is sorted by decreasing score. ``rotated``: the boxes are
    rotated boxes (cx, cy, w, h, angle) [N, 5], their centres shifted, the NMS rotated.
    """
    width = 5 if rotated else 4
    boxes, scores, labels = [], [], []
    for window, b, s, lab in detections:
        b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, width)
        origin = [window[0], window[1]] * 2 if not rotated else [window[0], window[1], 0.0, 0.0, 0.0]
        boxes.append(b + torch.tensor(origin, dtype=b.dtype, device=b.device))
        scores.append(torch.as_tensor(s, dtype=torch.float32).reshape(-1))
        labels.append(torch.as_tensor(lab, dtype=torch.long).reshape(-1))
    if not boxes:
        return torch.zeros(0, width), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    if rotated:
        from edgekit.rotated import batched_rotated_nms

        keep = batched_rotated_nms(boxes, scores, labels, iou_threshold)
    else:
        keep = batched_nms(boxes, scores, labels, iou_threshold)
    return boxes[keep], scores[keep], labels[keep]
