"""The deploy bundle: one folder that runs a detector on a device without torch or edgekit.

    bundle/
      model_fp32.onnx, model_int8.onnx   the ONNX model(s), as given
      labels.txt                         class names, one a line, in score-channel order
      preprocess.json                    input size, letterbox rule, mean/std, tiling, thresholds
      parity.json                        the export's parity report (when given)
      infer.py                           standalone script: numpy + onnxruntime + Pillow
      README.md                          how to run it

Why a standalone script instead of ``edgekit predict``: the boards it ships to (Jetson,
on-board computers) have onnxruntime but no torch, and a copy of the exact
pre/post-processing next to the model is what makes the numbers reproducible there.
``infer.py`` is the text of :mod:`edgekit.export.infer_template`, whose tests check it
against edgekit's own preprocessing, NMS and tiled detection.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

from edgekit.errors import EdgekitError

BUNDLE_FORMAT = "edgekit.bundle/1"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_bundle(bundle_dir, models: dict, *, class_names, image_size: int, normalisation: dict | None = None,
                 parity_report: dict | None = None, score_threshold: float = 0.25, iou_threshold: float = 0.6,
                 tile_overlap: int = 64, max_detections: int = 100, pre_nms_top_k: int = 1000,
                 default_model: str | None = None, overwrite: bool = False) -> Path:
    """Write a deploy bundle folder for ``models`` (e.g. {"fp32": path, "int8": path}); returns its path.

    ``normalisation`` is {"mean": [3 floats], "std": [3 floats]} on 0..1 pixels (default:
    edgekit's ImageNet values). Thresholds and tiling default to ``edgekit predict``'s, so
    the bundle reproduces it. The folder is built under a temporary name and renamed when
    complete; an existing non-empty folder is replaced only with ``overwrite=True``.
    """
    bundle_dir = Path(bundle_dir)
    config = bundle_config(models, class_names=class_names, image_size=image_size, normalisation=normalisation,
                           score_threshold=score_threshold, iou_threshold=iou_threshold, tile_overlap=tile_overlap,
                           max_detections=max_detections, pre_nms_top_k=pre_nms_top_k, default_model=default_model)
    for name, path in models.items():
        check_model(path, image_size, len(class_names), name)
    if parity_report is not None and not isinstance(parity_report, dict):
        raise EdgekitError(f"parity_report must be a dict (the parity check's report), got "
                           f"{type(parity_report).__name__}; pass the report or None")
    check_destination(bundle_dir, overwrite)

    tmp = bundle_dir.with_name(f".{bundle_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, path in models.items():
            target = tmp / config["models"][name]["file"]
            shutil.copyfile(path, target)
            config["models"][name]["sha256"] = _sha256(target)
            config["models"][name]["bytes"] = target.stat().st_size
        (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in class_names))
        (tmp / "preprocess.json").write_text(json.dumps(config, indent=2) + "\n")
        if parity_report is not None:
            (tmp / "parity.json").write_text(json.dumps(_json_safe(parity_report), indent=2, allow_nan=False) + "\n")
        (tmp / "infer.py").write_text(infer_script_text())
        (tmp / "README.md").write_text(readme_text(config, parity_report is not None))
        _swap_in(tmp, bundle_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle_dir


def bundle_config(models: dict, *, class_names, image_size: int, normalisation: dict | None, score_threshold: float,
                  iou_threshold: float, tile_overlap: int, max_detections: int, pre_nms_top_k: int,
                  default_model: str | None) -> dict:
    """The content of preprocess.json (without model hashes), with every argument checked."""
    if not isinstance(models, dict) or not models:
        raise EdgekitError("no models given for the bundle; pass e.g. {'fp32': 'model.onnx'}")
    for name in models:
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            raise EdgekitError(f"model name {name!r} is not usable as a file name and --model choice; "
                               f"use letters, digits, '_', '-' or '.' (e.g. fp32, int8)")
    if default_model is not None and default_model not in models:
        raise EdgekitError(f"default model {default_model!r} is not among the models {', '.join(models)}; "
                           f"pick one of them")
    class_names = list(class_names) if class_names is not None else []
    if not class_names:
        raise EdgekitError("the bundle needs the class names (labels.txt); pass class_names")
    for c in class_names:
        if not isinstance(c, str) or not c.strip() or c != c.strip() or "\n" in c or "\r" in c:
            raise EdgekitError(f"class name {c!r} cannot be a line of labels.txt; use non-empty names without "
                               f"line breaks or surrounding spaces")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise EdgekitError(f"image size {image_size!r} is invalid; give the model's input side in pixels (e.g. 640)")
    if not isinstance(tile_overlap, int) or not 0 <= tile_overlap < image_size:
        raise EdgekitError(f"tile overlap {tile_overlap!r} is invalid; need 0 <= overlap < image size {image_size}")
    for name, value in (("score threshold", score_threshold), ("IoU threshold", iou_threshold)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise EdgekitError(f"{name} {value!r} is outside [0, 1]; give a value between 0 and 1")
    for name, value in (("max detections", max_detections), ("pre-NMS top-k", pre_nms_top_k)):
        if not isinstance(value, int) or value <= 0:
            raise EdgekitError(f"{name} {value!r} is invalid; give a positive integer")
    mean, std = _normalisation(normalisation)
    return {
        "format": BUNDLE_FORMAT,
        "created_by": f"edgekit {_edgekit_version()}",
        "labels": "labels.txt",
        "num_classes": len(class_names),
        "input": {
            "size": image_size,
            "layout": "NCHW",
            "channel_order": "RGB",
            "dtype": "float32",
            "letterbox": {
                "rule": "scale the longer side to size keeping the aspect ratio (scale = size / max(h, w); "
                        "new side = min(size, max(1, round(side * scale))), Python rounding), resize with PIL "
                        "bilinear, paste at the top-left of a size x size canvas of zeros; boxes / scale map "
                        "back to the original image",
                "resample": "bilinear",
                "pad_value": 0,
                "align": "top-left",
                "upscale_small_images": True,
            },
            "pixel_scale": 1.0 / 255.0,
            "mean": mean,
            "std": std,
            "formula": "(pixel / 255 - mean) / std, per channel, float32",
        },
        "tiling": {
            "rule": "images whose longer side exceeds size are cut into size x size windows every size - overlap "
                    "pixels (the last window flush with the border, zero padding when the image is smaller than "
                    "a tile), detected without resizing, shifted back and merged with class-aware NMS",
            "tile_size": image_size,
            "overlap": tile_overlap,
        },
        "postprocess": {
            "score_threshold": float(score_threshold),
            "iou_threshold": float(iou_threshold),
            "max_detections": max_detections,
            "pre_nms_top_k": pre_nms_top_k,
            "nms": "class-aware, greedy, suppress IoU > threshold",
            "outputs": "'boxes' [B, N, 4] xyxy input pixels + 'scores' [B, N, C], or 'detections' [M, 7] = "
                       "(batch, x1, y1, x2, y2, score, class)",
        },
        "models": {name: {"file": f"model_{name}.onnx"} for name in models},
        "default_model": default_model or next(iter(models)),
    }


def check_model(path, image_size: int, num_classes: int, name: str = "model") -> dict:
    """Check that an ONNX file is a detector the bundle can run; returns its input/output shapes.

    Catches at write time what would otherwise fail on the device: a missing or corrupt
    file, weights in external data files (not copied), an input that is not
    [B, 3, size, size], outputs other than boxes/scores or detections, a class-count mismatch.
    """
    import onnx

    from edgekit.data.images import _one_line

    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{name} model {path} not found; export it first (edgekit export) or fix the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx its own types; all mean "not a model"
        raise EdgekitError(f"{name} model {path} is not a readable ONNX file ({_one_line(e)[:200]}); "
                           f"re-export it") from None
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise EdgekitError(f"{name} model {path} keeps its weights in external data files, which the bundle does "
                           f"not copy; re-export it as a single .onnx file")
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    shapes = {i.name: _dims(i) for i in inputs}
    if len(inputs) != 1 or len(shapes[inputs[0].name]) != 4:
        raise EdgekitError(f"{name} model {path} must take one [B, 3, H, W] image input, it takes {shapes}; "
                           f"export the detector with edgekit")
    _, c, h, w = shapes[inputs[0].name]
    if any(isinstance(d, int) and d != want for d, want in ((c, 3), (h, image_size), (w, image_size))):
        raise EdgekitError(f"{name} model {path} takes input {shapes[inputs[0].name]}, not [B, 3, {image_size}, "
                           f"{image_size}]; pass the image size it was exported with")
    outputs = {o.name: _dims(o) for o in graph.output}
    box_output = "rboxes" if "rboxes" in outputs else "boxes"  # an oriented model: [B, N, 5]
    if not {box_output, "scores"} <= outputs.keys() and "detections" not in outputs:
        raise EdgekitError(f"{name} model {path} has outputs {list(outputs)}; the bundle needs 'boxes' (or 'rboxes') "
                           f"and 'scores', or 'detections'; export the detector with edgekit")
    # Exported output shapes are mostly symbolic, so the class count and layouts are checked on a real run.
    ran = _run_blank(path, inputs[0].name, shapes[inputs[0].name], image_size, name)
    if "detections" in ran:
        if ran["detections"].ndim != 2 or ran["detections"].shape[-1] != 7:
            raise EdgekitError(f"{name} model {path} outputs detections of shape {ran['detections'].shape}, not "
                               f"[M, 7] (batch, x1, y1, x2, y2, score, class); export it with edgekit")
    else:
        boxes, scores = ran[box_output], ran["scores"]
        width = 5 if box_output == "rboxes" else 4
        if boxes.ndim != 3 or boxes.shape[-1] != width or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
            raise EdgekitError(f"{name} model {path} outputs {box_output} {boxes.shape} and scores {scores.shape}, "
                               f"not [B, N, {width}] and [B, N, C]; export it with edgekit")
        if scores.shape[-1] != num_classes:
            raise EdgekitError(f"{name} model {path} scores {scores.shape[-1]} classes but {num_classes} class "
                               f"names were given; pass the model's class names")
    return {"inputs": shapes, "outputs": {k: list(v.shape) for k, v in ran.items()}}


def _run_blank(path: Path, input_name: str, shape: list, image_size: int, name: str) -> dict:
    """One onnxruntime run on a blank image: the bundle must hold models that run, not just parse."""
    import numpy as np
    import onnxruntime as ort

    from edgekit.data.images import _one_line

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
        wanted = [o.name for o in session.get_outputs() if o.name in ("boxes", "rboxes", "scores", "detections")]
        values = session.run(wanted, {input_name: np.zeros((batch, 3, image_size, image_size), dtype)})
    except Exception as e:  # onnxruntime's own exception types, for unsupported ops or bad graphs
        raise EdgekitError(f"{name} model {path} does not run in onnxruntime ({_one_line(e)[:200]}); "
                           f"re-export it") from None
    return {k: np.asarray(v) for k, v in zip(wanted, values)}


def infer_script_text() -> str:
    """The source of the standalone infer.py (this package's infer_template module)."""
    return (Path(__file__).with_name("infer_template.py")).read_text()


def readme_text(config: dict, has_parity: bool) -> str:
    inp, post, tiling = config["input"], config["postprocess"], config["tiling"]
    models = "\n".join(f"| `{n}` | `{m['file']}` |" for n, m in config["models"].items())
    parity = ("- `parity.json` - how closely these ONNX models agree with the PyTorch model they came from\n"
              if has_parity else "")
    return f"""# edgekit deploy bundle

Runs the detector with **numpy, onnxruntime and Pillow only** (no torch, no edgekit).
Written by {config['created_by']}.

## Run

```
pip install numpy onnxruntime pillow     # onnxruntime-gpu for CUDA
python infer.py IMAGE_OR_FOLDER... [--model {'|'.join(config['models'])}|PATH.onnx] [--out DIR]
               [--score-threshold S] [--iou-threshold T] [--cpu]
```

Writes `DIR/predictions.json` (default `./predictions/`):
`{{"<image>": {{"width": W, "height": H, "detections": [{{"box": [x1, y1, x2, y2], "score": s, "label": "name"}}]}}}}`,
boxes in the image's own pixels, sorted by score, and prints a line per image.
Bad input (missing or unreadable image, unknown model) prints one line on stderr and exits with status 2.

| `--model` | file |
|---|---|
{models}

The default is `{config['default_model']}`.

## What infer.py does (the same as `edgekit predict`)

1. Decode the image to RGB uint8 (16-bit grey is rescaled by its range).
2. Images up to {inp['size']} px on their longer side: letterbox to {inp['size']}x{inp['size']} (scale the
   longer side to {inp['size']}, PIL bilinear, zero padding at the bottom/right).
   Larger images: {tiling['tile_size']} px tiles overlapping by {tiling['overlap']} px at native resolution.
3. Normalise: `(pixel / 255 - mean) / std`, mean {inp['mean']}, std {inp['std']}, NCHW float32.
4. Model outputs `boxes` + `scores` are decoded: scores > {post['score_threshold']}, top
   {post['pre_nms_top_k']}, class-aware NMS at IoU {post['iou_threshold']}, at most {post['max_detections']}
   per image (or tile). End-to-end models (output `detections`) ran NMS inside the graph with the
   thresholds they were exported with, so `--score-threshold` can only raise theirs, not lower it.
5. Boxes are divided by the letterbox scale (or shifted by the tile origin, then tiles are merged
   with class-aware NMS) and clipped to the image.

## Files

- `infer.py` - the script above
- `preprocess.json` - every number used in steps 2-4 (read by infer.py)
- `labels.txt` - class names, one per line, in the model's score order
{parity}- `model_*.onnx` - the models (sha256 in preprocess.json)
"""


def _normalisation(normalisation: dict | None) -> tuple[list[float], list[float]]:
    if normalisation is None:
        from edgekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        normalisation = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    try:
        mean = [float(v) for v in normalisation["mean"]]
        std = [float(v) for v in normalisation["std"]]
    except (KeyError, TypeError, ValueError):
        raise EdgekitError(f"normalisation {normalisation!r} is invalid; give {{'mean': [r, g, b], "
                           f"'std': [r, g, b]}} on 0..1 pixel values") from None
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise EdgekitError(f"normalisation mean {mean} / std {std} is invalid; need three finite means and three "
                           f"positive stds (RGB)")
    return mean, std


def check_destination(bundle_dir, overwrite: bool = False) -> Path:
    """Refuse a file, or a non-empty folder unless ``overwrite``; one check for the API and the CLI."""
    bundle_dir = Path(bundle_dir)
    if bundle_dir.exists() and not bundle_dir.is_dir():
        raise EdgekitError(f"bundle destination {bundle_dir} is a file, not a folder; remove it or choose a folder name")
    if bundle_dir.is_dir() and any(bundle_dir.iterdir()) and not overwrite:
        raise EdgekitError(f"bundle folder {bundle_dir} already exists and is not empty; remove it or choose another "
                           f"folder")
    return bundle_dir


def _swap_in(tmp: Path, bundle_dir: Path):
    """Rename the finished folder into place; an old bundle is moved aside first, then removed."""
    old = None
    if bundle_dir.is_dir():
        if any(bundle_dir.iterdir()):
            old = bundle_dir.with_name(f".{bundle_dir.name}.old{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(bundle_dir, old)
        else:
            bundle_dir.rmdir()
    os.replace(tmp, bundle_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dims(value_info) -> list:
    """A graph input/output's shape: ints for fixed sizes, names (or None) for dynamic ones."""
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_safe(value):
    """NaN/inf -> null, so parity.json is strict JSON that any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _json_safe(value.tolist())
    return str(value)


def _edgekit_version() -> str:
    from edgekit import __version__

    return __version__
