"""Box utilities against brute-force references on fresh random boxes."""

import numpy as np
import torch

from edgekit.boxes import batched_nms, box_iou, nms, polygon_to_box


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 3, (n, 2))
    return torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float64)


def iou_one(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def nms_bruteforce(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(iou_one(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def test_box_iou_matches_scalar_formula():
    rng = np.random.default_rng()
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    got = box_iou(a, b)
    want = [[iou_one(x, y) for y in b.tolist()] for x in a.tolist()]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_nms_matches_bruteforce():
    rng = np.random.default_rng()
    for _ in range(20):
        boxes = random_boxes(rng, int(rng.integers(1, 60)), size=60.0)
        scores = torch.tensor(rng.permutation(len(boxes)), dtype=torch.float64)  # distinct scores
        thr = float(rng.uniform(0.2, 0.8))
        assert nms(boxes, scores, thr).tolist() == nms_bruteforce(boxes.tolist(), scores.tolist(), thr)


def test_batched_nms_never_suppresses_across_classes():
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    boxes = box.repeat(4, 1)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 1, 0, 1])
    assert sorted(batched_nms(boxes, scores, labels, 0.5).tolist()) == [0, 1]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def test_nms_empty_and_polygon_box():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    assert polygon_to_box([3, 1, 9, 4, 7, 8, 1, 5]) == (1.0, 1.0, 9.0, 8.0)


def test_blocked_nms_equals_single_block():
    rng = np.random.default_rng()
    boxes = random_boxes(rng, 500, size=150.0)
    scores = torch.tensor(rng.permutation(500), dtype=torch.float64)
    assert nms(boxes, scores, 0.4, block=37).tolist() == nms(boxes, scores, 0.4, block=4096).tolist()


def test_batched_nms_many_boxes_path_equals_per_class_bruteforce():
    rng = np.random.default_rng()
    n = 5000
    boxes = random_boxes(rng, n, size=400.0)
    scores = torch.tensor(rng.permutation(n), dtype=torch.float64)
    labels = torch.tensor(rng.integers(0, 3, n))
    got = batched_nms(boxes, scores, labels, 0.5)
    want = torch.cat([torch.nonzero(labels == c).squeeze(1)[nms(boxes[labels == c], scores[labels == c], 0.5)]
                      for c in range(3)])
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert (scores[got][:-1] >= scores[got][1:]).all()
