"""Box utilities in plain torch (torchvision cannot be installed everywhere edgekit runs).

Boxes are (x1, y1, x2, y2) in pixels, float tensors of shape [N, 4].
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU, [N, M]."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, block: int = 2048,
        iou: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = box_iou) -> torch.Tensor:
    """Greedy NMS; returns kept indices sorted by decreasing score (torchvision semantics).

    Works block by block on the score-sorted boxes, so memory stays O(block^2) instead of
    O(N^2): a large aerial scene merged from hundreds of tiles can hold 10^5 candidates.
    ``iou`` is the pairwise overlap [n, m] of two box sets (rotated NMS passes its own).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    n = boxes.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        over = (iou(boxes[start:stop], boxes[start:stop]) > iou_threshold).cpu()
        local = suppressed[start:stop].cpu().clone()
        kept_here = []
        for i in range(stop - start):
            if not local[i]:
                kept_here.append(i)
                local |= over[i]
        keep += [start + i for i in kept_here]
        if kept_here and stop < n:
            kept_boxes = boxes[start:stop][torch.tensor(kept_here, device=boxes.device)]
            for later in range(stop, n, block):
                end = min(n, later + block)
                suppressed[later:end] |= (iou(kept_boxes, boxes[later:end]) > iou_threshold).any(0)
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-aware NMS: boxes of different labels never suppress each other."""
    return class_aware_nms(boxes, scores, labels, iou_threshold, nms, boxes, slice(None))


def class_aware_nms(boxes, scores, labels, iou_threshold, nms_fn, extent_boxes, shift_columns) -> torch.Tensor:
    """Class-aware wrapper of any greedy ``nms_fn(boxes, scores, iou_threshold)``.

    Few boxes: each class is shifted into its own coordinate range (``shift_columns`` of
    ``boxes`` move by label * the span of ``extent_boxes``, horizontal boxes enclosing
    them), one NMS call, the standard trick. Many boxes (merged tiles): per class, so
    the quadratic work shrinks by the class count.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if boxes.shape[0] <= 4096:
        span = extent_boxes.max() - extent_boxes.min() + 1
        shifted = boxes.clone()
        shifted[:, shift_columns] += (labels.to(boxes.dtype) * span.to(boxes.dtype))[:, None]
        return nms_fn(shifted, scores, iou_threshold)
    keep = torch.cat([idx[nms_fn(boxes[idx], scores[idx], iou_threshold)]
                      for idx in (torch.nonzero(labels == c).squeeze(1) for c in labels.unique())])
    return keep[scores[keep].argsort(descending=True)]


def polygon_to_box(poly) -> tuple[float, float, float, float]:
    """The horizontal box enclosing a polygon given as a flat sequence x1, y1, x2, y2, ..."""
    xs, ys = poly[0::2], poly[1::2]
    return float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))
