#!/usr/bin/env python3
"""Detect objects with an edgekit deploy bundle, using only numpy, onnxruntime and Pillow.

    python infer.py IMAGE_OR_FOLDER... [--model fp32|int8|PATH.onnx] [--out DIR]
                    [--score-threshold S] [--iou-threshold T] [--cpu]

Writes DIR/predictions.json ({image: {width, height, detections: [{box, score, label}]}},
boxes x1 y1 x2 y2 in the image's own pixels; an oriented model adds ``rbox`` (cx, cy, w, h,
angle in radians) and ``polygon`` (x1 y1 ... x4 y4)) and prints one summary line per image.
Bad input prints one line on stderr and exits with status 2.

This file is edgekit's ``export/infer_template.py``, copied verbatim into each bundle as
``infer.py``. It must not import torch or edgekit (the target device has neither), so it
re-implements, in numpy, the few pieces of edgekit it needs: image decoding
(``edgekit.data.images``), letterbox + normalisation (``edgekit.data.transforms``), tiling
(``edgekit.data.tiling``), decoding + class-aware NMS (``edgekit.models.detect_post``,
``edgekit.boxes``), rotated boxes and their NMS by exact polygon IoU (``edgekit.rotated``:
ONNX has no rotated NMS, so an oriented graph ends at its rboxes/scores) and the tiled
detection loop (``edgekit.engine.detect.detect_array``).
edgekit's tests check that each piece gives the same result as the original.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BUNDLE_FORMAT = "edgekit.bundle/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_BATCH = 8  # tiles per model call when the model's batch size is dynamic (as detect_array)

# Aerial scenes are huge: edgekit's pixel budget, checked from the header before decoding,
# replaces PIL's warning-then-error guard (EDGEKIT_MAX_IMAGE_PIXELS overrides it).
MAX_IMAGE_PIXELS = int(os.environ.get("EDGEKIT_MAX_IMAGE_PIXELS", "0") or 0) or 20000 * 20000
Image.MAX_IMAGE_PIXELS = None
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UserError(Exception):
    """Bad input from the user; the message is one line (what, where, how to fix)."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------- images (edgekit.data.images)

def load_image(path) -> np.ndarray:
    """An image file -> HxWx3 uint8 RGB (16-bit grey rescaled by its range, not clipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found; check the path")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserError(f"image {path} claims {w} x {h} px, over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP budget; "
                                f"tile it first, or raise EDGEKIT_MAX_IMAGE_PIXELS if the machine has the memory")
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(img).astype(np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
                grey = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    except _READ_ERRORS as e:
        raise UserError(f"cannot read image {path}: {_one_line(e)}; the file is corrupt or not an image") from None


def expand_images(paths) -> list[Path]:
    """Files as given; folders expand to the images directly inside them, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"image {p} not found; check the path")
    if not files:
        raise UserError(f"no images found in {', '.join(map(str, paths))}; give image files or folders of them")
    return files


# ------------------------------------------------------- preprocessing (edgekit.data.transforms)

def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Longer side scaled to ``size`` (PIL bilinear), zero padding bottom/right; returns (image, scale)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    if (nh, nw) == (size, size):
        return np.ascontiguousarray(image), scale
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[:nh, :nw] = image
    return out, scale


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """HxWx3 uint8 -> float32 [3, H, W], (x / 255 - mean) / std in float32 like edgekit."""
    x = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def to_model_input(image: np.ndarray, size: int, mean, std) -> tuple[np.ndarray, float]:
    boxed, scale = letterbox(image, size)
    return normalize(boxed, mean, std), scale


# ------------------------------------------------------------------ tiling (edgekit.data.tiling)

def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last window lies flush with the border
    return sorted(set(starts))


def tile_windows(height: int, width: int, tile_size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) windows every tile_size - overlap pixels, row-major, as DOTA's ImgSplit."""
    stride = tile_size - overlap
    return [(x0, y0, min(x0 + tile_size, width), min(y0 + tile_size, height))
            for y0 in _starts(height, tile_size, stride) for x0 in _starts(width, tile_size, stride)]


def crop_padded(image: np.ndarray, window, tile_size: int) -> np.ndarray:
    x0, y0, x1, y1 = window
    crop = image[y0:y1, x0:x1]
    if crop.shape[:2] == (tile_size, tile_size):
        return np.ascontiguousarray(crop)
    tile = np.zeros((tile_size, tile_size, *image.shape[2:]), dtype=image.dtype)
    tile[:y1 - y0, :x1 - x0] = crop
    return tile


# ------------------------------------------------------------------------- NMS (edgekit.boxes)

def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box against many, in the boxes' dtype, with edgekit.boxes.box_iou's operation order."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area_a = np.clip(box[2] - box[0], 0, None) * np.clip(box[3] - box[1], 0, None)
    area_b = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area_a + area_b - inter
    return inter / np.maximum(union, boxes.dtype.type(1e-9))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; kept indices by decreasing score (a box goes when IoU > threshold with a kept one)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        order = rest[_iou_one(boxes[i], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware NMS: boxes of different labels never suppress each other."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(boxes) <= 4096:
        # Each class shifted into its own coordinate range (as edgekit, so IoUs agree bit for bit).
        offsets = labels.astype(boxes.dtype) * (boxes.max() - boxes.min() + boxes.dtype.type(1))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep = np.concatenate([idx[nms(boxes[idx], scores[idx], iou_threshold)]
                           for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))])
    return keep[np.argsort(-scores[keep], kind="stable")]


# ------------------------------------------------------------ rotated boxes (edgekit.rotated)

def rbox_corners(rboxes: np.ndarray) -> np.ndarray:
    """(cx, cy, w, h, angle) [N, 5] -> corners [N, 4, 2] float64, edgekit.rotated.rbox_to_poly's order."""
    r = np.asarray(rboxes, dtype=np.float64).reshape(-1, 5)
    cos, sin = np.cos(r[:, 4:5]), np.sin(r[:, 4:5])
    lx = r[:, 2:3] * np.array([-0.5, 0.5, 0.5, -0.5])
    ly = r[:, 3:4] * np.array([-0.5, -0.5, 0.5, 0.5])
    return np.stack([r[:, 0:1] + lx * cos - ly * sin, r[:, 1:2] + lx * sin + ly * cos], axis=-1)


def canonical_rboxes(rboxes: np.ndarray) -> np.ndarray:
    """The same rectangles with w >= h and angle in [-pi/2, pi/2)."""
    r = np.array(rboxes, dtype=np.float64).reshape(-1, 5)
    swap = r[:, 2] < r[:, 3]
    r[swap, 2], r[swap, 3] = r[swap, 3].copy(), r[swap, 2].copy()
    r[swap, 4] += np.pi / 2
    r[:, 4] -= np.pi * np.floor((r[:, 4] + np.pi / 2) / np.pi)
    r[r[:, 4] >= np.pi / 2, 4] -= np.pi
    return r


def enclosing_boxes(rboxes: np.ndarray) -> np.ndarray:
    corners = rbox_corners(rboxes)
    return np.concatenate([corners.min(1), corners.max(1)], axis=1)


def _overlap_one(poly: np.ndarray, polys: np.ndarray) -> np.ndarray:
    """Intersection areas of one convex quadrilateral [4, 2] with many [M, 4, 2]: the convex hull
    of each one's corners inside the other and of the edge crossings, ordered by angle."""
    def cross(p, q):
        return p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]

    def inside(points, quads):  # points [M, K, 2] inside convex quads [M, 4, 2] (either orientation)
        edge = np.roll(quads, -1, axis=1) - quads
        side = cross(edge[:, None], points[:, :, None] - quads[:, None])  # [M, K, 4]
        tol = 1e-9 * (1.0 + np.abs(quads).max())
        return (side >= -tol).all(-1) | (side <= tol).all(-1)

    a = np.broadcast_to(poly, polys.shape)
    ea, eb = np.roll(a, -1, axis=1) - a, np.roll(polys, -1, axis=1) - polys
    den = cross(ea[:, :, None], eb[:, None])  # [M, 4, 4]
    diff = polys[:, None] - a[:, :, None]
    ok = np.abs(den) > 1e-12
    safe = np.where(ok, den, 1.0)
    t, u = cross(diff, eb[:, None]) / safe, cross(diff, ea[:, :, None]) / safe
    ok &= (t >= -1e-12) & (t <= 1 + 1e-12) & (u >= -1e-12) & (u <= 1 + 1e-12)
    crossings = (a[:, :, None] + t[..., None] * ea[:, :, None]).reshape(len(polys), 16, 2)
    points = np.concatenate([a, polys, crossings], axis=1)  # [M, 24, 2]
    valid = np.concatenate([inside(a, polys), inside(polys, a), ok.reshape(len(polys), 16)], axis=1)
    count = valid.sum(1)
    centre = (points * valid[..., None]).sum(1) / np.maximum(count, 1)[:, None]
    rel = points - centre[:, None]
    angle = np.where(valid, np.arctan2(rel[..., 1], rel[..., 0]), 10.0)
    order = np.argsort(angle, axis=1)
    rel = np.take_along_axis(rel, order[..., None], axis=1)
    rel = np.where(np.take_along_axis(valid, order, axis=1)[..., None], rel, rel[:, :1])
    x, y = rel[..., 0], rel[..., 1]
    area = 0.5 * np.abs((x * np.roll(y, -1, axis=1) - y * np.roll(x, -1, axis=1)).sum(1))
    return np.where(count >= 3, area, 0.0)


def rotated_iou_one(rbox: np.ndarray, rboxes: np.ndarray) -> np.ndarray:
    """Exact polygon IoU of one rotated box against many (pairs whose enclosing boxes miss: 0)."""
    out = np.zeros(len(rboxes))
    a, b = enclosing_boxes(rbox[None])[0], enclosing_boxes(rboxes)
    near = np.flatnonzero((np.minimum(a[2:], b[:, 2:]) - np.maximum(a[:2], b[:, :2]) >= 0).all(1))
    if near.size:
        inter = _overlap_one(rbox_corners(rbox[None])[0], rbox_corners(rboxes[near]))
        union = rbox[2] * rbox[3] + rboxes[near, 2] * rboxes[near, 3] - inter
        out[near] = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out


def batched_rotated_nms(rboxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float):
    """Class-aware greedy NMS of rotated boxes by polygon IoU; kept indices by decreasing score."""
    rboxes = np.asarray(rboxes, dtype=np.float64)
    keep = []
    for c in np.unique(labels):
        order = np.flatnonzero(labels == c)
        order = order[np.argsort(-scores[order], kind="stable")]
        while order.size:
            i, rest = order[0], order[1:]
            keep.append(i)
            order = rest[rotated_iou_one(rboxes[i], rboxes[rest]) <= iou_threshold]
    keep = np.asarray(keep, dtype=np.int64)
    return keep[np.argsort(-scores[keep], kind="stable")]


# ----------------------------------------------------------- decoding (edgekit.models.detect_post)

def _empty(width: int = 4):
    return np.zeros((0, width), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)


def postprocess_raw(boxes: np.ndarray, scores: np.ndarray, size: int, score_threshold: float,
                    iou_threshold: float, max_detections: int, pre_nms_top_k: int) -> list[tuple]:
    """boxes [B, N, 4] (or rotated [B, N, 5]) and scores [B, N, C] -> per image (boxes, scores,
    labels) after NMS; rotated boxes come out canonical and unclipped (a cut rectangle is none)."""
    results = []
    num_classes = scores.shape[-1]
    rotated = boxes.shape[-1] == 5
    for b, s in zip(boxes, scores):
        if not rotated:
            b = np.clip(b, 0, size)  # clamp to the input (a square of side ``size``)
        flat = s.reshape(-1)
        idx = np.flatnonzero(flat > score_threshold)
        flat = flat[idx]
        if flat.size > pre_nms_top_k:
            top = np.argpartition(-flat, pre_nms_top_k - 1)[:pre_nms_top_k]
            flat, idx = flat[top], idx[top]
        box_idx, labels = idx // num_classes, idx % num_classes
        cand = b[box_idx]
        nms_fn = batched_rotated_nms if rotated else batched_nms
        kept = nms_fn(cand, flat, labels, iou_threshold)[:max_detections]
        shapes = canonical_rboxes(cand[kept]).astype(np.float32) if rotated else cand[kept]
        results.append((shapes, flat[kept], labels[kept].astype(np.int64)))
    return results


def postprocess_end2end(detections: np.ndarray, batch: int, size: int, score_threshold: float,
                        max_detections: int) -> list[tuple]:
    """An end-to-end model's [M, 7] (batch, x1, y1, x2, y2, score, class) rows -> per image results."""
    detections = np.asarray(detections, dtype=np.float32).reshape(-1, 7)
    results = []
    for i in range(batch):
        d = detections[(detections[:, 0] == i) & (detections[:, 5] > score_threshold)]
        d = d[np.argsort(-d[:, 5], kind="stable")][:max_detections]
        results.append((np.clip(d[:, 1:5], 0, size), d[:, 5].copy(), d[:, 6].astype(np.int64)))
    return results


# ----------------------------------------------------------------------------------- the model

class Detector:
    """An ONNX detector session plus the bundle's preprocessing and post-processing settings."""

    def __init__(self, model_path: Path, config: dict, num_classes: int, cpu_only: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed; install it with 'pip install onnxruntime'") from None
        providers = ort.get_available_providers()
        wanted = [p for p in ("CUDAExecutionProvider",) if p in providers and not cpu_only] + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=wanted)
        except Exception as e:  # ORT raises its own exception types for every kind of bad file
            raise UserError(f"cannot load model {model_path}: {_one_line(e)[:300]}; give an ONNX file exported by "
                            f"edgekit") from None
        self.size = int(config["input"]["size"])
        self.mean, self.std = config["input"]["mean"], config["input"]["std"]
        post = config["postprocess"]
        self.iou_threshold = float(post["iou_threshold"])
        self.max_detections = int(post["max_detections"])
        self.pre_nms_top_k = int(post["pre_nms_top_k"])
        self.overlap = int(config["tiling"]["overlap"])
        self.num_classes = num_classes
        self._check_io(model_path)

    def _check_io(self, model_path: Path):
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise UserError(f"model {model_path} must take one [B, 3, H, W] image input; it takes "
                            f"{[(i.name, i.shape) for i in inputs]}; export it with edgekit")
        self.input = inputs[0]
        b, c, h, w = self.input.shape
        if any(isinstance(d, int) and d != want for d, want in ((c, 3), (h, self.size), (w, self.size))):
            raise UserError(f"model {model_path} takes input {self.input.shape}, but this bundle feeds "
                            f"[B, 3, {self.size}, {self.size}]; use the model the bundle was written with")
        self.batch = b if isinstance(b, int) and b > 0 else DEFAULT_BATCH
        self.fixed_batch = isinstance(b, int) and b > 0
        self.dtype = np.float16 if self.input.type == "tensor(float16)" else np.float32
        names = [o.name for o in self.session.get_outputs()]
        if {"boxes", "scores"} <= set(names):
            self.kind, self.outputs = "raw", ["boxes", "scores"]
        elif {"rboxes", "scores"} <= set(names):
            self.kind, self.outputs = "raw", ["rboxes", "scores"]
        elif "detections" in names:
            self.kind, self.outputs = "end2end", ["detections"]
        else:
            raise UserError(f"model {model_path} has outputs {names}; expected 'boxes' (or 'rboxes') and 'scores' "
                            f"or 'detections'; export it with edgekit")
        self.rotated = self.outputs[0] == "rboxes"

    def run(self, batch: np.ndarray, score_threshold: float) -> list[tuple]:
        """A [B, 3, size, size] float batch -> per image (boxes in input pixels, scores, labels)."""
        n = len(batch)
        if self.fixed_batch and n != self.batch:  # a static-batch model: pad with blank inputs
            pad = np.zeros((self.batch - n, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, pad])
        out = self.session.run(self.outputs, {self.input.name: batch.astype(self.dtype, copy=False)})
        if self.kind == "end2end":
            return postprocess_end2end(out[0], n, self.size, score_threshold, self.max_detections)
        boxes, scores = (np.asarray(o, dtype=np.float32)[:n] for o in out)
        if scores.shape[-1] != self.num_classes:
            raise UserError(f"the model scores {scores.shape[-1]} classes but labels.txt lists {self.num_classes}; "
                            f"use the model this bundle was written with")
        return postprocess_raw(boxes, scores, self.size, score_threshold, self.iou_threshold,
                               self.max_detections, self.pre_nms_top_k)

    def detect(self, image: np.ndarray, score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detections in the image's own pixels; large images are tiled at native resolution.
        Boxes are [N, 4], or rotated [N, 5] for an oriented model."""
        h, w = image.shape[:2]
        width = 5 if self.rotated else 4
        if max(h, w) <= self.size:
            x, scale = to_model_input(image, self.size, self.mean, self.std)
            boxes, scores, labels = self.run(x[None], score_threshold)[0]
            divisor = np.array([scale] * 4 + [1.0] * (width - 4), dtype=np.float32)
            return _clip(boxes / divisor, scores, labels, h, w)
        windows = tile_windows(h, w, self.size, self.overlap)
        merged = []
        for start in range(0, len(windows), self.batch):
            chunk = windows[start:start + self.batch]
            batch = np.stack([to_model_input(crop_padded(image, win, self.size), self.size, self.mean, self.std)[0]
                              for win in chunk])
            for (x0, y0, _, _), (b, s, lab) in zip(chunk, self.run(batch, score_threshold)):
                shift = [x0, y0, 0, 0, 0] if self.rotated else [x0, y0, x0, y0]
                merged.append((b + np.array(shift, dtype=np.float32), s, lab))
        if not merged:
            return _empty(width)
        boxes = np.concatenate([m[0] for m in merged]).astype(np.float32)
        scores = np.concatenate([m[1] for m in merged]).astype(np.float32)
        labels = np.concatenate([m[2] for m in merged]).astype(np.int64)
        nms_fn = batched_rotated_nms if self.rotated else batched_nms
        keep = nms_fn(boxes, scores, labels, self.iou_threshold)  # duplicates from overlapping tiles
        return _clip(boxes[keep], scores[keep], labels[keep], h, w)


def clipped_boxes(shapes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Horizontal boxes clipped to the image: the boxes themselves, or rotated boxes' enclosing ones."""
    boxes = (enclosing_boxes(shapes) if shapes.shape[1] == 5 else shapes).astype(np.float32, copy=True)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return boxes


def _clip(shapes: np.ndarray, scores: np.ndarray, labels: np.ndarray, h: int, w: int) -> tuple:
    """Boxes clipped to the image (rotated ones kept whole), less those whose clipped box has no
    area (they lay in the padding): edgekit.engine.detect's rule."""
    boxes = clipped_boxes(shapes, h, w)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    shapes = shapes[keep] if shapes.shape[1] == 5 else boxes[keep]
    return shapes, scores[keep], labels[keep]


def to_json(shapes, scores, labels, class_names: list[str], size: tuple[int, int]) -> list[dict]:
    """The schema of edgekit.engine.predict_outputs.detections_to_json (``size``: the image's h, w)."""
    rows = [{"box": [round(v, 2) for v in box], "score": round(float(score), 4), "label": class_names[int(label)]}
            for box, score, label in zip(clipped_boxes(shapes, *size).tolist(), scores.tolist(), labels.tolist())]
    if shapes.shape[1] == 5:
        for row, rbox, poly in zip(rows, shapes.tolist(), rbox_corners(shapes).reshape(-1, 8).tolist()):
            row["rbox"] = [round(v, 2) for v in rbox[:4]] + [round(rbox[4], 5)]
            row["polygon"] = [round(v, 2) for v in poly]
    return rows


# ------------------------------------------------------------------------------------ the bundle

# (path in preprocess.json, type): the fields infer.py reads, checked before use.
_CONFIG_FIELDS = ((("input", "size"), int), (("input", "mean"), list), (("input", "std"), list),
                  (("tiling", "overlap"), int), (("postprocess", "score_threshold"), float),
                  (("postprocess", "iou_threshold"), float), (("postprocess", "max_detections"), int),
                  (("postprocess", "pre_nms_top_k"), int), (("models",), dict), (("labels",), str))


def _check_config(config: dict, path: Path) -> None:
    for keys, kind in _CONFIG_FIELDS:
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else \
            (isinstance(value, kind) and not isinstance(value, bool))
        if not ok:
            raise UserError(f"{path}: field {'.'.join(keys)} is missing or not a {kind.__name__}; the file is "
                            f"damaged: re-create the bundle with edgekit")
    for name, entry in config["models"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "/" in entry["file"] \
                or "\\" in entry["file"] or entry["file"].startswith("."):
            raise UserError(f"{path}: model {name!r} must name a file inside the bundle; re-create the bundle")
    if len(config["input"]["mean"]) != 3 or len(config["input"]["std"]) != 3 or \
            not all(isinstance(v, (int, float)) and v > 0 for v in config["input"]["std"]):
        raise UserError(f"{path}: input.mean and input.std must be 3 numbers (std > 0); re-create the bundle")


def load_bundle(bundle_dir: Path) -> tuple[dict, list[str]]:
    """preprocess.json and labels.txt of a bundle folder, checked."""
    path = bundle_dir / "preprocess.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found; run infer.py from inside an edgekit bundle folder") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {_one_line(e)}; re-create the bundle with edgekit") from None
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path} is not an {BUNDLE_FORMAT} file; re-create the bundle with this edgekit version")
    _check_config(config, path)
    labels_path = bundle_dir / Path(config["labels"]).name
    try:
        class_names = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {labels_path}: {_one_line(e)}; re-create the bundle with edgekit") from None
    if not class_names:
        raise UserError(f"{labels_path} names no class; re-create the bundle with edgekit")
    return config, class_names


def resolve_model(bundle_dir: Path, config: dict, choice: str | None) -> Path:
    """A model name from the bundle (fp32, int8, ...) or a path to an .onnx file."""
    models = config.get("models", {})
    if choice is None:
        choice = config.get("default_model") or next(iter(models), None)
    if choice in models:
        return bundle_dir / models[choice]["file"]
    path = Path(choice) if choice else None
    if path is not None and path.suffix == ".onnx" and path.is_file():
        return path
    names = ", ".join(models) or "none"
    raise UserError(f"model {choice!r} is neither in this bundle (it has: {names}) nor an existing .onnx file; "
                    f"pass --model with one of those names or a path")


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Detect objects in images with this edgekit bundle "
                                            "(numpy + onnxruntime + Pillow only).")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--model", help="a model of this bundle (see preprocess.json 'models') or a path to an .onnx file")
    p.add_argument("--out", default="predictions", help="output folder for predictions.json (default ./predictions)")
    p.add_argument("--score-threshold", dest="score_threshold", type=float, help="keep scores above this")
    p.add_argument("--iou-threshold", dest="iou_threshold", type=float, help="NMS IoU threshold")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    return p.parse_args(argv)


def main(argv=None, bundle_dir=None) -> int:
    args = parse_args(argv)
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else Path(__file__).resolve().parent
    try:
        config, class_names = load_bundle(bundle_dir)
        if args.iou_threshold is not None:
            config["postprocess"]["iou_threshold"] = args.iou_threshold
        score_threshold = (args.score_threshold if args.score_threshold is not None
                           else float(config["postprocess"]["score_threshold"]))
        for name, value in (("--score-threshold", score_threshold), ("--iou-threshold", args.iou_threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"{name} {value} is outside [0, 1]; give a value between 0 and 1")
        images = expand_images(args.images)
        model_path = resolve_model(bundle_dir, config, args.model)
        detector = Detector(model_path, config, len(class_names), cpu_only=args.cpu)
        results, failed = {}, {}
        for path in images:
            try:
                image = load_image(path)
            except UserError as e:  # one unreadable file does not lose the others' results
                if len(images) == 1:
                    raise
                failed[str(path)] = str(e)
                continue
            start = time.perf_counter()
            boxes, scores, labels = detector.detect(image, score_threshold)
            ms = 1000 * (time.perf_counter() - start)
            results[str(path)] = {"width": image.shape[1], "height": image.shape[0],
                                  "detections": to_json(boxes, scores, labels, class_names, image.shape[:2])}
            counts = {}
            for label in labels.tolist():
                counts[class_names[label]] = counts.get(class_names[label], 0) + 1
            summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            print(f"{path}: {len(labels)} detections{' (' + summary + ')' if summary else ''} in {ms:.1f} ms")
        out = Path(args.out) / "predictions.json"
        if not results:
            raise UserError(f"no image could be read ({len(failed)} failed; first: {next(iter(failed.values()))})")
        try:
            write_json_atomic(out, results)
        except OSError as e:
            raise UserError(f"cannot write {out}: {_one_line(e)}; choose another --out folder") from None
        print(f"wrote {out} ({len(results)} images, model {model_path.name})")
        if failed:
            for path, reason in failed.items():
                print(f"infer.py: skipped {path}: {reason}", file=sys.stderr)
            raise UserError(f"{len(failed)} of {len(images)} images could not be read (listed above); the others' "
                            f"results are in {out}")
        return 0
    except UserError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infer.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
