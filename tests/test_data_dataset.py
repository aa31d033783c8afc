"""DetectionDataset: letterbox geometry, normalisation, augmentation that moves boxes with
the pixels, difficult flags, collate, errors."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.data.dataset import DetectionDataset, collate_detection, sample_batches
from edgekit.data.dota import DotaAnnotation, DotaObject, write_dota_labels
from edgekit.data.images import save_image
from edgekit.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, hflip, letterbox, random_flip_rotate, rot90,
                                     to_model_input, vflip)
from edgekit.errors import EdgekitError


def _marked_image(rng, h, w, n):
    """An image with n solid rectangles of distinct colours, and their boxes."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    boxes = []
    for i in range(n):
        x1, y1 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x2, y2 = int(rng.integers(x1 + 4, min(w, x1 + 40) + 1)), int(rng.integers(y1 + 4, min(h, y1 + 40) + 1))
        image[y1:y2, x1:x2] = (40 + 50 * i, 255, 255 - 40 * i)
        boxes.append([x1, y1, x2, y2])
    return image, torch.tensor(boxes, dtype=torch.float32)


def _box_of_colour(image, colour0):
    ys, xs = torch.nonzero(image[0] == colour0, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_flips_and_rotations_move_boxes_with_pixels():
    seed = random.randrange(2**32)
    rng = np.random.default_rng(seed)
    array, boxes = _marked_image(rng, 96, 96, 1)
    image = torch.from_numpy(array).permute(2, 0, 1)
    for op in (hflip, vflip, lambda i, b: rot90(i, b, 1), lambda i, b: rot90(i, b, 3)):
        im2, b2 = op(image, boxes)
        assert torch.equal(_box_of_colour(im2, 40), b2[0]), f"seed {seed}"
    for _ in range(8):
        im2, b2 = random_flip_rotate(image, boxes)
        assert torch.equal(_box_of_colour(im2, 40), b2[0]), f"seed {seed}"
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        assert torch.allclose(area(b2), area(boxes))
    for op in (hflip, vflip):
        im2, b2 = op(*op(image, boxes))
        assert torch.equal(im2, image) and torch.equal(b2, boxes)
    im2, b2 = rot90(image, boxes, 4)
    assert torch.equal(im2, image) and torch.equal(b2, boxes)


def test_letterbox_and_normalisation():
    image = np.full((50, 100, 3), 255, dtype=np.uint8)
    boxed, scale = letterbox(image, 64)
    assert boxed.shape == (64, 64, 3) and scale == 0.64
    assert boxed[:32].min() == 255 and boxed[32:].max() == 0  # image on top, padding at the bottom
    tensor, s = to_model_input(image, 64)
    assert s == scale and tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(tensor[:, 0, 0], expected)
    assert torch.allclose(tensor[:, -1, -1], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def _dota_folder(root: Path, rng, n=4):
    """Images of various sizes with coloured rectangles; labels with a difficult flag."""
    truth = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(60, 200, 2))
        array, boxes = _marked_image(rng, h, w, 3)
        save_image(root / "images" / f"im{i}.png", array)
        objs = [DotaObject((x1, y1, x2, y1, x2, y2, x1, y2), ["ship", "plane", "ship"][k], int(k == 2))
                for k, (x1, y1, x2, y2) in enumerate(boxes.tolist())]
        write_dota_labels(root / "labelTxt" / f"im{i}.txt", DotaAnnotation(objs))
        truth.append((h, w, boxes))
    return truth


@pytest.mark.parametrize("preload", [True, False])
def test_dataset_targets(tmp_path, preload):
    seed = random.randrange(2**32)
    truth = _dota_folder(tmp_path, np.random.default_rng(seed))
    with pytest.raises(EdgekitError, match="tile the data set first"):
        DetectionDataset(tmp_path, ["plane", "ship"], image_size=128, preload=preload)
    ds = DetectionDataset(tmp_path, ["plane", "ship"], image_size=128, preload=preload, allow_downscale=True)
    assert len(ds) == 4
    for i, (h, w, boxes) in enumerate(truth):
        image, t = ds[i]
        scale = 128 / max(h, w)
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert t["orig_size"] == (h, w) and t["scale"] == pytest.approx(scale) and t["image_id"] == i
        assert torch.allclose(t["boxes"], boxes * scale, atol=1e-4), f"seed {seed}"
        assert t["labels"].tolist() == [1, 0, 1] and t["difficult"].tolist() == [False, False, True]
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.long
    images, targets = collate_detection([ds[0], ds[1]])
    assert images.shape == (2, 3, 128, 128) and len(targets) == 2


def test_augmented_boxes_follow_pixels(tmp_path):
    seed = random.randrange(2**32)
    rng = np.random.default_rng(seed)
    save_image(tmp_path / "images" / "a.png", np.zeros((64, 64, 3), np.uint8))
    array, boxes = _marked_image(rng, 64, 64, 1)
    save_image(tmp_path / "images" / "a.png", array)
    x1, y1, x2, y2 = boxes[0].tolist()
    write_dota_labels(tmp_path / "labelTxt" / "a.txt", DotaAnnotation([DotaObject((x1, y1, x2, y1, x2, y2, x1, y2), "ship")]))
    ds = DetectionDataset(tmp_path, ["ship"], image_size=64, augment=True)
    red = (40 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    seen = set()
    for _ in range(24):
        image, t = ds[0]
        ys, xs = torch.nonzero((image[0] - red).abs() < 1e-4, as_tuple=True)
        assert torch.equal(torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32),
                           t["boxes"][0]), f"seed {seed}"
        seen.add(tuple(t["boxes"][0].tolist()))
    assert len(seen) > 1  # augmentation happened


def test_boxes_outside_image_are_clipped_or_dropped(tmp_path):
    save_image(tmp_path / "images" / "a.png", np.zeros((100, 50, 3), np.uint8))
    write_dota_labels(tmp_path / "labelTxt" / "a.txt", DotaAnnotation([
        DotaObject((-5, 10, 20, 10, 20, 30, -5, 30), "ship"),      # clipped at x = 0
        DotaObject((60, 10, 70, 10, 70, 30, 60, 30), "ship")]))    # wholly outside: dropped
    _, t = DetectionDataset(tmp_path, ["ship"], image_size=200)[0]
    assert t["boxes"].tolist() == [[0, 20, 40, 60]] and t["labels"].tolist() == [0]


def test_errors(tmp_path):
    with pytest.raises(EdgekitError, match="images not found"):
        DetectionDataset(tmp_path, ["ship"])
    _dota_folder(tmp_path, np.random.default_rng(), 1)
    with pytest.raises(EdgekitError, match=r"im0.txt:\d+: unknown class 'plane'"):
        DetectionDataset(tmp_path, ["ship"])
    (tmp_path / "images" / "im0.png").write_text("not an image")
    with pytest.raises(EdgekitError, match="im0.png"):
        DetectionDataset(tmp_path, ["ship", "plane"])


def test_sample_batches_takes_at_most_count_batches(tiny_data):
    from edgekit.data.synthetic import SYNTHETIC_CLASSES

    dataset = DetectionDataset(tiny_data / "train", list(SYNTHETIC_CLASSES), image_size=128)  # 8 images
    two = sample_batches(dataset, 2, batch_size=3)
    assert [b[0].shape[0] for b in two] == [3, 3] and len(two[0][1]) == 3
    assert sum(b[0].shape[0] for b in sample_batches(dataset, 10, batch_size=3)) == 8  # a small set gives fewer
