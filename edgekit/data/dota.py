"""DOTA label files: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` per object.

A file may start with ``imagesource:...`` and ``gsd:...`` header lines (gsd is metres per
pixel, or ``null``). The ``difficult`` field is optional (0 when absent); the DOTA devkit's
splitter writes 2 for objects cut by a tile border, so any non-negative integer is read
and anything non-zero counts as difficult.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.boxes import polygon_to_box
from edgekit.data.images import list_images
from edgekit.errors import EdgekitError
from edgekit.fileio import write_text_atomic

DOTA_V1_CLASSES = ("plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
                   "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
                   "roundabout", "soccer-ball-field", "swimming-pool")
DOTA_V15_CLASSES = DOTA_V1_CLASSES + ("container-crane",)
DOTA_V2_CLASSES = DOTA_V15_CLASSES + ("airport", "helipad")


@dataclass(frozen=True)
class DotaObject:
    poly: tuple[float, ...]  # x1, y1, ..., x4, y4 in pixels
    label: str
    difficult: int = 0

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The horizontal box (x1, y1, x2, y2) enclosing the polygon."""
        return polygon_to_box(self.poly)


@dataclass
class DotaAnnotation:
    objects: list[DotaObject] = field(default_factory=list)
    imagesource: str | None = None
    gsd: float | None = None


def _fail(path, lineno, what: str):
    raise EdgekitError(f"{path}:{lineno}: {what}")


def parse_dota_line(text: str, path, lineno: int, classes=None) -> DotaObject:
    parts = text.split()
    if len(parts) not in (9, 10):
        _fail(path, lineno, f"expected 'x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]' (9 or 10 fields), "
                            f"got {len(parts)} fields: '{text.strip()[:80]}'")
    try:
        poly = tuple(float(v) for v in parts[:8])
    except ValueError:
        bad = next(v for v in parts[:8] if not _is_float(v))
        _fail(path, lineno, f"coordinate '{bad[:40]}' is not a number; expected 8 numbers then the class name")
    if not all(math.isfinite(v) for v in poly):
        _fail(path, lineno, "coordinates must be finite numbers (found nan or inf)")
    label = parts[8]
    if _is_float(label):
        _fail(path, lineno, f"expected a class name after the 8 coordinates, got the number '{label}'")
    if classes is not None and label not in classes:
        _fail(path, lineno, f"unknown class '{label}'; known classes: {', '.join(classes)} "
                            f"(fix the label or pass the right class list)")
    difficult = 0
    if len(parts) == 10:
        if not (parts[9].isascii() and parts[9].isdigit()):
            _fail(path, lineno, f"difficult flag must be a non-negative integer (0 or 1), got '{parts[9][:40]}'")
        difficult = int(parts[9])
    return DotaObject(poly, label, difficult)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_dota_labels(path: str | Path, classes=None) -> DotaAnnotation:
    """Parse one DOTA label file; ``classes`` (optional) restricts the allowed class names."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EdgekitError(f"label file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read label file {path}: {' '.join(str(e).split())}") from None
    annotation = DotaAnnotation()
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("imagesource:"):
            annotation.imagesource = stripped[len("imagesource:"):].strip()
        elif stripped.startswith("gsd:"):
            value = stripped[len("gsd:"):].strip()
            if value.lower() in ("null", "none", ""):
                annotation.gsd = None
            else:
                try:
                    annotation.gsd = float(value)
                except ValueError:
                    _fail(path, lineno, f"gsd must be a number or 'null', got '{value[:40]}'")
        else:
            annotation.objects.append(parse_dota_line(stripped, path, lineno, classes))
    return annotation


def _num(v: float) -> str:
    """Shortest text that reads back as the same float (integers without '.0')."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def format_dota_labels(annotation: DotaAnnotation) -> str:
    lines = []
    if annotation.imagesource is not None or annotation.gsd is not None:
        lines.append(f"imagesource:{annotation.imagesource if annotation.imagesource is not None else 'null'}")
        lines.append(f"gsd:{'null' if annotation.gsd is None else repr(float(annotation.gsd))}")
    for obj in annotation.objects:
        if len(obj.poly) != 8:
            raise ValueError(f"a DOTA polygon has 8 coordinates, got {len(obj.poly)}")
        if not obj.label or any(c.isspace() for c in obj.label):
            raise EdgekitError(f"class name '{obj.label}' cannot be written to a DOTA file (empty or has spaces)")
        lines.append(" ".join(_num(v) for v in obj.poly) + f" {obj.label} {int(obj.difficult)}")
    return "".join(line + "\n" for line in lines)


def write_dota_labels(path: str | Path, annotation: DotaAnnotation) -> Path:
    """Write a DOTA label file atomically; :func:`read_dota_labels` reads it back unchanged."""
    return write_text_atomic(path, format_dota_labels(annotation))


def read_dota_dataset(root: str | Path, classes=None) -> list[tuple[Path, DotaAnnotation]]:
    """(image path, annotation) for each image in root/images, labels from root/labelTxt.

    Images without a label file get an empty annotation; label files without an image are
    ignored (DOTA distributes them separately).
    """
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labelTxt"
    if not images_dir.is_dir():
        raise EdgekitError(f"{images_dir} not found; a DOTA folder holds images/ and labelTxt/")
    images = list_images(images_dir)
    if not images:
        raise EdgekitError(f"{images_dir} holds no images (.png, .jpg, .jpeg, .tif, .tiff, .bmp); put the data set's "
                           f"images there")
    if not labels_dir.is_dir():
        raise EdgekitError(f"{labels_dir} not found; a DOTA folder holds images/ and labelTxt/")
    items = []
    for image in images:
        label = labels_dir / f"{image.stem}.txt"
        items.append((image, read_dota_labels(label, classes) if label.is_file() else DotaAnnotation()))
    return items
