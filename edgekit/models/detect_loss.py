"""FCOS training targets and losses (focal loss, GIoU, centerness).

Each feature-map point is assigned the smallest ground-truth box that contains it within
a centre region of ``center_radius`` strides, and whose largest distance to the box sides
falls in the level's size range; other points are background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgekit.models.detect_post import flatten_levels

INF = 1e8


def level_ranges(strides) -> list[tuple[float, float]]:
    """Size range of each level: (prev, 8*stride], the last open-ended (FCOS's 64/128/inf at 8/16/32)."""
    bounds = [0.0] + [8.0 * s for s in strides[:-1]] + [INF]
    return list(zip(bounds[:-1], bounds[1:]))


def point_ranges(strides, pstrides) -> torch.Tensor:
    """Each point's size range [P, 2] (its level's entry of :func:`level_ranges`)."""
    ranges = torch.tensor(level_ranges(strides), device=pstrides.device)
    return torch.cat([ranges[i].expand(int((pstrides == s).sum()), 2) for i, s in enumerate(strides)])


def assign_targets(points, pstrides, ranges, gt_boxes, gt_labels, num_classes, center_radius=1.5):
    """Targets for one image: labels [P] (num_classes = background), ltrb [P, 4] in pixels."""
    num_points = points.shape[0]
    if gt_boxes.numel() == 0:
        return (torch.full((num_points,), num_classes, dtype=torch.long, device=points.device),
                torch.zeros(num_points, 4, device=points.device))
    px, py = points[:, 0, None], points[:, 1, None]
    x1, y1, x2, y2 = gt_boxes.unbind(1)
    ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=2)  # [P, G, 4]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rad = pstrides[:, None] * center_radius
    in_center = ((px - torch.maximum(cx - rad, x1) > 0) & (torch.minimum(cx + rad, x2) - px > 0)
                 & (py - torch.maximum(cy - rad, y1) > 0) & (torch.minimum(cy + rad, y2) - py > 0))
    max_dist = ltrb.max(dim=2).values
    in_range = (max_dist > ranges[:, 0, None]) & (max_dist <= ranges[:, 1, None])
    area = ((x2 - x1) * (y2 - y1))[None].expand(num_points, -1).clone()
    area[~(in_center & in_range & (ltrb.min(dim=2).values > 0))] = INF
    min_area, gt_idx = area.min(dim=1)
    labels = gt_labels[gt_idx].clone()
    labels[min_area == INF] = num_classes
    return labels, ltrb[torch.arange(num_points, device=points.device), gt_idx]


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise focal loss (Lin et al. 2017); ``targets`` are 0/1 like ``logits``."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** gamma


def giou_loss(pred_ltrb, target_ltrb):
    """Generalised IoU loss between boxes given as distances from the same point."""
    pl, pt, pr, pb = pred_ltrb.unbind(1)
    tl, tt, tr, tb = target_ltrb.unbind(1)
    pred_area, target_area = (pl + pr) * (pt + pb), (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (torch.minimum(pt, tt) + torch.minimum(pb, tb))
    union = pred_area + target_area - inter
    enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (torch.maximum(pt, tt) + torch.maximum(pb, tb))
    iou = inter / union.clamp(min=1e-6)
    return 1 - (iou - (enclose - union) / enclose.clamp(min=1e-6))


def centerness_target(ltrb):
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    return torch.sqrt((lr.min(1).values / lr.max(1).values.clamp(min=1e-6))
                      * (tb.min(1).values / tb.max(1).values.clamp(min=1e-6)))


def classification_loss(cls, labels, focal_alpha=0.25, focal_gamma=2.0):
    """Focal loss of logits [B, P, K] against labels [B, P] (K = background), over the
    number of positives; returns (loss, positive mask, number of positives)."""
    num_classes = cls.shape[-1]
    pos = labels < num_classes
    num_pos = max(float(pos.sum()), 1.0)
    onehot = F.one_hot(labels, num_classes + 1)[..., :num_classes].to(cls.dtype)
    return sigmoid_focal_loss(cls, onehot, focal_alpha, focal_gamma).sum() / num_pos, pos, num_pos


def fcos_loss(outputs, targets, strides, focal_alpha=0.25, focal_gamma=2.0):
    """Sum of the three FCOS losses, each normalised by the number of positives."""
    cls, box, ctr, points, pstrides = flatten_levels(outputs, strides)
    num_classes = cls.shape[-1]
    ranges = point_ranges(strides, pstrides)
    all_labels, all_ltrb = zip(*(assign_targets(points, pstrides, ranges, t["boxes"].to(points.device),
                                                t["labels"].to(points.device), num_classes) for t in targets))
    labels, ltrb = torch.stack(all_labels), torch.stack(all_ltrb)
    loss_cls, pos, num_pos = classification_loss(cls, labels, focal_alpha, focal_gamma)
    if pos.any():
        strides_pos = pstrides.expand_as(labels)[pos][:, None]
        target = ltrb[pos] / strides_pos
        ctr_t = centerness_target(target)
        loss_box = (giou_loss(box[pos], target) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos].squeeze(-1), ctr_t, reduction="sum") / num_pos
    else:
        # Keep every head output in the graph, or DDP waits forever for their gradients.
        loss_box = loss_ctr = (box.sum() + ctr.sum()) * 0
    return {"loss": loss_cls + loss_box + loss_ctr, "cls": loss_cls.detach(), "box": loss_box.detach(),
            "ctr": loss_ctr.detach(), "num_pos": torch.tensor(num_pos)}
