"""DeepForest-style box precision/recall: hand cases whose value follows from the definition,
and random cases against a brute-force assignment with shapely's areas."""

import itertools
import math

import numpy as np
import pytest
from shapely.geometry import box as shapely_box

from edgekit.engine.box_pr import box_precision_recall, image_matches

SQUARE = [0, 0, 10, 10]


def test_identical_boxes_are_all_true_positives():
    r = box_precision_recall([([SQUARE, [20, 20, 30, 40]], [[20, 20, 30, 40], SQUARE], [0.9, 0.8])])
    assert (r["precision"], r["recall"], r["tp"]) == (1.0, 1.0, 2)


def test_iou_threshold_is_strict():
    # [0,0,10,10] against [0,0,10,20]: intersection 100, union 200, IoU exactly 0.5.
    pair = [([SQUARE], [[0, 0, 10, 20]], [1.0])]
    assert box_precision_recall(pair, iou_threshold=0.4)["tp"] == 1
    assert box_precision_recall(pair, iou_threshold=0.5)["tp"] == 0
    # Shifted by half a side: intersection 50, union 150, IoU 1/3.
    shifted = [([SQUARE], [[5, 0, 15, 10]], [1.0])]
    assert box_precision_recall(shifted, iou_threshold=0.3)["recall"] == 1.0
    assert box_precision_recall(shifted, iou_threshold=0.34)["recall"] == 0.0


def test_assignment_maximises_intersection_area_not_iou():
    # A covers the truth (intersection 100, IoU 0.5); B lies inside it (intersection 81, IoU 0.81).
    # DeepForest's assignment takes A, so at IoU 0.6 there is no true positive although B would be one.
    m = image_matches([SQUARE], [[0, 0, 20, 10], [0, 0, 9, 9]], iou_threshold=0.6)
    assert m["tp"] == 0 and m["ious"][0] == pytest.approx(0.5)
    r = box_precision_recall([([SQUARE], [[0, 0, 20, 10], [0, 0, 9, 9]], [0.5, 0.9])], iou_threshold=0.4)
    assert (r["tp"], r["precision"], r["recall"]) == (1, 0.5, 1.0)


def test_score_threshold_drops_predictions_at_or_below_it():
    images = [([SQUARE], [SQUARE, [50, 50, 60, 60], [70, 70, 80, 80]], [0.9, 0.3, 0.1])]
    r = box_precision_recall(images, score_threshold=0.1)  # the 0.1 box is not above 0.1
    assert (r["n_pred"], r["precision"], r["recall"]) == (2, 0.5, 1.0)
    r = box_precision_recall(images, score_threshold=0.95)
    assert r["n_pred"] == 0 and r["recall"] == 0.0 and math.isnan(r["precision"])


def test_per_image_means():
    images = [([SQUARE], [SQUARE], [1.0]),                                 # recall 1, precision 1
              ([SQUARE, [20, 0, 30, 10]], [], []),                         # recall 0, no precision
              ([SQUARE], [SQUARE, [40, 40, 50, 50], [60, 0, 70, 10]], [1, 1, 1]),  # recall 1, precision 1/3
              ([], [SQUARE], [1.0])]                                       # no truth: not an image of the mean
    r = box_precision_recall(images)
    assert r["images"] == 3
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx((1 + 1 / 3) / 2)


def test_bad_boxes_are_refused():
    with pytest.raises(ValueError):
        image_matches([[10, 0, 0, 10]], [SQUARE])
    with pytest.raises(ValueError):
        image_matches([SQUARE], [SQUARE], scores=[0.5, 0.5])


def _random_boxes(rng, n):
    xy = rng.uniform(0, 30, size=(n, 2))
    wh = rng.uniform(2, 15, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _brute_force_tp(truth, predicted, iou_threshold):
    """Every one-to-one pairing of truth with predictions; the one of largest total
    intersection (shapely areas) gives the true positives."""
    t = [shapely_box(*b) for b in truth]
    p = [shapely_box(*b) for b in predicted]
    slots = list(range(len(p))) + [None] * len(t)
    best, best_tp = -1.0, 0
    for chosen in itertools.permutations(slots, len(t)):
        if any(c is not None and chosen.count(c) > 1 for c in chosen):
            continue
        total = sum(t[i].intersection(p[j]).area for i, j in enumerate(chosen) if j is not None)
        if total > best + 1e-9:
            tp = sum(1 for i, j in enumerate(chosen) if j is not None
                     and t[i].intersection(p[j]).area / t[i].union(p[j]).area > iou_threshold)
            best, best_tp = total, tp
    return best_tp


@pytest.mark.parametrize("trial", range(20))
def test_random_cases_match_brute_force(rng, trial):
    truth = _random_boxes(rng, int(rng.integers(1, 5)))
    predicted = _random_boxes(rng, int(rng.integers(0, 5)))
    threshold = float(rng.uniform(0.1, 0.6))
    m = image_matches(truth, predicted, iou_threshold=threshold)
    assert m["tp"] == _brute_force_tp(truth, predicted, threshold)
    r = box_precision_recall([(truth, predicted, np.ones(len(predicted)))], iou_threshold=threshold,
                             score_threshold=0.0)
    assert r["recall"] == pytest.approx(m["tp"] / len(truth))
    if len(predicted):
        assert r["precision"] == pytest.approx(m["tp"] / len(predicted))
