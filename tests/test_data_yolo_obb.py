"""YOLO-OBB labels: round trips with the real DOTA labels, border cuts checked with shapely, bad input."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely

from edgekit.data.dota import DotaAnnotation, DotaObject, read_dota_dataset, read_dota_labels
from edgekit.data.images import image_size, save_image
from edgekit.data.yolo import read_yolo_dataset, write_yolo_labels
from edgekit.data.yolo_obb import (annotation_to_yolo_obb, read_yolo_obb_dataset, read_yolo_obb_labels,
                                   write_yolo_obb_labels, yolo_obb_to_annotation)
from edgekit.errors import EdgekitError

from conftest import DOTA_EXAMPLE

LABEL_FILES = sorted((DOTA_EXAMPLE / "labelTxt").glob("*.txt"))


def _classes(annotation):
    return sorted({o.label for o in annotation.objects})


@pytest.mark.parametrize("path", LABEL_FILES, ids=lambda p: p.stem)
def test_dota_labels_round_trip(path, tmp_path):
    """Every real DOTA label file, in an image just large enough to hold it, comes back to 1e-9 px."""
    annotation = read_dota_labels(path)
    polys = np.array([o.poly for o in annotation.objects])
    height, width = math.ceil(polys[:, 1::2].max()) + 1, math.ceil(polys[:, 0::2].max()) + 1
    classes = _classes(annotation)
    rows = annotation_to_yolo_obb(annotation, classes, height, width)
    label = tmp_path / "labels" / f"{path.stem}.txt"
    label.parent.mkdir()
    write_yolo_labels(label, rows)
    back = yolo_obb_to_annotation(read_yolo_obb_labels(label, len(classes)), classes, height, width)
    assert [o.label for o in back.objects] == [o.label for o in annotation.objects]
    np.testing.assert_allclose(np.array([o.poly for o in back.objects]), polys, rtol=0, atol=1e-9)
    assert all(o.difficult == 0 for o in back.objects)  # YOLO has no difficult flag
    text = label.read_text().splitlines()
    assert len(text) == len(annotation.objects) and all(len(line.split()) == 9 for line in text)
    values = np.array([[float(v) for v in line.split()[1:]] for line in text])
    assert values.min() >= 0 and values.max() <= 1


def test_real_images_folder_round_trip(tmp_path):
    """DOTA example folder -> YOLO-OBB folder -> pixels: the same as read directly, cut where the image ends."""
    items = read_dota_dataset(DOTA_EXAMPLE)
    classes = sorted({o.label for _, a in items for o in a.objects})
    root = tmp_path / "obb"
    (root / "images").mkdir(parents=True)
    copied = [(Path(shutil.copy(p, root / "images" / p.name)), a) for p, a in items]
    write_yolo_obb_labels(root, classes, copied)
    read_classes, back = read_yolo_obb_dataset(root)
    assert read_classes == classes and [p.name for p, _ in back] == [p.name for p, _ in items]
    # The generic YOLO reader (which also accepts 9-field rows) reads the same polygons.
    assert [a.objects for _, a in read_yolo_dataset(root)[1]] == [a.objects for _, a in back]
    for (image, original), (_, got) in zip(items, back):
        h, w = image_size(image)
        frame = shapely.box(0, 0, w, h)
        kept = [o for o in original.objects
                if shapely.Polygon(np.reshape(o.poly, (4, 2))).intersection(frame).area > 0]
        assert [o.label for o in got.objects] == [o.label for o in kept]
        for before, after in zip(kept, got.objects):
            inside = all(0 <= x <= w for x in before.poly[0::2]) and all(0 <= y <= h for y in before.poly[1::2])
            if inside:
                np.testing.assert_allclose(after.poly, before.poly, rtol=0, atol=1e-9)
            else:  # cut by the border: within the image, overlapping the object's visible part
                visible = shapely.Polygon(np.reshape(before.poly, (4, 2))).intersection(frame)
                cut = shapely.Polygon(np.reshape(after.poly, (4, 2)))
                assert frame.buffer(1e-9).contains(cut)
                assert cut.intersection(visible).area / visible.union(cut).area > 0.5


def test_random_polygons_outside_and_across_the_border(rng):
    width, height = int(rng.integers(100, 2000)), int(rng.integers(100, 2000))
    objects = []
    for _ in range(50):
        cx, cy = rng.uniform(-0.3, 1.3) * width, rng.uniform(-0.3, 1.3) * height
        w, h, a = rng.uniform(5, 100), rng.uniform(5, 100), rng.uniform(-math.pi, math.pi)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2 @ np.array([[math.cos(a), math.sin(a)],
                                                                                [-math.sin(a), math.cos(a)]])
        objects.append(DotaObject(tuple((corners + [cx, cy]).ravel()), "car", 0))
    rows = annotation_to_yolo_obb(DotaAnnotation(objects), ["car"], height, width)
    frame = shapely.box(0, 0, width, height)
    expected = sum(shapely.Polygon(np.reshape(o.poly, (4, 2))).intersection(frame).area > 0 for o in objects)
    assert len(rows) == expected
    assert all(0 <= v <= 1 for r in rows for v in r[1:])


def test_bad_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("0 0.1 0.1 0.2 0.1 0.2 0.2 0.1 0.2\n\n0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(EdgekitError, match=r"a.txt:3: a YOLO-OBB line is .* got a 5-field box"):
        read_yolo_obb_labels(path)
    path.write_text("3 0.1 0.1 0.2 0.1 0.2 0.2 0.1 0.2\n")
    with pytest.raises(EdgekitError, match=r"a.txt:1: class id 3 out of range"):
        read_yolo_obb_labels(path, num_classes=2)
    path.write_text("0 0.1 0.1 0.2 0.1 0.2 0.2 0.1 x\n")
    with pytest.raises(EdgekitError, match=r"a.txt:1: coordinates must be numbers"):
        read_yolo_obb_labels(path)
    with pytest.raises(EdgekitError, match="not in the class list"):
        annotation_to_yolo_obb(DotaAnnotation([DotaObject((0,) * 8, "ship")]), ["car"], 10, 10)


def test_folder_errors_and_unlabelled_images(tmp_path):
    with pytest.raises(EdgekitError, match="images not found; a YOLO-OBB folder"):
        read_yolo_obb_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    save_image(tmp_path / "images" / "empty.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(EdgekitError, match="classes.txt not found"):
        read_yolo_obb_dataset(tmp_path)
    classes, items = read_yolo_obb_dataset(tmp_path, classes=["car"])
    assert classes == ["car"] and items[0][1].objects == []
