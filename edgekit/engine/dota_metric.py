"""Oriented-box detection metrics: the DOTA devkit's Task 1 mAP and COCO-style mAP@[.5:.95].

**DOTA Task 1** (the rules of the devkit's ``dota_evaluation_task1.py``): per class,
detections from all images sorted by score; each takes the ground-truth polygon of its
image with the highest polygon IoU (the first on ties); IoU strictly above 0.5 on a
difficult object makes it neither a hit nor a miss, on a normal object it is a hit if that
object was not hit before, else a false positive; below, a false positive. Recall counts
the non-difficult objects only. AP is VOC07's 11-point AP (the devkit's default; the
all-point VOC AP is ``ap_method="all"``), the 11 recall levels being the devkit's own
``np.arange(0, 1.1, 0.1)`` (0.30000000000000004 etc., which decides when recall is exactly
0.3, 0.6 or 0.7). mAP is the mean over classes that have ground truth. Ties in score keep
the input order (the devkit's quicksort leaves them unspecified).

**COCO-style** for polygons: pycocotools' evaluation with polygon IoU in place of box
IoU: per image and class the 100 best detections, greedy matching at each IoU threshold
.50:.05:.95 (a detection goes to the best still unmatched object, normal objects before
ignored ones), 101-point interpolated precision, mean over thresholds and classes with
ground truth. Difficult objects are COCO crowd regions, as in
:func:`edgekit.engine.evaluate.coco_map`: overlap with them is intersection / detection
area, and any number of detections on them are ignored. On horizontal boxes this is the
number ``coco_map`` gives (faster-coco-eval), which the tests check.

Written here rather than taken from a library: the devkit's polygon IoU is a compiled
SWIG module with a per-pair Python loop, pycocotools has no polygon-IoU bbox mode, and
mmrotate needs mmcv's compiled ops; this is numpy, vectorised over detection/object pairs.

Polygon IoU uses the devkit's algebra (``polyiou.cpp``): the intersection area of two
polygons is the signed sum of the overlaps of their edge triangles seen from a common
point, exact for any simple polygon, convex or not. Convex pairs (every rotated box) take
a shorter route, the convex intersection of the two quadrilaterals; both are float64.
"""

from __future__ import annotations

import numpy as np

from edgekit.data.dota import DotaAnnotation
from edgekit.errors import EdgekitError

DOTA_METRIC = "DOTA Task 1: VOC{} AP at polygon IoU > {:g}, difficult objects ignored, mean over classes with objects"
COCO_METRIC = ("COCO mAP@[.5:.95]: 101-point interpolated AP over polygon IoU .50:.05:.95, at most {} detections "
               "per image and class, difficult objects as crowd regions")
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
VOC07_RECALL_LEVELS = np.arange(0.0, 1.1, 0.1)  # the devkit's levels, float rounding included
_PAIR_CHUNK = 1 << 13


# ---------------------------------------------------------------- polygon geometry


def _cross(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _signed_area(poly: np.ndarray) -> np.ndarray:
    """Shoelace area of polygons [..., K, 2], positive when counter-clockwise in x-right/y-up axes."""
    return 0.5 * _cross(poly, np.roll(poly, -1, axis=-2)).sum(-1)


def _convex_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas of convex polygons a [M, n, 2] and b [M, m, 2], pair by pair.

    The intersection is the convex hull of the vertices of each inside the other and the
    crossings of their edges; those points are ordered by angle around their mean and
    summed by the shoelace formula.
    """
    a = np.where((_signed_area(a) < 0)[:, None, None], a[:, ::-1], a)
    b = np.where((_signed_area(b) < 0)[:, None, None], b[:, ::-1], b)
    scale = np.maximum(np.abs(a).max((1, 2)), np.abs(b).max((1, 2))) + 1.0
    tol = 1e-12 * scale ** 2

    def inside(points, poly):  # [M, P, 2] in convex counter-clockwise poly [M, K, 2] -> [M, P]
        edges = np.roll(poly, -1, axis=1) - poly
        rel = points[:, :, None, :] - poly[:, None, :, :]
        return (_cross(edges[:, None], rel) >= -tol[:, None, None]).all(-1)

    da, db = np.roll(a, -1, axis=1) - a, np.roll(b, -1, axis=1) - b
    denom = _cross(da[:, :, None], db[:, None, :])  # [M, n, m]
    offset = b[:, None, :, :] - a[:, :, None, :]
    safe = np.where(np.abs(denom) > tol[:, None, None], denom, 1.0)
    t, u = _cross(offset, db[:, None]) / safe, _cross(offset, da[:, :, None]) / safe
    eps = 1e-12
    crossing = (np.abs(denom) > tol[:, None, None]) & (t >= -eps) & (t <= 1 + eps) & (u >= -eps) & (u <= 1 + eps)
    crossings = a[:, :, None, :] + t[..., None] * da[:, :, None, :]
    m = len(a)
    points = np.concatenate([a, b, crossings.reshape(m, -1, 2)], axis=1)
    valid = np.concatenate([inside(a, b), inside(b, a), crossing.reshape(m, -1)], axis=1)
    count = valid.sum(1)
    centre = (points * valid[..., None]).sum(1) / np.maximum(count, 1)[:, None]
    rel = points - centre[:, None, :]
    angle = np.where(valid, np.arctan2(rel[..., 1], rel[..., 0]), np.inf)
    order = np.argsort(angle, axis=1)
    ring = np.take_along_axis(points, order[..., None], axis=1)
    ring = np.where(np.take_along_axis(valid, order, axis=1)[..., None], ring, ring[:, :1])
    return np.where(count >= 3, np.abs(_signed_area(ring)), 0.0)


def _is_convex(poly: np.ndarray) -> np.ndarray:
    """[M, K, 2] -> [M]: every turn the same way (zero turns allowed); bow-ties are not convex."""
    edges = np.roll(poly, -1, axis=1) - poly
    turns = _cross(edges, np.roll(edges, -1, axis=1))
    scale = (np.abs(edges).max((1, 2)) + 1e-300) ** 2
    tol = 1e-12 * scale[:, None]
    return (turns >= -tol).all(1) | (turns <= tol).all(1)


def _fan_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The devkit's intersection area for any polygons [M, K, 2]: signed sums of edge-triangle overlaps."""
    m, n, k = len(a), a.shape[1], b.shape[1]
    sign_a = np.where(_signed_area(a) < 0, -1.0, 1.0)  # the devkit reverses clockwise polygons
    sign_b = np.where(_signed_area(b) < 0, -1.0, 1.0)
    origin = np.zeros((m, 1, 2))
    tri_a = np.stack([np.broadcast_to(origin, a.shape), a, np.roll(a, -1, axis=1)], axis=2)  # [M, n, 3, 2]
    tri_b = np.stack([np.broadcast_to(origin, b.shape), b, np.roll(b, -1, axis=1)], axis=2)
    s_a, s_b = np.sign(_signed_area(tri_a)), np.sign(_signed_area(tri_b))  # degenerate triangles: 0
    pa = np.broadcast_to(tri_a[:, :, None], (m, n, k, 3, 2)).reshape(-1, 3, 2)
    pb = np.broadcast_to(tri_b[:, None, :], (m, n, k, 3, 2)).reshape(-1, 3, 2)
    overlap = _convex_overlap(pa, pb).reshape(m, n, k)
    return sign_a * sign_b * (overlap * s_a[:, :, None] * s_b[:, None, :]).sum((1, 2))


def polygon_intersection_pairs(a, b) -> np.ndarray:
    """Intersection areas of polygons a[i] and b[i] ([M, 8] or [M, K, 2] each), float64 [M]."""
    out = np.zeros(len(a))
    if len(a) == 0:
        return out
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1, 2)
    for lo in range(0, len(a), _PAIR_CHUNK):
        pa, pb = a[lo:lo + _PAIR_CHUNK], b[lo:lo + _PAIR_CHUNK]
        ref = pa.mean(1, keepdims=True)  # a common origin near the pair: fewer cancelling digits
        pa, pb = pa - ref, pb - ref
        convex = _is_convex(pa) & _is_convex(pb)
        chunk = np.empty(len(pa))
        if convex.any():
            chunk[convex] = _convex_overlap(pa[convex], pb[convex])
        if (~convex).any():
            chunk[~convex] = _fan_overlap(pa[~convex], pb[~convex])
        out[lo:lo + len(pa)] = chunk
    return out


def polygon_area(polys) -> np.ndarray:
    """Absolute areas of polygons [M, 8] or [M, K, 2] (the devkit's ``fabs(area)``)."""
    polys = np.asarray(polys, dtype=np.float64)
    if len(polys) == 0:
        return np.zeros(0)
    polys = polys.reshape(len(polys), -1, 2)
    return np.abs(_signed_area(polys - polys.mean(1, keepdims=True)))  # local origin: no cancelled digits


def polygon_iou_pairs(a, b) -> np.ndarray:
    """IoU of polygons a[i] and b[i], [M]; 0 where both are empty."""
    inter = polygon_intersection_pairs(a, b)
    union = polygon_area(a) + polygon_area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def polygon_iou(a, b) -> np.ndarray:
    """Pairwise IoU [N, K] of polygons a [N, 8] and b [K, 8]."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 8), np.asarray(b, dtype=np.float64).reshape(-1, 8)
    i, j = np.meshgrid(np.arange(len(a)), np.arange(len(b)), indexing="ij")
    return polygon_iou_pairs(a[i.ravel()], b[j.ravel()]).reshape(len(a), len(b))


# ---------------------------------------------------------------- inputs


class _Flat:
    """All images' polygons in one array, with image, class, and (ground truth) difficult or (detections) score."""

    def __init__(self, polys, labels, images, extra):
        self.polys, self.labels, self.images, self.extra = polys, labels, images, extra

    def keys(self, num_classes: int) -> np.ndarray:
        return self.images * num_classes + self.labels


def _class_index(labels, classes, where: str) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind in "iu":
        bad = (labels < 0) | (labels >= len(classes))
        if bad.any():
            raise EdgekitError(f"{where}: class id {int(labels[bad][0])} is outside 0..{len(classes) - 1}; "
                               f"the class list has {len(classes)} names")
        return labels.astype(np.int64)
    index = {c: i for i, c in enumerate(classes)}
    missing = [str(x) for x in labels if x not in index]
    if missing:
        raise EdgekitError(f"{where}: class '{missing[0]}' is not in the class list ({', '.join(classes)})")
    return np.array([index[x] for x in labels], dtype=np.int64)


def _polygons(item: dict, n_expected: int | None, where: str) -> np.ndarray:
    if "polygons" in item:
        polys = np.asarray(item["polygons"], dtype=np.float64)
    elif "rboxes" in item:
        try:
            from edgekit.rotated import rbox_to_poly  # (cx, cy, w, h, angle) -> corners, edgekit's one convention
        except ImportError:
            raise EdgekitError(f"{where}: rotated boxes need edgekit.rotated, which this install lacks; "
                               f"give 'polygons' [N, 8] instead") from None
        polys = np.asarray(rbox_to_poly(np.asarray(item["rboxes"], dtype=np.float64).reshape(-1, 5)))
    else:
        raise EdgekitError(f"{where}: give 'polygons' [N, 8] or 'rboxes' [N, 5] (cx, cy, w, h, angle)")
    polys = polys.reshape(len(polys), -1) if polys.size else np.zeros((0, 8))
    if polys.shape[1] != 8 or (n_expected is not None and len(polys) != n_expected):
        raise EdgekitError(f"{where}: polygons must be [N, 8] (x1 y1 ... x4 y4) with one row per label, "
                           f"got {list(polys.shape)} for {n_expected} labels")
    if not np.isfinite(polys).all():
        raise EdgekitError(f"{where}: polygons contain nan or inf")
    return polys


def _flatten_ground_truth(ground_truth, classes) -> _Flat:
    polys, labels, images, difficult = [], [], [], []
    for i, item in enumerate(ground_truth):
        where = f"ground truth of image {i}"
        if isinstance(item, DotaAnnotation):
            item = {"polygons": [o.poly for o in item.objects], "labels": [o.label for o in item.objects],
                    "difficult": [o.difficult > 0 for o in item.objects]}
        lab = _class_index(item["labels"], classes, where)
        polys.append(_polygons(item, len(lab), where))
        labels.append(lab)
        images.append(np.full(len(lab), i))
        diff = np.asarray(item.get("difficult", np.zeros(len(lab))), dtype=bool).reshape(-1)
        if len(diff) != len(lab):
            raise EdgekitError(f"{where}: {len(diff)} difficult flags for {len(lab)} objects")
        difficult.append(diff)
    return _Flat(*(np.concatenate(x) if x else np.zeros((0, 8) if j == 0 else 0)
                   for j, x in enumerate((polys, labels, images, difficult))))


def _flatten_detections(detections, classes) -> _Flat:
    polys, labels, images, scores = [], [], [], []
    for i, item in enumerate(detections):
        where = f"detections of image {i}"
        lab = _class_index(item["labels"], classes, where)
        sc = np.asarray(item["scores"], dtype=np.float64).reshape(-1)
        if len(sc) != len(lab):
            raise EdgekitError(f"{where}: {len(sc)} scores for {len(lab)} labels")
        polys.append(_polygons(item, len(lab), where))
        labels.append(lab)
        images.append(np.full(len(lab), i))
        scores.append(sc)
    return _Flat(*(np.concatenate(x) if x else np.zeros((0, 8) if j == 0 else 0)
                   for j, x in enumerate((polys, labels, images, scores))))


def _flatten(ground_truth, detections, classes):
    ground_truth, detections = list(ground_truth), list(detections)
    if len(ground_truth) != len(detections):
        raise EdgekitError(f"{len(detections)} detection lists for {len(ground_truth)} images; "
                           f"give one (possibly empty) per image, in the same order")
    gt = _flatten_ground_truth(ground_truth, classes)
    det = _flatten_detections(detections, classes)
    gt.labels, gt.images = gt.labels.astype(np.int64), gt.images.astype(np.int64)
    det.labels, det.images = det.labels.astype(np.int64), det.images.astype(np.int64)
    gt.extra = gt.extra.astype(bool)
    return gt, det, len(ground_truth)


def _group_pairs(det_keys: np.ndarray, gt_keys: np.ndarray):
    """(det index, gt index) for every pair in the same group, dets in order, gts in input order per det."""
    g_order = np.argsort(gt_keys, kind="stable")
    sorted_keys = gt_keys[g_order]
    start = np.searchsorted(sorted_keys, det_keys, "left")
    counts = np.searchsorted(sorted_keys, det_keys, "right") - start
    d = np.repeat(np.arange(len(det_keys)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return d, g_order[np.repeat(start, counts) + within]


def _overlaps(det: _Flat, gt: _Flat, d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Intersection areas of the pairs; those whose enclosing boxes do not overlap are 0 without geometry."""
    def bounds(p):
        return np.stack([p[:, 0::2].min(1), p[:, 1::2].min(1), p[:, 0::2].max(1), p[:, 1::2].max(1)], 1)

    bd, bg = bounds(det.polys)[d], bounds(gt.polys)[g]
    touching = ((np.minimum(bd[:, 2], bg[:, 2]) > np.maximum(bd[:, 0], bg[:, 0]))
                & (np.minimum(bd[:, 3], bg[:, 3]) > np.maximum(bd[:, 1], bg[:, 1])))
    inter = np.zeros(len(d))
    inter[touching] = polygon_intersection_pairs(det.polys[d[touching]], gt.polys[g[touching]])
    return inter


# ---------------------------------------------------------------- DOTA Task 1 (VOC AP)


def voc_ap(recall: np.ndarray, precision: np.ndarray, method: str = "voc07") -> float:
    """VOC AP of a precision/recall curve: ``voc07`` (11-point, the devkit's levels) or ``all`` (area)."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if method == "voc07":
        if len(recall) == 0:
            return 0.0
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
        first = np.searchsorted(recall, VOC07_RECALL_LEVELS, "left")  # first point with recall >= level
        return float(np.where(first < len(recall), envelope[np.minimum(first, len(recall) - 1)], 0.0).sum() / 11.0)
    if method == "all":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
        step = np.nonzero(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))
    raise EdgekitError(f"unknown AP method '{method}'; use voc07 (11-point, DOTA's) or all (all-point)")


def dota_task1_map(ground_truth, detections, classes, iou_threshold: float = 0.5, ap_method: str = "voc07") -> dict:
    """DOTA Task 1 mAP (rules in the module doc) over images in the same order in both lists.

    ``ground_truth``: per image a :class:`DotaAnnotation` or ``{"polygons" [G, 8], "labels",
    "difficult"}``; ``detections``: per image ``{"polygons" [N, 8] or "rboxes" [N, 5],
    "scores", "labels"}``; labels are class names or indices into ``classes``.
    """
    classes = list(classes)
    if ap_method not in ("voc07", "all"):
        voc_ap(np.zeros(0), np.zeros(0), ap_method)  # raises the one-line error
    gt, det, num_images = _flatten(ground_truth, detections, classes)
    c = len(classes)
    det_keys = det.keys(c)
    order = np.lexsort((-det.extra, det_keys))  # by group, then by score (ties: input order)
    d, g = _group_pairs(det_keys[order], gt.keys(c))
    inter = _overlaps(_take(det, order), gt, d, g)
    union = polygon_area(det.polys[order][d]) + polygon_area(gt.polys[g]) - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    # Each detection's best object: highest IoU, first object on ties.
    best = np.lexsort((g, -iou, d))
    first = best[np.r_[True, d[best][1:] != d[best][:-1]]] if len(best) else best
    best_gt = np.full(len(order), -1)
    best_iou = np.zeros(len(order))
    best_gt[d[first]], best_iou[d[first]] = g[first], iou[first]
    hit = best_iou > iou_threshold
    ignored = np.zeros(len(order), dtype=bool)
    ignored[hit] = gt.extra[best_gt[hit]]
    counted = hit & ~ignored
    # A hit is true for the first (highest-scoring) detection of its object, false for the rest.
    tp_sorted = np.zeros(len(order), dtype=bool)
    hits = np.nonzero(counted)[0]
    _, first_hit = np.unique(best_gt[hits], return_index=True)
    tp_sorted[hits[first_hit]] = True
    fp_sorted = ~tp_sorted & ~ignored
    tp, fp = np.zeros(len(order), dtype=bool), np.zeros(len(order), dtype=bool)
    tp[order], fp[order] = tp_sorted, fp_sorted

    per_class, aps = {}, []
    for k, name in enumerate(classes):
        mine = np.nonzero(det.labels == k)[0]
        mine = mine[np.argsort(-det.extra[mine], kind="stable")]
        npos = int(((gt.labels == k) & ~gt.extra).sum())
        entry = {"ap": None, "num_gt": npos, "num_difficult": int(((gt.labels == k) & gt.extra).sum()),
                 "num_det": len(mine)}
        if npos > 0:
            tps, fps = np.cumsum(tp[mine]), np.cumsum(fp[mine])
            precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
            entry["ap"] = voc_ap(tps / npos, precision, ap_method)
            aps.append(entry["ap"])
        per_class[name] = entry
    label = "07 11-point" if ap_method == "voc07" else " all-point"
    return {"metric": DOTA_METRIC.format(label, iou_threshold), "ap_method": ap_method,
            "iou_threshold": iou_threshold, "map": float(np.mean(aps)) if aps else None,
            "per_class": per_class, "num_images": num_images}


def _take(flat: _Flat, index: np.ndarray) -> _Flat:
    return _Flat(flat.polys[index], flat.labels[index], flat.images[index], flat.extra[index])


# ---------------------------------------------------------------- COCO-style


def _coco_match(iou: np.ndarray, crowd: np.ndarray, thresholds: np.ndarray):
    """pycocotools' greedy matching of score-sorted detections [D] to objects [G] at each threshold.

    Returns (matched [T, D], on_ignored [T, D]). Objects are visited normal first; a
    detection takes the highest IoU >= threshold among unmatched normal objects (the last on
    ties, as pycocotools), else among crowd objects, which stay available.
    """
    t_count, (n_det, n_gt) = len(thresholds), iou.shape
    matched = np.zeros((t_count, n_det), dtype=bool)
    on_ignored = np.zeros((t_count, n_det), dtype=bool)
    if n_gt == 0:
        return matched, on_ignored
    taken = np.zeros((t_count, n_gt), dtype=bool)
    floor = np.minimum(thresholds, 1 - 1e-10)[:, None]
    rows = np.arange(t_count)
    for k in range(n_det):
        ok = (iou[k][None, :] >= floor) & ~(taken & ~crowd[None, :])
        for pool in (ok & ~crowd[None, :], ok & crowd[None, :]):
            choose = pool.any(1) & ~matched[:, k]
            if not choose.any():
                continue
            masked = np.where(pool, iou[k][None, :], -np.inf)
            last = n_gt - 1 - np.argmax(masked[:, ::-1], axis=1)  # last index of the maximum
            matched[choose, k] = True
            on_ignored[choose, k] = crowd[last[choose]]
            taken[rows[choose], last[choose]] = True
    return matched, on_ignored


def polygon_coco_map(ground_truth, detections, classes, max_dets: int = 100) -> dict:
    """COCO-style mAP@[.5:.95], mAP@.5, mAP@.75 and per-class AP for polygons (rules in the module doc).

    Inputs as :func:`dota_task1_map`.
    """
    classes = list(classes)
    gt, det, num_images = _flatten(ground_truth, detections, classes)
    c = len(classes)
    det_keys, gt_keys = det.keys(c), gt.keys(c)
    order = np.lexsort((-det.extra, det_keys))
    rank = np.arange(len(order)) - np.searchsorted(det_keys[order], det_keys[order], "left")
    order = order[rank < max_dets]  # the best max_dets of each image and class
    sdet = _take(det, order)
    d, g = _group_pairs(sdet.keys(c), gt_keys)
    inter = _overlaps(sdet, gt, d, g)
    det_area, gt_area = polygon_area(sdet.polys)[d], polygon_area(gt.polys)[g]
    crowd_pair = gt.extra[g]
    denom = np.where(crowd_pair, det_area, det_area + gt_area - inter)
    iou = np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), 0.0)

    t_count = len(COCO_IOU_THRESHOLDS)
    matched = np.zeros((t_count, len(order)), dtype=bool)
    on_ignored = np.zeros((t_count, len(order)), dtype=bool)
    keys_sorted = sdet.keys(c)
    starts = np.nonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])[0] if len(order) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(order)]
    pair_lo = np.searchsorted(d, starts, "left")
    pair_hi = np.searchsorted(d, ends, "left")
    gt_order = np.argsort(gt_keys, kind="stable")
    gt_start = np.searchsorted(gt_keys[gt_order], keys_sorted[starts], "left")
    gt_end = np.searchsorted(gt_keys[gt_order], keys_sorted[starts], "right")
    for s, e, plo, phi, glo, ghi in zip(starts, ends, pair_lo, pair_hi, gt_start, gt_end):
        members = gt_order[glo:ghi]
        if len(members) == 0:
            continue
        block = np.zeros((e - s, len(members)))
        local = np.searchsorted(members, g[plo:phi])  # members are increasing (stable sort)
        block[d[plo:phi] - s, local] = iou[plo:phi]
        m, ig = _coco_match(block, gt.extra[members], COCO_IOU_THRESHOLDS)
        matched[:, s:e], on_ignored[:, s:e] = m, ig

    per_class, ap_table = {}, np.full((t_count, c), np.nan)
    for k, name in enumerate(classes):
        npig = int(((gt.labels == k) & ~gt.extra).sum())
        per_class[name] = {"ap": None, "ap50": None, "num_gt": npig}
        if npig == 0:
            continue
        mine = np.nonzero(sdet.labels == k)[0]
        mine = mine[np.argsort(-sdet.extra[mine], kind="mergesort")]
        tps = np.cumsum(matched[:, mine] & ~on_ignored[:, mine], axis=1)
        fps = np.cumsum(~matched[:, mine] & ~on_ignored[:, mine], axis=1)
        for t in range(t_count):
            ap_table[t, k] = _coco_ap(tps[t], fps[t], npig)
        per_class[name].update(ap=float(ap_table[:, k].mean()), ap50=float(ap_table[0, k]))
    valid = ~np.isnan(ap_table[0])

    def mean(rows):
        return float(np.mean(rows[:, valid])) if valid.any() else None

    return {"metric": COCO_METRIC.format(max_dets), "map": mean(ap_table), "map50": mean(ap_table[:1]),
            "map75": mean(ap_table[5:6]), "per_class": per_class, "num_images": num_images}


def _coco_ap(tp: np.ndarray, fp: np.ndarray, npig: int) -> float:
    """pycocotools' 101-point interpolated AP from cumulative true/false positives."""
    if len(tp) == 0:
        return 0.0
    recall = tp / npig
    precision = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[::-1])[::-1]
    at = np.searchsorted(recall, COCO_RECALL_LEVELS, "left")
    return float(np.where(at < len(tp), precision[np.minimum(at, len(tp) - 1)], 0.0).mean())


def polygon_metrics(ground_truth, detections, classes) -> dict:
    """Both metrics, each labelled with its AP definition: ``{"dota_task1": ..., "coco": ...}``."""
    ground_truth, detections = list(ground_truth), list(detections)
    return {"dota_task1": dota_task1_map(ground_truth, detections, classes),
            "coco": polygon_coco_map(ground_truth, detections, classes)}
