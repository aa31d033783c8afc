"""Inference on image files: boxes out as JSON, and PNGs with the boxes drawn.

Images larger than the model's tile are cut into overlapping tiles at native resolution
(aerial detectors are trained at a fixed ground sampling distance, so shrinking a
20000-pixel scene to 256 pixels would erase every vehicle), detected tile by tile, and
merged back with class-aware NMS across tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from edgekit.data.images import load_image
from edgekit.data.tiling import iter_tiles, merge_tile_detections
from edgekit.data.transforms import to_model_input
from edgekit.engine.evaluate import scale_and_clip
from edgekit.errors import EdgekitError
from edgekit.fileio import temp_path, write_json_atomic

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]


@torch.no_grad()
def detect_array(model, image: np.ndarray, image_size: int, tile_overlap: int = 64, batch_size: int = 8,
                 score_threshold: float = 0.25, iou_threshold: float = 0.6) -> dict:
    """Detections for one HxWx3 uint8 image, in its own pixel coordinates."""
    model.eval()
    h, w = image.shape[:2]
    if max(h, w) <= image_size:
        tensor, scale = to_model_input(image, image_size)
        pred = model.predict(tensor[None], score_threshold=score_threshold, iou_threshold=iou_threshold)[0]
        return {**pred, "boxes": scale_and_clip(pred["boxes"], scale, (h, w))}
    tiles = list(iter_tiles(image, image_size, tile_overlap))
    per_tile = []
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        batch = torch.stack([to_model_input(t, image_size)[0] for _, t in chunk])
        preds = model.predict(batch, score_threshold=score_threshold, iou_threshold=iou_threshold)
        per_tile += [(window, p["boxes"], p["scores"], p["labels"]) for (window, _), p in zip(chunk, preds)]
    boxes, scores, labels = merge_tile_detections(per_tile, iou_threshold)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return {"boxes": boxes, "scores": scores, "labels": labels}


def draw_detections(image: np.ndarray, detections: dict, class_names: list[str]) -> Image.Image:
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(image.shape[:2]) / 400))
    for box, score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                 detections["labels"].tolist()):
        color = PALETTE[int(label) % len(PALETTE)]
        draw.rectangle(box, outline=color, width=width)
        draw.text((box[0] + 2, box[1] + 1), f"{class_names[int(label)]} {score:.2f}", fill=color)
    return canvas


def detections_to_json(detections: dict, class_names: list[str]) -> list[dict]:
    return [{"box": [round(v, 2) for v in box], "score": round(float(score), 4), "label": class_names[int(label)]}
            for box, score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                         detections["labels"].tolist())]


def predict_files(model, class_names: list[str], paths: list[Path], out_dir: Path, image_size: int,
                  score_threshold: float = 0.25, draw: bool = True, progress: bool = True) -> dict:
    """Detect objects in each image file; writes out_dir/predictions.json and annotated PNGs."""
    images = _expand(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    stems = [p.stem for p in images]
    for index, path in enumerate(tqdm(images, desc="predict", disable=not progress)):
        image = load_image(path)
        dets = detect_array(model, image, image_size, score_threshold=score_threshold)
        results[str(path)] = {"width": image.shape[1], "height": image.shape[0],
                              "detections": detections_to_json(dets, class_names)}
        if draw:
            # Two inputs with one stem (a.png, a.jpg, or two folders) must not overwrite each other.
            stem = path.stem if stems.count(path.stem) == 1 else f"{path.stem}_{index}"
            target = out_dir / f"{stem}_pred.png"
            tmp = temp_path(target)
            draw_detections(image, dets, class_names).save(tmp, format="PNG")
            tmp.replace(target)
    write_json_atomic(out_dir / "predictions.json", results)
    return results


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to the images inside them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise EdgekitError(f"image {p} not found")
    if not files:
        raise EdgekitError(f"no images found in {', '.join(map(str, paths))}")
    return files
