"""COCO mAP through faster-coco-eval, checked on cases whose AP follows from the definition."""

import numpy as np
import pytest
import torch

from edgekit.engine.evaluate import coco_map


def target(boxes, labels, difficult=None, size=(200, 300)):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
         "orig_size": size, "scale": 1.0}
    if difficult is not None:
        t["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return t


def pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def shifted_box_with_iou(iou, w=40.0):
    """A box of width w shifted right so that its IoU with [0, 0, w, w] equals ``iou``."""
    shift = w * (1 - iou) / (1 + iou)
    return [shift, 0.0, w + shift, w]


def test_perfect_predictions_score_one():
    rng = np.random.default_rng()
    targets, preds = [], []
    for _ in range(5):
        xy = rng.uniform(0, 150, (4, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (4, 2))], 1).tolist()
        labels = rng.integers(0, 2, 4).tolist()
        targets.append(target(boxes, labels))
        preds.append(pred(boxes, rng.uniform(0.5, 1, 4).tolist(), labels))
    m = coco_map(targets, preds, ["a", "b"])
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)


@pytest.mark.parametrize("iou", [0.52, 0.62, 0.77, 0.93])
def test_ap_counts_the_iou_thresholds_a_match_passes(iou):
    # One object, one detection at a known IoU: AP is 1 at thresholds <= IoU, 0 above,
    # so mAP@[.5:.95] is the fraction of the ten thresholds it passes.
    m = coco_map([target([[0, 0, 40, 40]], [0])], [pred([shifted_box_with_iou(iou)], [0.9], [0])], ["a"])
    thresholds = np.linspace(0.5, 0.95, 10)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx(np.mean(thresholds <= iou), abs=1e-6)


def test_false_positive_ranked_first_halves_precision():
    # Two objects; detections: a false positive (score .9), then both hits.
    # Precision-recall: r=.5 at p=.5, r=1 at p=2/3 -> interpolated p = 2/3 everywhere.
    t = target([[0, 0, 20, 20], [100, 100, 130, 130]], [0, 0])
    p = pred([[50, 50, 60, 60], [0, 0, 20, 20], [100, 100, 130, 130]], [0.9, 0.8, 0.7], [0, 0, 0])
    m = coco_map([t], [p], ["a"])
    assert m["map50"] == pytest.approx(2 / 3, abs=0.01)


def test_difficult_objects_are_ignored_and_empty_predictions_score_zero():
    t = target([[0, 0, 20, 20], [100, 100, 130, 130]], [0, 0], difficult=[False, True])
    m = coco_map([t], [pred([[0, 0, 20, 20]], [0.9], [0])], ["a"])
    assert m["map50"] == pytest.approx(1.0)  # missing the difficult one costs nothing
    assert coco_map([t], [pred([], [], [])], ["a"])["map50"] == 0.0
