"""Oriented boxes through the stages: train -> evaluate -> predict (images, GeoTIFF scenes)
-> export, and the metrics each report labels."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
import torch
from PIL import Image
from shapely.geometry import Polygon

from edgekit.engine.evaluate import detection_metrics
from edgekit.errors import EdgekitError
from edgekit.rotated import rbox_to_poly

OSBS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "neon_trees" / "val" / "images" / "OSBS_029.tif"
CLASSES = ["ship", "plane"]


def _target(rboxes, labels):
    from edgekit.rotated import rbox_to_box

    rboxes = torch.as_tensor(rboxes, dtype=torch.float64)
    return {"rboxes": rboxes, "boxes": rbox_to_box(rboxes), "labels": torch.as_tensor(labels),
            "difficult": torch.zeros(len(labels), dtype=torch.bool), "orig_size": (400, 400), "scale": 1.0}


def _random_rboxes(rng, n):
    return np.column_stack([rng.uniform(50, 350, (n, 2)), rng.uniform(20, 60, n), rng.uniform(4, 10, n),
                            rng.uniform(-math.pi / 2, math.pi / 2, n)])


def test_perfect_rotated_detections_score_one_by_every_definition(rng):
    rboxes = _random_rboxes(rng, 6)
    labels = rng.integers(0, 2, 6)
    target = _target(rboxes, labels)
    pred = {**target, "scores": torch.as_tensor(rng.uniform(0.3, 1, 6))}
    for oriented in (True, False):
        m = detection_metrics([target], [pred], CLASSES, oriented)
        assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
        assert m["dota_map50"] == pytest.approx(1.0)
        assert m["boxes"] == ("oriented" if oriented else "horizontal")
        assert set(m["definitions"]) == {"map", "map50", "dota_map50"}
    assert "polygon IoU" in detection_metrics([target], [pred], CLASSES, True)["definitions"]["dota_map50"]


def test_a_turned_box_is_a_miss_for_the_oriented_metric_only(rng):
    """A long thin box turned by 90 degrees about its centre: the polygon IoU is
    w h / (2 w h - h^2) ~ 0.1 (a miss); the horizontal metric scores the enclosing boxes."""
    box = np.array([[200.0, 200.0, 80.0, 8.0, 0.0]])
    turned = box.copy()
    turned[0, 4] = math.pi / 2
    target, pred = _target(box, [0]), {**_target(turned, [0]), "scores": torch.tensor([0.9])}
    iou = Polygon(rbox_to_poly(box)[0]).intersection(Polygon(rbox_to_poly(turned)[0])).area / (2 * 640 - 64)
    assert iou < 0.5
    assert detection_metrics([target], [pred], CLASSES, True)["dota_map50"] == 0.0
    assert detection_metrics([target], [pred], CLASSES, True)["map50"] == 0.0


def test_oriented_training_reports_rotated_metrics(tiny_obb_run):
    result, out = tiny_obb_run
    record = json.loads((out / "train.json").read_text())
    assert record["val"]["boxes"] == "oriented" and record["config"]["obb"] is True
    assert 0.0 <= record["val"]["map50"] <= 1.0 and record["val"]["dota_map50"] is not None
    from edgekit.engine.checkpoint import load

    assert load(result.checkpoint).model.obb


def test_evaluate_labels_its_definitions(tiny_obb_run, tiny_data, tmp_path):
    from edgekit.api import EvalConfig, evaluate

    result, _ = tiny_obb_run
    metrics = evaluate(result.checkpoint, tiny_data / "val", EvalConfig(progress=False), out=tmp_path / "m.json")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert metrics.boxes == saved["boxes"] == "oriented"
    assert "DOTA Task 1" in saved["definitions"]["dota_map50"] and "polygon IoU" in saved["definitions"]["map"]
    assert "DOTA mAP@.5" in metrics.table()


def test_predict_writes_rotated_boxes_polygons_and_dota_submission(tiny_obb_run, tiny_data, tmp_path):
    from edgekit.api import PredictConfig, predict

    result, _ = tiny_obb_run
    res = predict(result.checkpoint, tiny_data / "val" / "images",
                  PredictConfig(out=str(tmp_path / "p"), score_threshold=0.05, progress=False))
    rows = [d for r in json.loads((tmp_path / "p" / "predictions.json").read_text()).values() for d in r["detections"]]
    assert len(rows) == res.detections
    for row in rows[:50]:
        corners = rbox_to_poly(np.array(row["rbox"], dtype=np.float64)).reshape(-1)
        np.testing.assert_allclose(row["polygon"], corners, atol=0.02)
    files = sorted((tmp_path / "p" / "dota").iterdir())
    assert [f.name for f in files] == sorted(f"Task1_{c}.txt" for c in result.classes)
    lines = [line.split() for f in files for line in f.read_text().splitlines()]
    assert len(lines) == res.detections and all(len(parts) == 10 for parts in lines)
    assert len(list((tmp_path / "p").glob("*_pred.png"))) == 4


def test_oriented_export_has_rotated_outputs_and_refuses_onnx_nms(tiny_obb_run, tmp_path):
    from edgekit.api import ExportConfig, export
    from edgekit.export.to_onnx import read_metadata

    result, _ = tiny_obb_run
    exported = export(result.checkpoint, ExportConfig(out=str(tmp_path / "x"), form="training"))
    assert exported.parity["passed"] and list(exported.parity["outputs"]) == ["rboxes", "scores"]
    assert read_metadata(exported.target)["boxes"] == "oriented"
    from conftest import one_line_error

    message = one_line_error(export, result.checkpoint, ExportConfig(out=str(tmp_path / "y"), nms=True))
    assert "oriented" in message and not (tmp_path / "y").exists()


def test_bench_decodes_oriented_heads(tiny_obb_run):
    from edgekit.benchmarks.model_bench import decode_outputs
    from edgekit.engine.checkpoint import load

    model = load(tiny_obb_run[0].checkpoint).model.eval()
    with torch.no_grad():
        raw = model(torch.randn(2, 3, 128, 128))
    flat = [t for level in raw for t in level]
    rboxes, scores = decode_outputs(flat, model.strides)
    want, want_scores = model.decode(raw)
    assert rboxes.shape[-1] == 5 and torch.equal(rboxes, want) and torch.equal(scores, want_scores)


def _geotiff(path, image, crs=True):
    profile = {"driver": "GTiff", "width": image.shape[1], "height": image.shape[0], "count": 3, "dtype": "uint8"}
    if crs:
        profile.update(crs="EPSG:32617", transform=Affine(0.1, 0.0, 400000.0, 0.0, -0.1, 3290000.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.moveaxis(image, -1, 0))
    return path


def test_streamed_scene_gives_the_in_memory_detections(tiny_run, tmp_path, rng):
    """A GeoTIFF larger than a tile, read window by window, gives what detect_array gives on
    the decoded image; its GeoJSON lands at the raster's map coordinates."""
    from edgekit.api import PredictConfig, predict
    from edgekit.engine.checkpoint import load
    from edgekit.engine.detect import detect_array

    result, _ = tiny_run
    image = rng.integers(0, 256, (300, 350, 3), dtype=np.uint8)
    path = _geotiff(tmp_path / "scene.tif", image)
    res = predict(result.checkpoint, [path], PredictConfig(out=str(tmp_path / "p"), score_threshold=0.05,
                                                            progress=False))
    record = res.images[str(path)]
    want = detect_array(load(result.checkpoint).model, image, 128, score_threshold=0.05)
    got = np.array([d["box"] for d in record["detections"]]).reshape(-1, 4)
    np.testing.assert_allclose(got, want["boxes"].numpy().round(2), atol=0.011)
    features = json.loads(Path(record["geojson"]).read_text())["features"]
    assert len(features) == len(got)
    with rasterio.open(path) as ds:
        for feature, box in list(zip(features, got))[:100]:
            ring = np.array(feature["geometry"]["coordinates"][0])
            corners = np.array([ds.transform @ (x, y) for x, y in [(box[0], box[1]), (box[2], box[3])]])
            np.testing.assert_allclose([ring[:, 0].min(), ring[:, 1].max()], [corners[0][0], corners[0][1]],
                                       atol=0.002)
            np.testing.assert_allclose([ring[:, 0].max(), ring[:, 1].min()], [corners[1][0], corners[1][1]],
                                       atol=0.002)


def test_raster_without_crs_is_noted_once_and_written_in_pixels(tiny_run, tmp_path, rng):
    from edgekit.api import PredictConfig, predict

    path = _geotiff(tmp_path / "plain.tif", rng.integers(0, 256, (100, 120, 3), dtype=np.uint8), crs=False)
    res = predict(tiny_run[0].checkpoint, [path], PredictConfig(out=str(tmp_path / "p"), progress=False))
    assert len(res.notes) == 1 and "no CRS" in res.notes[0]
    assert "geojson" not in res.images[str(path)] and not list((tmp_path / "p").glob("*.geojson"))


@pytest.mark.skipif(not OSBS.exists(), reason="shared NEON data not present")
def test_real_geotiff_detections_land_in_utm(tiny_run, tmp_path):
    from edgekit.api import PredictConfig, predict

    res = predict(tiny_run[0].checkpoint, [OSBS], PredictConfig(out=str(tmp_path / "p"), score_threshold=0.0,
                                                                 progress=False))
    collection = json.loads(Path(res.images[str(OSBS)]["geojson"]).read_text())
    assert collection["crs"]["properties"]["name"].endswith("32617")
    with rasterio.open(OSBS) as ds:
        left, bottom, right, top = ds.bounds
    for feature in collection["features"]:
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert (left - 1e-6 <= ring[:, 0]).all() and (ring[:, 0] <= right + 1e-6).all()
        assert (bottom - 1e-6 <= ring[:, 1]).all() and (ring[:, 1] <= top + 1e-6).all()


def test_corrupt_geotiff_is_skipped_with_one_line(tiny_run, tmp_path):
    from edgekit.api import PredictConfig, predict

    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(EdgekitError, match="broken.tif"):
        predict(tiny_run[0].checkpoint, [bad], PredictConfig(out=str(tmp_path / "p"), progress=False))
    assert not (tmp_path / "p").exists()


DOTA_EXAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dota_example"


def _read_submission(folder: Path) -> dict:
    """DOTA Task 1 submission files read as the devkit reads them: per image, polygons, scores, classes."""
    per_image: dict = {}
    for path in folder.glob("Task1_*.txt"):
        name = path.stem.removeprefix("Task1_")
        for line in path.read_text().splitlines():
            image, score, *coords = line.split()
            entry = per_image.setdefault(image, {"polygons": [], "scores": [], "labels": []})
            entry["polygons"].append([float(v) for v in coords])
            entry["scores"].append(float(score))
            entry["labels"].append(name)
    return per_image


@pytest.mark.skipif(not (DOTA_EXAMPLE / "labelTxt" / "P0706.txt").exists(), reason="shared DOTA data not present")
def test_real_dota_scene_through_oriented_predict_and_the_devkit_metric(tiny_obb_run, tmp_path):
    """A real DOTA scene, tiled by predict; its Task 1 submission files, read back, score
    the same as the detections in predictions.json, and the ground truth written in the same
    format scores 1."""
    from edgekit.api import PredictConfig, predict
    from edgekit.data.dota import read_dota_labels
    from edgekit.engine.dota_metric import dota_task1_map
    from edgekit.engine.predict_outputs import write_dota_submission

    result, _ = tiny_obb_run
    image = DOTA_EXAMPLE / "images" / "P0706.png"
    truth = read_dota_labels(DOTA_EXAMPLE / "labelTxt" / "P0706.txt")
    classes = result.classes
    truth.objects = [o for o in truth.objects if o.label in classes]
    out = predict(result.checkpoint, [image], PredictConfig(out=str(tmp_path / "p"), score_threshold=0.05,
                                                              draw=False, progress=False))
    rows = out.images[str(image)]["detections"]
    in_memory = {"polygons": [r["polygon"] for r in rows], "scores": [r["score"] for r in rows],
                 "labels": [r["label"] for r in rows]}
    read_back = _read_submission(out.submission).get("P0706", {"polygons": [], "scores": [], "labels": []})
    assert len(read_back["scores"]) == len(rows)
    want = dota_task1_map([truth], [in_memory], classes)
    got = dota_task1_map([truth], [read_back], classes)
    assert got["map"] == pytest.approx(want["map"], abs=1e-3)

    lines = {}
    for o in truth.objects:
        lines.setdefault(o.label, []).append("P0706 1.0000 " + " ".join(f"{v:.1f}" for v in np.ravel(o.poly)))
    oracle = write_dota_submission(tmp_path / "oracle", lines, classes, oriented=True)
    assert dota_task1_map([truth], [_read_submission(oracle)["P0706"]], classes)["map"] == pytest.approx(1.0)
