"""Detector post-processing: dense per-level outputs -> boxes, then class-aware NMS.

Split from the model so that export can put the same decoding into an ONNX graph.
"""

from __future__ import annotations

import torch

from edgekit.boxes import batched_nms


def level_points(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """Centres (x, y) in input pixels of a level's feature-map cells, [H*W, 2], row-major."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def flatten_levels(outputs, strides):
    """Per-level [B, C, H, W] maps -> [B, P, C] tensors plus the points [P, 2] and strides [P]."""
    cls, box, ctr = outputs
    pts, pstrides = [], []
    for c, s in zip(cls, strides):
        p = level_points(c.shape[-2], c.shape[-1], s, c.device)
        pts.append(p)
        pstrides.append(torch.full((p.shape[0],), float(s), device=c.device))

    return flatten_maps(cls), flatten_maps(box), flatten_maps(ctr), torch.cat(pts), torch.cat(pstrides)


def flatten_maps(maps) -> torch.Tensor:
    """Per-level [B, C, H, W] maps -> [B, P, C], points in :func:`flatten_levels`' order."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def decode_predictions(outputs, strides):
    """Boxes [B, P, 4] (x1 y1 x2 y2, pixels) and scores [B, P, K] = sqrt(cls * centerness)."""
    if len(outputs) != 3:
        # An oriented head's distances are in the box's frame: decoding them as xyxy would be silently wrong.
        raise ValueError(f"decode_predictions takes a horizontal head's (cls, box, ctr), got {len(outputs)} "
                         f"output groups; decode an oriented head with obb_post.decode_rotated_predictions")
    cls, box, ctr, points, pstrides = flatten_levels(outputs, strides)
    ltrb = box * pstrides[None, :, None]
    boxes = torch.cat([points[None] - ltrb[..., :2], points[None] + ltrb[..., 2:]], dim=-1)
    scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr))
    return boxes, scores


def postprocess(boxes, scores, score_threshold=0.05, iou_threshold=0.6, max_detections=100,
                pre_nms_top_k=1000, image_size=None):
    """Per image: threshold, keep the top-k (box, class) pairs, class-aware NMS, cap detections."""
    results = []
    for b, s in zip(boxes, scores):
        if image_size is not None:
            h, w = image_size
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
        box_idx, labels, flat = top_candidates(s, score_threshold, pre_nms_top_k)
        cand = b[box_idx]
        kept = batched_nms(cand, flat, labels, iou_threshold)[:max_detections]
        results.append({"boxes": cand[kept], "scores": flat[kept], "labels": labels[kept]})
    return results


def top_candidates(scores, score_threshold: float, pre_nms_top_k: int):
    """One image's (point index, label, score) pairs above the threshold, at most the top k.

    ``scores`` is [P, K]; every (point, class) pair is a candidate, as in FCOS."""
    num_classes = scores.shape[-1]
    flat = scores.flatten()
    idx = (flat > score_threshold).nonzero().squeeze(1)
    flat = flat[idx]
    if flat.numel() > pre_nms_top_k:
        flat, top = flat.topk(pre_nms_top_k)
        idx = idx[top]
    return idx // num_classes, idx % num_classes, flat
