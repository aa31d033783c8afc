"""YOLO labels: one ``class cx cy w h`` line per object, normalised to [0, 1] by the image
size, class names in ``classes.txt`` (one per line, the line number is the class id).

The reader also accepts Ultralytics' oriented-box lines ``class x1 y1 ... x4 y4``
(normalised corners) so DOTA-derived YOLO-OBB sets keep their orientation. YOLO has no
"difficult" field: it is lost when writing.

Layout of a YOLO folder: root/images, root/labels (same stem, .txt), root/classes.txt.
"""

from __future__ import annotations

import math
from pathlib import Path

from edgekit.data.dota import DotaAnnotation, DotaObject
from edgekit.data.images import image_size, list_images
from edgekit.errors import EdgekitError
from edgekit.fileio import write_text_atomic

YoloRow = tuple  # (class_id, cx, cy, w, h) or (class_id, x1, y1, ..., x4, y4), normalised


def read_yolo_classes(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{path} not found; a YOLO folder needs classes.txt with one class name per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not names:
        raise EdgekitError(f"{path} lists no class names; write one class name per line")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise EdgekitError(f"{path}: class '{dup}' is listed twice; class names must be unique")
    return names


def write_yolo_classes(path: str | Path, classes) -> Path:
    return write_text_atomic(path, "".join(f"{c}\n" for c in classes))


def read_yolo_labels(path: str | Path, num_classes: int | None = None) -> list[YoloRow]:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"label file {path} not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        if len(parts) not in (5, 9):
            raise EdgekitError(f"{where}: expected 'class cx cy w h' (5 fields) or 'class x1 y1 ... x4 y4' "
                               f"(9 fields), got {len(parts)} fields")
        if not (parts[0].isascii() and parts[0].isdigit()):
            raise EdgekitError(f"{where}: class id must be a non-negative integer, got '{parts[0][:40]}'")
        cls = int(parts[0])
        if num_classes is not None and cls >= num_classes:
            raise EdgekitError(f"{where}: class id {cls} out of range; classes.txt lists {num_classes} classes")
        try:
            values = tuple(float(v) for v in parts[1:])
        except ValueError:
            raise EdgekitError(f"{where}: coordinates must be numbers normalised to [0, 1], got "
                               f"'{' '.join(parts[1:])[:80]}'") from None
        if not all(math.isfinite(v) and -0.01 <= v <= 1.01 for v in values):
            raise EdgekitError(f"{where}: coordinates must be normalised to [0, 1] by the image size")
        if len(values) == 4 and (values[2] < 0 or values[3] < 0):
            raise EdgekitError(f"{where}: box width and height must be non-negative")
        rows.append((cls, *values))
    return rows


def format_yolo_labels(rows: list[YoloRow]) -> str:
    return "".join(f"{int(r[0])} " + " ".join(repr(float(v)) for v in r[1:]) + "\n" for r in rows)


def write_yolo_labels(path: str | Path, rows: list[YoloRow]) -> Path:
    return write_text_atomic(path, format_yolo_labels(rows))


def yolo_to_annotation(rows: list[YoloRow], classes, height: int, width: int) -> DotaAnnotation:
    """Pixel polygons: boxes become axis-aligned quadrilaterals, OBB rows keep their corners."""
    objects = []
    for cls, *v in rows:
        if len(v) == 4:
            cx, cy, w, h = v[0] * width, v[1] * height, v[2] * width, v[3] * height
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            poly = (x1, y1, x2, y1, x2, y2, x1, y2)
        else:
            poly = tuple(c * (width if i % 2 == 0 else height) for i, c in enumerate(v))
        objects.append(DotaObject(poly, classes[cls], 0))
    return DotaAnnotation(objects)


def class_index(annotation: DotaAnnotation, classes, path=None) -> dict:
    """{class name: id}, after checking that every object's class is in the list."""
    index = {c: i for i, c in enumerate(classes)}
    for obj in annotation.objects:
        if obj.label not in index:
            raise EdgekitError(f"{path or 'annotation'}: class '{obj.label}' is not in the class list "
                               f"({', '.join(classes)}); pass --classes with every class")
    return index


def annotation_to_yolo(annotation: DotaAnnotation, classes, height: int, width: int, path=None) -> list[YoloRow]:
    """Normalised horizontal boxes, clipped to the image (YOLO tools reject coordinates outside [0, 1])."""
    index = class_index(annotation, classes, path)
    rows = []
    for obj in annotation.objects:
        x1, y1, x2, y2 = obj.box
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            continue  # entirely outside the image
        rows.append((index[obj.label], (x1 + x2) / 2 / width, (y1 + y2) / 2 / height,
                     (x2 - x1) / width, (y2 - y1) / height))
    return rows


def read_yolo_dataset(root: str | Path, classes=None) -> tuple[list[str], list[tuple[Path, DotaAnnotation]]]:
    """(class names, [(image path, annotation in pixels)]) for a YOLO folder."""
    return read_labelled_folder(root, classes, "YOLO",
                                lambda label, names, h, w: yolo_to_annotation(read_yolo_labels(label, len(names)),
                                                                              names, h, w))


def read_labelled_folder(root, classes, layout: str, annotation_of) -> tuple[list[str], list]:
    """The YOLO-style layout (images/, labels/<stem>.txt, classes.txt): (class names,
    [(image path, annotation)]); ``annotation_of(label file, classes, h, w)`` reads one
    label file. Images without a label file are empty (negatives)."""
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise EdgekitError(f"{d} not found; a {layout} folder holds images/, labels/ and classes.txt")
    classes = list(classes) if classes is not None else read_yolo_classes(root / "classes.txt")
    items = []
    for image in list_images(images_dir):
        label = labels_dir / f"{image.stem}.txt"
        if not label.is_file():
            items.append((image, DotaAnnotation()))
            continue
        h, w = image_size(image)
        items.append((image, annotation_of(label, classes, h, w)))
    return classes, items
