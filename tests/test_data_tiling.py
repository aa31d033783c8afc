"""Tiling: windows cover the image, objects are clipped by the documented rule (checked
against point sampling with matplotlib's polygon test), duplicates across tiles merge."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath

from edgekit.boxes import box_iou
from edgekit.data.dota import DotaAnnotation, DotaObject, read_dota_dataset, read_dota_labels
from edgekit.data.images import load_image
from edgekit.data.tiling import (iter_tiles, merge_tile_detections, min_area_rectangle, polygon_area,
                                 split_annotation, split_object, tile_dataset, tile_windows)
from edgekit.errors import EdgekitError

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota_example"
needs_example = pytest.mark.skipif(not EXAMPLE.is_dir(), reason=f"real DOTA sample data not found at {EXAMPLE}")


def _check_cover(h, w, tile, overlap):
    windows = tile_windows(h, w, tile, overlap)
    cover = np.zeros((h, w), dtype=np.int32)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == min(tile, w) and y1 - y0 == min(tile, h)  # full tiles unless the image is smaller
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    xs = sorted({x for x, *_ in windows})
    assert all(b - a <= tile - overlap for a, b in zip(xs, xs[1:]))  # neighbours overlap by >= overlap
    assert max(x1 for *_, x1, _ in windows) == w and max(y1 for *_, y1 in windows) == h
    return windows


def test_windows_cover_random_sizes():
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(30):
        tile = rng.randrange(16, 200)
        _check_cover(rng.randrange(1, 700), rng.randrange(1, 700), tile, rng.randrange(0, tile))


def test_window_edge_cases():
    assert tile_windows(100, 80, 128, 16) == [(0, 0, 80, 100)]
    assert tile_windows(128, 128, 128, 16) == [(0, 0, 128, 128)]
    assert [w[0] for w in tile_windows(10, 300, 128, 28)] == [0, 100, 172]
    for tile, overlap in ((0, 0), (64, 64), (64, -1)):
        with pytest.raises(EdgekitError):
            tile_windows(100, 100, tile, overlap)


def test_iter_tiles_reassemble_and_pad():
    image = np.random.default_rng().integers(0, 256, (300, 170, 3), dtype=np.uint8)
    rebuilt = np.zeros_like(image)
    for (x0, y0, x1, y1), tile in iter_tiles(image, 128, 30):
        assert tile.shape == (128, 128, 3)
        rebuilt[y0:y1, x0:x1] = tile[:y1 - y0, :x1 - x0]
        assert not tile[y1 - y0:].any() and not tile[:, x1 - x0:].any()  # zero padding
    np.testing.assert_array_equal(rebuilt, image)


def _sample(poly, window, n=300):
    pts = np.asarray(poly).reshape(4, 2)
    (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    gx, gy = np.meshgrid(np.linspace(x1, x2, n), np.linspace(y1, y2, n))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    inside = MplPath(pts).contains_points(grid)
    wx0, wy0, wx1, wy1 = window
    in_window = (grid[:, 0] >= wx0) & (grid[:, 0] <= wx1) & (grid[:, 1] >= wy0) & (grid[:, 1] <= wy1)
    return grid, inside, in_window


def _sampled_fraction(poly, window):
    """Visible fraction by point sampling (independent of the clipping code)."""
    _, inside, in_window = _sample(poly, window)
    return (inside & in_window).sum() / max(inside.sum(), 1)


def _sampled_points(poly, window):
    grid, inside, in_window = _sample(poly, window)
    return grid[inside & in_window]


def _rotated_rect(rng, cx, cy):
    hx, hy, a = rng.uniform(5, 60), rng.uniform(5, 60), rng.uniform(0, np.pi)
    c, s = np.cos(a), np.sin(a)
    return tuple(float(v) for x, y in ((-hx, -hy), (hx, -hy), (hx, hy), (-hx, hy))
                 for v in (cx + x * c - y * s, cy + x * s + y * c))


def test_split_rule_matches_sampling():
    seed = random.randrange(2**32)
    rng = np.random.default_rng(seed)
    window = (100, 80, 300, 260)
    objects = [DotaObject(_rotated_rect(rng, *rng.uniform(40, 360, 2)), "ship", int(rng.integers(0, 2)))
               for _ in range(200)]
    out = split_annotation(DotaAnnotation(objects, "GF", 1.0), window, min_visible=0.7)
    assert out.imagesource == "GF" and out.gsd == 1.0
    pieces = [split_object(obj, window, 0.7) for obj in objects]
    assert out.objects == [p for p in pieces if p is not None]
    for obj, piece in zip(objects, pieces):
        f = _sampled_fraction(obj.poly, window)
        if f < 0.01:
            continue  # too close to call by sampling
        assert piece is not None, f"seed {seed}"
        pts = np.asarray(piece.poly).reshape(4, 2)
        assert pts.min() >= -1e-9 and pts[:, 0].max() <= 200 + 1e-9 and pts[:, 1].max() <= 180 + 1e-9
        corners = np.asarray(obj.poly).reshape(4, 2)
        if ((corners >= [100, 80]) & (corners <= [300, 260])).all():
            np.testing.assert_allclose(piece.poly, np.asarray(obj.poly) - np.tile([100, 80], 4), atol=1e-9)
        if f >= 0.72:
            assert piece.difficult == obj.difficult, f"seed {seed}"
        elif f <= 0.68:
            assert piece.difficult >= 1, f"seed {seed}"
        # The horizontal box of the piece holds every sampled visible point.
        visible = _sampled_points(obj.poly, window) - [100, 80]
        bx1, by1, bx2, by2 = piece.box
        assert bx1 <= visible[:, 0].min() + 1e-6 and bx2 >= visible[:, 0].max() - 1e-6, f"seed {seed}"
        assert by1 <= visible[:, 1].min() + 1e-6 and by2 >= visible[:, 1].max() - 1e-6, f"seed {seed}"
        if len(_unique_visible_corners(obj.poly, window)) == 4:  # the visible part itself, so same area
            full = polygon_area(corners)
            assert abs(polygon_area(pts) - f * full) <= 0.015 * full, f"seed {seed}"


def _unique_visible_corners(poly, window):
    from edgekit.data.tiling import clip_polygon
    return clip_polygon(np.asarray(poly).reshape(4, 2), window)


def test_split_axis_aligned_exact():
    obj = DotaObject((90, 10, 130, 10, 130, 30, 90, 30), "plane", 0)  # 40 x 20, 30 px inside x < 120
    assert split_annotation(DotaAnnotation([obj]), (0, 0, 120, 120), 0.7).objects == [
        DotaObject((90, 10, 120, 10, 120, 30, 90, 30), "plane", 0)]
    # 10/40 visible in the next window: kept, marked difficult.
    assert split_annotation(DotaAnnotation([obj]), (120, 0, 240, 120), 0.7).objects == [
        DotaObject((0, 10, 10, 10, 10, 30, 0, 30), "plane", 1)]
    assert split_annotation(DotaAnnotation([obj]), (130, 0, 250, 120), 0.7).objects == []  # touches an edge


def test_min_area_rectangle():
    rng = np.random.default_rng()
    pts = rng.normal(size=(30, 2)) * [5, 1]
    rect = min_area_rectangle(pts)
    assert MplPath(np.vstack([rect, rect[:1]])).contains_points(pts, radius=1e-6).all() or \
        MplPath(np.vstack([rect[::-1], rect[:1]])).contains_points(pts, radius=-1e-6).all()
    x1, y1 = pts.min(0)
    x2, y2 = pts.max(0)
    assert polygon_area(rect) <= (x2 - x1) * (y2 - y1) + 1e-9


@needs_example
def test_real_image_tiles(tmp_path):
    image = load_image(EXAMPLE / "images" / "P1888.png")
    ann = read_dota_labels(EXAMPLE / "labelTxt" / "P1888.txt")
    h, w = image.shape[:2]
    windows = _check_cover(h, w, 512, 100)
    seen = set()
    for window, tile in iter_tiles(image, 512, 100):
        x0, y0, x1, y1 = window
        np.testing.assert_array_equal(tile[:y1 - y0, :x1 - x0], image[y0:y1, x0:x1])
        for piece in split_annotation(ann, window).objects:
            pts = np.asarray(piece.poly).reshape(4, 2)
            assert pts.min() >= 0 and pts[:, 0].max() <= x1 - x0 and pts[:, 1].max() <= y1 - y0
            seen.add((piece.label, tuple(np.round(pts + [x0, y0], 6).ravel())))
    # Every object lies wholly in some tile here (objects are small), so each appears unchanged.
    for obj in ann.objects:
        assert (obj.label, tuple(np.round(obj.poly, 6))) in seen
    out = tile_dataset(EXAMPLE, tmp_path / "tiles", 512, 100, progress=False)
    items = read_dota_dataset(tmp_path / "tiles")
    assert out["tiles"] == len(items) == len(windows) + len(tile_windows(1182, 1111, 512, 100))
    assert all(load_image(p).shape == (512, 512, 3) for p, _ in items[:3])
    assert sum(len(a.objects) for _, a in items) == out["objects"] >= 600
    assert any("P0706__1__0___0" == p.stem for p, _ in items)
    with pytest.raises(EdgekitError, match="not empty"):
        tile_dataset(EXAMPLE, tmp_path / "tiles", 512, 100, progress=False)


def test_merge_removes_cross_tile_duplicates():
    # One object at image box (480, 100, 540, 140), seen by tiles starting at x=0 and x=412.
    windows = [(0, 0, 512, 512), (412, 0, 924, 512)]
    dets = [(windows[0], torch.tensor([[480.0, 100, 512, 140], [10, 10, 30, 30]]), torch.tensor([0.6, 0.9]),
             torch.tensor([1, 0])),
            (windows[1], torch.tensor([[68.0, 100, 128, 140], [68.0, 100, 128, 140]]), torch.tensor([0.8, 0.7]),
             torch.tensor([1, 2]))]
    boxes, scores, labels = merge_tile_detections(dets, iou_threshold=0.5)
    expected = torch.tensor([[10.0, 10, 30, 30], [480, 100, 540, 140], [480, 100, 540, 140]])
    assert torch.equal(scores, torch.tensor([0.9, 0.8, 0.7]))
    assert torch.equal(labels, torch.tensor([0, 1, 2]))  # the label-2 copy is another class: kept
    assert torch.allclose(boxes, expected)
    assert box_iou(torch.tensor([[480.0, 100, 512, 140]]), expected[1:2]) > 0.5  # it was a real duplicate
    empty = merge_tile_detections([])
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,) and empty[2].dtype == torch.long
