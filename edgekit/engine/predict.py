"""Inference on image files: boxes out as JSON, and PNGs with the boxes drawn.

Images larger than the model's tile are cut into overlapping tiles at native resolution
(aerial detectors are trained at a fixed ground sampling distance, so shrinking a
20000-pixel scene to 256 pixels would erase every vehicle), detected tile by tile, and
merged back with class-aware NMS across tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from edgekit.data.images import list_images, load_image
from edgekit.data.tiling import iter_tiles, merge_tile_detections
from edgekit.data.transforms import to_model_input
from edgekit.engine.evaluate import scale_and_clip
from edgekit.errors import EdgekitError
from edgekit.config import StageConfig, require
from edgekit.fileio import atomic_target, write_json_atomic

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
        return _with_area({**pred, "boxes": scale_and_clip(pred["boxes"], scale, (h, w))})
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
    return _with_area({"boxes": boxes, "scores": scores, "labels": labels})


def _with_area(detections: dict) -> dict:
    """Drop boxes that clipping to the image left with no area (they lay in the padding)."""
    boxes = detections["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {k: (v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape else v)
            for k, v in detections.items()}


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


@dataclass
class PredictConfig(StageConfig):
    out: str = "runs/predict"
    score_threshold: float = 0.25
    iou_threshold: float = 0.6
    draw: bool = True          # also write <image>_pred.png with the boxes drawn
    progress: bool = True

    def check(self) -> None:
        require(0 <= self.score_threshold <= 1, "score_threshold", self.score_threshold, "in [0, 1]")
        require(0 < self.iou_threshold <= 1, "iou_threshold", self.iou_threshold, "in (0, 1]")


@dataclass
class PredictResult:
    """Per image file: its size and detections; ``failed``: files that could not be read
    (with the reason), skipped so that one bad file does not lose the others' results."""

    out: Path
    images: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)

    @property
    def detections(self) -> int:
        return sum(len(r["detections"]) for r in self.images.values())


def predict(checkpoint, images, config: PredictConfig | None = None) -> PredictResult:
    """Detect objects in image files and folders with a detector checkpoint; writes
    ``out/predictions.json`` (and drawn PNGs) for every image that could be read."""
    from edgekit.engine.checkpoint import load
    from edgekit.fileio import check_output_dir, remove_if_empty

    config = config or PredictConfig()
    out = check_output_dir(config.out)
    paths = _expand([Path(p) for p in ([images] if isinstance(images, (str, Path)) else images)])
    loaded = load(checkpoint)
    classes = loaded.detector_classes()
    existed = out.exists()
    try:
        return _predict_files(loaded.model, classes, paths, out, loaded.image_size, config)
    except BaseException:
        if not existed:
            remove_if_empty(out)
        raise


def _predict_files(model, class_names: list[str], paths: list[Path], out_dir: Path, image_size: int,
                   config: PredictConfig) -> PredictResult:
    result = PredictResult(out_dir)
    stems = [p.stem for p in paths]
    for index, path in enumerate(tqdm(paths, desc="predict", disable=not config.progress)):
        try:
            image = load_image(path)
        except EdgekitError as exc:
            result.failed[str(path)] = str(exc)
            continue
        dets = detect_array(model, image, image_size, score_threshold=config.score_threshold,
                            iou_threshold=config.iou_threshold)
        result.images[str(path)] = {"width": image.shape[1], "height": image.shape[0],
                                    "detections": detections_to_json(dets, class_names)}
        if config.draw:
            # Two inputs with one stem (a.png, a.jpg, or two folders) must not overwrite each other.
            stem = path.stem if stems.count(path.stem) == 1 else f"{path.stem}_{index}"
            with atomic_target(out_dir / f"{stem}_pred.png") as tmp:
                draw_detections(image, dets, class_names).save(tmp, format="PNG")
    if result.images:
        write_json_atomic(out_dir / "predictions.json", result.images)
    elif result.failed:
        first = next(iter(result.failed.values()))
        raise EdgekitError(f"no image could be read ({len(result.failed)} failed; first: {first})")
    return result


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to the images inside them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += list_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise EdgekitError(f"image {p} not found")
    if not files:
        raise EdgekitError(f"no images found in {', '.join(map(str, paths))}")
    return files
