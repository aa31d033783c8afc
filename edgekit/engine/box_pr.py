"""Box precision and recall at one IoU threshold, as DeepForest reports them for tree crowns.

mAP ranks detections over every score; users of crown detectors also read one operating
point: the boxes above a score threshold, each matched to at most one ground-truth box.
DeepForest (``deepforest.evaluate.evaluate_boxes``, 2.x) defines it, per image:

* keep predictions with score > ``score_threshold`` (its ``score_thresh``, 0.1 by default,
  applied by torchvision's RetinaNet with ``>``);
* match ground truth and predictions one to one by linear sum assignment maximising the
  total *intersection area* (not IoU), pairs without overlap left unmatched;
* a matched pair is a true positive when its IoU is strictly greater than ``iou_threshold``;
* recall = TP / ground-truth boxes, precision = TP / predictions;

and over a data set, the mean of the per-image recalls (an image without predictions counts
0) and the mean of the per-image precisions (images without predictions left out; NaN
when no image has any). Labels are ignored (``box_recall``/``box_precision`` are
class-agnostic in DeepForest too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_boxes(boxes) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(array).all() or (array[:, 2:] < array[:, :2]).any():
        raise ValueError("boxes must be finite (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")
    return array


def overlaps(truth, predicted) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise intersection and union areas, each [n_truth, n_pred], in float64."""
    t, p = _as_boxes(truth), _as_boxes(predicted)
    w = np.minimum(t[:, None, 2], p[None, :, 2]) - np.maximum(t[:, None, 0], p[None, :, 0])
    h = np.minimum(t[:, None, 3], p[None, :, 3]) - np.maximum(t[:, None, 1], p[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter, area(t)[:, None] + area(p)[None, :] - inter


def image_matches(truth, predicted, scores=None, iou_threshold: float = 0.4,
                  score_threshold: float = 0.0) -> dict:
    """One image: ``tp``, ``n_truth``, ``n_pred`` (after the score threshold) and the IoU of
    each matched pair (``ious``, one per ground-truth box, 0 where unmatched)."""
    truth, predicted = _as_boxes(truth), _as_boxes(predicted)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(predicted):
            raise ValueError(f"{len(scores)} scores for {len(predicted)} predicted boxes")
        predicted = predicted[scores > score_threshold]
    ious = np.zeros(len(truth))
    if len(truth) and len(predicted):
        inter, union = overlaps(truth, predicted)
        rows, cols = linear_sum_assignment(inter, maximize=True)
        paired = inter[rows, cols] > 0
        rows, cols = rows[paired], cols[paired]
        ious[rows] = inter[rows, cols] / union[rows, cols]
    return {"tp": int((ious > iou_threshold).sum()), "n_truth": len(truth), "n_pred": len(predicted),
            "ious": ious}


def box_precision_recall(images: Iterable[tuple], iou_threshold: float = 0.4, score_threshold: float = 0.1) -> dict:
    """DeepForest's box precision and recall over ``images``: (truth boxes, predicted boxes,
    scores) per image, boxes (x1, y1, x2, y2) in one image's pixels. Returns ``precision``
    (NaN when no image has a prediction above the threshold), ``recall`` and the totals."""
    recalls, precisions, tp = [], [], 0
    n_truth = n_pred = 0
    for truth, predicted, scores in images:
        m = image_matches(truth, predicted, scores, iou_threshold, score_threshold)
        if not m["n_truth"]:
            continue  # DeepForest iterates over ground-truth images only
        tp, n_truth, n_pred = tp + m["tp"], n_truth + m["n_truth"], n_pred + m["n_pred"]
        recalls.append(m["tp"] / m["n_truth"])
        if m["n_pred"]:
            precisions.append(m["tp"] / m["n_pred"])
    return {"precision": float(np.mean(precisions)) if precisions else math.nan,
            "recall": float(np.mean(recalls)) if recalls else math.nan,
            "tp": tp, "n_truth": n_truth, "n_pred": n_pred, "images": len(recalls),
            "iou_threshold": iou_threshold, "score_threshold": score_threshold}
