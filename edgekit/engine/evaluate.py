"""COCO-style evaluation (mAP@[.5:.95], mAP@.5, per class) through faster-coco-eval.

faster-coco-eval is a maintained C++ re-implementation of pycocotools' COCOeval with the
same numbers. DOTA "difficult" objects are passed as crowd regions, so detections on them
are neither rewarded nor punished (the DOTA devkit ignores them the same way).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from tqdm import tqdm


def coco_ground_truth(targets: list[dict], class_names: list[str]) -> dict:
    """A COCO dataset dict from per-image targets holding original-coordinate boxes."""
    images, annotations = [], []
    for image_id, t in enumerate(targets):
        h, w = t["orig_size"]
        images.append({"id": image_id, "width": int(w), "height": int(h)})
        difficult = t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool))
        for box, label, diff in zip(t["boxes"].tolist(), t["labels"].tolist(), difficult.tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(bool(diff))})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(predictions: list[dict]) -> list[dict]:
    out = []
    for image_id, p in enumerate(predictions):
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            x1, y1, x2, y2 = box
            out.append({"image_id": image_id, "category_id": int(label) + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


def coco_map(targets: list[dict], predictions: list[dict], class_names: list[str]) -> dict:
    """mAP@[.5:.95], mAP@.5 and per-class AP for predictions against targets (same order)."""
    gt = COCO(coco_ground_truth(targets, class_names))
    dets = coco_detections(predictions)
    # None (JSON null), not NaN, for classes absent from the split: NaN is not valid JSON.
    per_class = {name: {"ap": None, "ap50": None} for name in class_names}
    if not dets:
        return {"map": 0.0, "map50": 0.0, "per_class": per_class, "num_images": len(targets)}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval_faster(gt, gt.loadRes(dets), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]: IoUs, recalls, classes, areas, maxdets
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            per_class[name] = {"ap": float(np.mean(p[p > -1])),
                               "ap50": float(np.mean(p[0][p[0] > -1])) if (p[0] > -1).any() else None}
    stats = evaluator.stats
    return {"map": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0), "per_class": per_class,
            "num_images": len(targets)}


def to_original_coordinates(pred: dict, target: dict) -> dict:
    """Undo the letterbox scaling (boxes were scaled, not shifted) and clip to the real image."""
    return {**pred, "boxes": scale_and_clip(pred["boxes"], float(target["scale"]), target["orig_size"])}


def scale_and_clip(boxes, scale: float, size) -> torch.Tensor:
    """Boxes in letterboxed pixels -> original pixels, clipped to the (h, w) image, not its padding."""
    h, w = size
    boxes = boxes / scale
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


@torch.no_grad()
def evaluate(model, loader, class_names: list[str], score_threshold: float = 0.01, progress: bool = True) -> dict:
    """Run ``model.predict`` over a loader of (images, targets) and score it against COCO mAP."""
    model.eval()
    all_targets, all_preds = [], []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        preds = model.predict(images, score_threshold=score_threshold)
        for p, t in zip(preds, targets):
            all_preds.append(to_original_coordinates(p, t))
            all_targets.append({**t, "boxes": t["boxes"] / float(t["scale"])})
    return coco_map(all_targets, all_preds, class_names)
