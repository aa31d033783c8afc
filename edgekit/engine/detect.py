"""Detection on whole images and scenes, in their own pixel coordinates.

Images larger than the model's tile are cut into overlapping tiles at native resolution
(aerial detectors are trained at a fixed ground sampling distance, so shrinking a
20000-pixel scene to 256 pixels would erase every vehicle), detected a batch of tiles at a
time, and merged back with class-aware NMS across tiles (rotated NMS for oriented models).
A raster scene is streamed: tiles come from windowed reads and only the detections are
kept, so memory does not grow with the scene.

Every function returns ``{"boxes" [N, 4], "scores" [N], "labels" [N]}``, plus ``"rboxes"``
[N, 5] (cx, cy, w, h, angle; :mod:`edgekit.rotated`) for an oriented model; ``boxes`` are
then the rotated boxes' enclosing boxes clipped to the image.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from tqdm import tqdm

from edgekit.data.tiling import Window, iter_tiles, merge_tile_detections
from edgekit.data.transforms import to_model_input
from edgekit.engine.evaluate import scale_and_clip, unscale_rboxes


TILE_OVERLAP = 64  # pixels shared by neighbouring tiles (an object cut by one tile is whole in the next)


def is_oriented(model) -> bool:
    return bool(getattr(model, "obb", False))


@torch.no_grad()
def detect_array(model, image: np.ndarray, image_size: int, tile_overlap: int = TILE_OVERLAP, batch_size: int = 8,
                 score_threshold: float = 0.25, iou_threshold: float = 0.6) -> dict:
    """Detections for one HxWx3 uint8 image held in memory."""
    model.eval()
    h, w = image.shape[:2]
    if max(h, w) > image_size:
        return detect_tiles(model, iter_tiles(image, image_size, tile_overlap), (h, w), image_size,
                            batch_size=batch_size, score_threshold=score_threshold, iou_threshold=iou_threshold)
    tensor, scale = to_model_input(image, image_size)
    pred = model.predict(tensor[None], score_threshold=score_threshold, iou_threshold=iou_threshold)[0]
    out = {**pred, "boxes": scale_and_clip(pred["boxes"], scale, (h, w))}
    if "rboxes" in pred:
        out["rboxes"] = unscale_rboxes(pred["rboxes"], scale)
    return _with_area(out)


@torch.no_grad()
def detect_tiles(model, tiles: Iterable[tuple[Window, np.ndarray]], size: tuple[int, int], image_size: int,
                 batch_size: int = 8, score_threshold: float = 0.25, iou_threshold: float = 0.6,
                 progress: tqdm | None = None) -> dict:
    """Detections from (window, tile) pairs of an image of ``size`` (h, w), merged across
    tiles; the tiles are consumed a batch at a time (an iterator is never held whole)."""
    model.eval()
    oriented = is_oriented(model)
    key = "rboxes" if oriented else "boxes"
    per_tile, chunk = [], []

    def flush():
        batch = torch.stack([to_model_input(tile, image_size)[0] for _, tile in chunk])
        preds = model.predict(batch, score_threshold=score_threshold, iou_threshold=iou_threshold)
        per_tile.extend((window, p[key], p["scores"], p["labels"]) for (window, _), p in zip(chunk, preds))
        if progress is not None:
            progress.update(len(chunk))
        chunk.clear()

    for item in tiles:
        chunk.append(item)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    shapes, scores, labels = merge_tile_detections(per_tile, iou_threshold, rotated=oriented)
    h, w = size
    if oriented:
        from edgekit.rotated import rbox_to_box

        out = {"rboxes": shapes, "boxes": scale_and_clip(rbox_to_box(shapes).float(), 1.0, (h, w))}
    else:
        out = {"boxes": scale_and_clip(shapes, 1.0, (h, w))}
    return _with_area({**out, "scores": scores, "labels": labels})


def detect_scene(model, scene, image_size: int, tile_overlap: int = TILE_OVERLAP, batch_size: int = 8,
                 score_threshold: float = 0.25, iou_threshold: float = 0.6, progress: bool = True) -> dict:
    """Detections for an open raster (:class:`edgekit.data.geo.GeoScene`), streamed tile by tile."""
    windows = scene.windows(image_size, tile_overlap)
    with tqdm(total=len(windows), desc=scene.path.name, unit="tile", disable=not progress, leave=False) as bar:
        return detect_tiles(model, scene.tiles(image_size, tile_overlap), (scene.height, scene.width), image_size,
                            batch_size=batch_size, score_threshold=score_threshold, iou_threshold=iou_threshold,
                            progress=bar)


def _with_area(detections: dict) -> dict:
    """Drop detections whose clipped box has no area (they lay in the padding)."""
    boxes = detections["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {k: (v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape else v)
            for k, v in detections.items()}
