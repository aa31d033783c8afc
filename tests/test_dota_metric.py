"""DOTA Task 1 and COCO-style polygon metrics against definitions, shapely, a loop re-statement of the
devkit's voc_eval, and edgekit's COCO evaluator (faster-coco-eval) on horizontal boxes."""

import functools
import math

import numpy as np
import pytest
import shapely
import torch

from edgekit.data.dota import DotaAnnotation, DotaObject
from edgekit.engine.dota_metric import (dota_task1_map, polygon_coco_map, polygon_iou, polygon_iou_pairs,
                                        polygon_metrics, voc_ap)
from edgekit.engine.evaluate import coco_map
from edgekit.errors import EdgekitError


def box(x1, y1, x2, y2):
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def rbox_params(rng, n, spread=100.0, size=(2.0, 40.0)):
    """Random rotated rectangles as [n, 5] (cx, cy, w, h, angle)."""
    return np.column_stack([rng.uniform(0, spread, (n, 2)), rng.uniform(*size, (n, 2)),
                            rng.uniform(-math.pi, math.pi, n)])


def corners(params):
    """[n, 5] rotated rectangles -> [n, 8] corners, written out here (independent of edgekit.rotated)."""
    cx, cy, w, h, a = np.asarray(params, dtype=float).reshape(-1, 5).T
    u = np.stack([np.cos(a), np.sin(a)], 1)
    v = np.stack([-np.sin(a), np.cos(a)], 1)
    centre = np.stack([cx, cy], 1)
    return np.stack([centre + sx * w[:, None] / 2 * u + sy * h[:, None] / 2 * v
                     for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))], 1).reshape(-1, 8)


def rotated(rng, n, spread=100.0, size=(2.0, 40.0)):
    """Random rotated rectangles [n, 8]."""
    return corners(rbox_params(rng, n, spread, size))


def simple_quads(rng, n):
    """Random simple quadrilaterals, convex or not: one point per quadrant around a centre (gaps < pi)."""
    angle = np.arange(4) * math.pi / 2 + rng.uniform(-0.7, 0.7, (n, 4)) + rng.uniform(0, 2 * math.pi, (n, 1))
    radius = rng.uniform(1, 30, (n, 4))
    centre = rng.uniform(0, 40, (n, 2))
    return (centre[:, None] + np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)).reshape(n, 8)


def shapely_iou(a, b):
    pa, pb = shapely.polygons(np.reshape(a, (-1, 4, 2))), shapely.polygons(np.reshape(b, (-1, 4, 2)))
    inter = shapely.area(shapely.intersection(pa, pb))
    return inter / (shapely.area(pa) + shapely.area(pb) - inter)


# ---------------------------------------------------------------- polygon IoU


@pytest.mark.parametrize("make", [functools.partial(rotated, spread=50.0), simple_quads], ids=["rotated", "quads"])
def test_polygon_iou_matches_shapely(rng, make):
    a, b = make(rng, 3000), make(rng, 3000)
    valid = (shapely.is_valid(shapely.polygons(a.reshape(-1, 4, 2)))
             & shapely.is_valid(shapely.polygons(b.reshape(-1, 4, 2))))
    ref = shapely_iou(a[valid], b[valid])
    assert valid.mean() > 0.99 and (ref > 0).mean() > 0.2  # enough real overlaps to mean something
    np.testing.assert_allclose(polygon_iou_pairs(a[valid], b[valid]), ref, rtol=0, atol=1e-11)


def test_polygon_iou_far_from_the_origin(rng):
    """A 20000-px scene's coordinates: the pair is moved to a local origin, so no digits are lost."""
    a, b = rotated(rng, 500, spread=60), rotated(rng, 500, spread=60)
    shift = np.tile(rng.uniform(1e4, 2e4, 2), 4)
    np.testing.assert_allclose(polygon_iou_pairs(a + shift, b + shift), shapely_iou(a, b), rtol=0, atol=1e-11)


def test_polygon_iou_hand_cases():
    dart = [0, 0, 4, 0, 1, 1, 0, 4]  # non-convex, area 4, contains the unit square
    unit = box(0, 0, 1, 1)
    assert polygon_iou_pairs([dart], [unit])[0] == pytest.approx(0.25, abs=1e-15)
    assert polygon_iou_pairs([unit], [dart])[0] == pytest.approx(0.25, abs=1e-15)
    assert polygon_iou_pairs([unit], [box(0, 0, 1, 1)[::-1]])[0] == pytest.approx(1.0)  # either orientation
    assert polygon_iou_pairs([unit], [box(1, 0, 2, 1)])[0] == 0.0  # touching along an edge
    assert polygon_iou_pairs([unit], [box(5, 5, 6, 6)])[0] == 0.0
    assert polygon_iou_pairs([box(0, 0, 2, 1)], [unit])[0] == pytest.approx(0.5, abs=1e-15)
    assert polygon_iou_pairs([[0] * 8], [[0] * 8])[0] == 0.0  # empty polygons: 0, not nan
    # A self-intersecting "bow-tie" gets the devkit's value: its two lobes wind oppositely and cancel.
    assert polygon_iou_pairs([[0, 0, 2, 2, 2, 0, 0, 2]], [box(0, 0, 2, 2)])[0] == pytest.approx(0.0, abs=1e-15)
    assert polygon_iou(np.array([unit, dart]), np.array([unit, box(0, 0, 2, 1), box(9, 9, 10, 10)])) == \
        pytest.approx(np.array([[1.0, 0.5, 0.0], [0.25, 0.44, 0.0]]), abs=1e-15)
    # dart x [0, 2] x [0, 1]: width min(2, 4 - 3y) -> area 4/3 + 1/2 = 11/6; IoU (11/6) / (4 + 2 - 11/6) = 0.44


# ---------------------------------------------------------------- DOTA Task 1: values from the definition


def one_image(gt_polys, gt_labels, det_polys, scores, det_labels, difficult=None):
    gt = [{"polygons": np.array(gt_polys, dtype=float).reshape(-1, 8), "labels": gt_labels,
           "difficult": difficult if difficult is not None else [False] * len(gt_labels)}]
    det = [{"polygons": np.array(det_polys, dtype=float).reshape(-1, 8), "scores": scores, "labels": det_labels}]
    return gt, det


@pytest.mark.parametrize("method", ["voc07", "all"])
def test_one_perfect_detection(method):
    gt, det = one_image([box(10, 10, 50, 30)], [0], [box(10, 10, 50, 30)], [0.9], [0])
    result = dota_task1_map(gt, det, ["plane"], ap_method=method)
    assert result["map"] == 1.0 and result["per_class"]["plane"]["ap"] == 1.0


@pytest.mark.parametrize("method", ["voc07", "all"])
def test_false_positive_ranked_first(method):
    # Detections in score order: FP, TP over one object: recall (0, 1), precision (0, 1/2). The best
    # precision at any recall level is 1/2, so both AP definitions give 1/2.
    gt, det = one_image([box(0, 0, 10, 10)], [0], [box(50, 50, 60, 60), box(0, 0, 10, 10)], [0.9, 0.8], [0, 0])
    assert dota_task1_map(gt, det, ["ship"], ap_method=method)["map"] == pytest.approx(0.5, abs=1e-15)


def test_eleven_point_and_all_point_differ():
    # TP, FP, TP over two objects: recall (.5, .5, 1), precision (1, 1/2, 2/3).
    # all-point: .5 * 1 + .5 * 2/3 = 5/6; 11-point: levels 0...0.5 see 1, levels 0.6...1 see 2/3: (6 + 5 * 2/3) / 11.
    objects = [box(0, 0, 10, 10), box(20, 0, 30, 10)]
    gt, det = one_image(objects, [0, 0], [objects[0], box(50, 50, 60, 60), objects[1]], [0.9, 0.8, 0.7], [0, 0, 0])
    assert dota_task1_map(gt, det, ["car"], ap_method="all")["map"] == pytest.approx(5 / 6, abs=1e-15)
    assert dota_task1_map(gt, det, ["car"], ap_method="voc07")["map"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-15)


def test_eleven_point_levels_are_the_devkits():
    # 3 of 10 objects found, no false positive: recall stops at 3/10, which is below the devkit's level
    # np.arange(0, 1.1, 0.1)[3] = 0.30000000000000004, so 3 levels (0, .1, .2) count, not 4.
    objects = [box(20 * i, 0, 20 * i + 10, 10) for i in range(10)]
    gt, det = one_image(objects, [0] * 10, objects[:3], [0.9, 0.8, 0.7], [0] * 3)
    assert dota_task1_map(gt, det, ["car"])["map"] == pytest.approx(3 / 11, abs=1e-15)
    assert voc_ap(np.array([0.3]), np.array([1.0]), "voc07") == pytest.approx(3 / 11, abs=1e-15)
    assert voc_ap(np.array([0.3]), np.array([1.0]), "all") == pytest.approx(0.3, abs=1e-15)


def test_duplicates_and_the_strict_threshold():
    objects = [box(0, 0, 10, 10)]
    # The second detection of the same object is a false positive: precision (1, 1/2) at recall 1.
    gt, det = one_image(objects, [0], [objects[0], objects[0]], [0.9, 0.8], [0, 0])
    assert dota_task1_map(gt, det, ["car"], ap_method="all")["map"] == pytest.approx(1.0)
    gt, det = one_image(objects, [0], [objects[0], objects[0]], [0.8, 0.9], [0, 0])
    assert dota_task1_map(gt, det, ["car"], ap_method="all")["map"] == pytest.approx(1.0)
    # IoU exactly 0.5 is not a hit for the devkit (IoU > 0.5), but is one for COCO (IoU >= 0.5).
    gt, det = one_image([box(0, 0, 2, 1)], [0], [box(0, 0, 1, 1)], [0.9], [0])
    assert dota_task1_map(gt, det, ["car"])["map"] == 0.0
    assert polygon_coco_map(gt, det, ["car"])["map50"] == pytest.approx(1.0)


def test_difficult_objects_neither_count_nor_penalise():
    normal, hard = box(0, 0, 10, 10), box(100, 100, 110, 110)
    # A detection on a difficult object ranked first changes nothing: AP stays 1.
    gt, det = one_image([normal, hard], [0, 0], [hard, normal, hard], [0.95, 0.9, 0.85], [0, 0, 0],
                        difficult=[False, True])
    result = dota_task1_map(gt, det, ["car"])
    assert result["map"] == 1.0
    assert result["per_class"]["car"]["num_gt"] == 1 and result["per_class"]["car"]["num_difficult"] == 1
    # A detection whose best object is difficult is ignored even if it also covers a normal one > 0.5:
    # the devkit takes the best object only, so the normal one stays missed (AP 0, no false positive).
    big, inner = box(0, 0, 10, 10), box(0, 0, 10, 8)
    gt, det = one_image([big, inner], [0, 0], [box(0, 0, 10, 8.5)], [0.9], [0], difficult=[False, True])
    assert dota_task1_map(gt, det, ["car"])["map"] == 0.0
    # A class whose objects are all difficult has no AP and stays out of the mean.
    gt, det = one_image([normal, hard], [0, 1], [normal], [0.9], [0], difficult=[False, True])
    result = dota_task1_map(gt, det, ["car", "ship"])
    assert result["per_class"]["ship"]["ap"] is None and result["map"] == 1.0


def test_classes_without_objects_or_detections():
    gt, det = one_image([box(0, 0, 10, 10)], [0], [box(0, 0, 10, 10)], [0.5], [1])
    result = dota_task1_map(gt, det, ["car", "ship"])
    assert result["per_class"]["car"]["ap"] == 0.0 and result["per_class"]["ship"]["ap"] is None
    assert result["map"] == 0.0
    empty = dota_task1_map([{"polygons": np.zeros((0, 8)), "labels": []}], [{"polygons": [], "scores": [],
                                                                            "labels": []}], ["car"])
    assert empty["map"] is None
    assert polygon_coco_map([{"polygons": np.zeros((0, 8)), "labels": []}],
                            [{"polygons": [], "scores": [], "labels": []}], ["car"])["map"] is None


# ---------------------------------------------------------------- against the devkit's rules, restated as loops


def devkit_voc_eval(gt, det, classes, use_07_metric):
    """dota_evaluation_task1.voc_eval restated: per class and per detection, Python loops, shapely IoU."""
    aps = []
    for k in range(len(classes)):
        recs = {i: {"poly": g["polygons"][np.asarray(g["labels"]) == k],
                    "difficult": np.asarray(g["difficult"], bool)[np.asarray(g["labels"]) == k]}
                for i, g in enumerate(gt)}
        for r in recs.values():
            r["det"] = [False] * len(r["poly"])
        npos = sum(int((~r["difficult"]).sum()) for r in recs.values())
        rows = [(i, s, p) for i, d in enumerate(det) for s, p, lab in zip(d["scores"], d["polygons"], d["labels"])
                if lab == k]
        rows.sort(key=lambda row: -row[1])
        tp, fp = np.zeros(len(rows)), np.zeros(len(rows))
        for n, (i, _, p) in enumerate(rows):
            r = recs[i]
            ovmax, jmax = -np.inf, -1
            if len(r["poly"]):
                ious = shapely_iou(np.repeat(p[None], len(r["poly"]), 0), r["poly"])
                ovmax, jmax = ious.max(), int(np.argmax(ious))
            if ovmax > 0.5:
                if not r["difficult"][jmax]:
                    if not r["det"][jmax]:
                        tp[n], r["det"][jmax] = 1, True
                    else:
                        fp[n] = 1
            else:
                fp[n] = 1
        if npos == 0:
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if use_07_metric:
            ap = sum((np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11 for t in np.arange(0.0, 1.1, 0.1))
        else:
            mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
            for i in range(mpre.size - 1, 0, -1):
                mpre[i - 1] = max(mpre[i - 1], mpre[i])
            i = np.where(mrec[1:] != mrec[:-1])[0]
            ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
        aps.append(ap)
    return float(np.mean(aps))


def random_scene(rng, num_images, num_classes, horizontal=False):
    """Objects, noisy detections of them (some with the wrong class) and random false positives, fresh
    scores; a fifth of the objects difficult. Horizontal scenes have angle 0."""
    gt, det = [], []
    for _ in range(num_images):
        g = int(rng.integers(0, 12))
        params = rbox_params(rng, g, spread=300, size=(10, 60))
        labels = rng.integers(0, num_classes, g)
        gt_params = params.copy()
        src = rng.integers(0, g, int(rng.integers(0, 3 * g + 1))) if g else np.zeros(0, int)
        found = params[src] + rng.normal(0, 1, (len(src), 5)) * [3, 3, 3, 3, 0.1]
        found[:, 2:4] = np.maximum(found[:, 2:4], 2)
        noise = rbox_params(rng, int(rng.integers(0, 5)), spread=300, size=(10, 60))
        det_params = np.concatenate([found, noise])
        if horizontal:
            gt_params[:, 4], det_params[:, 4] = 0, 0
        det_labels = np.concatenate([np.where(rng.random(len(src)) < 0.9, labels[src],
                                              rng.integers(0, num_classes, len(src))),
                                     rng.integers(0, num_classes, len(noise))]).astype(int)
        gt.append({"polygons": corners(gt_params), "labels": labels, "difficult": rng.random(g) < 0.2})
        det.append({"polygons": corners(det_params), "scores": rng.random(len(det_params)), "labels": det_labels})
    return gt, det


@pytest.mark.parametrize("method", ["voc07", "all"])
def test_matches_the_devkit_rules_on_random_scenes(rng, method):
    classes = ["plane", "ship", "harbor"]
    gt, det = random_scene(rng, 25, len(classes))
    ours = dota_task1_map(gt, det, classes, ap_method=method)["map"]
    reference = devkit_voc_eval(gt, det, classes, use_07_metric=method == "voc07")
    assert 0.05 < reference < 0.99  # a scene with both hits and misses
    assert ours == pytest.approx(reference, abs=1e-12)


def test_metrics_do_not_change_when_the_scene_turns(rng):
    classes = ["plane", "ship"]
    gt, det = random_scene(rng, 10, len(classes))
    a = rng.uniform(0, 2 * math.pi)
    turn = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])

    def turned(items):
        return [{**x, "polygons": (np.reshape(x["polygons"], (-1, 4, 2)) @ turn + 1000).reshape(-1, 8)} for x in items]

    before, after = polygon_metrics(gt, det, classes), polygon_metrics(turned(gt), turned(det), classes)
    assert after["dota_task1"]["map"] == pytest.approx(before["dota_task1"]["map"], abs=1e-9)
    assert after["coco"]["map"] == pytest.approx(before["coco"]["map"], abs=1e-9)
    assert "VOC07 11-point" in before["dota_task1"]["metric"] and "101-point" in before["coco"]["metric"]


# ---------------------------------------------------------------- COCO-style against edgekit's COCO evaluator


def test_horizontal_boxes_agree_with_coco_map(rng):
    """Same numbers as faster-coco-eval through coco_map, difficult objects (crowd regions) included."""
    classes = ["a", "b", "c"]
    gt, det = random_scene(rng, 30, len(classes), horizontal=True)

    def corners(p):
        p = np.reshape(p, (-1, 8))
        return torch.tensor(np.stack([p[:, 0], p[:, 1], p[:, 4], p[:, 5]], 1), dtype=torch.float64)

    targets = [{"orig_size": (400, 400), "boxes": corners(g["polygons"]), "labels": torch.tensor(g["labels"]),
                "difficult": torch.tensor(g["difficult"])} for g in gt]
    preds = [{"boxes": corners(d["polygons"]), "scores": torch.tensor(d["scores"]), "labels": torch.tensor(d["labels"])}
             for d in det]
    reference = coco_map(targets, preds, classes)
    ours = polygon_coco_map(gt, det, classes)
    assert 0.05 < reference["map"] < 0.95
    assert ours["map"] == pytest.approx(reference["map"], abs=1e-9)
    assert ours["map50"] == pytest.approx(reference["map50"], abs=1e-9)
    for name in classes:
        assert ours["per_class"][name]["ap"] == pytest.approx(reference["per_class"][name]["ap"], abs=1e-9)


def test_coco_keeps_the_best_hundred_per_image_and_class():
    objects = [box(20 * i, 0, 20 * i + 10, 10) for i in range(101)]
    gt = [{"polygons": objects, "labels": [0] * 101}]
    det = [{"polygons": objects, "scores": np.linspace(1, 0.5, 101), "labels": [0] * 101}]
    assert polygon_coco_map(gt, det, ["car"])["map"] == pytest.approx(np.mean(np.linspace(0, 1, 101) <= 100 / 101))
    assert polygon_coco_map(gt, det, ["car"], max_dets=200)["map"] == pytest.approx(1.0)


# ---------------------------------------------------------------- inputs


def test_dota_annotations_and_rotated_boxes_as_inputs():
    pytest.importorskip("edgekit.rotated")  # another module's conversion, used for 'rboxes' inputs
    gt = [DotaAnnotation([DotaObject(tuple(box(10, 20, 50, 30)), "ship", 0)])]
    det = [{"rboxes": [[30, 25, 40, 10, 0.0]], "scores": [0.9], "labels": ["ship"]}]
    assert dota_task1_map(gt, det, ["ship"])["map"] == pytest.approx(1.0)
    det = [{"rboxes": [[30, 25, 10, 40, math.pi / 2]], "scores": [0.9], "labels": [0]}]  # same rectangle
    assert polygon_coco_map(gt, det, ["ship"])["map"] == pytest.approx(1.0)


@pytest.mark.parametrize("gt,det,message", [
    ([{"polygons": [box(0, 0, 1, 1)], "labels": [0]}], [], "0 detection lists for 1 images"),
    ([{"polygons": [box(0, 0, 1, 1)], "labels": ["boat"]}], [{"polygons": [], "scores": [], "labels": []}],
     "class 'boat' is not in the class list"),
    ([{"polygons": [box(0, 0, 1, 1)], "labels": [3]}], [{"polygons": [], "scores": [], "labels": []}],
     "class id 3 is outside 0..0"),
    ([{"polygons": [[0, 0, 1, 1]], "labels": [0]}], [{"polygons": [], "scores": [], "labels": []}],
     "polygons must be"),
    ([{"polygons": [box(0, 0, 1, math.nan)], "labels": [0]}], [{"polygons": [], "scores": [], "labels": []}],
     "nan or inf"),
    ([{"polygons": [box(0, 0, 1, 1)], "labels": [0]}], [{"polygons": [box(0, 0, 1, 1)], "scores": [], "labels": [0]}],
     "0 scores for 1 labels"),
    ([{"polygons": [box(0, 0, 1, 1)], "labels": [0], "difficult": [0, 1]}],
     [{"polygons": [], "scores": [], "labels": []}], "2 difficult flags for 1 objects"),
    ([{"labels": [0]}], [{"polygons": [], "scores": [], "labels": []}], "give 'polygons'"),
])
def test_bad_inputs_are_one_line(gt, det, message):
    with pytest.raises(EdgekitError, match=message) as info:
        dota_task1_map(gt, det, ["car"])
    assert "\n" not in str(info.value)
    with pytest.raises(EdgekitError, match="unknown AP method"):
        dota_task1_map([], [], ["car"], ap_method="coco")
