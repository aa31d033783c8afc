"""Conversion between DOTA, YOLO and COCO layouts: round trips keep boxes and labels,
COCO output loads in faster-coco-eval, bad input gives one-line errors."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from faster_coco_eval import COCO

from edgekit.data.convert import convert_dataset
from edgekit.data.dota import DOTA_V1_CLASSES, DotaAnnotation, DotaObject, read_dota_dataset, write_dota_labels
from edgekit.data.images import save_image
from edgekit.data.yolo import read_yolo_labels
from edgekit.errors import EdgekitError

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota_example"


def _random_dota(root: Path, n_images=4):
    """A small DOTA folder with random oriented boxes, some poking out of the image."""
    rng = np.random.default_rng()
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(40, 120, 2))
        save_image(root / "images" / f"img{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        objects = []
        for _ in range(int(rng.integers(0, 6))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            hx, hy, a = rng.uniform(2, 15), rng.uniform(2, 15), rng.uniform(0, np.pi)
            c, s = np.cos(a), np.sin(a)
            poly = tuple(round(float(v), 2) for x, y in ((-hx, -hy), (hx, -hy), (hx, hy), (-hx, hy))
                         for v in (cx + x * c - y * s, cy + x * s + y * c))
            objects.append(DotaObject(poly, str(rng.choice(DOTA_V1_CLASSES)), int(rng.integers(0, 2))))
        write_dota_labels(root / "labelTxt" / f"img{i}.txt", DotaAnnotation(objects, "GoogleEarth", 0.3))
    return read_dota_dataset(root)


def _source(tmp_path):
    if EXAMPLE.is_dir():  # the real sample (2 images, 600 objects) plus random ones
        src = tmp_path / "src"
        shutil.copytree(EXAMPLE, src)
        _random_dota(src)
        return src, read_dota_dataset(src)
    src = tmp_path / "src"
    return src, _random_dota(src)


def _clipped_box(obj, h, w):
    x1, y1, x2, y2 = obj.box
    return [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]


def test_dota_coco_dota_round_trip(tmp_path):
    src, items = _source(tmp_path)
    summary = convert_dataset(src, tmp_path / "coco", "dota", "coco")
    assert summary["images"] == len(items) and summary["classes"] == list(DOTA_V1_CLASSES)
    data = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))  # a valid COCO file for the evaluator
    assert len(coco.getImgIds()) == len(items) and len(coco.getAnnIds()) == sum(len(a.objects) for _, a in items)
    assert all(a["iscrowd"] == 0 and a["difficult"] == a["ignore"] for a in data["annotations"])
    for ann in data["annotations"][:50]:
        x, y, bw, bh = ann["bbox"]
        assert ann["area"] == pytest.approx(bw * bh)
    convert_dataset(tmp_path / "coco", tmp_path / "back", "coco", "dota")
    back = read_dota_dataset(tmp_path / "back")
    assert [p.name for p, _ in back] == [p.name for p, _ in items]
    for (_, a), (p, b) in zip(items, back):
        assert [o.label for o in a.objects] == [o.label for o in b.objects]
        assert [o.difficult > 0 for o in a.objects] == [o.difficult > 0 for o in b.objects]
        np.testing.assert_allclose([o.box for o in a.objects], [o.box for o in b.objects], atol=1e-9)
        assert (tmp_path / "back" / "images" / p.name).read_bytes() == (src / "images" / p.name).read_bytes()


def test_dota_yolo_dota_round_trip(tmp_path):
    from edgekit.data.images import image_size

    src, items = _source(tmp_path)
    convert_dataset(src, tmp_path / "yolo", "dota", "yolo", link=True)
    assert (tmp_path / "yolo" / "classes.txt").read_text().split() == list(DOTA_V1_CLASSES)
    for p, _ in items:
        for row in read_yolo_labels(tmp_path / "yolo" / "labels" / f"{p.stem}.txt", 15):
            assert all(0 <= v <= 1 for v in row[1:])
    convert_dataset(tmp_path / "yolo", tmp_path / "back", "yolo", "dota")
    for (p, a), (_, b) in zip(items, read_dota_dataset(tmp_path / "back")):
        h, w = image_size(p)
        boxes = [_clipped_box(o, h, w) for o in a.objects]
        kept = [(bx, o.label) for bx, o in zip(boxes, a.objects) if bx[2] > bx[0] and bx[3] > bx[1]]
        assert [lab for _, lab in kept] == [o.label for o in b.objects]
        if kept:
            np.testing.assert_allclose([bx for bx, _ in kept], [o.box for o in b.objects], atol=1e-6)
        for o in b.objects:  # axis-aligned 4-point polygons
            x1, y1, x2, y2 = o.box
            assert o.poly == (x1, y1, x2, y1, x2, y2, x1, y2)


def test_coco_to_yolo_and_class_override(tmp_path):
    src = tmp_path / "src"
    _random_dota(src, 3)
    classes = ["small-vehicle", *[c for c in DOTA_V1_CLASSES if c != "small-vehicle"]]
    convert_dataset(src, tmp_path / "coco", "dota", "coco", classes=classes)
    cats = json.loads((tmp_path / "coco" / "annotations.json").read_text())["categories"]
    assert cats[0] == {"id": 1, "name": "small-vehicle", "supercategory": "none"}
    convert_dataset(tmp_path / "coco", tmp_path / "yolo", "coco", "yolo")
    assert (tmp_path / "yolo" / "classes.txt").read_text().split() == classes


def test_errors(tmp_path):
    src = tmp_path / "src"
    _random_dota(src, 1)
    write_dota_labels(src / "labelTxt" / "img0.txt", DotaAnnotation([DotaObject((1, 1, 9, 1, 9, 5, 1, 5), "ship")]))
    cases = [
        (lambda: convert_dataset(src, tmp_path / "o1", "dota", "kitti"), "unknown destination format 'kitti'"),
        (lambda: convert_dataset(src, tmp_path / "o2", "pascal", "coco"), "unknown source format 'pascal'"),
        (lambda: convert_dataset(tmp_path / "nope", tmp_path / "o3", "dota", "coco"), "nope not found"),
        (lambda: convert_dataset(src, src, "dota", "coco"), "not empty"),
        (lambda: convert_dataset(src, tmp_path / "o4", "yolo", "coco"), "labels not found"),
        (lambda: convert_dataset(src, tmp_path / "o5", "coco", "dota"), "annotations.json not found"),
        (lambda: convert_dataset(src, tmp_path / "o6", "dota", "coco", classes=["plane"]), "unknown class"),
    ]
    for call, expect in cases:
        with pytest.raises(EdgekitError) as e:
            call()
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # nothing half-written left behind


def test_malformed_yolo_and_coco(tmp_path):
    src = tmp_path / "src"
    _random_dota(src, 2)
    convert_dataset(src, tmp_path / "yolo", "dota", "yolo")
    label = tmp_path / "yolo" / "labels" / "img0.txt"
    for line, expect in (("0 0.5 0.5 0.1", "5 fields"), ("x 0.5 0.5 0.1 0.1", "class id"),
                         ("99 0.5 0.5 0.1 0.1", "out of range"), ("0 0.5 a 0.1 0.1", "numbers"),
                         ("0 0.5 3.0 0.1 0.1", "normalised")):
        label.write_text(f"0 0.5 0.5 0.1 0.1\n{line}\n")
        with pytest.raises(EdgekitError, match=rf"img0.txt:2: .*{expect}"):
            convert_dataset(tmp_path / "yolo", tmp_path / "out", "yolo", "dota")
    convert_dataset(src, tmp_path / "coco", "dota", "coco")
    ann = tmp_path / "coco" / "annotations.json"
    ann.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(EdgekitError, match=r"annotations.json:2: invalid JSON"):
        convert_dataset(tmp_path / "coco", tmp_path / "out", "coco", "dota")
    ann.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(EdgekitError, match="malformed COCO entry"):
        convert_dataset(tmp_path / "coco", tmp_path / "out", "coco", "dota")
