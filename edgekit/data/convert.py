"""Convert a labelled image folder between the DOTA, YOLO, YOLO-OBB, COCO and Pascal VOC layouts.

Every format is read into the same in-memory form, (image path, DotaAnnotation with pixel
polygons), and written from it: DOTA polygons become horizontal boxes in YOLO/COCO,
YOLO/COCO boxes become axis-aligned 4-point polygons in DOTA. The output folder is built
under a temporary name next to ``dst`` and renamed into place when complete.

Layouts: DOTA root/images + root/labelTxt; YOLO root/images + root/labels +
root/classes.txt (YOLO-OBB: the same, with ``class x1 y1 ... x4 y4`` lines); COCO
root/images + root/annotations.json; VOC root/images + root/annotations/*.xml (read also
from the classic JPEGImages/ + Annotations/). Oriented polygons survive DOTA and YOLO-OBB;
YOLO, COCO and VOC hold their enclosing horizontal boxes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgekit.data.coco import ANNOTATIONS, annotations_to_coco, coco_items, read_coco_dataset, write_coco_json
from edgekit.data.dota import (DOTA_V1_CLASSES, DOTA_V15_CLASSES, DOTA_V2_CLASSES, read_dota_dataset,
                               write_dota_labels)
from edgekit.data.images import image_size
from edgekit.data.voc import read_voc_dataset, write_voc_labels
from edgekit.data.yolo import annotation_to_yolo, read_yolo_dataset, write_yolo_classes, write_yolo_labels
from edgekit.data.yolo_obb import read_yolo_obb_dataset, write_yolo_obb_labels
from edgekit.config import StageConfig, require
from edgekit.errors import EdgekitError
from edgekit.fileio import check_output_dir

FORMATS = ("dota", "yolo", "yolo-obb", "coco", "voc")


def _check_format(name, role: str) -> str:
    fmt = str(name).lower()
    if fmt not in FORMATS:
        raise EdgekitError(f"unknown {role} format '{name}'; use one of {', '.join(FORMATS)}")
    return fmt


def read_dataset(root, fmt: str, classes=None) -> tuple[list[str], list]:
    """(class names, [(image path, annotation)]) from a folder in any supported layout."""
    fmt = _check_format(fmt, "source")
    root = Path(root)
    if not root.is_dir():
        raise EdgekitError(f"source folder {root} not found")
    if fmt == "yolo":
        return read_yolo_dataset(root, classes)
    if fmt == "coco":
        return read_coco_dataset(root, classes)
    if fmt == "voc":
        return read_voc_dataset(root, classes)
    if fmt == "yolo-obb":
        return read_yolo_obb_dataset(root, classes)
    items = read_dota_dataset(root, classes)
    return (list(classes) if classes is not None else default_dota_classes(items)), items


def default_dota_classes(items) -> list[str]:
    """The smallest official DOTA class list holding every label, else the labels in order seen."""
    seen = list(dict.fromkeys(o.label for _, a in items for o in a.objects))
    for official in (DOTA_V1_CLASSES, DOTA_V15_CLASSES, DOTA_V2_CLASSES):
        if set(seen) <= set(official):
            return list(official)
    return seen


def write_dataset(root, fmt: str, classes, items, link: bool = False):
    """Write [(image path, annotation)] into ``root`` (which must not exist yet) in layout ``fmt``."""
    fmt = _check_format(fmt, "destination")
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    names = set()
    for image, _ in items:
        if image.name in names:
            raise EdgekitError(f"two source images are named {image.name}; image names must be unique")
        names.add(image.name)
        _transfer(image, images_dir / image.name, link)
    if fmt == "dota":
        for image, annotation in items:
            write_dota_labels(root / "labelTxt" / f"{image.stem}.txt", annotation)
        (root / "labelTxt").mkdir(exist_ok=True)
    elif fmt == "yolo":
        write_yolo_classes(root / "classes.txt", classes)
        (root / "labels").mkdir(exist_ok=True)
        for image, annotation in items:
            h, w = image_size(image)
            write_yolo_labels(root / "labels" / f"{image.stem}.txt",
                              annotation_to_yolo(annotation, classes, h, w, path=image))
    elif fmt == "voc":
        write_voc_labels(root, classes, items)
    elif fmt == "yolo-obb":
        write_yolo_obb_labels(root, classes, items)
    else:
        write_coco_json(root / ANNOTATIONS, annotations_to_coco(coco_items(items), classes))


def _transfer(src: Path, dst: Path, link: bool):
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system or no hard links: fall back to a copy
    shutil.copy2(src, dst)


@dataclass
class ConvertConfig(StageConfig):
    src_format: str = "dota"
    dst_format: str = "coco"
    classes: list[str] | None = None   # fixes the class list and its order (YOLO ids, COCO category ids)
    link: bool = False                 # hard-link images instead of copying

    def check(self) -> None:
        _check_format(self.src_format, "source")
        _check_format(self.dst_format, "destination")
        if self.classes is not None:
            require(bool(self.classes) and len(set(self.classes)) == len(self.classes), "classes", self.classes,
                    "a non-empty list of distinct class names")


def convert(src, dst, config: ConvertConfig) -> dict:
    """The convert stage: :func:`convert_dataset` with a checked config; returns the summary."""
    check_output_dir(Path(dst).parent, "destination")
    return convert_dataset(src, dst, config.src_format, config.dst_format, config.classes, config.link)


def convert_dataset(src, dst, src_format: str, dst_format: str, classes=None, link: bool = False) -> dict:
    """Convert folder ``src`` (layout ``src_format``) into a new folder ``dst`` (``dst_format``).

    ``classes`` fixes the class list (and its order, i.e. YOLO ids / COCO category ids);
    by default it is the source's own (classes.txt, COCO categories) or, for DOTA, the
    official DOTA list covering its labels. ``link`` hard-links images instead of copying.
    Returns a summary dict.
    """
    src_format, dst_format = _check_format(src_format, "source"), _check_format(dst_format, "destination")
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise EdgekitError(f"destination {dst} already exists and is not empty; remove it or choose another")
    if dst.resolve() == src.resolve():
        raise EdgekitError("source and destination are the same folder; choose another destination")
    classes, items = read_dataset(src, src_format, classes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_dataset(tmp, dst_format, classes, items, link)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"src": str(src), "dst": str(dst), "from": src_format, "to": dst_format, "images": len(items),
            "objects": sum(len(a.objects) for _, a in items), "classes": list(classes)}
