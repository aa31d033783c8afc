"""Measured latency as the accuracy-control cost (``--max-drop-cost latency``): each layer
exported alone computes what it computes inside the model, is stored at the width asked,
the loop charges each move the table's latency difference (floored at 0), and the option
and its factory go together. No timing is asserted: only that the table was measured."""

import numpy as np
import pytest
import torch

from conftest import one_line_error
from edgekit.calibration import accuracy_bound as ab
from edgekit.calibration.accuracy_control import FLOAT
from edgekit.errors import EdgekitError
from edgekit.export import layer_latency as ll
from test_accuracy_control_stage import IMAGE, boxnet_case  # noqa: F401  (a fixture)


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def initializer_types(path) -> set:
    import onnx

    return {init.data_type for init in onnx.load(str(path)).graph.initializer}


def test_a_layer_alone_computes_what_it_does_in_the_model(tmp_path, fresh_torch_seed, rng):
    """A channels-last pointwise Linear becomes the deploy form's 1x1 Conv on NCHW; a conv stays itself."""
    import onnx

    height, width = (int(v) for v in rng.integers(3, 9, size=2))
    linear = torch.nn.Linear(int(rng.integers(4, 12)), int(rng.integers(4, 12)))
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, groups=1)
    cases = [(linear, (1, height, width, linear.in_features)), (conv, (1, 5, height, width))]
    for case, (module, shape) in enumerate(cases):
        x = torch.randn(shape)
        with torch.no_grad():
            want = module(x)
        if isinstance(module, torch.nn.Linear):
            want = want.permute(0, 3, 1, 2)
            x = x.permute(0, 3, 1, 2)
        folder = tmp_path / str(case)
        folder.mkdir()
        graphs = ll._graphs(folder, module, shape, {FLOAT: None}, {})
        assert tuple(ll._alone(module, shape)[1]) == tuple(x.shape)
        got = run_onnx(graphs[FLOAT], np.ascontiguousarray(x.numpy()))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
        assert {n.op_type for n in onnx.load(str(graphs[FLOAT])).graph.node} == {"Conv"}


def test_each_width_is_stored_as_the_deployed_file_stores_it(tmp_path, fresh_torch_seed):
    """4 bits: INT4 weights (no integer kernel in ORT); 8 bits: INT8; float: no quantized tensor."""
    from onnx import TensorProto

    from edgekit.calibration.ptq import calibrate

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)).eval()
    x = np.random.default_rng().standard_normal((1, 3, 16, 16)).astype(np.float32)
    spec = calibrate(model, [torch.from_numpy(x)], model_name=None, progress=False)  # ranges cover x
    entries = {w: None if w == FLOAT else ab.spec_for_bits(spec, model, {"0": w})["layers"]["0"] for w in (4, 8, FLOAT)}
    graphs = ll._graphs(tmp_path, model[0], (1, 3, 16, 16), entries, spec)
    assert TensorProto.INT4 in initializer_types(graphs[4]) and TensorProto.INT8 not in initializer_types(graphs[4])
    assert TensorProto.INT8 in initializer_types(graphs[8])
    assert initializer_types(graphs[FLOAT]) == {TensorProto.FLOAT}
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    scale = float(np.abs(want).max())
    for width, tolerance in ((8, 0.02), (4, 0.15)):  # near the float layer (outputs' percentile grid clips tails)
        assert np.abs(run_onnx(graphs[width], x) - want).mean() < tolerance * scale, width


def test_layer_inputs_records_every_call():
    from edgekit.models import create_model

    model = create_model("rsdet_atto", num_classes=3)
    shapes = ll.layer_inputs(model, 128, ["backbone.downsample_layers.0.0", "head.box_out"])
    assert shapes["backbone.downsample_layers.0.0"] == [(1, 3, 128, 128)]
    levels = len(model.strides)
    assert len(shapes["head.box_out"]) == levels and len(set(shapes["head.box_out"])) == levels  # one per level
    with pytest.raises(EdgekitError, match="does not have"):
        ll.layer_inputs(model, 128, ["head.nothing"])


def test_latency_cost_is_the_signed_difference_floored_at_zero(rng):
    table = {"a": {4: float(rng.uniform(2, 3)), 8: float(rng.uniform(1, 2)), FLOAT: float(rng.uniform(3, 4))}}
    cost = ll.latency_cost(table)
    assert cost("a", 4, 8) == 0.0  # faster at 8 bits: free
    assert cost("a", 8, FLOAT) == pytest.approx(table["a"][FLOAT] - table["a"][8])
    with pytest.raises(EdgekitError, match="no measurement of 'b'"):
        cost("b", 4, 8)


def test_the_loop_charges_each_move_its_measured_latency(boxnet_case):  # noqa: F811
    model, _, batches, spec = boxnet_case
    options = ab.BoundOptions(max_drop=0.0, max_drop_cost="latency", max_drop_candidates=2)
    _, record = ab.bound_spec(model, spec, batches, model.class_names, options, IMAGE,
                              layer_cost=ll.onnxruntime_latency)
    table = record["latency_seconds"]
    assert record["cost_unit"] == "latency" and set(table) == set(spec["layers"])
    assert all(set(row) == {"2", "8", FLOAT} and min(row.values()) > 0 for row in table.values())
    assert record["path"]
    for step in record["path"]:
        row = table[step["layer"]]
        assert step["cost"] == pytest.approx(max(0.0, row[str(step["bits_to"])] - row[str(step["bits_from"])]))
    with pytest.raises(EdgekitError, match="needs layer_cost"):
        ab.bound_spec(model, spec, batches, model.class_names, options, IMAGE)


def test_the_latency_factory_goes_with_its_option(tmp_path, tiny_data):
    from edgekit.calibration.pipeline import CalibrateConfig, QuantizeRecipe, calibrate_checkpoint, quantize_checkpoint

    needs = QuantizeRecipe(method="uniform", max_drop=1.0, max_drop_cost="latency", progress=False)
    assert "layer_cost" in one_line_error(quantize_checkpoint, "rsdet_atto", needs, data=tiny_data / "train",
                                          out=tmp_path / "q")
    plain = CalibrateConfig(max_drop=1.0, progress=False)
    assert "applies only with max_drop_cost" in one_line_error(
        calibrate_checkpoint, "rsdet_atto", tiny_data / "train", plain, out=tmp_path / "s.json",
        layer_cost=ll.onnxruntime_latency)
    assert "applies only with --max-drop" in one_line_error(CalibrateConfig, max_drop_cost="latency")
    assert not any(tmp_path.iterdir())
