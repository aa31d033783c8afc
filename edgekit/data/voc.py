"""Pascal VOC XML annotations: one file per image with its size and ``<object>`` boxes.

Each ``<object>`` (``name``, optional ``difficult`` and ``truncated``, ``bndbox`` with
``xmin ymin xmax ymax``) becomes a :class:`DotaObject` whose polygon is the box's four
corners, clockwise from the top-left, so every edgekit tool (tiling, conversion, training)
reads VOC like DOTA. Coordinates are taken as written, like DeepForest and torchvision do:
the classic 1-based VOC convention is not shifted (at most one pixel).

Boxes must lie in the image, ``0 <= xmin < xmax <= width`` (same for y): a box outside is
refused, not clipped, because it means the file describes another image or another size.
Files with a DTD or entity declarations are refused: VOC never needs one, and entity
expansion is the classic XML denial of service. ``defusedxml`` is not a dependency, so an
expat pre-pass (which decodes any declared encoding, UTF-16 included) looks for them.

Folder layouts: ``root/images`` + ``root/annotations`` (DeepForest, the NEON tree set) or
the classic ``root/JPEGImages`` + ``root/Annotations``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from xml.parsers import expat
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.data.dota import DotaAnnotation, DotaObject
from edgekit.data.images import IMAGE_SUFFIXES, image_size, list_images
from edgekit.errors import EdgekitError
from edgekit.fileio import write_text_atomic

LAYOUTS = (("images", "annotations"), ("JPEGImages", "Annotations"))


@dataclass
class VocFile:
    """One VOC annotation file: the image it names, its size, its objects (``truncated`` per object)."""

    filename: str
    width: int
    height: int
    annotation: DotaAnnotation
    depth: int | None = 3
    truncated: list[int] = field(default_factory=list)


def box_polygon(x1: float, y1: float, x2: float, y2: float) -> tuple[float, ...]:
    """The 4-point DOTA polygon of a horizontal box, clockwise from the top-left."""
    return (x1, y1, x2, y1, x2, y2, x1, y2)


def _text(node: ET.Element, tag: str, where: str, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise EdgekitError(f"{where}: missing <{tag}>; every VOC annotation needs it")
        return None
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise EdgekitError(f"{where}: <{tag}> is '{text[:40]}', not a number") from None
    if not math.isfinite(value):
        raise EdgekitError(f"{where}: <{tag}> must be a finite number, got '{text[:40]}'")
    return value


def _flag(node: ET.Element, tag: str, where: str) -> int:
    text = _text(node, tag, where, required=False)
    if text is None:
        return 0
    if not (text.isascii() and text.isdigit()):
        raise EdgekitError(f"{where}: <{tag}> must be 0 or 1, got '{text[:40]}'")
    return int(text)


def _size(root: ET.Element, where: str) -> tuple[int, int, int | None]:
    size = root.find("size")
    if size is None:
        raise EdgekitError(f"{where}: missing <size> (width, height); every VOC annotation needs it")
    dims = []
    for tag in ("width", "height"):
        value = _number(size, tag, f"{where}: <size>")
        if not value.is_integer() or value <= 0:
            raise EdgekitError(f"{where}: <size><{tag}> must be a positive integer, got {value:g}")
        dims.append(int(value))
    depth = _text(size, "depth", where, required=False)
    return dims[0], dims[1], int(depth) if depth is not None and depth.isdigit() else None


class _Declaration(Exception):
    pass


def _refuse_declarations(data: str | bytes, source):
    def refuse(*_):
        raise _Declaration

    scanner = expat.ParserCreate()
    scanner.StartDoctypeDeclHandler = scanner.EntityDeclHandler = refuse
    try:
        scanner.Parse(data, True)
    except _Declaration:
        raise EdgekitError(f"{source}: DTD or entity declarations are not accepted in VOC files "
                           f"(they allow entity-expansion attacks); remove the <!DOCTYPE ...> block") from None
    except expat.ExpatError:
        pass  # malformed: reported below by ElementTree, with its position


def parse_voc_xml(data: str | bytes, source: str | Path = "VOC annotation", classes=None) -> VocFile:
    """Parse one VOC file's text (or bytes, any declared encoding); errors name ``source`` and the object."""
    _refuse_declarations(data, source)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        line, column = e.position
        raise EdgekitError(f"{source}:{line}: malformed XML at column {column} ({str(e).split(':')[0]})") from None
    if root.tag != "annotation":
        raise EdgekitError(f"{source}: the root element is <{root.tag}>, expected <annotation>; not a VOC file")
    filename = _text(root, "filename", str(source))
    width, height, depth = _size(root, str(source))
    annotation, truncated = DotaAnnotation(), []
    for index, node in enumerate(root.findall("object")):
        name = _text(node, "name", f"{source}: object {index}")
        where = f"{source}: object {index} ('{name}')"
        if classes is not None and name not in classes:
            raise EdgekitError(f"{where}: unknown class; known classes: {', '.join(classes)} "
                               f"(fix the name or pass the right class list)")
        bndbox = node.find("bndbox")
        if bndbox is None:
            raise EdgekitError(f"{where}: missing <bndbox>; every object needs xmin, ymin, xmax, ymax")
        x1, y1, x2, y2 = (_number(bndbox, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if not (x1 < x2 and y1 < y2):
            raise EdgekitError(f"{where}: empty box (xmin {x1:g}, xmax {x2:g}, ymin {y1:g}, ymax {y2:g}); "
                               f"need xmin < xmax and ymin < ymax")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise EdgekitError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) leaves the {width}x{height} image; "
                               f"fix the box or the <size>")
        annotation.objects.append(DotaObject(box_polygon(x1, y1, x2, y2), name, _flag(node, "difficult", where)))
        truncated.append(_flag(node, "truncated", where))
    return VocFile(filename, width, height, annotation, depth, truncated)


def read_voc_annotation(path: str | Path, classes=None) -> VocFile:
    """Read one VOC XML file; ``classes`` (optional) restricts the allowed names."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EdgekitError(f"annotation file {path} not found") from None
    except OSError as e:
        raise EdgekitError(f"cannot read annotation file {path}: {' '.join(str(e).split())}") from None
    return parse_voc_xml(data, path, classes)


def _num(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def format_voc_xml(voc: VocFile) -> str:
    """VOC XML text; each object's box is the horizontal box enclosing its polygon."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = voc.filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", voc.width), ("height", voc.height), ("depth", voc.depth)):
        if value is not None:
            ET.SubElement(size, tag).text = str(int(value))
    ET.SubElement(root, "segmented").text = "0"
    truncated = voc.truncated or [0] * len(voc.annotation.objects)
    for obj, trunc in zip(voc.annotation.objects, truncated, strict=True):
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.label
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(trunc))
        ET.SubElement(node, "difficult").text = str(int(obj.difficult > 0))
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            ET.SubElement(box, tag).text = _num(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_voc_annotation(path: str | Path, voc: VocFile) -> Path:
    """Write one VOC file atomically; :func:`read_voc_annotation` reads the boxes back unchanged."""
    return write_text_atomic(path, format_voc_xml(voc))


def voc_layout(root: str | Path) -> tuple[Path, Path]:
    """(images folder, annotations folder) of a VOC data set, either layout."""
    root = Path(root)
    for images, labels in LAYOUTS:
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    raise EdgekitError(f"{root} is not a VOC folder; it needs images/ + annotations/ "
                       f"(or JPEGImages/ + Annotations/) with one .xml per image")


def _image_for(voc: VocFile, xml: Path, images_dir: Path) -> Path:
    named = images_dir / Path(voc.filename).name
    if named.is_file():
        return named
    same_stem = [images_dir / f"{xml.stem}{s}" for s in IMAGE_SUFFIXES]
    found = [p for p in same_stem if p.is_file()]
    if len(found) != 1:
        raise EdgekitError(f"{xml}: image '{voc.filename}' not found in {images_dir}"
                           + ("" if not found else f" and {len(found)} images share the stem '{xml.stem}'")
                           + "; fix <filename> or add the image")
    return found[0]


def read_voc_dataset(root: str | Path, classes=None) -> tuple[list[str], list[tuple[Path, DotaAnnotation]]]:
    """(class names, [(image path, annotation)]) for a VOC folder.

    Each XML is paired with the image its ``<filename>`` names, else the one image with
    the XML's stem; the image's real size must match ``<size>``. Images that no XML names
    are unlabelled negatives (empty annotation), except those sharing an annotated image's
    stem: that is the same scene in another encoding (the NEON ``OSBS_029.png`` beside the
    annotated ``OSBS_029.tif``), not a second image. Classes default to the names in order
    of first appearance.
    """
    images_dir, annotations_dir = voc_layout(root)
    items, used = [], set()
    for xml in sorted(annotations_dir.glob("*.xml")):
        voc = read_voc_annotation(xml, classes)
        image = _image_for(voc, xml, images_dir)
        h, w = image_size(image)
        if (h, w) != (voc.height, voc.width):
            raise EdgekitError(f"{xml}: <size> says {voc.width}x{voc.height} but {image.name} is {w}x{h}; "
                               f"the annotation belongs to another image")
        items.append((image, voc.annotation))
        used.update((image.stem, xml.stem))
    for image in list_images(images_dir):
        if image.stem not in used:
            items.append((image, DotaAnnotation()))
    items.sort(key=lambda item: item[0].name)
    if classes is None:
        classes = list(dict.fromkeys(o.label for _, a in items for o in a.objects))
    return list(classes), items


def write_voc_labels(root: str | Path, classes, items) -> Path:
    """Write ``root/annotations/<stem>.xml`` for each (image path, annotation); images are copied by the caller.

    Oriented polygons become their enclosing horizontal boxes, clipped to the image (VOC
    readers refuse boxes outside it); objects entirely outside the image are dropped.
    """
    annotations_dir = Path(root) / "annotations"
    annotations_dir.mkdir(parents=True, exist_ok=True)
    known = set(classes)
    for image, annotation in items:
        h, w = image_size(image)
        objects = []
        for obj in annotation.objects:
            if obj.label not in known:
                raise EdgekitError(f"{image}: class '{obj.label}' is not in the class list "
                                   f"({', '.join(classes)}); pass --classes with every class")
            x1, y1, x2, y2 = obj.box
            x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
            y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
            if x1 < x2 and y1 < y2:
                objects.append(DotaObject(box_polygon(x1, y1, x2, y2), obj.label, obj.difficult))
        voc = VocFile(image.name, w, h, DotaAnnotation(objects), depth=3)
        write_voc_annotation(annotations_dir / f"{image.stem}.xml", voc)
    return annotations_dir
