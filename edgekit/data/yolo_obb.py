"""YOLO-OBB labels (Ultralytics' oriented-box format): ``class x1 y1 x2 y2 x3 y3 x4 y4`` per
object, the four corners normalised to [0, 1] by the image width (x) and height (y).

The folder layout and ``classes.txt`` are those of :mod:`edgekit.data.yolo` (root/images,
root/labels, root/classes.txt); the line parser is shared with it, and this module only
insists on the 9-field form. Like YOLO, the format has no "difficult" flag: it is lost
when writing. Corners are kept in their DOTA order, so DOTA -> YOLO-OBB -> DOTA returns
the same polygons (to float rounding). A polygon reaching outside the image is cut to its
visible part by the tiling rule (:func:`edgekit.data.tiling.split_object` with the whole
image as the window), since Ultralytics refuses coordinates outside [0, 1]; an object
entirely outside is dropped.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.data.dota import DotaAnnotation
from edgekit.data.images import image_size
from edgekit.data.tiling import split_object
from edgekit.data.yolo import (YoloRow, class_index, read_labelled_folder, read_yolo_labels, write_yolo_classes,
                               write_yolo_labels, yolo_to_annotation)
from edgekit.errors import EdgekitError


def read_yolo_obb_labels(path: str | Path, num_classes: int | None = None) -> list[YoloRow]:
    """Rows ``(class, x1, y1, ..., x4, y4)``; a 5-field (horizontal box) line is refused."""
    rows = read_yolo_labels(path, num_classes)
    for index, row in enumerate(rows):
        if len(row) != 9:
            lineno = [n for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1)
                      if line.split()][index]
            raise EdgekitError(f"{path}:{lineno}: a YOLO-OBB line is 'class x1 y1 x2 y2 x3 y3 x4 y4' (9 fields), "
                               f"got a 5-field box; use the yolo format for horizontal boxes")
    return rows


def yolo_obb_to_annotation(rows: list[YoloRow], classes, height: int, width: int) -> DotaAnnotation:
    """Pixel polygons from normalised rows (the corners are kept in order)."""
    return yolo_to_annotation(rows, classes, height, width)


def annotation_to_yolo_obb(annotation: DotaAnnotation, classes, height: int, width: int, path=None) -> list[YoloRow]:
    """Normalised corner rows; polygons cut by the image border keep their visible part."""
    index = class_index(annotation, classes, path)
    rows = []
    for obj in annotation.objects:
        visible = split_object(obj, (0, 0, width, height), min_visible=0.0)
        if visible is None:
            continue  # entirely outside the image
        rows.append((index[obj.label], *(v / (width if i % 2 == 0 else height) for i, v in enumerate(visible.poly))))
    return rows


def read_yolo_obb_dataset(root: str | Path, classes=None) -> tuple[list[str], list[tuple[Path, DotaAnnotation]]]:
    """(class names, [(image path, annotation in pixels)]) for a YOLO-OBB folder; images without labels are empty."""
    return read_labelled_folder(root, classes, "YOLO-OBB",
                                lambda label, names, h, w: yolo_obb_to_annotation(
                                    read_yolo_obb_labels(label, len(names)), names, h, w))


def write_yolo_obb_labels(root: str | Path, classes, items) -> Path:
    """Write ``root/classes.txt`` and ``root/labels/<stem>.txt`` for [(image path, annotation)].

    Images are copied by the caller (:func:`edgekit.data.convert.write_dataset`).
    """
    root = Path(root)
    write_yolo_classes(root / "classes.txt", classes)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for image, annotation in items:
        h, w = image_size(image)
        write_yolo_labels(root / "labels" / f"{image.stem}.txt",
                          annotation_to_yolo_obb(annotation, classes, h, w, path=image))
    return root / "labels"
