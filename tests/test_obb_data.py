"""Rotated boxes in the data pipeline: flips and 90-degree rotations move them as they move
the polygon's corners and the drawn pixels; DetectionDataset's ``rboxes``; the synthetic
set's labels are the objects' true rotated rectangles."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from shapely.geometry import Polygon

from edgekit.data.dataset import DetectionDataset
from edgekit.data.dota import DotaAnnotation, DotaObject, write_dota_labels
from edgekit.data.images import save_image
from edgekit.data.synthetic import SYNTHETIC_CLASSES, synthetic_sample
from edgekit.data.transforms import hflip, random_flip_rotate, rot90, vflip
from edgekit.rotated import canonical_rboxes, poly_to_rbox, rbox_iou, rbox_to_box, rbox_to_poly


def random_rboxes_inside(rng, n, h, w):
    """Rotated boxes (any angle, either side longer) lying inside an h x w image."""
    out = []
    while len(out) < n:
        r = [rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 40), rng.uniform(2, 20), rng.uniform(-4, 4)]
        p = rbox_to_poly(np.array(r))
        if p[:, 0].min() > 1 and p[:, 0].max() < w - 1 and p[:, 1].min() > 1 and p[:, 1].max() < h - 1:
            out.append(r)
    return torch.tensor(out, dtype=torch.float64)


# The pixel maps of the transforms, written from their definitions: (x, y) -> new (x, y).
def map_hflip(p, h, w):
    return np.stack([w - p[..., 0], p[..., 1]], -1)


def map_vflip(p, h, w):
    return np.stack([p[..., 0], h - p[..., 1]], -1)


def map_rot90(p, h, w):  # counter-clockwise, as torch.rot90 on (H, W)
    return np.stack([p[..., 1], w - p[..., 0]], -1)


def same_rectangles(a, b, iou_tol=1e-6, atol=1e-5):
    """Rotated boxes equal as rectangles (IoU 1, canonical forms equal where not square)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.diag(rbox_iou(a, b)) == pytest.approx(1.0, abs=iou_tol)
    ca, cb = canonical_rboxes(a), canonical_rboxes(b)
    oblong = np.abs(ca[:, 2] - ca[:, 3]) > 1e-3
    np.testing.assert_allclose(ca[oblong], cb[oblong], atol=atol)


@pytest.mark.parametrize("h, w", [(96, 96), (80, 112)])
def test_transforms_move_rboxes_like_the_corners(rng, h, w):
    rboxes = random_rboxes_inside(rng, 12, h, w)
    boxes = rbox_to_box(rboxes).float()
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    corners = rbox_to_poly(rboxes.numpy())
    for op, steps in ((hflip, [map_hflip]), (vflip, [map_vflip]), (lambda *a, **k: rot90(*a, k=1, **k), [map_rot90]),
                      (lambda *a, **k: rot90(*a, k=3, **k), [map_rot90] * 3)):
        img2, boxes2, rboxes2 = op(image, boxes, rboxes=rboxes)
        p, (hh, ww) = corners, (h, w)
        for step in steps:
            p = step(p, hh, ww)
            hh, ww = (ww, hh) if step is map_rot90 else (hh, ww)
        assert img2.shape[-2:] == (hh, ww)
        same_rectangles(rboxes2.numpy(), poly_to_rbox(p))
        c = rboxes2.numpy()
        assert (c[:, 2] >= c[:, 3]).all() and (c[:, 4] >= -math.pi / 2).all() and (c[:, 4] < math.pi / 2).all()
        np.testing.assert_allclose(rbox_to_box(rboxes2).numpy(), boxes2.numpy(), atol=1e-4)
    # Without rotated boxes the transforms keep their two-item results.
    assert len(hflip(image, boxes)) == 2 and len(rot90(image, boxes, 1)) == 2 and len(random_flip_rotate(image, boxes)) == 2


def test_random_flip_rotate_moves_rboxes_with_the_drawn_pixels(rng):
    """Draw a rotated rectangle, augment: its pixels lie in the returned rotated box."""
    h = w = 96
    rbox = random_rboxes_inside(rng, 1, h, w)
    rbox[0, 2:4] = torch.tensor([36.0, 14.0])
    while not (rbox_to_poly(rbox.numpy())[0].min() > 1 and rbox_to_poly(rbox.numpy())[0].max() < 95):
        rbox = random_rboxes_inside(rng, 1, h, w)
        rbox[0, 2:4] = torch.tensor([36.0, 14.0])
    canvas = Image.new("L", (w, h))
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in rbox_to_poly(rbox.numpy())[0]], fill=255)
    image = torch.from_numpy(np.asarray(canvas).copy())[None].repeat(3, 1, 1)
    seen = set()
    for _ in range(16):
        img2, _, r2 = random_flip_rotate(image, rbox_to_box(rbox).float(), rboxes=rbox)
        mask = img2[0].numpy() > 127
        ys, xs = np.nonzero(mask)
        drawn = Polygon(rbox_to_poly(r2.numpy())[0])
        inside = np.mean([drawn.buffer(1.0).contains(Polygon.from_bounds(x, y, x + 1, y + 1).centroid)
                          for x, y in zip(xs, ys)])
        assert inside > 0.99
        assert abs(mask.sum() - drawn.area) < drawn.length  # PIL's fill adds at most a one-pixel rim
        seen.add(tuple(np.round(r2.numpy()[0], 3)))
    assert len(seen) > 1


def _rotated_folder(root, rng, size=(90, 120)):
    h, w = size
    rboxes = random_rboxes_inside(rng, 5, h, w).numpy()
    save_image(root / "images" / "a.png", np.zeros((h, w, 3), np.uint8))
    objs = [DotaObject(tuple(float(v) for v in p.ravel()), "ship" if i % 2 else "plane")
            for i, p in enumerate(rbox_to_poly(rboxes))]
    objs.append(DotaObject((w + 10.0, 5, w + 20, 5, w + 20, 15, w + 10, 15), "ship"))  # outside: dropped
    write_dota_labels(root / "labelTxt" / "a.txt", DotaAnnotation(objs))
    return rboxes


def test_dataset_returns_rotated_targets(tmp_path, rng):
    rboxes = _rotated_folder(tmp_path, rng)
    plain = DetectionDataset(tmp_path, ["plane", "ship"], image_size=128, rotated=False)
    assert "rboxes" not in plain[0][1]
    ds = DetectionDataset(tmp_path, ["plane", "ship"], image_size=128)  # rotated boxes by default
    _, t = ds[0]
    scale = 128 / 120
    want = rboxes.copy()
    want[:, :4] *= scale
    assert t["rboxes"].shape == (5, 5) and t["rboxes"].dtype == torch.float32
    same_rectangles(t["rboxes"].numpy(), want, iou_tol=1e-4, atol=1e-3)  # labels are written rounded, rboxes are float32
    np.testing.assert_allclose(rbox_to_box(t["rboxes"]).numpy(), t["boxes"].numpy(), atol=1e-3)
    assert t["labels"].tolist() == [0, 1, 0, 1, 0]
    aug = DetectionDataset(tmp_path, ["plane", "ship"], image_size=128, rotated=True, augment=True)
    for _ in range(8):
        _, t = aug[0]
        np.testing.assert_allclose(rbox_to_box(t["rboxes"]).numpy(), t["boxes"].numpy(), atol=1e-3)


def test_synthetic_labels_are_the_true_rotated_rectangles(rng):
    """Each label is a rectangle with the class's proportions (a horizontal box around a
    turned object would not be), at every orientation."""
    angles, ratios = [], {c: [] for c in SYNTHETIC_CLASSES}
    for _ in range(12):
        _, ann = synthetic_sample(rng, 256)
        for obj in ann.objects:
            poly = np.array(obj.poly).reshape(4, 2)
            edges = np.roll(poly, -1, 0) - poly
            lengths = np.linalg.norm(edges, axis=1)
            cosines = [abs(np.dot(edges[i], edges[i - 1])) / (lengths[i] * lengths[i - 1]) for i in range(4)]
            assert max(cosines) < 0.3 / lengths.min()  # right angles, up to 0.1 px label rounding
            rb = poly_to_rbox(poly)
            ratios[obj.label].append(rb[3] / rb[2])
            if obj.label != "storage-tank":
                angles.append(rb[4])
    assert all(0.97 < r <= 1.0 for r in ratios["storage-tank"])
    assert all(0.40 < r < 0.60 for r in ratios["small-vehicle"])
    assert all(1 / 6.0 < r < 1 / 3.0 for r in ratios["ship"])
    assert all(r < 0.45 for r in ratios["large-vehicle"])
    # Orientations cover the half-turn (uniform draws: each quarter holds some).
    counts = np.histogram(angles, bins=4, range=(-math.pi / 2, math.pi / 2))[0]
    assert (counts > 0).all(), counts
