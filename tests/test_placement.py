"""The placement report (export/placement.py) against what ONNX Runtime actually fuses."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_qdq import ConvNet, deform_conv_onnx, export_legacy

from edgekit.calibration.ptq import calibrate
from edgekit.export.placement import _FUSABLE_WITH_QDQ, _float_other_reason, optimized_graph, placement_report
from edgekit.export.qdq import quantize_onnx

SHAPE = [1, 4, 8, 8]


def qdq_unit(op: str, tmp_path, inputs: int = 1, attrs: dict | None = None, constants: dict | None = None,
             condition: bool = False):
    """DQ (each input) -> op -> Q: the node unit ORT's QDQ transformer looks for."""
    scale, zero = np.random.uniform(0.005, 0.05), np.random.randint(0, 256)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zero, np.uint8), "z")]
    inits += [numpy_helper.from_array(np.asarray(v), k) for k, v in (constants or {}).items()]
    graph_inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.UINT8, SHAPE) for i in range(inputs)]
    nodes = [helper.make_node("DequantizeLinear", [f"x{i}", "s", "z"], [f"d{i}"]) for i in range(inputs)]
    args = [f"d{i}" for i in range(inputs)] + list(constants or {})
    if condition:
        graph_inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, SHAPE))
        args = ["c"] + args
    nodes += [helper.make_node(op, args, ["y"], **(attrs or {})),
              helper.make_node("QuantizeLinear", ["y", "s", "z"], ["q"])]
    graph = helper.make_graph(nodes, op, graph_inputs, [helper.make_tensor_value_info("q", TensorProto.UINT8, None)],
                              inits)
    path = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


FUSABLE_UNITS = {"Add": {"inputs": 2}, "Mul": {"inputs": 2}, "Concat": {"inputs": 2, "attrs": {"axis": 1}},
                 "Where": {"inputs": 2, "condition": True}, "Softmax": {"attrs": {"axis": 1}},
                 "AveragePool": {"attrs": {"kernel_shape": [2, 2]}}}


@pytest.mark.parametrize("op", sorted(_FUSABLE_WITH_QDQ))
def test_every_op_the_report_calls_fusable_is_fused_by_onnxruntime(op, tmp_path):
    ops = [n.op_type for n in optimized_graph(qdq_unit(op, tmp_path, **FUSABLE_UNITS.get(op, {}))).node]
    assert ops == [_FUSABLE_WITH_QDQ[op]], ops


FLOAT_ONLY_UNITS = {  # the detector's float element-wise ops: the report says ORT has no integer kernel
    "Gelu": {}, "Exp": {}, "Sqrt": {}, "Div": {"inputs": 2}, "Sub": {"inputs": 2},
    "ReduceL2": {"constants": {"axes": np.array([2, 3], np.int64)}},
    "LayerNormalization": {"attrs": {"axis": -1}, "constants": {"ln_scale": np.ones(8, np.float32)}},
    "InstanceNormalization": {"constants": {"in_scale": np.ones(4, np.float32), "in_bias": np.zeros(4, np.float32)}},
}


@pytest.mark.parametrize("op", sorted(FLOAT_ONLY_UNITS))
def test_ops_the_report_calls_float_only_stay_float_in_onnxruntime(op, tmp_path):
    ops = [n.op_type for n in optimized_graph(qdq_unit(op, tmp_path, **FLOAT_ONLY_UNITS[op])).node]
    assert op in ops and not any(o.startswith("QLinear") for o in ops), ops
    assert "no integer kernel" in _float_other_reason(op)


@pytest.fixture
def calibrated(fresh_torch_seed, tmp_path):
    model = ConvNet().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    return export_legacy(model, tmp_path / "fp32.onnx"), calibrate(model, batches, weight_bits=7, progress=False,
                                                                   conv_outputs=True)


def test_each_conv_is_named_with_its_kernel_and_the_reason_it_stays_float(calibrated, tmp_path):
    fp32, spec = calibrated
    report = placement_report(quantize_onnx(fp32, spec, tmp_path / "q.onnx"), spec)
    assert {k: v["kernel"] for k, v in report["integer"].items() if k.startswith("conv")} == {
        "conv1": "QLinearConv", "conv2": "QLinearConv", "conv3": "QLinearConv"}, report
    assert report["summary"]["conversion_nodes"] > 0 and "Relu" not in report["integer"]

    worse = copy.deepcopy(spec)
    worse["layers"]["conv2"]["output"] = None       # no output grid: DQ + float Conv
    worse["layers"]["conv1"]["input"] = None        # weight-only
    del worse["layers"]["conv3"]                    # float by choice
    report = placement_report(quantize_onnx(fp32, worse, tmp_path / "worse.onnx"), worse)
    floats = report["float_compute"]
    assert set(report["integer"]).isdisjoint({"conv1", "conv2", "conv3"}), report["integer"]
    assert "no output grid" in floats["conv2"]["why"] and "no input grid" in floats["conv1"]["why"]
    assert "not in the quant spec" in floats["conv3"]["why"]
    assert all(floats[k]["calls"] == 1 for k in ("conv1", "conv2", "conv3"))
    blind = placement_report(tmp_path / "worse.onnx")  # no spec: the report does not guess the reason
    assert all(blind["float_compute"][k]["why"].startswith("float (no quant spec given") for k in ("conv1", "conv3"))


def test_a_quantized_deform_conv_is_reported_float_with_its_reason(fresh_torch_seed, tmp_path):
    w = torch.randn(6, 4, 3, 3)
    path = deform_conv_onnx(tmp_path / "dcn.onnx", w, batch=1)
    scale = (w.flatten(1).abs().amax(1) / 127).tolist()
    grid = {"bits": 8, "signed": False, "scale": 0.03, "zero_point": 128, "observer": "minmax"}
    spec = {"format": "edgekit.quant-spec/1", "model": None, "source": "uniform", "layers": {"dcn": {
        "type": "DeformConv2d", "weight": {"bits": 8, "signed": True, "axis": 0, "scale": scale, "zero_point": [0] * 6},
        "input": grid, "output": grid}}}
    report = placement_report(quantize_onnx(path, spec, tmp_path / "q.onnx"), spec)
    assert report["integer"] == {} and report["float_compute"]["dcn"]["kernel"] == "DeformConv"
    assert "no integer DeformConv kernel" in report["float_compute"]["dcn"]["why"]


def test_openvino_report_names_the_layers_its_cpu_plugin_runs_in_u8(calibrated, tmp_path):
    pytest.importorskip("openvino")
    from edgekit.export.openvino import convert
    from edgekit.export.placement import openvino_placement_report

    fp32, spec = calibrated
    del spec["layers"]["conv3"]  # float by choice: the plugin keeps it f32
    qdq = quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    report = openvino_placement_report(convert(qdq, tmp_path / "q.xml", "int8"), qdq, spec)
    assert {k: v["kernel"] for k, v in report["integer"].items() if k.startswith("conv")} == {
        "conv1": "Convolution (u8)", "conv2": "Convolution (u8)"}, report
    assert report["float_compute"]["conv3"]["kernel"].endswith("(f32)")
    assert "not in the quant spec" in report["float_compute"]["conv3"]["why"]


def test_a_graph_onnxruntime_cannot_load_is_one_line(tmp_path):
    from edgekit.errors import EdgekitError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EdgekitError) as err:
        placement_report(bad)
    assert "cannot load it for the placement report" in str(err.value) and "\n" not in str(err.value)
