"""Oriented-head post-processing: dense per-level outputs -> rotated boxes, then
class-aware rotated NMS. The rotated counterpart of :mod:`edgekit.models.detect_post`,
split from the model for the same reason: export puts the decoding into the ONNX graph.

Parametrisation (as Ultralytics' OBB head): at a point p the head predicts an angle and
the distances (l, t, r, b) from p to the box's four sides measured in the box's own
frame; the box is then w = l + r, h = t + b, centre p + R(angle) ((r - l) / 2, (b - t) / 2).
The angle is ``(sigmoid(x) - 0.5) * pi``, an open interval of length pi: every rectangle
has a representation well inside it ((w, h, a) or (h, w, a +- pi/2)), so the head never
has to sit on a range boundary, and the ProbIoU loss does not care which one it picks.
"""

from __future__ import annotations

import math

import torch

from edgekit.models.detect_post import flatten_levels, flatten_maps, top_candidates
from edgekit.rotated import batched_rotated_nms, canonical_rboxes, rbox_to_box


def angle_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Raw angle-branch outputs -> radians in (-pi/2, pi/2)."""
    return (torch.sigmoid(logits) - 0.5) * math.pi


def distances_to_rboxes(points: torch.Tensor, ltrb: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Points [..., 2], side distances in the box frame [..., 4] (pixels) and angles [...] -> rboxes [..., 5]."""
    left, top, right, bottom = ltrb.unbind(-1)
    ox, oy = (right - left) / 2, (bottom - top) / 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx = points[..., 0] + ox * cos - oy * sin
    cy = points[..., 1] + ox * sin + oy * cos
    return torch.stack([cx, cy, left + right, top + bottom, angle], dim=-1)


def decode_rotated_predictions(outputs, strides, canonical: bool = True):
    """Rotated boxes [B, P, 5] (cx, cy, w, h, angle; input pixels) and scores [B, P, K] =
    sqrt(cls * centerness), from the oriented head's (cls, box, ctr, angle); canonical
    (le90, ``w >= h``) unless ``canonical=False``. The exported graph leaves that step to
    the post-processing: its angle is then the head's own, continuous in (-pi/2, pi/2),
    so float noise between runtimes cannot flip a square-ish box to its other form."""
    cls, box, ctr, angle = outputs
    cls, box, ctr, points, pstrides = flatten_levels((cls, box, ctr), strides)
    angle = angle_from_logits(flatten_maps(angle).squeeze(-1))
    rboxes = distances_to_rboxes(points[None], box * pstrides[None, :, None], angle)
    scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr))
    return (canonical_rboxes(rboxes) if canonical else rboxes), scores


def postprocess_rotated(rboxes, scores, score_threshold=0.05, iou_threshold=0.6, max_detections=100,
                        pre_nms_top_k=1000, image_size=None):
    """Per image: threshold, keep the top-k (box, class) pairs, class-aware rotated NMS (exact
    polygon IoU), cap detections. Each result holds ``rboxes`` [M, 5], ``boxes`` [M, 4] (the
    enclosing horizontal boxes, clipped to ``image_size`` (h, w) when given, as
    :func:`edgekit.models.detect_post.postprocess` clips), ``scores`` [M] and ``labels`` [M].
    Rotated boxes are not clipped: a clipped rectangle is no rectangle."""
    results = []
    for r, s in zip(rboxes, scores):
        box_idx, labels, flat = top_candidates(s, score_threshold, pre_nms_top_k)
        cand = r[box_idx]
        kept = batched_rotated_nms(cand, flat, labels, iou_threshold)[:max_detections]
        boxes = rbox_to_box(cand[kept])
        if image_size is not None:
            h, w = image_size
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
        results.append({"rboxes": canonical_rboxes(cand[kept]), "boxes": boxes, "scores": flat[kept],
                        "labels": labels[kept]})
    return results


def merge_rotated_tile_detections(detections, iou_threshold: float = 0.5):
    """Rotated detections from tiles -> (rboxes [N, 5], scores [N], labels [N]) in image
    coordinates: :func:`edgekit.data.tiling.merge_tile_detections` with rotated boxes
    (centres shifted by the window origin, class-aware rotated NMS)."""
    from edgekit.data.tiling import merge_tile_detections

    return merge_tile_detections(detections, iou_threshold, rotated=True)
