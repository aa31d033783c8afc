"""QDQ ONNX export against the torch fake-quant simulation, in ONNX Runtime.

Found on this CI machine (x86-64 AVX2, no VNNI) and tested below: ONNX Runtime's fused
integer Conv (QLinearConv) with 8-bit weights can saturate (u8 x s8 pairs summed in
int16, VPMADDUBSW), so its output departs from the QDQ graph's meaning by more than a
quantization step. The graph itself is exact (optimizations off: equal to fake-quant to
float rounding); with 7-bit weights ("reduce range", ORT's advice for such CPUs) the
fused integer kernels agree with fake-quant too.
"""

import copy
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.calibration.ptq import apply_fake_quant, calibrate
from edgekit.errors import EdgekitError
from edgekit.export.qdq import quantize_onnx
from edgekit.export.to_onnx import read_metadata


class ConvNet(nn.Module):
    """Plain conv stack the legacy exporter handles quickly; weights keep their names."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, groups=4)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def export_legacy(model, path, size=16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=False, opset_version=18,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}})
    return path


def run_ort(path, x, optimize=True, optimized_path=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture
def convnet(fresh_torch_seed, tmp_path):
    model = ConvNet().eval()
    return model, export_legacy(model, tmp_path / "fp32.onnx")


def assert_equals_fake_quant(got, expected, step, max_share):
    """``got`` (the graph's meaning) equals the fake-quant model to float rounding, except
    where float32 accumulation order (ORT vs torch) flips a rounding tie in some quantizer
    (about one run in a hundred): then at most ``max_share`` of the outputs move, each by
    at most ``step``. A wrong scale or zero point moves most outputs."""
    off = ~np.isclose(got, expected, rtol=1e-4, atol=1e-5)
    assert off.mean() <= max_share, f"{off.sum()} of {off.size} outputs differ"
    assert np.abs(got - expected).max() <= step + 1e-5


def last_layer_step(spec, model):
    """Output change when every input of the last layer moves by one quantization step."""
    a = spec["layers"]["fc"]["input"]
    return a["scale"] * model.fc.weight.detach().abs().sum(1).max().item()


@pytest.mark.parametrize("weight_bits, act_bits, conv_outputs", [
    (8, 8, False), (4, 8, False), (4, 4, False), (2, 8, False), (6, 6, False), (3, 5, False),
    (8, 8, True), (7, 6, True), (4, 4, True)])
def test_qdq_graph_equals_fake_quant(convnet, tmp_path, weight_bits, act_bits, conv_outputs):
    model, fp32 = convnet
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    spec = calibrate(model, batches, weight_bits=weight_bits, act_bits=act_bits, progress=False,
                     conv_outputs=conv_outputs)
    assert all(("output" in layer) == (conv_outputs and layer["type"] in ("Conv2d", "Linear"))
               for layer in spec["layers"].values())
    out = quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
        float_out = model(x).numpy()
    got = run_ort(out, x, optimize=False)
    assert_equals_fake_quant(got, expected, 2 * last_layer_step(spec, model), max_share=0.34)  # one sample of 3
    if weight_bits >= 6 and act_bits >= 6:  # close to float at 6 bits and up
        assert np.abs(got - float_out).max() <= 0.1 * np.abs(float_out).max() + 1e-6
    assert not np.array_equal(got, float_out)


@pytest.mark.parametrize("weight_bits, act_bits", [(8, 8), (2, 4)])
def test_onnx_reference_evaluator_agrees(convnet, tmp_path, weight_bits, act_bits):
    """The ONNX spec's own evaluator reads the graph (INT4 packing included) as ORT does."""
    from onnx.reference import ReferenceEvaluator

    model, fp32 = convnet
    spec = calibrate(model, [torch.randn(2, 3, 16, 16)], weight_bits=weight_bits, act_bits=act_bits, progress=False)
    out = quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    x = torch.randn(2, 3, 16, 16)
    reference = ReferenceEvaluator(str(out)).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
    assert_equals_fake_quant(reference, expected, 2 * last_layer_step(spec, model), max_share=0.5)  # one sample of 2


def test_int8_runs_integer_kernels_and_matches_fake_quant_with_reduced_range(convnet, tmp_path):
    model, fp32 = convnet
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    spec = calibrate(model, batches, weight_bits=7, progress=False)
    out = quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    x = torch.randn(3, 3, 16, 16)
    got = run_ort(out, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
    kernels = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert kernels & {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}, kernels
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
    assert np.abs(got - expected).max() <= 2 * last_layer_step(spec, model)


def test_quantized_conv_outputs_make_every_conv_an_integer_kernel(convnet, tmp_path):
    """ORT fuses DQ -> Conv -> Q only: with output entries no quantized conv stays float."""
    model, fp32 = convnet
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    x = torch.randn(3, 3, 16, 16)
    counts = {}
    for conv_outputs in (False, True):
        spec = calibrate(model, batches, weight_bits=7, progress=False, conv_outputs=conv_outputs)
        out = quantize_onnx(fp32, spec, tmp_path / f"q{conv_outputs}.onnx")
        got = run_ort(out, x, optimize=True, optimized_path=tmp_path / f"opt{conv_outputs}.onnx")
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"opt{conv_outputs}.onnx")).graph.node]
        counts[conv_outputs] = (ops.count("QLinearConv"), ops.count("Conv") + ops.count("FusedConv"))
        with torch.no_grad():
            expected = apply_fake_quant(model, spec)(x).numpy()
        assert np.abs(got - expected).max() <= 2 * last_layer_step(spec, model)
    assert counts[True] == (3, 0), counts
    assert counts[False][1] > 0, counts  # without them the last conv (feeding a mean) stays float


def test_bad_output_entry_is_reported(convnet, tmp_path):
    model, fp32 = convnet
    spec = calibrate(model, [torch.randn(1, 3, 16, 16)], progress=False, conv_outputs=True)
    spec["layers"]["conv2"]["output"]["zero_point"] = 999
    with pytest.raises(EdgekitError, match="conv2.*output.*zero_point"):
        quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_exporters_expanded_zero_bias_becomes_an_initializer(tmp_path):
    """dynamo writes a bias-free conv's bias as Expand(CastLike(0, x), [C]), which ORT cannot
    fold (CastLike reads a runtime tensor) and which blocks its QLinearConv fusion."""
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.export.qdq import fold_conv_biases

    rng = np.random.default_rng()
    c = int(rng.integers(2, 9))
    value = np.float32(rng.choice([0.0, rng.standard_normal()]))
    nodes = [helper.make_node("CastLike", ["zero", "X"], ["zero_cast"]),
             helper.make_node("Expand", ["zero_cast", "shape"], ["bias"]),
             helper.make_node("Conv", ["X", "w", "bias"], ["Y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(np.array(value), "zero"), numpy_helper.from_array(np.array([c]), "shape"),
             numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, c, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})[0]
    assert fold_conv_biases(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    assert {t.name for t in model.graph.initializer} == {"w", model.graph.node[0].input[2]}
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)  # another conv kernel: float rounding
    assert fold_conv_biases(model) == 0  # already an initializer


def layer_bytes(path, wname):
    """Stored bytes of one weight's integer initializer (INT4/INT8 or bit planes)."""
    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    init = inits.get(f"{wname}_quantized", inits.get(f"{wname}_bitplanes"))
    return len(init.raw_data)


def test_weight_storage_shrinks_with_the_bits(fresh_torch_seed, tmp_path):
    model = ConvNet(width=64).eval()
    fp32 = export_legacy(model, tmp_path / "fp32.onnx")
    counts = {p: m.weight.numel() for p, m in model.named_modules() if hasattr(m, "weight")}
    n_weights = sum(counts.values())
    batches = [torch.randn(1, 3, 16, 16)]
    sizes, conv2 = {}, {}
    for bits, storage in ((8, "native"), (4, "native"), (2, "native"), (2, "packed"), (5, "packed")):
        spec = calibrate(model, batches, weight_bits=bits, progress=False)
        path = quantize_onnx(fp32, spec, tmp_path / f"w{bits}{storage}.onnx", weight_storage=storage)
        sizes[bits, storage], conv2[bits, storage] = path.stat().st_size, layer_bytes(path, "conv2.weight")
        meta = read_metadata(path)  # the file says what it holds
        assert meta["precision"] == ("int8" if bits == 8 else "mixed") and meta["opset"] == "21"
        assert meta["weight_bits"] == {path: bits for path in spec["layers"]}
        want = f"bitplane{bits}" if storage == "packed" else "int8" if bits > 4 else "int4"
        assert meta["weight_storage"] == {path: want for path in spec["layers"]}
    fp32_size = fp32.stat().st_size
    # float32 -> int8 saves 3 bytes per weight, int8 -> int4 half a byte; natively 2 bits are INT4.
    assert fp32_size - sizes[8, "native"] == pytest.approx(3 * n_weights, rel=0.05)
    assert sizes[8, "native"] - sizes[4, "native"] == pytest.approx(n_weights / 2, rel=0.05)
    assert sizes[2, "native"] == sizes[4, "native"]
    # Bit planes: the big layer's bytes follow the bits (plus < 1 byte of padding per plane) ...
    n = counts["conv2"]
    assert conv2[4, "native"] == -(-n // 2) and conv2[2, "packed"] == 2 * -(-n // 8)
    assert conv2[2, "packed"] / conv2[4, "native"] == pytest.approx(2 / 4, rel=0.01)
    assert conv2[5, "packed"] / conv2[8, "native"] == pytest.approx(5 / 8, rel=0.01)
    # ... and so does the file, less the unpacking chains (a few hundred bytes per layer).
    saved = sum(-(-c // 2) - 2 * -(-c // 8) for c in counts.values())
    assert 0.6 * saved < sizes[4, "native"] - sizes[2, "packed"] < saved


def test_bitplane_storage_computes_what_native_storage_computes(convnet, tmp_path):
    """2-, 3- and 5-bit layers: the same codes and scales, so the same outputs, bit for bit
    (the graph's meaning: ORT unoptimized, and the ONNX reference evaluator)."""
    from onnx.reference import ReferenceEvaluator

    model, fp32 = convnet
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    spec = calibrate(model, batches, weight_bits=2, act_bits=8, progress=False)
    for path, bits in (("conv2", 3), ("conv3", 5), ("fc", 3)):
        spec["layers"][path] = calibrate(model, batches, weight_bits=bits, act_bits=8, progress=False,
                                         layers=[path])["layers"][path]
    packed = quantize_onnx(fp32, spec, tmp_path / "packed.onnx")
    native = quantize_onnx(fp32, spec, tmp_path / "native.onnx", weight_storage="native")
    assert read_metadata(packed)["weight_storage"] == {"conv1": "bitplane2", "conv2": "bitplane3",
                                                       "conv3": "bitplane5", "fc": "bitplane3"}
    ops = Counter(n.op_type for n in onnx.load(str(packed)).graph.node)
    native_ops = Counter(n.op_type for n in onnx.load(str(native)).graph.node)
    assert ops["BitShift"] == ops["ReduceSum"] == 4 and native_ops["BitShift"] == 0
    assert ops["DequantizeLinear"] == native_ops["DequantizeLinear"] and ops["Conv"] == native_ops["Conv"] == 3
    x = torch.randn(3, 3, 16, 16)
    got = run_ort(packed, x, optimize=False)
    np.testing.assert_array_equal(got, run_ort(native, x, optimize=False))
    reference = ReferenceEvaluator(str(packed)).run(None, {"images": x.numpy()})[0]
    np.testing.assert_array_equal(reference, ReferenceEvaluator(str(native)).run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
    for out in (got, reference):
        assert_equals_fake_quant(out, expected, 2 * last_layer_step(spec, model), max_share=0.34)
    with pytest.raises(EdgekitError, match="weight_storage='int2'.*packed, native"):
        quantize_onnx(fp32, spec, tmp_path / "bad.onnx", weight_storage="int2")


class ConvThenLinear(nn.Module):
    """Convs, then a channels-last Linear (a MatMul on a folded, transposed weight), as in ConvNeXt blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pw = nn.Linear(16, 24)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.pw(x.permute(0, 2, 3, 1)).mean((1, 2))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_orts_optimizer_folds_the_unpacking_and_keeps_integer_kernels(fresh_torch_seed, tmp_path, bits):
    """ORT folds the constant unpacking chain at session creation and fuses each layer into
    QLinearConv / MatMulIntegerToFloat, as with INT8 storage (INT4, the native storage of 2-
    to 4-bit weights, leaves ORT 1.32's convs in float: DequantizeLinear + Conv)."""
    model = ConvThenLinear().eval()
    fp32 = export_legacy(model, tmp_path / "fp32.onnx")
    spec = calibrate(model, [torch.randn(4, 3, 16, 16)], weight_bits=bits, progress=False, conv_outputs=True)
    x = torch.randn(2, 3, 16, 16)
    ops, outputs = {}, {}
    for storage in ("packed", "native"):
        out = quantize_onnx(fp32, spec, tmp_path / f"{storage}.onnx", model=model, weight_storage=storage)
        outputs[storage] = run_ort(out, x, optimize=True, optimized_path=tmp_path / f"opt_{storage}.onnx")
        ops[storage] = Counter(n.op_type for n in onnx.load(str(tmp_path / f"opt_{storage}.onnx")).graph.node)
    packed = ops["packed"]
    assert packed["QLinearConv"] == 2 and packed["MatMulIntegerToFloat"] == 1, packed
    assert not set(packed) & {"BitShift", "BitwiseAnd", "ReduceSum", "Conv", "FusedConv", "MatMul"}, packed
    if bits > 4:  # INT8 storage: the same kernels, hence the same outputs
        assert ops["native"] == packed
        np.testing.assert_array_equal(outputs["packed"], outputs["native"])
    else:
        assert ops["native"]["QLinearConv"] < packed["QLinearConv"]
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
    step = spec["layers"]["pw"]["input"]["scale"] * model.pw.weight.detach().abs().sum(1).max().item()
    assert np.abs(outputs["packed"] - expected).max() <= 2 * step


@pytest.mark.parametrize("signed", [False, True])
def test_activation_qdq_chain_is_exactly_fake_quantize(fresh_torch_seed, signed):
    """The Q (-> integer Clip) -> DQ chain of every activation width, alone, run by ONNX
    Runtime and by ONNX's reference evaluator: elementwise, so equal to fake_quantize to
    the bit, values far outside the grid and the grid's ends included."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from edgekit.calibration.spec import fake_quantize, qrange
    from edgekit.export.qdq import _QDQRewriter

    x = (torch.randn(4096) * 3).float()
    for bits in range(2, 9):
        qmin, qmax = qrange(bits, signed)
        scale, zero_point = float(torch.rand(()) * 0.2 + 0.01), int(torch.randint(qmin, qmax + 1, ()))
        edges = torch.tensor([(qmin - zero_point) * scale, (qmax - zero_point) * scale, -1e4, 1e4])
        xs = torch.cat([x, edges, edges + scale / 2, edges - scale / 2]).float()
        graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(xs)])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(xs)])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        aspec = {"bits": bits, "signed": signed, "scale": scale, "zero_point": zero_point, "observer": "minmax"}
        model.graph.node.extend(_QDQRewriter(model, None)._qdq("x", aspec, "a", out="y"))
        onnx.checker.check_model(model, full_check=True)
        expected = fake_quantize(xs, scale, zero_point, bits, signed).numpy()
        feed = {"x": xs.numpy()}
        got_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        got_ref = ReferenceEvaluator(model).run(None, feed)[0]
        np.testing.assert_array_equal(got_ort, expected, err_msg=f"ORT, {bits} bits")
        np.testing.assert_array_equal(got_ref, expected, err_msg=f"reference evaluator, {bits} bits")
        assert len(np.unique(expected)) <= 2 ** bits


@pytest.mark.parametrize("act_bits", [3, 4, 6])
def test_narrow_activation_grids_keep_integer_kernels(fresh_torch_seed, tmp_path, act_bits):
    """2-7-bit activations are an 8-bit Q, a Clip of the integers and a DQ: ORT still fuses
    every conv into QLinearConv (a UINT4 Q, or a float Clip after the DQ, left it in float)."""
    model = ConvThenLinear().eval()
    fp32 = export_legacy(model, tmp_path / "fp32.onnx")
    spec = calibrate(model, [torch.randn(4, 3, 16, 16)], weight_bits=4, act_bits=act_bits, progress=False,
                     conv_outputs=True)
    out = quantize_onnx(fp32, spec, tmp_path / "q.onnx", model=model)
    clips = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Clip"]
    assert clips and all(n.output[0].endswith("_clipped") for n in clips)
    x = torch.randn(2, 3, 16, 16)
    got = run_ort(out, x, optimize=True, optimized_path=tmp_path / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 2 and ops["MatMulIntegerToFloat"] == 1 and not ops["Conv"] + ops["FusedConv"], ops
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
    step = spec["layers"]["pw"]["input"]["scale"] * model.pw.weight.detach().abs().sum(1).max().item()
    assert np.abs(got - expected).max() <= 2 * step


def test_only_the_quantized_layers_data_edge_gets_qdq(convnet, tmp_path):
    model, fp32 = convnet
    spec = calibrate(model, [torch.randn(2, 3, 16, 16)], layers=["conv2"], progress=False, conv_outputs=False)
    out = onnx.load(str(quantize_onnx(fp32, spec, tmp_path / "q.onnx")))
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    conv2 = next(n for n in out.graph.node if n.op_type == "Conv" and n.input[1] == "conv2.weight")
    assert conv2.input[0] == "conv2.input_dequantized"
    dq = next(n for n in out.graph.node if n.output[0] == "conv2.weight")
    assert dq.op_type == "DequantizeLinear" and next(a.i for a in dq.attribute if a.name == "axis") == 0
    assert max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) >= 21


def test_a_module_called_twice_gets_qdq_on_every_call(fresh_torch_seed, tmp_path):
    """Like RSDet's head shared across pyramid levels: one weight, several Conv nodes."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            y = F.relu(self.stem(x))
            return self.head(y) + self.head(F.max_pool2d(y, 2).repeat_interleave(2, -1).repeat_interleave(2, -2))

    model = Shared().eval()
    fp32 = export_legacy(model, tmp_path / "fp32.onnx")
    spec = calibrate(model, [torch.randn(2, 3, 16, 16)], progress=False)
    out = quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    heads = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv" and n.input[1] == "head.weight"]
    assert len(heads) == 2 and all(n.input[0].startswith("head.input") for n in heads)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
    head = spec["layers"]["head"]  # a flip moves a head output (the sum of two) by an output step or two
    weight_sum = model.head.weight.detach().abs().sum((1, 2, 3)).max().item()
    step = 2 * (head["output"]["scale"] + head["input"]["scale"] * weight_sum)
    assert_equals_fake_quant(run_ort(out, x, optimize=False), expected, step, max_share=0.05)


def deform_conv_onnx(path, weight, batch: int):
    """A one-node graph: ONNX DeformConv (3x3, padding 1) on 6x6 inputs with weight 'dcn.weight'."""
    from onnx import TensorProto, helper, numpy_helper

    cout, cin = weight.shape[:2]
    node = helper.make_node("DeformConv", ["X", "dcn.weight", "offset"], ["Y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "dcn", [value("X", TensorProto.FLOAT, [batch, cin, 6, 6]),
                                              value("offset", TensorProto.FLOAT, [batch, 18, 6, 6])],
                              [value("Y", TensorProto.FLOAT, [batch, cout, 6, 6])],
                              [numpy_helper.from_array(weight.numpy(), "dcn.weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_deform_conv_node_gets_weight_dq_and_input_qdq(fresh_torch_seed, tmp_path):
    """ONNX DeformConv (weight is input 1, data input 0, offsets stay float)."""
    from edgekit.calibration.spec import fake_quantize
    from edgekit.models.deform import deform_conv2d_reference

    x, w, offset = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3), torch.randn(2, 18, 6, 6) * 0.7
    path = deform_conv_onnx(tmp_path / "dcn.onnx", w, batch=2)
    w_scale = (w.flatten(1).abs().amax(1) / 7).tolist()
    spec = {"format": "edgekit.quant-spec/1", "model": None, "source": "uniform", "layers": {"dcn": {
        "type": "DeformConv2d", "weight": {"bits": 4, "signed": True, "axis": 0, "scale": w_scale, "zero_point": [0] * 6},
        "input": {"bits": 8, "signed": True, "scale": 0.03, "zero_point": 2, "observer": "minmax"}}}}
    out = quantize_onnx(path, spec, tmp_path / "q.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": x.numpy(), "offset": offset.numpy()})[0]
    xq = fake_quantize(x, 0.03, 2, 8, True)
    wq = fake_quantize(w, w_scale, [0] * 6, 4, True, axis=0, narrow=True)
    expected = deform_conv2d_reference(xq.double(), offset.double(), wq.double(), padding=(1, 1)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_spec_layers_that_match_nothing_are_reported(convnet, tmp_path):
    model, fp32 = convnet
    spec = calibrate(model, [torch.randn(1, 3, 16, 16)], progress=False)
    spec["layers"]["head.conv9"] = spec["layers"]["conv1"]
    with pytest.raises(EdgekitError, match="head.conv9"):
        quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    del spec["layers"]["head.conv9"]
    spec["layers"]["conv1"]["weight"]["scale"] = spec["layers"]["conv1"]["weight"]["scale"][:3]
    spec["layers"]["conv1"]["weight"]["zero_point"] = [0] * 3
    with pytest.raises(EdgekitError, match="3 weight scales"):
        quantize_onnx(fp32, spec, tmp_path / "q.onnx")
    with pytest.raises(EdgekitError, match="not found"):
        quantize_onnx(tmp_path / "none.onnx", spec, tmp_path / "q.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgekitError, match="not a readable ONNX"):
        quantize_onnx(tmp_path / "bad.onnx", spec, tmp_path / "q.onnx")


def test_transposed_linear_weights_are_found_by_value(fresh_torch_seed, tmp_path):
    """A Linear on channels-last maps exports as MatMul with a folded, renamed W^T (axis 1)."""
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Linear(8, 12)

        def forward(self, x):
            return self.pw(x.permute(0, 2, 3, 1))

    model = ChannelsLast().eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 8, 4, 4),), str(path), dynamo=False, opset_version=18)
    proto = onnx.load(str(path))
    w = model.pw.weight.detach().numpy()
    for init in proto.graph.initializer:  # make the file look like the folded dynamo export
        if init.name == "pw.weight":
            init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), "val_7"))
    for node in proto.graph.node:
        node.input[:] = ["val_7" if i == "pw.weight" else i for i in node.input]
    onnx.save(proto, str(path))
    spec = calibrate(model, [torch.randn(2, 8, 4, 4)], progress=False)
    with pytest.raises(EdgekitError, match="pass the torch model"):
        quantize_onnx(path, spec, tmp_path / "q.onnx")
    out = quantize_onnx(path, spec, tmp_path / "q.onnx", model=model)
    # the module's output grid sits after the bias Add, where the torch Linear's output is
    nodes = onnx.load(str(out)).graph.node
    writer = {o: n for n in nodes for o in n.output}
    q = next(n for n in nodes if n.name == "pw.output_QuantizeLinear")
    assert writer[q.input[0]].op_type == "Add"
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        expected = apply_fake_quant(model, spec)(x).numpy()
    np.testing.assert_allclose(run_ort(out, x, optimize=False), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("conv_outputs", [False, True])
def test_rsdet_atto_qdq_matches_fake_quant(fresh_torch_seed, tmp_path, conv_outputs):
    """The detector through export_onnx (dynamo, DeformConv; its deploy form writes the blocks'
    Linear layers as 1x1 Convs, whose reshaped weights quantize_onnx folds) at 64 px; with
    conv outputs quantized ORT runs every quantized conv and Linear as an integer QLinearConv."""
    from edgekit.export.to_onnx import DetectorOutputs, export_onnx
    from edgekit.models import create_model

    model = create_model("rsdet_atto", num_classes=3, grn_backend="torch").eval()  # torch GRN runs float64
    for name, p in model.named_parameters():
        if "conv_offset" in name:
            nn.init.normal_(p, std=0.01)
    fp32 = export_onnx(model, tmp_path / "rsdet.onnx", image_size=64)
    spec = calibrate(model, [torch.randn(2, 3, 64, 64) for _ in range(2)], weight_bits=7, progress=False,
                     conv_outputs=conv_outputs)
    assert any(layer["type"] == "DeformConv2d" for layer in spec["layers"].values())
    out = quantize_onnx(fp32, spec, tmp_path / "rsdet_qdq.onnx", model=model)
    run_ort(out, torch.randn(1, 3, 64, 64), optimized_path=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    float_convs = ops.count("Conv") + ops.count("FusedConv")
    offset_convs = sum(1 for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"
                       and any("conv_offset" in i for i in n.input))  # excluded from quantization
    linears = sum(1 for layer in spec["layers"].values() if layer["type"] == "Linear")
    assert linears > 0 and ops.count("MatMulIntegerToFloat") == 0 and "MatMul" not in ops  # no Linear left as such
    if conv_outputs:
        # the Linear layers' 1x1 convs have no output grid yet, so they stay float convs
        assert float_convs == offset_convs + linears and ops.count("QLinearConv") > 4 * offset_convs, Counter(ops)
    else:
        assert ops.count("QLinearConv") < float_convs, Counter(ops)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        simulate = DetectorOutputs(apply_fake_quant(model, spec))
        expected = simulate(x)[0].numpy()
        # ~50 quantized layers deep, float32 vs float64 arithmetic already flips rounding ties
        # somewhere (the untrained model amplifies them): the spread between two correct
        # simulations is the floor that any runtime can be held to.
        floor = np.abs(simulate.double()(x.double())[0].numpy() - expected).mean()
        float_err = np.abs(DetectorOutputs(model)(x)[0].numpy() - expected).mean()
    for optimize in (False, True):
        err = np.abs(run_ort(out, x, optimize=optimize) - expected).mean()
        print(f"optimize={optimize}: mean |ORT - fake-quant| {err:.4g}, float32/64 floor {floor:.4g}, "
              f"|float - fake-quant| {float_err:.4g}")
        assert err <= 3 * floor + 0.01 * float_err and err < float_err


def test_int8_precision_takes_reduced_range_weights_only():
    from edgekit.export.qdq import spec_precision

    def spec(weight_bits, act_bits):
        act = {"bits": act_bits, "signed": False, "scale": 0.1, "zero_point": 0, "observer": "minmax"}
        return {"layers": {"a": {"weight": {"bits": weight_bits}, "input": act}}}

    assert spec_precision(spec(8, 8)) == spec_precision(spec(7, 8)) == "int8"  # 7: int8 on CPUs without VNNI
    assert spec_precision(spec(6, 8)) == spec_precision(spec(8, 4)) == "mixed"


class DirectFeedNet(nn.Module):
    """conv1 feeds conv2 directly and a residual add; conv3 feeds conv4 directly; conv2's
    output reaches conv3 only through a ReLU; conv4 feeds a mean."""

    def __init__(self, width: int = 16, in_place: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, groups=4)
        self.conv4 = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, 10)
        self.in_place = in_place

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(a) + a
        c = self.conv3(F.relu(b))
        if self.in_place:
            c.mul_(0.5)  # the same object reaches conv4, but not the same values
        return self.fc(self.conv4(c).mean((2, 3)))


def searched_input_grids(model, batches, act_bits=8):
    """A spec whose input grids were not observed on these tensors (as a bit search's are):
    minmax grids widened by 10%."""
    spec = calibrate(model, batches, weight_bits=7, act_bits=act_bits, progress=False, conv_outputs=False)
    for layer in spec["layers"].values():
        layer["input"]["scale"] *= 1.1
    return spec


def test_a_conv_feeding_a_quantized_layer_takes_its_input_grid(fresh_torch_seed, tmp_path):
    """Two grids on one tensor leave Q -> DQ -> Q -> DQ in the graph, which ORT cannot fold:
    the producer's output grid must be the reader's input grid, and ORT then runs fewer
    conversions, with the graph still computing what the fake-quant model computes."""
    from edgekit.calibration.ptq import calibrate_conv_outputs

    model = DirectFeedNet().eval()
    fp32 = export_legacy(model, tmp_path / "fp32.onnx")
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    spec = searched_input_grids(model, batches)
    out = calibrate_conv_outputs(model, spec, batches, observer="minmax", bits=8)
    layers = out["layers"]
    assert layers["conv1"]["output"] == spec["layers"]["conv2"]["input"]
    assert layers["conv3"]["output"] == spec["layers"]["conv4"]["input"]
    for path, reader in (("conv2", "conv3"), ("conv4", "fc")):  # no direct reader: an observed grid
        assert layers[path]["output"]["scale"] != spec["layers"][reader]["input"]["scale"]
    # the same spec with independently observed grids on the two direct edges
    observed = calibrate(model, batches, weight_bits=7, progress=False, conv_outputs=True)
    separate = copy.deepcopy(out)
    for path in ("conv1", "conv3"):
        separate["layers"][path]["output"] = observed["layers"][path]["output"]
    x = torch.randn(3, 3, 16, 16)
    conversions = {}
    for name, s in (("shared", out), ("separate", separate)):
        q = quantize_onnx(fp32, s, tmp_path / f"{name}.onnx")
        got = run_ort(q, x, optimize=True, optimized_path=tmp_path / f"{name}_opt.onnx")
        ops = Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}_opt.onnx")).graph.node)
        conversions[name] = ops["QuantizeLinear"] + ops["DequantizeLinear"]
        with torch.no_grad():
            expected = apply_fake_quant(model, s)(x).numpy()
        assert np.abs(got - expected).max() <= 2 * last_layer_step(s, model)
    assert conversions["shared"] < conversions["separate"], conversions


def test_a_direct_reader_on_a_narrower_grid_or_after_an_in_place_change_shares_nothing(fresh_torch_seed):
    """A 4-bit reader keeps the producer's output at 8 bits (the residual reads it too), and a
    tensor changed in place between producer and reader is not the producer's output."""
    from edgekit.calibration.ptq import calibrate_conv_outputs

    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    model = DirectFeedNet().eval()
    spec = searched_input_grids(model, batches)
    spec["layers"]["conv2"]["input"].update(bits=4, zero_point=0)  # 0 is on every 4-bit grid
    out = calibrate_conv_outputs(model, spec, batches, observer="minmax", bits=8)
    assert out["layers"]["conv1"]["output"]["bits"] == 8
    assert out["layers"]["conv1"]["output"]["scale"] != spec["layers"]["conv2"]["input"]["scale"]
    assert out["layers"]["conv3"]["output"] == spec["layers"]["conv4"]["input"]
    in_place = DirectFeedNet(in_place=True).eval()
    in_place.load_state_dict(model.state_dict())
    spec = searched_input_grids(in_place, batches)
    out = calibrate_conv_outputs(in_place, spec, batches, observer="minmax", bits=8)
    assert out["layers"]["conv3"]["output"]["scale"] != spec["layers"]["conv4"]["input"]["scale"]
    assert out["layers"]["conv1"]["output"] == spec["layers"]["conv2"]["input"]
