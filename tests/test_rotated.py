"""Rotated-box geometry against independent references: shapely polygons, a float64
Gaussian Bhattacharyya computation, the tiling module's hull-based minimum-area
rectangle, and a brute-force greedy NMS."""

import math

import numpy as np
import pytest
import torch
from shapely.geometry import MultiPoint, Polygon

from edgekit.data.tiling import min_area_rectangle
from edgekit.rotated import (batched_rotated_nms, canonical_rboxes, poly_to_rbox, probiou, rbox_iou, rbox_to_box,
                             rbox_to_poly, rotated_nms)


def random_rboxes(rng, n, size=60.0, max_side=30.0):
    return np.column_stack([rng.uniform(0, size, (n, 2)), rng.uniform(0.5, max_side, (n, 2)),
                            rng.uniform(-2 * math.pi, 2 * math.pi, n)])


def shapely_poly(rbox):
    """The rectangle from its definition (an independent corner formula)."""
    cx, cy, w, h, a = rbox
    u, v = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    c = np.array([cx, cy])
    return Polygon([c + sx * w / 2 * u + sy * h / 2 * v for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))])


def shapely_iou(a, b):
    pa, pb = shapely_poly(a), shapely_poly(b)
    union = pa.union(pb).area
    return pa.intersection(pb).area / union if union > 0 else 0.0


def edge_case_pairs(rng):
    """(a, b) pairs: identical, swapped representation, disjoint, contained, touching,
    thin, angles at the [-pi/2, pi/2) boundary, crossing, concentric squares at 45 degrees."""
    base = [30.0, 40.0, 20.0, 8.0, float(rng.uniform(-1.5, 1.5))]
    cx, cy, w, h, a = base
    return [
        (base, base),
        (base, [cx, cy, h, w, a + math.pi / 2]),
        (base, [cx, cy, w, h, a + math.pi]),
        (base, [cx + 100, cy, w, h, a]),
        (base, [cx, cy, w / 3, h / 3, a + 0.3]),
        (base, [cx + w * math.cos(a), cy + w * math.sin(a), w, h, a]),  # sharing an edge
        ([cx, cy, 40.0, 0.05, 0.2], [cx, cy, 40.0, 0.05, 0.25]),
        ([cx, cy, 40.0, 0.05, 0.2], [cx, cy, 0.05, 40.0, 0.2]),
        ([cx, cy, w, h, -math.pi / 2], [cx + 1, cy, w, h, math.pi / 2 - 1e-9]),
        ([cx, cy, w, h, -math.pi / 2], [cx, cy, w, h, math.pi / 2]),
        ([cx, cy, 30.0, 4.0, 0.0], [cx, cy, 30.0, 4.0, math.pi / 2]),  # a cross
        ([cx, cy, 10.0, 10.0, 0.0], [cx, cy, 10.0, 10.0, math.pi / 4]),  # octagon intersection
        ([cx, cy, 0.0, 5.0, 0.3], [cx, cy, 6.0, 5.0, 0.3]),  # zero area
    ]


def test_rbox_iou_matches_shapely_on_random_and_edge_cases(rng):
    a, b = random_rboxes(rng, 40, size=40.0), random_rboxes(rng, 30, size=40.0)
    got = rbox_iou(torch.tensor(a), torch.tensor(b)).numpy()
    want = np.array([[shapely_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert (want > 0).mean() > 0.1  # the random boxes do overlap often
    for x, y in edge_case_pairs(rng):
        got = rbox_iou(np.array([x]), np.array([y]))[0, 0]
        assert got == pytest.approx(shapely_iou(x, y), abs=1e-9), (x, y)
        assert rbox_iou(np.array([y]), np.array([x]))[0, 0] == pytest.approx(got, abs=1e-12)


def test_rbox_iou_blocks_and_equivalent_representations(rng):
    r = random_rboxes(rng, 50)
    full = rbox_iou(r, r)
    np.testing.assert_allclose(rbox_iou(r, r, max_pairs=7), full, rtol=0, atol=0)
    np.testing.assert_allclose(np.diag(full), 1.0, atol=1e-12)
    swapped = np.column_stack([r[:, :2], r[:, 3], r[:, 2], r[:, 4] + math.pi / 2])
    np.testing.assert_allclose(rbox_iou(r, swapped), full, atol=1e-9)
    assert rbox_iou(np.zeros((0, 5)), r).shape == (0, 50)


def test_canonical_form_is_the_same_rectangle(rng):
    r = random_rboxes(rng, 200)
    r[:5, 4] = [-math.pi / 2, math.pi / 2, 3 * math.pi / 2, -3 * math.pi / 2, 0.0]
    c = canonical_rboxes(r)
    assert (c[:, 2] >= c[:, 3]).all()
    assert (c[:, 4] >= -math.pi / 2).all() and (c[:, 4] < math.pi / 2).all()
    for x, y in zip(r, c):  # the same four corners (GEOS overlays of near-identical polygons are not robust)
        px, py = np.asarray(shapely_poly(x).exterior.coords)[:4], np.asarray(shapely_poly(y).exterior.coords)[:4]
        assert np.abs(px[:, None] - py[None]).max(-1).min(1).max() < 1e-9
    np.testing.assert_allclose(canonical_rboxes(c), c, atol=1e-12)  # idempotent


def test_poly_round_trips(rng):
    r = canonical_rboxes(random_rboxes(rng, 300))
    polys = rbox_to_poly(r)
    for x, p in zip(r[:20], polys[:20]):  # corners from the independent formula, in the same order
        np.testing.assert_allclose(p, np.asarray(shapely_poly(x).exterior.coords)[:4], atol=1e-9)
    back = poly_to_rbox(polys)
    not_square = np.abs(r[:, 2] - r[:, 3]) > 1e-6
    np.testing.assert_allclose(back[not_square], r[not_square], atol=1e-9)
    np.testing.assert_allclose(back[:, :4], r[:, :4], atol=1e-9)
    # Flat DOTA order (x1 y1 ... x4 y4), any starting vertex and either winding.
    flat = np.roll(polys[:, ::-1], int(rng.integers(4)), axis=1).reshape(-1, 8)
    np.testing.assert_allclose(poly_to_rbox(flat)[not_square], r[not_square], atol=1e-9)
    back_poly = rbox_to_poly(poly_to_rbox(polys))
    assert np.abs(np.sort(back_poly.reshape(-1, 8), 1) - np.sort(polys.reshape(-1, 8), 1)).max() < 1e-9


def test_poly_to_rbox_is_the_minimum_area_rectangle(rng):
    quads = rng.uniform(0, 50, (100, 4, 2))  # arbitrary, often concave or self-crossing
    quads[0] = [[5, 5], [5, 5], [5, 5], [5, 5]]  # one point
    quads[1] = [[0, 0], [2, 1], [4, 2], [6, 3]]  # collinear
    rb = poly_to_rbox(quads)
    for q, box in zip(quads[2:], rb[2:]):  # the reference's hull needs three non-collinear points
        assert box[2] * box[3] == pytest.approx(Polygon(min_area_rectangle(q)).area, rel=1e-9, abs=1e-9)
        assert shapely_poly(box).buffer(1e-7).covers(MultiPoint(q))
    assert rb[1, 2] == pytest.approx(math.hypot(6, 3)) and rb[1, 3] == pytest.approx(0, abs=1e-12)
    assert rb[0, 2] == 0 and rb[0, 3] == 0 and tuple(rb[0, :2]) == (5, 5)
    hexagons = rng.uniform(0, 50, (10, 6, 2))
    for h, box in zip(hexagons, poly_to_rbox(hexagons)):
        assert box[2] * box[3] == pytest.approx(Polygon(min_area_rectangle(h)).area, rel=1e-9)


def test_numpy_and_torch_agree(rng):
    r = random_rboxes(rng, 20)
    t = torch.tensor(r)
    for fn in (canonical_rboxes, rbox_to_poly, rbox_to_box):
        out = fn(r)
        assert isinstance(out, np.ndarray)
        np.testing.assert_allclose(out, fn(t).numpy(), atol=1e-12)
    assert isinstance(poly_to_rbox(rbox_to_poly(t)), torch.Tensor)
    np.testing.assert_allclose(probiou(r, r[::-1]), probiou(t, t.flip(0)).numpy(), atol=1e-12)


def test_enclosing_box_matches_corner_extremes(rng):
    r = random_rboxes(rng, 100)
    p = rbox_to_poly(r)
    want = np.concatenate([p.min(1), p.max(1)], axis=1)
    np.testing.assert_allclose(rbox_to_box(r), want, atol=1e-9)


def bhattacharyya_reference(a, b):
    """Float64 ProbIoU from the Gaussians' definition (matrix algebra, no closed form)."""
    def gauss(r):
        cx, cy, w, h, ang = r
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        return np.array([cx, cy]), rot @ np.diag([w * w / 12, h * h / 12]) @ rot.T
    (ma, sa), (mb, sb) = gauss(a), gauss(b)
    s = (sa + sb) / 2
    d = ma - mb
    bd = d @ np.linalg.solve(s, d) / 8 + 0.5 * math.log(np.linalg.det(s) / math.sqrt(np.linalg.det(sa) * np.linalg.det(sb)))
    return 1 - math.sqrt(1 - math.exp(-min(bd, 100.0)))


def test_probiou_matches_the_gaussian_definition(rng):
    a, b = random_rboxes(rng, 100, max_side=40.0), random_rboxes(rng, 100, max_side=40.0)
    a[:, 2:4] += 2.0
    b[:, 2:4] += 2.0
    got = probiou(a, b)
    want = np.array([bhattacharyya_reference(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, want, atol=2e-3)  # eps=1e-7 inside the square root shifts ~3e-4
    assert (want > 0.05).sum() > 5 and (want < 0.01).sum() > 5  # both near and far pairs were drawn
    pair = probiou(torch.tensor(a[:7, None]), torch.tensor(b[None, :5]))
    assert pair.shape == (7, 5)
    assert pair[3, 2] == pytest.approx(bhattacharyya_reference(a[3], b[2]), abs=2e-3)


def test_probiou_is_symmetric_and_periodic(rng):
    a, b = random_rboxes(rng, 50), random_rboxes(rng, 50, size=20.0)
    ref = probiou(a, b)
    for other in (np.column_stack([b[:, :2], b[:, 3], b[:, 2], b[:, 4] + math.pi / 2]),
                  np.column_stack([b[:, :4], b[:, 4] - math.pi]), canonical_rboxes(b)):
        np.testing.assert_allclose(probiou(a, other), ref, atol=1e-9)
    np.testing.assert_allclose(probiou(a, b), probiou(b, a), atol=1e-12)
    assert (probiou(a, a) > 0.999).all()


@pytest.mark.parametrize("angle", [-math.pi / 2, math.pi / 2, 0.0, math.pi / 4, math.pi])
def test_probiou_gradients_finite_at_angle_boundaries(angle):
    target = torch.tensor([[20.0, 20.0, 30.0, 10.0, angle], [20.0, 20.0, 10.0, 10.0, angle]], dtype=torch.float64)
    for delta in (0.0, 1e-4, -0.3):
        pred = (target + torch.tensor([0.5, -0.2, 1.0, -1.0, delta], dtype=torch.float64)).requires_grad_()
        (1 - probiou(pred, target)).sum().backward()
        assert torch.isfinite(pred.grad).all(), (angle, delta, pred.grad)
    exact = target.clone().requires_grad_()
    (1 - probiou(exact, target)).sum().backward()
    assert torch.isfinite(exact.grad).all()


def greedy_reference(rboxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(shapely_iou(rboxes[i], rboxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def test_rotated_nms_matches_bruteforce_greedy(rng):
    for _ in range(8):
        n = int(rng.integers(1, 50))
        r = random_rboxes(rng, n, size=40.0)
        scores = torch.tensor(rng.permutation(n), dtype=torch.float64)
        thr = float(rng.uniform(0.1, 0.7))
        want = greedy_reference(r, scores.tolist(), thr)
        assert rotated_nms(torch.tensor(r), scores, thr).tolist() == want
    dense = random_rboxes(rng, 150, size=25.0)  # crowded: the IoU bound and the exact clipping both decide
    scores = torch.tensor(rng.permutation(150), dtype=torch.float64)
    assert rotated_nms(torch.tensor(dense), scores, 0.3).tolist() == greedy_reference(dense, scores.tolist(), 0.3)
    assert rotated_nms(torch.zeros(0, 5), torch.zeros(0), 0.5).numel() == 0


def test_batched_rotated_nms_is_class_aware(rng):
    r = random_rboxes(rng, 60, size=50.0)
    scores = torch.tensor(rng.permutation(60), dtype=torch.float64)
    labels = torch.tensor(rng.integers(0, 3, 60))
    got = batched_rotated_nms(torch.tensor(r), scores, labels, 0.3)
    want = [int(i) for c in range(3) for i in np.nonzero(labels.numpy() == c)[0][
        greedy_reference(r[labels.numpy() == c], scores[labels == c].tolist(), 0.3)]]
    assert sorted(got.tolist()) == sorted(want)
    assert (scores[got][:-1] >= scores[got][1:]).all()
    same = torch.tensor([[10.0, 10.0, 20.0, 5.0, 0.3]]).repeat(4, 1)
    kept = batched_rotated_nms(same, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 0, 1]), 0.5)
    assert sorted(kept.tolist()) == [0, 1]
