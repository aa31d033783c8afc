"""The deployed metric of ``--max-drop-on onnxruntime``: an ONNX detector's mAP as ONNX Runtime
runs it, checked on graphs whose answer follows from COCO's definition (a box matching the
label at a known IoU scores the share of the 10 IoU thresholds it clears), the stage options
that go with it, and (slow) the measure of a spec against the file ``edgekit export`` writes."""

import numpy as np
import pytest

from conftest import one_line_error
from edgekit.calibration import accuracy_bound as ab
from edgekit.export.deployed_metric import OnnxRuntimeMeasure, onnx_map_points
from test_accuracy_control_stage import IMAGE, write_split

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def constant_detector(path, box) -> None:
    """An ONNX graph answering every image with one box of class 0, score 0.9 (it reads the image
    only through a zero-weighted mean, so it keeps a real input)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(box, np.float32).reshape(1, 1, 4), "box"),
             numpy_helper.from_array(np.full((1, 1, 1), 0.9, np.float32), "score"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("Reshape", ["nothing", "shape"], ["nothing3"]),
             helper.make_node("Add", ["box", "nothing3"], ["boxes"]),
             helper.make_node("Add", ["score", "nothing3"], ["scores"])]
    inits.append(numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"))
    graph = helper.make_graph(nodes, "constant", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                  ["batch", 3, IMAGE, IMAGE])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 1, 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def test_onnx_map_points_follows_the_definition(tmp_path, rng):
    label = [int(v) for v in (rng.integers(4, 14), rng.integers(4, 14), rng.integers(30, 50), rng.integers(30, 50))]
    batches = ab.validation_batches(write_split(tmp_path / "val", label, images=3), ["thing"], IMAGE, 3)
    for shift in (0.0, float(rng.uniform(1, 6)), 40.0):
        box = [label[0] + shift, label[1], label[2] + shift, label[3]]
        constant_detector(tmp_path / "m.onnx", box)
        cleared = float(np.mean(iou(box, label) >= THRESHOLDS - 1e-9))  # every image: one box, one label
        assert onnx_map_points(tmp_path / "m.onnx", batches, ["thing"]) == pytest.approx(100 * cleared, abs=1e-6), shift


def test_the_deployed_measure_goes_with_its_option(tmp_path, tiny_data):
    from edgekit.calibration.pipeline import CalibrateConfig, QuantizeRecipe, calibrate_checkpoint, quantize_checkpoint

    for config in (QuantizeRecipe, CalibrateConfig):
        assert "applies only with --max-drop" in one_line_error(config, max_drop_on="onnxruntime")
        assert "--max-drop-on" in one_line_error(config, max_drop=1.0, max_drop_on="tensorrt")
    needs = QuantizeRecipe(method="uniform", max_drop=1.0, max_drop_on="onnxruntime", progress=False)
    assert "deployed_measure" in one_line_error(quantize_checkpoint, "rsdet_atto", needs, data=tiny_data / "train",
                                                out=tmp_path / "q")
    plain = CalibrateConfig(max_drop=1.0, progress=False)
    assert "applies only with max_drop_on" in one_line_error(
        calibrate_checkpoint, "rsdet_atto", tiny_data / "train", plain, out=tmp_path / "s.json",
        deployed_measure=lambda *a: None)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_measure_scores_the_graph_that_export_writes(tmp_path, tiny_run, tiny_data):
    """A spec's deployed mAP equals ONNX Runtime's mAP of ``edgekit export --format
    onnx-mixed`` (default storage) of the same spec, on the same images."""
    from edgekit.calibration.pipeline import CalibrateConfig, calibrate_checkpoint
    from edgekit.engine.checkpoint import load
    from edgekit.export.pipeline import ExportConfig, export

    checkpoint = tiny_run[1] / "last.safetensors"
    loaded = load(checkpoint)
    spec = calibrate_checkpoint(checkpoint, tiny_data / "train", CalibrateConfig(batches=1, weight_bits=4,
                                                                                 progress=False)).spec
    batches = ab.validation_batches(tiny_data / "val", loaded.detector_classes(), loaded.image_size, 4)
    measure = OnnxRuntimeMeasure(loaded.model, loaded.image_size, batches, loaded.detector_classes())
    try:
        measured = measure(spec)
    finally:
        measure.close()
    assert not measure.float_graph.exists()
    result = export(checkpoint, ExportConfig(format="onnx-mixed", out=str(tmp_path / "x"),
                                             calibration=spec, parity=False))
    assert measured == pytest.approx(onnx_map_points(result.target, batches, loaded.detector_classes()), abs=1e-9)
