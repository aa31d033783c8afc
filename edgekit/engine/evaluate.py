"""Detection evaluation: COCO-style mAP@[.5:.95] and mAP@.5, and the DOTA devkit's mAP@.5.

Every result names the AP definitions it holds (``definitions``), because the two
families differ by several points on the same detections:

* ``map``/``map50``: COCO-style (101-point interpolated AP, IoU .50:.05:.95). Horizontal
  boxes through faster-coco-eval (a maintained C++ re-implementation of pycocotools'
  COCOeval with the same numbers); rotated boxes through
  :func:`edgekit.engine.dota_metric.polygon_coco_map` (the same rules with polygon IoU).
* ``dota_map50``: the DOTA devkit's VOC07 11-point AP at IoU 0.5: Task 1 (polygon IoU)
  for oriented models, Task 2 (box IoU) for horizontal ones.

DOTA "difficult" objects are ignored by both (COCO crowd regions; the devkit's rule).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from tqdm import tqdm

from edgekit.config import StageConfig, require
from edgekit.errors import EdgekitError


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
    """Undo the letterbox scaling (boxes were scaled, not shifted) and clip to the real image;
    rotated boxes are scaled, not clipped (a cut rectangle is no rectangle)."""
    scale = float(target["scale"])
    out = {**pred, "boxes": scale_and_clip(pred["boxes"], scale, target["orig_size"])}
    if "rboxes" in pred:
        out["rboxes"] = unscale_rboxes(pred["rboxes"], scale)
    return out


def unscale_rboxes(rboxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Rotated boxes in letterboxed pixels -> original pixels (centre and sides scale, the angle stays)."""
    divisor = torch.tensor([scale] * 4 + [1.0], dtype=rboxes.dtype, device=rboxes.device)
    return rboxes / divisor


def target_in_original(target: dict) -> dict:
    """A data set target with its boxes (and rotated boxes) back in original pixels."""
    scale = float(target["scale"])
    out = {**target, "boxes": target["boxes"] / scale}
    if "rboxes" in target:
        out["rboxes"] = unscale_rboxes(target["rboxes"], scale)
    return out


COCO_BOX = "COCO-style box AP (faster-coco-eval): mAP@[.5:.95] 101-point, mAP@.5 at box IoU 0.5"
DOTA_TASK2 = "DOTA Task 2 (horizontal boxes): VOC07 11-point AP at box IoU > 0.5, difficult objects ignored"


def _box_polygons(boxes: torch.Tensor) -> np.ndarray:
    x1, y1, x2, y2 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T
    return np.stack([x1, y1, x2, y1, x2, y2, x1, y2], axis=1)


def detection_metrics(targets: list[dict], predictions: list[dict], class_names: list[str],
                      oriented: bool = False) -> dict:
    """COCO-style and DOTA-devkit scores of predictions against targets (original pixels,
    same order); ``oriented`` scores rotated boxes (``rboxes``) by polygon IoU."""
    from edgekit.engine.dota_metric import dota_task1_map, polygon_coco_map

    def shapes(item: dict) -> dict:
        if oriented:
            return {"rboxes": np.asarray(item["rboxes"], dtype=np.float64)}
        return {"polygons": _box_polygons(item["boxes"])}

    gt = [{**shapes(t), "labels": np.asarray(t["labels"]),
           "difficult": np.asarray(t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool)))}
          for t in targets]
    dets = [{**shapes(p), "labels": np.asarray(p["labels"]), "scores": np.asarray(p["scores"])} for p in predictions]
    if oriented:
        coco = polygon_coco_map(gt, dets, class_names)
        coco = {**coco, "map": coco["map"] or 0.0, "map50": coco["map50"] or 0.0}
        definition = coco["metric"]
    else:
        coco = coco_map(targets, predictions, class_names)
        definition = COCO_BOX
    dota = dota_task1_map(gt, dets, class_names)
    per_class = {name: {"ap": coco["per_class"][name]["ap"], "ap50": coco["per_class"][name]["ap50"],
                        "dota_ap50": dota["per_class"][name]["ap"]} for name in class_names}
    return {"map": coco["map"], "map50": coco["map50"], "dota_map50": dota["map"], "per_class": per_class,
            "num_images": len(targets), "boxes": "oriented" if oriented else "horizontal",
            "definitions": {"map": definition, "map50": definition,
                            "dota_map50": dota["metric"] if oriented else DOTA_TASK2}}


def scale_and_clip(boxes, scale: float, size) -> torch.Tensor:
    """Boxes in letterboxed pixels -> original pixels, clipped to the (h, w) image, not its padding."""
    h, w = size
    boxes = boxes / scale
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


@torch.no_grad()
def evaluate_model(model, loader, class_names: list[str], score_threshold: float = 0.01, progress: bool = True) -> dict:
    """Run ``model.predict`` over a loader of (images, targets) and score it
    (:func:`detection_metrics`; rotated boxes for an oriented model)."""
    model.eval()
    oriented = bool(getattr(model, "obb", False))
    all_targets, all_preds = [], []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        if oriented and any("rboxes" not in t for t in targets):
            raise EdgekitError("an oriented model is scored on rotated boxes, and these targets have none: "
                               "build the data set without rotated=False")
        preds = model.predict(images, score_threshold=score_threshold)
        for p, t in zip(preds, targets):
            all_preds.append(to_original_coordinates(p, t))
            all_targets.append(target_in_original(t))
    return detection_metrics(all_targets, all_preds, class_names, oriented)


@dataclass
class EvalConfig(StageConfig):
    batch_size: int = 16
    score_threshold: float = 0.01   # detections below it are not scored (COCO keeps up to 100 per image)
    progress: bool = True

    def check(self) -> None:
        require(1 <= self.batch_size <= 1024, "batch_size", self.batch_size, "an integer in [1, 1024]")
        require(0 <= self.score_threshold < 1, "score_threshold", self.score_threshold, "in [0, 1)")


@dataclass
class Metrics:
    """Scores of one evaluation (see the module doc): COCO-style mAP@[.5:.95] and mAP@.5,
    the DOTA devkit's mAP@.5, per class (None for a class absent from the split), over
    ``num_images`` images; ``definitions`` names each AP."""

    map: float
    map50: float
    per_class: dict
    num_images: int
    dota_map50: float | None = None
    boxes: str = "horizontal"
    definitions: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> "Metrics":
        return cls(raw["map"], raw["map50"], raw["per_class"], raw["num_images"], raw.get("dota_map50"),
                   raw.get("boxes", "horizontal"), raw.get("definitions", {}))

    def to_dict(self) -> dict:
        return {"map": self.map, "map50": self.map50, "dota_map50": self.dota_map50, "boxes": self.boxes,
                "per_class": self.per_class, "num_images": self.num_images, "definitions": self.definitions}

    def table(self) -> str:
        """The text the eval command prints: totals, then one line per class, then the definitions."""
        def fmt(value) -> str:
            return "  n/a " if value is None else f"{value:.4f}"

        lines = [f"{self.boxes} boxes, {self.num_images} images: mAP@[.5:.95] {self.map:.4f}  mAP@.5 "
                 f"{self.map50:.4f} (COCO-style)  DOTA mAP@.5 {fmt(self.dota_map50)} (VOC07)"]
        lines += [f"  {name:<20} AP {fmt(m['ap'])}  AP50 {fmt(m['ap50'])}  DOTA AP50 {fmt(m.get('dota_ap50'))}"
                  for name, m in self.per_class.items()]
        lines += [f"  {key}: {text}" for key, text in self.definitions.items() if key != "map50"]
        return "\n".join(lines)


def evaluate(checkpoint, data, config: EvalConfig | None = None, out=None) -> Metrics:
    """Score a detector checkpoint on a DOTA-format split (images/ + labelTxt/); with
    ``out``, also write the metrics there as JSON. A split without any labelled object is
    refused: its mAP would be a meaningless 0."""
    from torch.utils.data import DataLoader

    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.engine.checkpoint import load
    from edgekit.fileio import check_output_file, write_json_atomic

    config = config or EvalConfig()
    if out is not None:
        check_output_file(out, "--out")
    loaded = load(checkpoint)
    classes = loaded.detector_classes()
    dataset = DetectionDataset(Path(data), classes, image_size=loaded.image_size)
    if not sum(len(labels) for labels in dataset.labels):
        raise EdgekitError(f"{data}: no labelled object of the model's classes ({', '.join(classes)}) in this split; "
                           f"mAP needs ground truth: check the labelTxt folder and the class names")
    loader = DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate_detection)
    raw = evaluate_model(loaded.model, loader, classes, score_threshold=config.score_threshold,
                         progress=config.progress)
    metrics = Metrics.from_dict(raw)
    if out is not None:
        write_json_atomic(out, metrics.to_dict())
    return metrics
