"""COCO detection json: images, annotations (bbox [x, y, w, h], area, iscrowd,
category_id), categories.

DOTA objects are written with ``iscrowd`` 0 and their ``difficult`` flag kept in the extra
fields ``difficult`` and ``ignore`` (the convention of mmdetection's DOTA tools). The
oriented polygon is kept as the annotation's ``segmentation``, so DOTA -> COCO -> DOTA
loses nothing; COCO files without a 4-point segmentation give axis-aligned polygons.

Layout of a COCO folder: root/images and root/annotations.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.data.dota import DotaAnnotation, DotaObject
from edgekit.data.images import image_size
from edgekit.errors import EdgekitError
from edgekit.fileio import confined_path, write_json_atomic

ANNOTATIONS = "annotations.json"


def annotations_to_coco(items, classes) -> dict:
    """A COCO dict from [(file_name, height, width, annotation)]; category ids are 1-based."""
    cat = {c: i + 1 for i, c in enumerate(classes)}
    images, annotations = [], []
    for image_id, (file_name, height, width, annotation) in enumerate(items, start=1):
        images.append({"id": image_id, "file_name": str(file_name), "height": int(height), "width": int(width)})
        for obj in annotation.objects:
            if obj.label not in cat:
                raise EdgekitError(f"{file_name}: class '{obj.label}' is not in the class list "
                                   f"({', '.join(classes)}); pass --classes with every class")
            x1, y1, x2, y2 = obj.box
            flag = int(obj.difficult > 0)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat[obj.label],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "segmentation": [list(obj.poly)], "iscrowd": 0,
                                "difficult": flag, "ignore": flag})
    categories = [{"id": i, "name": c, "supercategory": "none"} for c, i in cat.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def read_coco_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{path} not found; a COCO folder holds images/ and {ANNOTATIONS}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise EdgekitError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise EdgekitError(f"{path}: not a COCO detection file; expected lists 'images', 'annotations', 'categories'")
    return data


def coco_to_annotations(data: dict, classes=None, source="COCO json"):
    """(class names, [(file_name, height, width, DotaAnnotation)]) from a COCO dict."""
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        names = {c["id"]: str(c["name"]) for c in cats}
        if classes is None:
            classes = [names[i] for i in sorted(names)]
        else:
            classes = list(classes)
            missing = [n for n in names.values() if n not in classes]
            if missing:
                raise EdgekitError(f"{source}: categories {', '.join(missing)} are not in the class list "
                                   f"({', '.join(classes)}); pass --classes with every class")
        per_image = {im["id"]: (im["file_name"], int(im["height"]), int(im["width"]), DotaAnnotation())
                     for im in data["images"]}
        for n, ann in enumerate(data.get("annotations", [])):
            where = f"{source}: annotation {ann.get('id', n)}"
            if ann["image_id"] not in per_image:
                raise EdgekitError(f"{where} refers to image id {ann['image_id']}, which is not in 'images'")
            if ann["category_id"] not in names:
                raise EdgekitError(f"{where} has category id {ann['category_id']}, which is not in 'categories'")
            x, y, w, h = (float(v) for v in ann["bbox"])
            seg = ann.get("segmentation")
            if isinstance(seg, list) and len(seg) == 1 and isinstance(seg[0], list) and len(seg[0]) == 8:
                poly = tuple(float(v) for v in seg[0])
            else:
                poly = (x, y, x + w, y, x + w, y + h, x, y + h)
            difficult = int(bool(ann.get("difficult", ann.get("ignore", ann.get("iscrowd", 0)))))
            per_image[ann["image_id"]][3].objects.append(DotaObject(poly, names[ann["category_id"]], difficult))
    except EdgekitError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise EdgekitError(f"{source}: malformed COCO entry ({type(e).__name__}: {e}); "
                           f"expected images with id/file_name/height/width and annotations with "
                           f"image_id/category_id/bbox") from None
    return classes, list(per_image.values())


def read_coco_dataset(root: str | Path, classes=None) -> tuple[list[str], list[tuple[Path, DotaAnnotation]]]:
    """(class names, [(image path, annotation)]) for a COCO folder."""
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise EdgekitError(f"{images_dir} not found; a COCO folder holds images/ and {ANNOTATIONS}")
    path = root / ANNOTATIONS
    classes, entries = coco_to_annotations(read_coco_json(path), classes, source=str(path))
    items = []
    for file_name, _, _, annotation in entries:
        image = confined_path(images_dir, file_name, str(path))
        if not image.is_file():
            raise EdgekitError(f"{path}: image '{file_name}' not found in {images_dir}")
        items.append((image, annotation))
    return classes, items


def write_coco_json(path: str | Path, data: dict) -> Path:
    return write_json_atomic(path, data)


def coco_items(items):
    """[(file_name, h, w, annotation)] from [(image path, annotation)], sizes read from the files."""
    return [(p.name, *image_size(p), a) for p, a in items]
