"""Oriented (rotated) boxes: conversions, ProbIoU, exact polygon IoU and rotated NMS.

Convention: a rotated box is ``(cx, cy, w, h, angle)`` in pixels and radians, in image
axes (x right, y down); ``angle`` is the direction of the ``w`` side measured from +x
towards +y (clockwise on screen). The canonical form is MMRotate's "le90": ``w >= h``
and ``angle`` in [-pi/2, pi/2). Why: a rectangle has no head or tail (DOTA's Task 1
scores unoriented polygons), so its direction is periodic in pi; putting the long side
in ``w`` makes every non-square rectangle's representation unique, which is what lets
tests, NMS and users compare boxes. Every function accepts any representation;
conversions, decoding and augmentation return canonical boxes (:func:`canonical_rboxes`).

Functions take torch tensors or numpy arrays (and return the same kind); the numpy path
runs the torch code on a zero-copy view, so there is one implementation.

Written here rather than taken from mmcv/mmrotate (compiled CUDA ops, pinned to old
torch versions) or Ultralytics (AGPL, and no exact polygon IoU): edgekit runs on plain
torch everywhere.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from edgekit.boxes import class_aware_nms


def _torch_io(fn):
    """Let ``fn`` (written for tensors) take numpy arrays too, returning numpy then."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        numpy_in = any(isinstance(a, np.ndarray) for a in args)
        args = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
        out = fn(*args, **kwargs)
        return out.numpy() if numpy_in else out
    return wrapper


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.double()


@_torch_io
def canonical_rboxes(rboxes):
    """[..., 5] -> the same rectangles with ``w >= h`` and angle in [-pi/2, pi/2)."""
    rboxes = _float(rboxes)
    cx, cy, w, h, a = rboxes.unbind(-1)
    swap = w < h
    w, h = torch.where(swap, h, w), torch.where(swap, w, h)
    a = torch.where(swap, a + math.pi / 2, a)
    a = a - math.pi * torch.floor((a + math.pi / 2) / math.pi)
    a = torch.where(a >= math.pi / 2, a - math.pi, a)  # rounding can land exactly on pi/2
    return torch.stack([cx, cy, w, h, a], dim=-1)


@_torch_io
def rbox_to_poly(rboxes):
    """[..., 5] -> corners [..., 4, 2]: (-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2) of the box frame."""
    rboxes = _float(rboxes)
    cx, cy, w, h, a = rboxes.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    sx = torch.tensor([-0.5, 0.5, 0.5, -0.5], dtype=rboxes.dtype, device=rboxes.device)
    sy = torch.tensor([-0.5, -0.5, 0.5, 0.5], dtype=rboxes.dtype, device=rboxes.device)
    lx, ly = w[..., None] * sx, h[..., None] * sy
    x = cx[..., None] + lx * cos[..., None] - ly * sin[..., None]
    y = cy[..., None] + lx * sin[..., None] + ly * cos[..., None]
    return torch.stack([x, y], dim=-1)


@_torch_io
def poly_to_rbox(polys):
    """Polygons [..., K, 2] (or flat [..., 2K], DOTA's x1 y1 ... x4 y4) -> canonical rotated boxes [..., 5],
    the minimum-area rectangle enclosing each polygon.

    Vectorised: the minimum-area rectangle has a side along a convex-hull edge (the
    rotating-calipers theorem), every hull edge joins two of the K points, so the best of
    the K(K-1)/2 point-pair directions is the answer, with no per-polygon hull (the loop
    :func:`edgekit.data.tiling.min_area_rectangle` costs ~0.1 ms per object; it is this
    function's reference in the tests). Cost grows as K^3: meant for quadrilaterals and
    other small polygons. All-equal points give a zero-size box at the point.
    """
    polys = _float(polys)
    if polys.shape[-1] != 2:
        polys = polys.reshape(*polys.shape[:-1], -1, 2)
    k = polys.shape[-2]
    i, j = torch.triu_indices(k, k, offset=1, device=polys.device)
    d = polys[..., j, :] - polys[..., i, :]  # [..., P, 2]
    norm = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    valid = norm.squeeze(-1) > 0
    fallback = torch.tensor([1.0, 0.0], dtype=polys.dtype, device=polys.device)
    u = torch.where(norm > 0, d / norm.clamp(min=torch.finfo(polys.dtype).tiny), fallback)
    v = torch.stack([-u[..., 1], u[..., 0]], dim=-1)
    pu = torch.einsum("...pc,...kc->...pk", u, polys)
    pv = torch.einsum("...pc,...kc->...pk", v, polys)
    lo_u, hi_u, lo_v, hi_v = pu.amin(-1), pu.amax(-1), pv.amin(-1), pv.amax(-1)
    area = torch.where(valid, (hi_u - lo_u) * (hi_v - lo_v), math.inf)
    best = area.argmin(-1, keepdim=True)

    def pick(t):
        return t.gather(-1, best).squeeze(-1)

    ub = u.gather(-2, best[..., None].expand(*best.shape, 2)).squeeze(-2)
    vb = torch.stack([-ub[..., 1], ub[..., 0]], dim=-1)
    mid_u, mid_v = (pick(lo_u) + pick(hi_u)) / 2, (pick(lo_v) + pick(hi_v)) / 2
    centre = ub * mid_u[..., None] + vb * mid_v[..., None]
    angle = torch.atan2(ub[..., 1], ub[..., 0])
    out = torch.stack([centre[..., 0], centre[..., 1], pick(hi_u) - pick(lo_u), pick(hi_v) - pick(lo_v), angle], -1)
    return canonical_rboxes(out)


@_torch_io
def rbox_to_box(rboxes):
    """[..., 5] -> the enclosing horizontal boxes [..., 4] (x1, y1, x2, y2)."""
    rboxes = _float(rboxes)
    cx, cy, w, h, a = rboxes.unbind(-1)
    cos, sin = torch.cos(a).abs(), torch.sin(a).abs()
    ex, ey = (w * cos + h * sin) / 2, (w * sin + h * cos) / 2
    return torch.stack([cx - ex, cy - ey, cx + ex, cy + ey], dim=-1)


def _gaussian(rboxes):
    """Covariance (sxx, syy, sxy) of the uniform distribution over each box (side^2 / 12 along its axes)."""
    w2, h2 = rboxes[..., 2] ** 2 / 12, rboxes[..., 3] ** 2 / 12
    cos, sin = torch.cos(rboxes[..., 4]), torch.sin(rboxes[..., 4])
    return w2 * cos ** 2 + h2 * sin ** 2, w2 * sin ** 2 + h2 * cos ** 2, (w2 - h2) * cos * sin


@_torch_io
def probiou(a, b, eps: float = 1e-7):
    """ProbIoU (Llerena et al. 2021, as Ultralytics' OBB uses): 1 - the Hellinger distance
    between the boxes' Gaussians, from their Bhattacharyya distance. Broadcasts [..., 5]
    against [..., 5] (pairwise: ``probiou(a[:, None], b[None])``).

    Smooth everywhere and identical for (w, h, a), (h, w, a + pi/2) and (w, h, a + pi),
    so it trains an angle without boundary jumps; square boxes have no angle information.
    """
    a, b = _float(a), _float(b)
    xa, ya, xb, yb = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    (sa, ta, ca), (sb, tb, cb) = _gaussian(a), _gaussian(b)
    sxx, syy, sxy = sa + sb, ta + tb, ca + cb  # twice the mean covariance
    det = sxx * syy - sxy ** 2
    dx, dy = xa - xb, ya - yb
    mahalanobis = (syy * dx ** 2 + sxx * dy ** 2 - 2 * sxy * dx * dy) / (det + eps) * 0.25
    log_det = 0.5 * torch.log(det / (4 * torch.sqrt((sa * ta - ca ** 2).clamp(min=0) * (sb * tb - cb ** 2).clamp(min=0))
                                     + eps) + eps)
    bhattacharyya = (mahalanobis + log_det).clamp(eps, 100.0)
    return 1 - torch.sqrt(1 - torch.exp(-bhattacharyya) + eps)


def _cross(p, q):
    return p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]


def _inside(points, rboxes, tol):
    """points [K, 4, 2] inside rboxes [K, 5] (boundary included)."""
    rel = points - rboxes[:, None, :2]
    cos, sin = torch.cos(rboxes[:, 4, None]), torch.sin(rboxes[:, 4, None])
    lx = rel[..., 0] * cos + rel[..., 1] * sin
    ly = -rel[..., 0] * sin + rel[..., 1] * cos
    return (lx.abs() <= rboxes[:, 2, None] / 2 + tol) & (ly.abs() <= rboxes[:, 3, None] / 2 + tol)


@_torch_io
def rbox_iou(a, b, max_pairs: int = 1 << 15):
    """Exact pairwise IoU [N, M] of rotated boxes (polygon intersection over union), float64.

    Only pairs whose enclosing horizontal boxes overlap are intersected, ``max_pairs``
    at a time (~2 kB of temporaries each): in NMS over a scene most pairs are far apart.

    The clipping (:func:`edgekit.rotated_clip.clipped_areas`) is a Numba loop over pairs of
    corner lists computed once per box: vectorised torch geometry cost ~25 us per pair,
    which made NMS over a dense head's 1000 candidates take seconds per image.
    """
    from edgekit.rotated_clip import clipped_areas

    a, b = a.to(torch.float64), b.to(torch.float64)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    if out.numel() == 0:
        return out
    ha, hb = rbox_to_box(a), rbox_to_box(b)
    area_a, area_b = a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]
    corners_a = np.ascontiguousarray(rbox_to_poly(a).cpu().numpy())
    corners_b = np.ascontiguousarray(rbox_to_poly(b).cpu().numpy())
    rows = max(1, (max_pairs * 16) // max(1, b.shape[0]))  # the overlap mask is 1 byte per pair
    for start in range(0, a.shape[0], rows):
        stop = min(a.shape[0], start + rows)
        near = ((torch.minimum(ha[start:stop, None, 2:], hb[None, :, 2:])
                 - torch.maximum(ha[start:stop, None, :2], hb[None, :, :2])) >= 0).all(-1)
        i, j = near.nonzero(as_tuple=True)
        for first in range(0, i.numel(), max_pairs):
            ii, jj = i[first:first + max_pairs] + start, j[first:first + max_pairs]
            inter = torch.from_numpy(clipped_areas(corners_a, corners_b, ii.cpu().numpy(), jj.cpu().numpy()))
            inter = inter.to(a.device)
            union = area_a[ii] + area_b[jj] - inter
            out[ii, jj] = torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(inter))
    return out


@_torch_io
def rotated_nms(rboxes, scores, iou_threshold: float):
    """Greedy NMS of rotated boxes by exact polygon IoU (the DOTA metric's overlap); kept
    indices by decreasing score. One compiled loop (:func:`edgekit.rotated_clip.greedy_nms`)
    that clips only pairs whose IoU could exceed the threshold: memory O(N), and a dense
    head's 1000 candidates take milliseconds instead of the seconds of pairwise matrices."""
    from edgekit.rotated_clip import greedy_nms

    if rboxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=rboxes.device)
    order = scores.argsort(descending=True)
    ordered = rboxes[order].to(torch.float64)
    corners = rbox_to_poly(ordered).cpu().numpy()
    hbb = np.concatenate([corners.min(1), corners.max(1)], axis=1)
    areas = (ordered[:, 2] * ordered[:, 3]).cpu().numpy()
    kept = greedy_nms(np.ascontiguousarray(corners), hbb, areas, float(iou_threshold))
    return order[torch.from_numpy(kept).to(order.device)]


@_torch_io
def batched_rotated_nms(rboxes, scores, labels, iou_threshold: float):
    """Class-aware rotated NMS: boxes of different labels never suppress each other."""
    rboxes = rboxes.to(torch.float64)
    return class_aware_nms(rboxes, scores, labels, iou_threshold, rotated_nms, rbox_to_box(rboxes), slice(0, 2))
