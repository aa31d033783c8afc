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


def run_onnx(path, *arrays, optimized: bool = True) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:  # Q/DQ run as written, no fused integer kernels: the simulation's arithmetic
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {f"input{i}": a for i, a in enumerate(arrays)})[0]


def initializer_types(path) -> set:
    import onnx

    return {init.data_type for init in onnx.load(str(path)).graph.initializer}


def test_a_layer_alone_computes_what_it_does_in_the_model(tmp_path, fresh_torch_seed, rng):
    """A Linear (channels-last, or on tokens) becomes a 1x1 Conv on (1, C, rows, 1); a conv and a
    plain deformable conv (offset and mask as inputs) stay themselves; a packed deformable conv
    is exported in its deploy form (sliced offsets and mask: no sequence ops)."""
    import onnx

    from edgekit.models.deform import DeformConv2d, DeformConv2dPack

    height, width = (int(v) for v in rng.integers(3, 9, size=2))
    linear = torch.nn.Linear(int(rng.integers(4, 12)), int(rng.integers(4, 12)))
    deform = DeformConv2d(4, 6, 3, padding=1)
    cases = [(linear, ((1, height, width, linear.in_features),)),
             (linear, ((1, height * width, linear.in_features),)),
             (torch.nn.Conv2d(5, 7, 3, padding=1), ((1, 5, height, width),)),
             (deform, ((1, 4, height, width), (1, 18, height, width), (1, 9, height, width))),
             (DeformConv2dPack(4, 6, 3, padding=1), ((1, 4, height, width),))]
    for case, (module, shapes) in enumerate(cases):
        makers = (torch.randn, lambda shape: torch.rand(shape) * 2 - 1, torch.rand)  # image, offsets, mask
        inputs = [make(shape) for make, shape in zip(makers, shapes)]
        with torch.no_grad():
            want = module(*inputs)
        if isinstance(module, torch.nn.Linear):  # the same numbers, laid out as the 1x1 Conv's output
            want = want.reshape(1, -1, linear.out_features).permute(0, 2, 1)[..., None]
            inputs = [inputs[0].reshape(1, -1, linear.in_features).permute(0, 2, 1)[..., None]]
        folder = tmp_path / str(case)
        folder.mkdir()
        graphs, input_shapes = ll._graphs(folder, module, shapes, {FLOAT: None}, {})
        assert input_shapes == tuple(tuple(t.shape) for t in inputs)
        got = run_onnx(graphs[FLOAT], *(np.ascontiguousarray(t.numpy()) for t in inputs))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4, err_msg=str(case))
        ops = {node.op_type for node in onnx.load(str(graphs[FLOAT])).graph.node}
        assert not ops & {"SplitToSequence", "SequenceAt", "ConcatFromSequence"}, (case, ops)


def test_each_width_is_stored_and_computed_as_the_spec_says(tmp_path, fresh_torch_seed, rng):
    """Export's default storage: 4 bits as bit planes, 8 bits as INT8; float: no quantized
    tensor; each quantized graph, run without fusion, computes the spec's fake quantization."""
    from onnx import TensorProto

    from edgekit.calibration.ptq import apply_fake_quant, calibrate
    from edgekit.export.to_onnx import read_metadata

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)).eval()
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    spec = calibrate(model, [torch.from_numpy(x)], model_name=None, progress=False)  # ranges cover x
    specs = {w: ab.spec_for_bits(spec, model, {"0": w}) for w in (4, 8)}
    entries = {FLOAT: None, **{w: s["layers"]["0"] for w, s in specs.items()}}
    graphs, _ = ll._graphs(tmp_path, model[0], ((1, 3, 16, 16),), entries, spec)
    assert read_metadata(graphs[4])["weight_storage"] == {"layer": "bitplane4"}
    assert read_metadata(graphs[8])["weight_storage"] == {"layer": "int8"}
    assert TensorProto.INT8 in initializer_types(graphs[8])
    assert initializer_types(graphs[FLOAT]) == {TensorProto.FLOAT}
    for width, width_spec in specs.items():
        with torch.no_grad():
            want = apply_fake_quant(model, width_spec)(torch.from_numpy(x)).numpy()
        step = float(width_spec["layers"]["0"]["output"]["scale"])  # the output grid's step: one rounding apart
        got = run_onnx(graphs[width], x, optimized=False)
        assert np.abs(got - want).max() <= step * 1.01, width


def test_layer_inputs_records_every_call():
    from edgekit.models import create_model

    model = create_model("rsdet_atto", num_classes=3).train()
    shapes = ll.layer_inputs(model, 128, ["backbone.downsample_layers.0.0", "head.box_out"])
    assert model.training  # its mode is restored
    assert shapes["backbone.downsample_layers.0.0"] == [((1, 3, 128, 128),)]
    levels = len(model.strides)
    assert len(shapes["head.box_out"]) == levels and len(set(shapes["head.box_out"])) == levels  # one per level
    with pytest.raises(EdgekitError, match="does not have"):
        ll.layer_inputs(model, 128, ["head.nothing"])


class SharedTwice(torch.nn.Module):
    """One conv run at two sizes, as a detection head shared across pyramid levels."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Conv2d(3, 4, 1)

    def forward(self, images):
        return self.shared(images).mean() + self.shared(images[..., ::2, ::2]).mean()


def test_a_shared_layer_costs_the_sum_of_its_calls(monkeypatch, fresh_torch_seed, rng):
    """Each call is timed at its own input shape and the table adds them up, time and spread."""
    from edgekit.calibration.ptq import calibrate

    model = SharedTwice().eval()
    spec = calibrate(model, [torch.randn(1, 3, 16, 16)], model_name=None, progress=False)
    per_pixel, spread_per_pixel = float(rng.uniform(1e-6, 1e-5)), float(rng.uniform(1e-8, 1e-7))

    def fake_timing(paths, shapes, threads):
        pixels = shapes[0][2] * shapes[0][3]
        return {w: (per_pixel * pixels * (2 if w == FLOAT else 1), spread_per_pixel * pixels) for w in paths}

    monkeypatch.setattr(ll, "_time_interleaved", fake_timing)
    table, noise = ll.latency_table(model, spec, 16, {"shared": (8, FLOAT)})
    pixels = 16 * 16 + 8 * 8
    assert table["shared"][8] == pytest.approx(per_pixel * pixels)
    assert table["shared"][FLOAT] == pytest.approx(2 * per_pixel * pixels)
    assert noise["shared"] == pytest.approx(spread_per_pixel * pixels)


def test_timing_gives_each_width_a_median(tmp_path, fresh_torch_seed):
    from edgekit.calibration.ptq import calibrate

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)).eval()
    spec = calibrate(model, [torch.randn(1, 3, 8, 8)], model_name=None, progress=False)
    graphs, shapes = ll._graphs(tmp_path, model[0], ((1, 3, 8, 8),), {FLOAT: None, 8: spec["layers"]["0"]}, spec)
    times = ll._time_interleaved(graphs, shapes, threads=1)
    assert set(times) == {FLOAT, 8} and all(0 < t < 1 and 0 <= spread < t for t, spread in times.values())


def test_latency_cost_is_the_added_time_beyond_the_noise(rng):
    table = {"a": {4: float(rng.uniform(2, 3)), 8: float(rng.uniform(1, 2)), FLOAT: float(rng.uniform(3, 4))}}
    cost = ll.latency_cost(table)
    assert cost("a", 4, 8) == 0.0  # faster at 8 bits: free
    assert cost("a", 8, FLOAT) == pytest.approx(table["a"][FLOAT] - table["a"][8])
    added = table["a"][FLOAT] - table["a"][8]
    assert ll.latency_cost(table, {"a": added / ll.NOISE_FACTOR * 1.01})("a", 8, FLOAT) == 0.0  # within the noise
    assert ll.latency_cost(table, {"a": added / ll.NOISE_FACTOR * 0.99})("a", 8, FLOAT) == pytest.approx(added)
    with pytest.raises(EdgekitError, match="no measurement of 'b'"):
        cost("b", 4, 8)


def test_the_loop_charges_each_move_its_measured_latency(boxnet_case, monkeypatch):  # noqa: F811
    """Timing replaced by a fixed time per weight storage read from each graph (bit planes
    slow, INT8 fast, float between) and a spread of 0.1 s or, every other layer, 0.6 s: the
    table, every step's cost, the zero floor and the noise rule handed on by the factory
    (+1 s within 2 x 0.6 s is free) follow."""
    import itertools

    from edgekit.export.to_onnx import read_metadata

    def storage_seconds(path) -> float:
        storage = read_metadata(path).get("weight_storage", {}).get("layer")
        return {"bitplane2": 3.0, "int8": 1.0, None: 2.0}[storage]

    layers_timed = itertools.count()

    def fake_timing(paths, shapes, threads):
        spread = 0.6 if next(layers_timed) % 2 else 0.1
        return {w: (storage_seconds(p), spread) for w, p in paths.items()}

    monkeypatch.setattr(ll, "_time_interleaved", fake_timing)
    model, _, batches, spec = boxnet_case
    options = ab.BoundOptions(max_drop=0.0, max_drop_cost="latency", max_drop_candidates=2)
    _, record = ab.bound_spec(model, spec, batches, model.class_names, options, IMAGE,
                              layer_cost=ll.onnxruntime_latency)
    table = record["latency"]["seconds"]
    assert record["cost_unit"] == "latency" and set(table) == set(spec["layers"])
    assert all(row == {"2": 3.0, "8": 1.0, FLOAT: 2.0} for row in table.values())
    noise = record["latency"]["noise"]
    assert set(noise) == set(spec["layers"]) and set(noise.values()) == {0.1, 0.6}
    assert record["path"]
    for step in record["path"]:  # 2 -> 8 is faster: free; 8 -> float: +1 s, free within a spread of 0.6 s
        assert step["cost"] == (0.0 if step["bits_to"] == 8 or noise[step["layer"]] == 0.6 else 1.0)
    # The loop's path here ends at 8 bits; the factory's cost function itself shows the noise rule on 8 -> float.
    cost, measured = ll.onnxruntime_latency(model, spec, IMAGE, {path: (8, FLOAT) for path in spec["layers"]})
    for path in spec["layers"]:
        assert cost(path, 8, FLOAT) == (0.0 if measured["noise"][path] == 0.6 else 1.0)
    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before the options were checked")

    monkeypatch.setattr(ab, "map_points", no_evaluation)  # a mismatch is refused before any work
    with pytest.raises(EdgekitError, match="needs layer_cost"):
        ab.bound_spec(model, spec, batches, model.class_names, options, IMAGE)
    with pytest.raises(EdgekitError, match="applies only with max_drop_cost"):
        ab.bound_spec(model, spec, batches, model.class_names, ab.BoundOptions(max_drop=0.0), IMAGE,
                      layer_cost=ll.onnxruntime_latency)


def test_the_latency_factory_goes_with_its_option(tmp_path, tiny_data):
    from edgekit.calibration.pipeline import CalibrateConfig, QuantizeRecipe, calibrate_checkpoint, quantize_checkpoint

    needs = QuantizeRecipe(method="uniform", max_drop=1.0, max_drop_cost="latency", progress=False)
    assert "layer_cost" in one_line_error(quantize_checkpoint, "rsdet_atto", needs, data=tiny_data / "train",
                                          out=tmp_path / "q")
    bops = QuantizeRecipe(method="uniform", max_drop=1.0, progress=False)
    assert "applies only with max_drop_cost" in one_line_error(quantize_checkpoint, "rsdet_atto", bops,
                                                               data=tiny_data / "train", out=tmp_path / "q",
                                                               layer_cost=ll.onnxruntime_latency)
    plain = CalibrateConfig(max_drop=1.0, progress=False)
    assert "applies only with max_drop_cost" in one_line_error(
        calibrate_checkpoint, "rsdet_atto", tiny_data / "train", plain, out=tmp_path / "s.json",
        layer_cost=ll.onnxruntime_latency)
    assert "applies only with --max-drop" in one_line_error(CalibrateConfig, max_drop_cost="latency")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_quantize_cli_with_the_latency_cost_records_the_table(tmp_path, tiny_run, tiny_data, capsys, monkeypatch):
    """The command line hands the latency factory in: every quantized layer of the written
    spec's record has its seconds per width (timing replaced, the exports are real)."""
    import json

    from edgekit.cli import main

    monkeypatch.setattr(ll, "_time_interleaved", lambda paths, shapes, threads: {w: (1e-3, 0.0) for w in paths})
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_run[1] / "last.safetensors"), "--method", "uniform", "--weight-bits", "4",
                 "--data", str(tiny_data / "train"), "--max-drop", "100", "--max-drop-cost", "latency",
                 "--max-drop-images", "4", "--calib-batches", "1", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0, text
    record = json.loads((out / "search.json").read_text())["accuracy_control"]
    assert record["cost_unit"] == "latency" and "timing" in text and "measured" in text
    quantized = {p for p, b in record["bits"].items() if b != FLOAT}
    assert quantized and set(record["latency"]["seconds"]) >= quantized
    assert all(set(record["latency"]["seconds"][p]) >= {"4", "8", FLOAT} for p in quantized
               if record["bits"][p] == 4)
