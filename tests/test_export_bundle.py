"""Deploy bundle: the standalone infer.py against edgekit's own code.

- its numpy preprocessing, tiling, NMS and decoding equal edgekit's torch versions exactly
  (random sizes, boxes and scores each run; the seed is printed);
- a tiny untrained rsdet_atto exported to ONNX, bundled, and run by infer.py in a virtual
  environment where ``import torch`` and ``import edgekit`` fail, gives the detections of
  ``edgekit.engine.detect.detect_array`` with the torch model, on a small image and on
  large ones that force tiling;
- write_bundle's files, its refusals, and infer.py's one-line errors.

The model is untrained, so its head is re-initialised with spread-out scores: the
default init gives every location the same score (about 0.07), which would make the
comparison a test of tie-breaking rather than of the pipeline.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.boxes import batched_nms
from edgekit.data.images import load_image, save_image
from edgekit.data.tiling import iter_tiles, tile_windows
from edgekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from edgekit.errors import EdgekitError
from edgekit.export import infer_template as infer
from edgekit.export.bundle import check_model, write_bundle
from edgekit.models.detect_post import postprocess

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota_example" / "images" / "P0706.png"
SIZE = 128
CLASSES = ["plane", "ship", "small-vehicle"]


def fresh_rng():
    seed = random.SystemRandom().randrange(2**31)  # fresh even when a test before seeded `random`
    print(f"numpy seed {seed}")
    return np.random.default_rng(seed)


def random_boxes(rng, n: int, extent: float = 200.0) -> np.ndarray:
    """Boxes clustered around a few centres, so that many overlap."""
    centres = rng.uniform(0, extent, (max(1, n // 8), 2))[rng.integers(0, max(1, n // 8), n)]
    centres = centres + rng.normal(0, 6, (n, 2))
    half = rng.uniform(2, 25, (n, 2))
    return np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)


def distinct_scores(rng, n: int) -> np.ndarray:
    """Random scores without ties (a tie's order is arbitrary in torch and numpy alike)."""
    return ((rng.permutation(n) + 1) / (n + 1)).astype(np.float32)


# ----------------------------------------------------------------- pieces against edgekit

def test_preprocessing_equals_edgekit():
    rng = fresh_rng()
    cases = [(SIZE, SIZE, SIZE), (1, 1, 16), (1, 200, 64), (300, 2, 64), (64, 32, 64)]
    cases += [(int(rng.integers(1, 400)), int(rng.integers(1, 400)), int(rng.integers(8, 200))) for _ in range(25)]
    for h, w, size in cases:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours, scale = infer.to_model_input(image, size, IMAGENET_MEAN, IMAGENET_STD)
        ref, ref_scale = to_model_input(image, size)
        assert scale == ref_scale, (h, w, size)
        assert ours.dtype == np.float32 and ours.shape == (3, size, size)
        np.testing.assert_array_equal(ours, ref.numpy(), err_msg=f"image {h}x{w}, size {size}")


def test_tiling_equals_edgekit():
    rng = fresh_rng()
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        tile = int(rng.integers(16, 300))
        overlap = int(rng.integers(0, tile))
        assert infer.tile_windows(h, w, tile, overlap) == tile_windows(h, w, tile, overlap)
    image = rng.integers(0, 256, (150, 97, 3), dtype=np.uint8)
    for window, tile in iter_tiles(image, 64, 13):
        np.testing.assert_array_equal(infer.crop_padded(image, window, 64), tile)


@pytest.mark.parametrize("n", [0, 1, 2, 37, 600, 4500])  # 4500: edgekit's per-class path (> 4096 boxes)
def test_nms_equals_batched_nms(n):
    rng = fresh_rng()
    boxes, scores = random_boxes(rng, n), distinct_scores(rng, n)
    labels = rng.integers(0, 4, n)
    for iou in (0.3, 0.6):
        ours = infer.batched_nms(boxes, scores, labels, iou)
        ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), iou)
        np.testing.assert_array_equal(ours, ref.numpy())
    if n >= 37:  # clustered boxes: greedy NMS really suppressed something, so the comparison is not vacuous
        assert len(infer.batched_nms(boxes, scores, labels, 0.3)) < n


def test_decoding_equals_edgekit_postprocess():
    rng = fresh_rng()
    batch, points, classes = 3, 400, 5
    boxes = np.stack([random_boxes(rng, points, extent=SIZE + 20) - 10 for _ in range(batch)])  # some outside
    scores = distinct_scores(rng, batch * points * classes).reshape(batch, points, classes)
    for threshold, top_k, max_det in ((0.5, 1000, 100), (0.2, 150, 30), (0.999, 1000, 100)):
        ours = infer.postprocess_raw(boxes, scores, SIZE, threshold, 0.6, max_det, top_k)
        ref = postprocess(torch.from_numpy(boxes), torch.from_numpy(scores), threshold, 0.6, max_det, top_k,
                          image_size=(SIZE, SIZE))
        for (b, s, lab), r in zip(ours, ref):
            np.testing.assert_array_equal(b, r["boxes"].numpy())
            np.testing.assert_array_equal(s, r["scores"].numpy())
            np.testing.assert_array_equal(lab, r["labels"].numpy())


# ------------------------------------------------------------------ a real exported model

def _spread_head(model, generator):
    """Scores that differ between locations and classes (see the module docstring)."""
    head = model.head
    with torch.no_grad():
        for conv in (head.cls_out, head.ctr_out, head.box_out):
            conv.weight.normal_(0, 0.1, generator=generator)
        head.cls_out.bias.normal_(-4.0, 0.5, generator=generator)


def _export(model, path: Path, static_batch: int | None = None):
    """ONNX with outputs boxes [B, N, 4] (rboxes [B, N, 5] when oriented) and scores [B, N, C],
    as the export stage writes them (:class:`edgekit.export.to_onnx.DetectorOutputs`)."""
    from edgekit.export.to_onnx import DetectorOutputs

    net = DetectorOutputs(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(static_batch or 1, 3, SIZE, SIZE),), str(path),
                          input_names=["images"], output_names=list(net.output_names),
                          dynamic_axes=None if static_batch else {"images": {0: "batch"}},
                          opset_version=18, dynamo=False)
    return path


def _untrained_detector(deformable: bool, obb: bool = False):
    from edgekit.models import create_model

    seed = random.SystemRandom().randrange(2**31)  # fresh even when a test before seeded `random`
    print(f"model seed {seed}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("rsdet_atto", class_names=CLASSES, deformable=deformable, grn_backend="torch",
                         obb=obb).eval()
    _spread_head(model, generator)
    if obb:
        with torch.no_grad():
            model.head.angle_out.weight.normal_(0, 0.3, generator=generator)  # angles that differ by location
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(torch model, ONNX path) of an untrained rsdet_atto without DCN, by the fast TorchScript
    exporter (1 s instead of edgekit's 20-40 s dynamo export; the slow test below uses that)."""
    model = _untrained_detector(deformable=False)
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "rsdet.onnx")


def _python_without_torch(root: Path) -> Path:
    """A venv (no pip, nothing downloaded) that sees only numpy, onnxruntime and Pillow of this env."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    exposed = root / "exposed"
    exposed.mkdir()
    for dist in ("numpy", "onnxruntime", "pillow"):
        for top in {f.parts[0] for f in metadata.files(dist)}:
            if top.startswith("..") or top.endswith(".dist-info") or top == "__pycache__":
                continue
            source = Path(metadata.distribution(dist).locate_file(top))
            if source.exists() and not (exposed / top).exists():
                (exposed / top).symlink_to(source)
    (site / "exposed_runtime.pth").write_text(f"{exposed}\n")
    return python


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _crops(rng, shapes) -> list[np.ndarray]:
    """Random crops of a real DOTA image (random pixels when the sample data is absent)."""
    if EXAMPLE.is_file():
        scene = load_image(EXAMPLE)
        out = []
        for h, w in shapes:
            y, x = int(rng.integers(0, scene.shape[0] - h)), int(rng.integers(0, scene.shape[1] - w))
            out.append(np.ascontiguousarray(scene[y:y + h, x:x + w]))
        return out
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _top_scores_threshold(model, image: np.ndarray, quantile: float) -> float:
    """A threshold that keeps the top 2% of (location, class) scores: a few dozen candidates per
    tile whatever the random head gives, so edgekit's Python-loop NMS stays quick."""
    with torch.no_grad():
        _, scores = model.decode(model(to_model_input(image, SIZE)[0][None]))
    return float(torch.quantile(scores.flatten().double(), quantile))


def _pixel_tolerance(rbox) -> float:
    """0.05 px, widened for long rotated boxes: ORT's and torch's float32 outputs differ by
    ~1e-5 relative (accumulation order), so an angle off by 1e-5 rad moves the ends of an
    untrained head's box thousands of px long (model seed 1418186270, numpy 2027837527: a
    3951 px box, its enclosing box 0.05 px apart) by hundredths of a pixel."""
    return 0.05 if rbox is None else 0.05 + 2e-5 * max(abs(rbox[2]), abs(rbox[3]))


def _same_rectangle(a, b) -> bool:
    """Rotated boxes equal as rectangles: angles are equal modulo pi (a box at -pi/2 is the one
    at pi/2, and float rounding may put the two runtimes on either side of that boundary)."""
    turn = abs((a[4] - b[4] + math.pi / 2) % math.pi - math.pi / 2)
    return max(abs(x - y) for x, y in zip(a[:4], b[:4])) < _pixel_tolerance(b) and turn < 1e-3


def _assert_same_detections(ours: list[dict], ref: dict, threshold: float, where: str):
    """Each torch detection has an infer.py twin (same label, box within :func:`_pixel_tolerance`,
    score within 1e-3) and infer.py has no others. A detection whose score is within 2e-4 of the threshold may be
    missing on either side: ONNX Runtime and torch differ by ~1e-6, which can tip it over."""
    def borderline(score):
        return abs(score - threshold) < 2e-4

    unmatched = list(ours)
    rboxes = ref["rboxes"].tolist() if "rboxes" in ref else [None] * len(ref["boxes"])
    for box, rbox, score, label in zip(ref["boxes"].tolist(), rboxes, ref["scores"].tolist(), ref["labels"].tolist()):
        twin = next((d for d in unmatched if d["label"] == CLASSES[label] and abs(d["score"] - score) < 1e-3
                     and max(abs(a - b) for a, b in zip(d["box"], box)) < _pixel_tolerance(rbox)
                     and (rbox is None or _same_rectangle(d["rbox"], rbox))), None)
        assert twin is not None or borderline(score), \
            f"{where}: no infer.py detection matches edgekit's {CLASSES[label]} {score:.4f} {box}"
        if twin is not None:
            unmatched.remove(twin)
    extra = [d for d in unmatched if not borderline(d["score"])]
    assert not extra, f"{where}: infer.py found {len(extra)} detections edgekit did not, e.g. {extra[0]}"


def test_infer_py_without_torch_matches_detect_array(exported, tmp_path):
    _check_infer_py_matches_detect_array(*exported, tmp_path)


def test_infer_py_runs_oriented_models_with_numpy_rotated_nms(tmp_path):
    """An oriented model's rboxes/scores graph: infer.py's numpy rotated NMS and tiling give
    detect_array's rotated detections (rbox and enclosing box) and their polygons."""
    model = _untrained_detector(deformable=False, obb=True)
    _check_infer_py_matches_detect_array(model, _export(model, tmp_path / "obb.onnx"), tmp_path)


@pytest.mark.slow
def test_infer_py_runs_edgekit_export_with_deformable_conv(tmp_path):
    """The same, on the file edgekit's own exporter writes, with the DCN head (ONNX DeformConv)."""
    from edgekit.export.to_onnx import export_onnx

    model = _untrained_detector(deformable=True)
    path = export_onnx(model, tmp_path / "rsdet_dcn.onnx", image_size=SIZE, deform="native", simplify=False)
    _check_infer_py_matches_detect_array(model, path, tmp_path)


def _check_infer_py_matches_detect_array(model, onnx_path: Path, tmp_path: Path):
    from edgekit.engine.detect import detect_array

    rng = fresh_rng()
    # Smaller than the input (letterboxed, upscaled), larger (tiled), and thin (tiles padded).
    shapes = [(int(rng.integers(40, SIZE)), int(rng.integers(40, SIZE))), (300, 260), (90, 300)]
    images = _crops(rng, shapes)
    threshold = _top_scores_threshold(model, images[0], 0.98)
    overlap = int(rng.integers(8, 48))
    bundle = write_bundle(tmp_path / "bundle", {"fp32": onnx_path}, class_names=CLASSES, image_size=SIZE,
                          score_threshold=threshold, iou_threshold=0.6, tile_overlap=overlap,
                          parity_report={"max_abs_diff": 1e-6, "nan": float("nan")})
    python = _python_without_torch(tmp_path / "venv")
    env = _clean_env()
    for banned in ("torch", "edgekit"):
        probe = subprocess.run([str(python), "-c", f"import {banned}"], capture_output=True, text=True, env=env,
                               cwd=tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, f"{banned} importable in the venv"

    paths = [save_image(tmp_path / "images" / f"im{i}.png", im) for i, im in enumerate(images)]
    def infer_py(*args):
        return subprocess.run([str(python), str(bundle / "infer.py"), *args, "--cpu"], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)

    run = infer_py(str(tmp_path / "images"), "--out", str(tmp_path / "out"))  # a folder expands to its images
    assert run.returncode == 0, run.stderr
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    total = 0
    for path, image in zip(paths, images):
        entry = predictions[str(path)]
        assert (entry["height"], entry["width"]) == image.shape[:2]
        ref = detect_array(model, image, SIZE, tile_overlap=overlap, score_threshold=threshold,
                           iou_threshold=0.6)
        _assert_same_detections(entry["detections"], ref, threshold, f"{path.name} {image.shape[:2]}")
        total += len(ref["boxes"])
    assert total > 0, "no detections at all: the comparison would be vacuous"
    assert f"{paths[1]}:" in run.stdout and "predictions.json" in run.stdout
    missing = infer_py(str(tmp_path / "images" / "nope.png"), "--out", str(tmp_path / "out2"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr, missing


def test_static_batch_and_end_to_end_models(exported, tmp_path, capsys):
    """A fixed-batch-2 model (odd tile counts padded) and an end-to-end model (edgekit's
    ONNX NMS appended) give detect_array's detections on a tiled image, like the raw model."""
    import onnx

    from edgekit.engine.detect import detect_array
    from edgekit.export.end2end import append_nms

    model, raw = exported
    rng = fresh_rng()
    image = _crops(rng, [(300, 260)])[0]  # 9 tiles of 128
    threshold = _top_scores_threshold(model, image[:SIZE, :SIZE], 0.98)
    end2end = tmp_path / "e2e.onnx"
    onnx.save(append_nms(onnx.load(str(raw)), score_threshold=threshold, iou_threshold=0.6), str(end2end))
    models = {"raw": raw, "batch2": _export(model, tmp_path / "b2.onnx", static_batch=2), "e2e": end2end}
    bundle = write_bundle(tmp_path / "bundle", models, class_names=CLASSES, image_size=SIZE,
                          score_threshold=threshold, iou_threshold=0.6, tile_overlap=32)
    path = save_image(tmp_path / "scene.png", image)
    ref = detect_array(model, image, SIZE, tile_overlap=32, score_threshold=threshold, iou_threshold=0.6)
    assert len(ref["boxes"]) > 0
    for name in models:
        out = tmp_path / name
        assert infer.main([str(path), "--model", name, "--out", str(out), "--cpu"], bundle_dir=bundle) == 0
        got = json.loads((out / "predictions.json").read_text())[str(path)]["detections"]
        _assert_same_detections(got, ref, threshold, f"model {name}")
    capsys.readouterr()


# ------------------------------------------------------------------------- the bundle files

def test_bundle_files(exported, tmp_path):
    _, onnx_path = exported
    bundle = write_bundle(tmp_path / "b", {"fp32": onnx_path, "int8": onnx_path}, class_names=CLASSES,
                          image_size=SIZE, normalisation={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]},
                          parity_report={"max_abs_diff": float("inf"), "ok": False}, score_threshold=0.3,
                          iou_threshold=0.5, tile_overlap=16)
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["README.md", "infer.py", "labels.txt", "model_fp32.onnx", "model_int8.onnx", "parity.json",
                     "preprocess.json"]
    assert (bundle / "labels.txt").read_text().splitlines() == CLASSES
    assert (bundle / "model_int8.onnx").read_bytes() == onnx_path.read_bytes()
    assert (bundle / "infer.py").read_text() == Path(infer.__file__).read_text()
    assert json.loads((bundle / "parity.json").read_text()) == {"max_abs_diff": None, "ok": False}
    config = json.loads((bundle / "preprocess.json").read_text())
    assert config["input"]["size"] == SIZE and config["input"]["std"] == [0.25, 0.5, 1.0]
    assert config["tiling"] == {**config["tiling"], "tile_size": SIZE, "overlap": 16}
    assert config["postprocess"]["score_threshold"] == 0.3 and config["default_model"] == "fp32"
    assert len(config["models"]["fp32"]["sha256"]) == 64
    assert "python infer.py" in (bundle / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    with pytest.raises(EdgekitError, match="not empty"):
        write_bundle(bundle, {"fp32": onnx_path}, class_names=CLASSES, image_size=SIZE)
    write_bundle(bundle, {"fp32": onnx_path}, class_names=CLASSES, image_size=SIZE, overwrite=True)
    assert not (bundle / "model_int8.onnx").exists() and not (bundle / "parity.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bundle_refuses_bad_input(exported, tmp_path):
    _, onnx_path = exported
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model\xff" * 10)
    ok = {"class_names": CLASSES, "image_size": SIZE}
    cases = [
        (({"fp32": tmp_path / "missing.onnx"}, ok), "not found"),
        (({"fp32": garbage}, ok), "not a readable ONNX"),
        (({"fp32": onnx_path}, {**ok, "image_size": 96}), "takes input"),
        (({"fp32": onnx_path}, {**ok, "class_names": CLASSES[:2]}), "scores 3 classes"),
        (({}, ok), "no models"),
        (({"../x": onnx_path}, ok), "not usable as a file name"),
        (({"fp32": onnx_path}, {**ok, "tile_overlap": SIZE}), "tile overlap"),
        (({"fp32": onnx_path}, {**ok, "score_threshold": 1.5}), "outside"),
        (({"fp32": onnx_path}, {**ok, "class_names": ["a\nb", "c", "d"]}), "labels.txt"),
        (({"fp32": onnx_path}, {**ok, "normalisation": {"mean": [0, 0, 0], "std": [1, 0, 1]}}), "normalisation"),
    ]
    for (models, kwargs), message in cases:
        with pytest.raises(EdgekitError, match=message) as info:
            write_bundle(tmp_path / "b", models, **kwargs)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()
    assert check_model(onnx_path, SIZE, 3)["outputs"]["scores"][-1] == 3


def _e2e_model(path: Path, detections: np.ndarray) -> Path:
    """An end-to-end-style ONNX model: output 'detections' [M, 7] (constant), input ignored but required."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    const = helper.make_node("Constant", [], ["detections"], value=numpy_helper.from_array(detections, "d"))
    shape = helper.make_node("Shape", ["images"], ["unused"])
    graph = helper.make_graph([const, shape], "e2e",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [len(detections), 7]),
                               helper.make_tensor_value_info("unused", TensorProto.INT64, [4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_end_to_end_output_and_errors(tmp_path, capsys):
    rng = fresh_rng()
    m = 12
    xy = rng.uniform(-10, SIZE, (m, 2))
    dets = np.concatenate([np.zeros((m, 1)), xy, xy + rng.uniform(1, 40, (m, 2)), distinct_scores(rng, m)[:, None],
                           rng.integers(0, 3, (m, 1))], axis=1).astype(np.float32)
    bundle = write_bundle(tmp_path / "b", {"e2e": _e2e_model(tmp_path / "e2e.onnx", dets)}, class_names=CLASSES,
                          image_size=SIZE, score_threshold=0.3)
    # Not larger than the input: a constant model would give every tile the same boxes.
    h, w = int(rng.integers(20, SIZE + 1)), int(rng.integers(20, SIZE + 1))
    image = save_image(tmp_path / "im.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert infer.main([str(image), "--out", str(tmp_path / "o"), "--cpu"], bundle_dir=bundle) == 0
    got = json.loads((tmp_path / "o" / "predictions.json").read_text())[str(image)]["detections"]
    scale = SIZE / max(h, w)
    keep = dets[dets[:, 5] > 0.3]
    keep = keep[np.argsort(-keep[:, 5])]
    expected_rows = []
    for row in keep:  # clipped to the image; boxes left with no area (in the padding) are dropped
        box = [min(max(v, 0.0), SIZE) / scale for v in row[1:5]]
        box = [min(box[0], w), min(box[1], h), min(box[2], w), min(box[3], h)]
        if box[2] > box[0] and box[3] > box[1]:
            expected_rows.append((box, row))
    assert len(got) == len(expected_rows)
    for d, (expected, row) in zip(got, expected_rows):
        np.testing.assert_allclose(d["box"], expected, atol=0.006)
        assert d["label"] == CLASSES[int(row[6])] and d["score"] == pytest.approx(float(row[5]), abs=1e-4)
    capsys.readouterr()

    not_image = tmp_path / "notes.png"
    not_image.write_text("plain text")
    for argv, message in (([str(tmp_path / "nope.png")], "not found"),
                          ([str(not_image)], "cannot read image"),
                          ([str(image), "--model", "int4"], "neither in this bundle"),
                          ([str(image), "--model", str(tmp_path / "e2e.onnx.bak")], "neither in this bundle"),
                          ([str(image), "--score-threshold", "2"], "outside [0, 1]")):
        assert infer.main(argv + ["--out", str(tmp_path / "o2")], bundle_dir=bundle) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"junk")
    assert infer.main([str(image), "--model", str(garbage), "--out", str(tmp_path / "o2")], bundle_dir=bundle) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda c: c["postprocess"].pop("score_threshold"), "field postprocess.score_threshold is missing"),
    (lambda c: c["input"].update(size="640"), "field input.size is missing or not a int"),
    (lambda c: c.update(models={"fp32": {"file": "../../outside.onnx"}}), "must name a file inside the bundle"),
    (lambda c: c["input"].update(std=[0.2, 0.0, 0.2]), "std > 0"),
    (lambda c: c.update(models=[]), "field models is missing or not a dict"),
])
def test_infer_py_refuses_a_damaged_bundle_in_one_line(tmp_path, capsys, damage, needle):
    dets = np.zeros((1, 7), dtype=np.float32)
    bundle = write_bundle(tmp_path / "b", {"e2e": _e2e_model(tmp_path / "e2e.onnx", dets)}, class_names=CLASSES,
                          image_size=SIZE, score_threshold=0.3)
    config = json.loads((bundle / "preprocess.json").read_text())
    damage(config)
    (bundle / "preprocess.json").write_text(json.dumps(config))
    image = save_image(tmp_path / "im.png", np.zeros((20, 20, 3), dtype=np.uint8))
    assert infer.main([str(image), "--out", str(tmp_path / "o"), "--cpu"], bundle_dir=bundle) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_infer_py_labels_in_another_encoding_and_a_bad_image_among_good_ones(tmp_path, capsys):
    dets = np.array([[0, 1, 1, 5, 5, 0.9, 0]], dtype=np.float32)
    bundle = write_bundle(tmp_path / "b", {"e2e": _e2e_model(tmp_path / "e2e.onnx", dets)}, class_names=CLASSES,
                          image_size=SIZE, score_threshold=0.3)
    good = save_image(tmp_path / "a.png", np.zeros((20, 20, 3), dtype=np.uint8))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    assert infer.main([str(good), str(bad), "--out", str(tmp_path / "o"), "--cpu"], bundle_dir=bundle) == 2
    err = capsys.readouterr().err
    assert "1 of 2 images could not be read" in err and "Traceback" not in err
    assert list(json.loads((tmp_path / "o" / "predictions.json").read_text())) == [str(good)]
    (bundle / "labels.txt").write_bytes("Flugzeug\nSchiff\xff\n".encode("latin-1"))
    assert infer.main([str(good), "--out", str(tmp_path / "o3"), "--cpu"], bundle_dir=bundle) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "labels.txt" in err and err.count("\n") == 1, err
