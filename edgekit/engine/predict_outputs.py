"""What ``predict`` writes from detections: JSON rows, drawn images, DOTA submission files.

The DOTA submission format is the devkit's: one file per class, ``Task1_<class>.txt`` with
``image_id score x1 y1 x2 y2 x3 y3 x4 y4`` per oriented detection, or ``Task2_<class>.txt``
with ``image_id score xmin ymin xmax ymax`` for horizontal ones, in image pixels; the
image id is the file stem, as DOTA's evaluation server expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgekit.fileio import atomic_target

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]


def polygons_of(detections: dict) -> np.ndarray | None:
    """Corner polygons [N, 8] of oriented detections (None for horizontal ones)."""
    if "rboxes" not in detections:
        return None
    from edgekit.rotated import rbox_to_poly

    return np.asarray(rbox_to_poly(detections["rboxes"].double()), dtype=np.float64).reshape(-1, 8)


def draw_detections(image: np.ndarray, detections: dict, class_names: list[str]) -> Image.Image:
    """The image with each detection drawn (its rotated polygon for oriented models) and labelled."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(image.shape[:2]) / 400))
    polygons = polygons_of(detections)
    for i, (box, score, label) in enumerate(zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                                detections["labels"].tolist())):
        color = PALETTE[int(label) % len(PALETTE)]
        if polygons is None:
            draw.rectangle(box, outline=color, width=width)
            anchor = (box[0] + 2, box[1] + 1)
        else:
            corners = [tuple(p) for p in polygons[i].reshape(4, 2).tolist()]
            draw.polygon(corners, outline=color, width=width)
            anchor = min(corners, key=lambda p: p[1])
        draw.text(anchor, f"{class_names[int(label)]} {score:.2f}", fill=color)
    return canvas


def detections_to_json(detections: dict, class_names: list[str]) -> list[dict]:
    """One row per detection: ``box`` (x1, y1, x2, y2), ``score``, ``label``; oriented models
    add ``rbox`` (cx, cy, w, h, angle in radians) and ``polygon`` (x1 y1 ... x4 y4)."""
    rows = [{"box": [round(v, 2) for v in box], "score": round(float(score), 4), "label": class_names[int(label)]}
            for box, score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                         detections["labels"].tolist())]
    polygons = polygons_of(detections)
    if polygons is not None:
        for row, rbox, poly in zip(rows, detections["rboxes"].tolist(), polygons.tolist()):
            row["rbox"] = [round(v, 2) for v in rbox[:4]] + [round(rbox[4], 5)]
            row["polygon"] = [round(v, 2) for v in poly]
    return rows


def dota_submission_lines(image_id: str, rows: list[dict]) -> dict[str, list[str]]:
    """Per class name, the submission lines of one image's detections (rows of
    :func:`detections_to_json`: the polygon of an oriented detection, else its box)."""
    lines: dict[str, list[str]] = {}
    for row in rows:
        coords = " ".join(f"{v:.1f}" for v in row.get("polygon", row["box"]))
        lines.setdefault(row["label"], []).append(f"{image_id} {row['score']:.4f} {coords}")
    return lines


def write_dota_submission(folder: Path, lines: dict[str, list[str]], class_names: list[str], oriented: bool) -> Path:
    """One file per class (empty for classes without detections), each written atomically."""
    task = "Task1" if oriented else "Task2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in class_names:
        with atomic_target(folder / f"{task}_{name}.txt") as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in lines.get(name, [])))
    return folder
