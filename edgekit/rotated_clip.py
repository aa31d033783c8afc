"""Intersection areas of convex quadrilateral pairs, compiled with Numba.

Sutherland-Hodgman clipping of one quadrilateral by the four edges of the other, then the
shoelace area; float64 throughout. Kept apart from :mod:`edgekit.rotated` so that importing
the geometry does not import Numba until an exact overlap is needed.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _pair_area(pa, pb, xs, ys, tx, ty) -> float:
    """Area of quadrilateral pa [4, 2] clipped by the convex, positively oriented pb [4, 2]."""
    n = 4
    for i in range(4):
        xs[i], ys[i] = pa[i, 0], pa[i, 1]
    for e in range(4):
        px, py = pb[e, 0], pb[e, 1]
        ex, ey = pb[(e + 1) % 4, 0] - px, pb[(e + 1) % 4, 1] - py
        m = 0
        for i in range(n):
            cx, cy = xs[i], ys[i]
            nx, ny = xs[(i + 1) % n], ys[(i + 1) % n]
            dc = ex * (cy - py) - ey * (cx - px)  # >= 0: on the inner side of edge e
            dn = ex * (ny - py) - ey * (nx - px)
            if dc >= 0:
                tx[m], ty[m] = cx, cy
                m += 1
            if (dc >= 0) != (dn >= 0):
                t = dc / (dc - dn)
                tx[m], ty[m] = cx + t * (nx - cx), cy + t * (ny - cy)
                m += 1
        n = m
        if n == 0:
            return 0.0
        for i in range(n):
            xs[i], ys[i] = tx[i], ty[i]
    area = 0.0
    for i in range(n):
        area += xs[i] * ys[(i + 1) % n] - ys[i] * xs[(i + 1) % n]
    return abs(area) * 0.5


@numba.njit(cache=True, nogil=True)
def clipped_areas(pa, pb, ia, ib):
    """Intersection areas [K] of the quadrilateral pairs (pa[ia[k]], pb[ib[k]]); pa [N, 4, 2], pb [M, 4, 2]."""
    out = np.empty(ia.shape[0])
    xs, ys = np.empty(16), np.empty(16)
    tx, ty = np.empty(16), np.empty(16)
    for k in range(ia.shape[0]):
        out[k] = _pair_area(pa[ia[k]], pb[ib[k]], xs, ys, tx, ty)
    return out


@numba.njit(cache=True, nogil=True)
def greedy_nms(corners, hbb, areas, iou_threshold):
    """Greedy NMS over boxes already sorted by decreasing score: corners [N, 4, 2], enclosing
    boxes [N, 4], areas [N]. A box is dropped when its polygon IoU with a kept one exceeds the
    threshold; pairs whose enclosing boxes miss, or whose IoU bound cannot exceed it, are never
    clipped: the intersection is at most I = min(area_i, area_j, overlap of the enclosing
    boxes), so IoU <= I / (area_i + area_j - I). Returns the kept positions in order."""
    n = areas.shape[0]
    suppressed = np.zeros(n, dtype=np.bool_)
    keep = np.empty(n, dtype=np.int64)
    xs, ys = np.empty(16), np.empty(16)
    tx, ty = np.empty(16), np.empty(16)
    count = 0
    for i in range(n):
        if suppressed[i]:
            continue
        keep[count] = i
        count += 1
        for j in range(i + 1, n):
            if suppressed[j]:
                continue
            w = min(hbb[i, 2], hbb[j, 2]) - max(hbb[i, 0], hbb[j, 0])
            h = min(hbb[i, 3], hbb[j, 3]) - max(hbb[i, 1], hbb[j, 1])
            if w < 0 or h < 0:
                continue
            bound = min(w * h, areas[i], areas[j])
            if bound <= iou_threshold * (areas[i] + areas[j] - bound):
                continue
            inter = _pair_area(corners[i], corners[j], xs, ys, tx, ty)
            union = areas[i] + areas[j] - inter
            if union > 0 and inter / union > iou_threshold:
                suppressed[j] = True
    return keep[:count]
