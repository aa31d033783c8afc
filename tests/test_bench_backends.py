"""Backend runners: the same outputs through eager and ONNX Runtime, precision labels, and
every unavailable backend reported as skipped/failed with a reason instead of raising."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from edgekit.benchmarks.backends import (BACKENDS, Runner, Skipped, flatten_outputs, make_runner, onnx_precision)


class TwoHeads(nn.Module):
    """Nested outputs like a detector's: ([a, b], c)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(4, 3, 1, stride=2)
        self.c = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return [self.a(y), self.b(y)], self.c(y)


def export(model, path, batch_dynamic=True):
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, 16, 16),), str(path), input_names=["images"], opset_version=17,
                      dynamic_axes={"images": {0: "batch"}} if batch_dynamic else None, dynamo=False)
    return path


def test_flatten_outputs_is_depth_first():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert [t.item() for t in flatten_outputs(([a, b], c))] == [0.0, 1.0, 2.0]
    assert [t.item() for t in flatten_outputs(a)] == [0.0]


def test_eager_and_onnxruntime_agree(tmp_path, fresh_torch_seed):
    model = TwoHeads().eval()
    path = export(model, tmp_path / "m.onnx")
    x = torch.randn(int(torch.randint(1, 4, ())), 3, 16, 16)
    eager = make_runner("eager", model=model)
    onnxrt = make_runner("ort", onnx_path=path, threads=1)
    assert isinstance(eager, Runner) and isinstance(onnxrt, Runner)
    assert onnxrt.session_ms > 0 and onnxrt.precision == "fp32" and "fp32" in onnxrt.format
    with torch.no_grad():
        ref = flatten_outputs(model(x))
    for got in (eager(x), onnxrt(x)):
        assert len(got) == len(ref) == 3
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_static_batch_is_reported(tmp_path):
    path = export(TwoHeads(), tmp_path / "static.onnx", batch_dynamic=False)
    assert make_runner("ort", onnx_path=path).fixed_batch == 1


def _qdq_model(quantize_second: bool) -> onnx.ModelProto:
    """Two 1x1 convs; the first weight goes through DequantizeLinear, the second optionally."""
    w = helper.make_tensor("w", TensorProto.INT8, [1, 1, 1, 1], [3])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    z = helper.make_tensor("z", TensorProto.INT8, [], [0])
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [1, 1, 1, 1], [0.5])
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"]), helper.make_node("Conv", ["x", "wf"], ["y"])]
    inits = [w, s, z, w2]
    if quantize_second:
        inits.append(helper.make_tensor("w2q", TensorProto.INT8, [1, 1, 1, 1], [5]))
        nodes += [helper.make_node("DequantizeLinear", ["w2q", "s", "z"], ["w2f"]),
                  helper.make_node("Conv", ["y", "w2f"], ["out"])]
    else:
        nodes.append(helper.make_node("Conv", ["y", "w2"], ["out"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_precision_labels(tmp_path):
    export(TwoHeads(), tmp_path / "f.onnx")
    assert onnx_precision(tmp_path / "f.onnx") == "fp32"
    for quantize_second, want in ((True, "int8-qdq"), (False, "mixed")):
        p = tmp_path / f"q{want}.onnx"
        onnx.save(_qdq_model(quantize_second), str(p))
        assert onnx_precision(p) == want
        r = make_runner("ort", onnx_path=p)
        assert isinstance(r, Runner) and r.precision == want
        x = torch.rand(1, 1, 2, 2)
        second = 0.5  # the second weight is 0.5 either way: float, or int8 5 x scale 0.1
        np.testing.assert_allclose(r(x)[0].numpy(), x.numpy() * 0.3 * second, rtol=1e-6)


def _graph(nodes, inits, opset=19):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _linear_and_deform(float_matmul: bool) -> onnx.ModelProto:
    """A Linear whose weight reaches MatMul through DequantizeLinear -> Transpose, and a
    DeformConv (quantized weight) whose offsets come from a float conv, as exports have them."""
    s, z = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])
    inits = [s, z, helper.make_tensor("lin_q", TensorProto.INT8, [2, 2], [1, 2, 3, 4]),
             helper.make_tensor("dw_q", TensorProto.INT8, [1, 1, 1, 1], [3]),
             helper.make_tensor("off_w", TensorProto.FLOAT, [2, 1, 1, 1], [0.0, 0.0])]
    nodes = [helper.make_node("DequantizeLinear", ["dw_q", "s", "z"], ["dw"]),
             helper.make_node("Conv", ["x", "off_w"], ["off"]),
             helper.make_node("DeformConv", ["x", "dw", "off"], ["d"], kernel_shape=[1, 1])]
    if float_matmul:
        inits.append(helper.make_tensor("lin_f", TensorProto.FLOAT, [2, 2], [0.1, 0.2, 0.3, 0.4]))
        nodes.append(helper.make_node("Transpose", ["lin_f"], ["lin_t"], perm=[1, 0]))
    else:
        nodes += [helper.make_node("DequantizeLinear", ["lin_q", "s", "z"], ["lin_f"]),
                  helper.make_node("Transpose", ["lin_f"], ["lin_t"], perm=[1, 0])]
    nodes.append(helper.make_node("MatMul", ["d", "lin_t"], ["out"]))
    return _graph(nodes, inits)


def test_precision_follows_pass_through_ops_and_ignores_offset_convs(tmp_path):
    for float_matmul, want in ((False, "int8-qdq"), (True, "mixed")):
        p = tmp_path / f"lin{float_matmul}.onnx"
        onnx.save(_linear_and_deform(float_matmul), str(p))
        assert onnx_precision(p) == want


def test_precision_prefers_the_export_metadata(tmp_path):
    from edgekit.export.to_onnx import set_metadata

    for export_format, want in (("onnx-int8", "int8-qdq"), ("onnx-mixed", "mixed")):
        for graph_quantized in (True, False):  # the graph alone would say int8-qdq / mixed
            m = _qdq_model(graph_quantized)
            set_metadata(m, {"export_format": export_format})
            p = tmp_path / f"{export_format}{graph_quantized}.onnx"
            onnx.save(m, str(p))
            assert onnx_precision(p) == want
    m = _qdq_model(True)  # quantize_onnx's record of bit widths below 8: mixed precision
    set_metadata(m, {"quant_source": "ghost", "precision": "mixed"})
    onnx.save(m, str(tmp_path / "low.onnx"))
    assert onnx_precision(tmp_path / "low.onnx") == "mixed"


def test_unavailable_backends_are_skipped_not_raised(tmp_path):
    path = export(TwoHeads(), tmp_path / "m.onnx")
    providers = ort.get_available_providers()
    for backend in ("ort-cuda", "ort-trt"):
        r = make_runner(backend, onnx_path=path)
        if isinstance(r, Runner):
            continue  # this machine has it
        assert r.status == "skipped" and "ExecutionProvider" in r.reason
    if not torch.cuda.is_available():
        for backend, kwargs in (("cuda-graph", {"model": TwoHeads(), "example": torch.zeros(1, 3, 16, 16)}),
                                ("eager-cuda", {"model": TwoHeads()}),
                                ("tensorrt", {"onnx_path": tmp_path / "x.engine"})):
            r = make_runner(backend, **kwargs)
            assert isinstance(r, Skipped) and r.status == "skipped" and r.reason, (backend, providers)


@pytest.mark.parametrize("backend,kwargs,status", [
    ("eager", {}, "skipped"),                                # no torch model (an .onnx was given)
    ("ort", {"model": TwoHeads()}, "skipped"),               # no .onnx file
    ("ort", {"onnx_path": "/nonexistent/m.onnx"}, "failed"),
    ("no-such-backend", {}, "failed"),
])
def test_missing_inputs_give_one_line_reasons(backend, kwargs, status):
    r = make_runner(backend, **kwargs)
    assert isinstance(r, Skipped) and r.status == status
    assert r.reason and "\n" not in r.reason
    assert r.format == BACKENDS.get(backend, backend)


def test_a_corrupt_onnx_file_is_a_failed_row(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    r = make_runner("ort", onnx_path=bad)
    assert isinstance(r, Skipped) and r.status == "failed" and "\n" not in r.reason


@pytest.mark.slow
def test_compiled_runner_matches_eager_and_releases_the_export_routing(fresh_torch_seed):
    """Slow: Inductor compiles for tens of seconds on a 2-core machine."""
    from edgekit.kernels import dispatch

    model = TwoHeads().eval()
    before = dispatch.resolve
    r = make_runner("compile", model=model)
    assert isinstance(r, Runner), getattr(r, "reason", "")
    try:
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            ref = flatten_outputs(model(x))
        for g, want in zip(r(x), ref):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
    finally:
        r.close()
    assert dispatch.resolve is before
