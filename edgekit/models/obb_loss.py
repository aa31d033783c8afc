"""Training targets and losses of the oriented (rotated-box) head.

FCOS's rules in the box's own frame: a point is assigned the smallest ground-truth
rotated box that contains it within ``center_radius`` strides of the box centre
(measured along the box's axes), and whose largest side distance falls in the point's
level range; other points are background. Losses: focal classification and centerness
as in :mod:`edgekit.models.detect_loss`; the box loss is 1 - ProbIoU between the decoded
box and its target, weighted by centerness. ProbIoU compares the boxes' Gaussians, which
are equal for (w, h, a), (h, w, a + pi/2) and (w, h, a + pi), so the angle has no
boundary where the loss jumps; its gradient moves centre, size and angle together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgekit.errors import EdgekitError
from edgekit.models.detect_loss import INF, centerness_target, classification_loss, point_ranges
from edgekit.models.detect_post import flatten_levels, flatten_maps
from edgekit.models.obb_post import angle_from_logits, distances_to_rboxes
from edgekit.rotated import probiou


def box_frame_distances(points: torch.Tensor, rboxes: torch.Tensor) -> torch.Tensor:
    """Distances (l, t, r, b) [P, G, 4] from points [P, 2] to the sides of rboxes [G, 5],
    along each box's own axes (negative outside the box)."""
    cx, cy, w, h, angle = rboxes.unbind(1)
    dx, dy = points[:, 0, None] - cx, points[:, 1, None] - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    return torch.stack([w / 2 + along, h / 2 + across, w / 2 - along, h / 2 - across], dim=2)


def assign_rotated_targets(points, pstrides, ranges, gt_rboxes, gt_labels, num_classes, center_radius=1.5):
    """Targets for one image: labels [P] (num_classes = background), side distances in the
    box frame [P, 4] (pixels), and the matched rotated boxes [P, 5]."""
    num_points = points.shape[0]
    if gt_rboxes.numel() == 0:
        return (torch.full((num_points,), num_classes, dtype=torch.long, device=points.device),
                torch.zeros(num_points, 4, device=points.device), torch.zeros(num_points, 5, device=points.device))
    ltrb = box_frame_distances(points, gt_rboxes)
    half_w, half_h = gt_rboxes[:, 2] / 2, gt_rboxes[:, 3] / 2
    rad = pstrides[:, None] * center_radius
    along, across = (ltrb[..., 0] - ltrb[..., 2]) / 2, (ltrb[..., 1] - ltrb[..., 3]) / 2
    in_center = (along.abs() < torch.minimum(rad, half_w)) & (across.abs() < torch.minimum(rad, half_h))
    max_dist = ltrb.max(dim=2).values
    in_range = (max_dist > ranges[:, 0, None]) & (max_dist <= ranges[:, 1, None])
    area = (gt_rboxes[:, 2] * gt_rboxes[:, 3])[None].expand(num_points, -1).clone()
    area[~(in_center & in_range)] = INF
    min_area, gt_idx = area.min(dim=1)
    labels = gt_labels[gt_idx].clone()
    labels[min_area == INF] = num_classes
    rows = torch.arange(num_points, device=points.device)
    return labels, ltrb[rows, gt_idx], gt_rboxes[gt_idx]


def obb_loss(outputs, targets, strides, focal_alpha=0.25, focal_gamma=2.0):
    """Focal + ProbIoU + centerness losses of the oriented head's (cls, box, ctr, angle) outputs;
    ``targets`` hold ``rboxes`` [N, 5] (input pixels) and ``labels`` [N]."""
    if any("rboxes" not in t for t in targets):
        raise EdgekitError("the oriented detector trains on rotated boxes: targets need 'rboxes' [N, 5]; "
                           "build the data set without rotated=False")
    cls_maps, box_maps, ctr_maps, angle_maps = outputs
    cls, box, ctr, points, pstrides = flatten_levels((cls_maps, box_maps, ctr_maps), strides)
    angle = angle_from_logits(flatten_maps(angle_maps).squeeze(-1))
    num_classes = cls.shape[-1]
    ranges = point_ranges(strides, pstrides)
    assigned = [assign_rotated_targets(points, pstrides, ranges, t["rboxes"].to(points.device, torch.float32),
                                       t["labels"].to(points.device), num_classes) for t in targets]
    labels, ltrb, gt = (torch.stack(parts) for parts in zip(*assigned))
    loss_cls, pos, num_pos = classification_loss(cls, labels, focal_alpha, focal_gamma)
    if pos.any():
        strides_pos = pstrides.expand_as(labels)[pos][:, None]
        ctr_t = centerness_target(ltrb[pos] / strides_pos)
        pred = distances_to_rboxes(points.expand(labels.shape[0], -1, -1)[pos], box[pos] * strides_pos, angle[pos])
        loss_box = ((1 - probiou(pred, gt[pos])) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos].squeeze(-1), ctr_t, reduction="sum") / num_pos
    else:
        # Keep every head output in the graph, or DDP waits forever for their gradients.
        loss_box = loss_ctr = (box.sum() + ctr.sum() + angle.sum()) * 0
    return {"loss": loss_cls + loss_box + loss_ctr, "cls": loss_cls.detach(), "box": loss_box.detach(),
            "ctr": loss_ctr.detach(), "num_pos": torch.tensor(num_pos)}
