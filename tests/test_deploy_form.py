"""The deploy form (export/deploy_form.py) and its graph passes (export/graph_passes.py).

- Layer level, float64: the deploy GRN, block and deformable pack against the training
  modules and the GRN reference (and float16 GRN inputs whose sums of squares overflow
  float16 against float64).
- Model level: rsdet_atto and convnextv2_atto in deploy form against the training form in
  torch (fp32 parity tolerance of export/parity.py; float64 for the identity itself), and
  exported graphs in ONNX Runtime against the training-form torch model (check_parity),
  with an op-type census: no CastLike/Expand/SequenceAt/SplitToSequence, no Shape feeding
  a Reshape, one Gelu per block, every Transpose next to a LayerNormalization, every torch
  parameter an initializer of its own name and shape. The full models are slow tests
  (each export takes tens of seconds); a small ConvNeXt V2 runs by default.
- Passes: small hand-written graphs, run in ONNX Runtime before and after.

Weights and inputs are random each run (seeds printed); the zero-initialised GRN and
offset parameters are made non-zero so that they do real work.
"""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edgekit.errors import EdgekitError
from edgekit.export import graph_passes, onnx_checks
from edgekit.export.deform_export import export_backends
from edgekit.export.deploy_form import (DeployBlock, DeployDeformConv2dPack, deployed_layers, grn_channels_first,
                                        to_deploy_form)
from edgekit.export.parity import TOLERANCES, check_parity, compare_arrays
from edgekit.export.to_onnx import DetectorOutputs, export_onnx, read_metadata
from edgekit.models import create_model
from edgekit.models.convnextv2 import Block, ConvNeXtV2
from edgekit.models.deform import DeformConv2dPack
from edgekit.models.grn import grn_reference

FP32 = TOLERANCES["fp32"]
REMOVED_OPS = ("CastLike", "Expand", "SequenceAt", "SplitToSequence", "MatMul", "Erf")


def _wake_up(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random GRN gamma/beta, offset predictors and LayerNorm affines (all start at 0 or 1)."""
    for name, p in model.named_parameters():
        if name.endswith(("grn.gamma", "grn.beta")):
            p.data = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5
        elif "conv_offset" in name:
            p.data = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05
        elif ".norm." in name or name.startswith("norm."):
            p.data = p.data + torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2


def _outputs(model, images) -> list[np.ndarray]:
    """Float64 numpy outputs; GRN and deformable convolution through the pure-PyTorch references."""
    net = DetectorOutputs(model) if hasattr(model, "strides") else model
    with torch.no_grad(), export_backends("native"):
        out = net(images)
    return [t.double().numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]


# ------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (1, 3, 1, 1), (3, 40, 16, 16)])
def test_grn_channels_first_is_the_reference_grn(fresh_torch_seed, shape):
    x = torch.randn(shape, dtype=torch.float64) * 3
    x[0, 0] = 0.0  # a dead channel: its norm is 0, so its output is beta
    gamma, beta = (torch.randn(1, 1, 1, shape[1], dtype=torch.float64) for _ in range(2))
    want = grn_reference(x.permute(0, 2, 3, 1), gamma, beta, 1e-6, "channels_last").permute(0, 3, 1, 2)
    got = grn_channels_first(x, gamma, beta, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_grn_channels_first_reduces_float16_in_float32(fresh_torch_seed):
    """Per-channel sums of squares far beyond float16's 65504: still finite and close to float64."""
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64) * 60
    gamma, beta = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert float((x * x).sum(dim=(2, 3)).min()) > 10 * 65504
    got = grn_channels_first(x.half(), gamma.float(), beta.float(), 1e-6)
    want = grn_reference(x, gamma, beta, 1e-6, "channels_first")
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


@pytest.mark.parametrize("dim", [8, 40])
def test_deploy_block_computes_the_training_block(fresh_torch_seed, dim):
    block = Block(dim, grn_backend="torch").double().eval()
    _wake_up(block, torch.Generator().manual_seed(fresh_torch_seed))
    deployed = to_deploy_form(block)
    assert type(deployed) is DeployBlock and type(block) is Block
    x = torch.randn(2, dim, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(deployed(x), block(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("modulated, offset_groups", [(True, 1), (True, 2), (False, 1)])
def test_deploy_deform_pack_slices_what_chunk_and_cat_give(fresh_torch_seed, modulated, offset_groups):
    layer = DeformConv2dPack(8, 6, 3, padding=1, offset_groups=offset_groups, modulated=modulated,
                             backend="torch").double().eval()
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    torch.nn.init.normal_(layer.conv_offset.bias, std=0.5)
    deployed = to_deploy_form(layer)
    assert type(deployed) is DeployDeformConv2dPack
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    # Equal to the last bit: the same numbers reach the same kernel.
    assert torch.equal(deployed(x), layer(x))


def test_to_deploy_form_keeps_every_parameter_and_leaves_the_model_alone(fresh_torch_seed):
    class MyBlock(Block):  # a user's subclass may have its own forward: not swapped
        pass

    model = create_model("rsdet_atto", num_classes=3).eval()
    model.backbone.stages[0][1] = MyBlock(40)
    deployed = to_deploy_form(model)
    assert [(n, p.shape) for n, p in deployed.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(deployed.parameters(), model.parameters()))
    assert not any(isinstance(m, (DeployBlock, DeployDeformConv2dPack)) for m in model.modules())
    assert type(deployed.backbone.stages[0][1]) is MyBlock
    assert deployed_layers(model) == {"Block": 2 + 6 + 2 + 1, "DeformConv2dPack": 2}


# -------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["rsdet_atto", "convnextv2_atto"])
def test_deploy_model_matches_training_model_in_torch(fresh_torch_seed, name):
    """float32 deploy vs float32 training within the fp32 parity tolerance; in float64 the two
    forms agree to rounding (the rewrite is an identity, not an approximation)."""
    model = create_model(name).eval()
    _wake_up(model, torch.Generator().manual_seed(fresh_torch_seed))
    deployed = to_deploy_form(model)
    images = torch.randn(2, 3, 64, 64)
    for want, got in zip(_outputs(model, images), _outputs(deployed, images)):
        report = compare_arrays(want, got, FP32)
        assert report["passed"], report
    if name.startswith("convnextv2"):  # float64 rsdet convolutions take tens of seconds on 2 cores
        for want, got in zip(_outputs(model.double(), images.double()), _outputs(deployed.double(), images.double())):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * float(np.abs(want).max()))


def _census(proto, model) -> Counter:
    """The deploy graph's op types, after asserting what the deploy form promises."""
    ops = onnx_checks.op_types(proto)
    for op in REMOVED_OPS:
        assert ops[op] == 0, f"{op} left: {dict(ops)}"
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers = onnx_checks_consumers(proto)
    for node in proto.graph.node:
        if node.op_type == "Reshape":
            assert producers.get(node.input[1]) is None or producers[node.input[1]].op_type != "Shape"
        if node.op_type == "Transpose":
            # Left: the LayerNorms' own layout change (ORT folds it into its NCHWc reorders) and
            # permutes of reshaped tensors (the detector's level flattening, decomposed DCN offsets).
            before, after = producers.get(node.input[0]), consumers.get(node.output[0], [])
            near = {n.op_type for n in [before, *after] if n is not None}
            reshaped = before is not None and before.op_type == "Reshape"
            assert "LayerNormalization" in near or reshaped, f"{node.name} between {near}"
            assert "Transpose" not in near, f"{node.name}: a Transpose pair"
    blocks = sum(isinstance(m, Block) for m in model.modules())
    assert ops["Gelu"] == blocks and ops["ReduceL2"] == blocks
    norms = sum(type(m).__name__ == "LayerNorm" or isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert ops["LayerNormalization"] == norms
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert ops["Conv"] >= convs + 2 * blocks  # the pointwise Linear layers are 1x1 Conv nodes
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    for name, p in model.named_parameters():
        assert inits.get(name) == tuple(p.shape), f"{name} missing or reshaped"
    return ops


def onnx_checks_consumers(proto) -> dict:
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def test_small_convnext_exports_a_deploy_graph_with_parity(fresh_torch_seed, tmp_path):
    model = ConvNeXtV2(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5).eval()
    _wake_up(model, torch.Generator().manual_seed(fresh_torch_seed))
    path = export_onnx(model, tmp_path / "deploy.onnx", image_size=64)
    proto = onnx.load(str(path))
    _census(proto, model)
    meta = read_metadata(proto)
    assert meta["form"] == "deploy" and meta["opset"] == 20 and meta["simplified"].startswith("yes")
    assert meta["deployed_layers"] == {"Block": 5}
    assert set(meta["graph_passes"]) == {"constants_to_initializers", "castlike_resolved",
                                         "batch_reshapes_made_constant", "dead_nodes_removed"}
    for batch in (1, 3):
        check_parity(model, path, [torch.randn(batch, 3, 64, 64).numpy()], "fp32")


@pytest.mark.parametrize("kwargs, fragment", [({"form": "fast"}, "form"), ({"form": "Deploy"}, "form")])
def test_bad_form_is_a_one_line_error_and_writes_nothing(tmp_path, kwargs, fragment):
    model = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5).eval()
    with pytest.raises(EdgekitError) as info:
        export_onnx(model, tmp_path / "x.onnx", image_size=64, **kwargs)
    assert "\n" not in str(info.value) and fragment in str(info.value) and "deploy, training" in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name, deform", [("rsdet_atto", "native"), ("rsdet_atto", "decompose"),
                                          ("convnextv2_atto", "native")])
def test_full_model_deploy_graph_matches_the_training_model(fresh_torch_seed, tmp_path, name, deform):
    model = create_model(name).eval()
    _wake_up(model, torch.Generator().manual_seed(fresh_torch_seed))
    path = export_onnx(model, tmp_path / "deploy.onnx", image_size=64, deform=deform)
    proto = onnx.load(str(path))
    ops = _census(proto, model)
    if name.startswith("rsdet"):
        assert ops["DeformConv"] == (6 if deform == "native" else 0)
        assert ops["Shape"] == ops["Resize"]  # only the FPN's upsampling sizes (N, C of a runtime tensor)
    else:
        assert ops["Shape"] == 0
    for batch in (1, 3):
        check_parity(model, path, [torch.randn(batch, 3, 64, 64).numpy()], "fp32")


@pytest.mark.slow
def test_training_form_is_still_written_on_request(fresh_torch_seed, tmp_path):
    model = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5).eval()
    path = export_onnx(model, tmp_path / "training.onnx", image_size=64, form="training", opset=19)
    proto = onnx.load(str(path))
    ops = onnx_checks.op_types(proto)
    assert ops["MatMul"] == 2 * 4 and ops["Erf"] == 4 and ops["Gelu"] == 0
    assert read_metadata(proto)["form"] == "training" and "graph_passes" not in read_metadata(proto)
    check_parity(model, path, [torch.randn(2, 3, 64, 64).numpy()], "fp32")


# -------------------------------------------------------------------------------- passes


def _model(nodes, inputs, outputs, inits=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, feeds):
    """The graph's meaning (ONNX's reference evaluator): ORT's fusions round float16 differently."""
    return ReferenceEvaluator(model).run(None, feeds)


def test_resolve_castlike_drops_same_type_casts_and_makes_the_rest_casts(rng):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT16, ["batch", 4])
    half = helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 4])
    inits = [numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "cf"),
             numpy_helper.from_array(rng.standard_normal(4), "cd")]  # float64
    nodes = [helper.make_node("CastLike", ["cf", "x"], ["a"]),          # float -> float: dropped
             helper.make_node("CastLike", ["cd", "x"], ["b"]),          # double -> float: Cast
             helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Mul", ["x", "ab"], ["y"]),
             helper.make_node("CastLike", ["cf", "h"], ["c"]),          # float -> float16: Cast
             helper.make_node("Add", ["h", "c"], ["z"])]
    model = _model(nodes, [x, half], [y, z], inits)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32), "h": rng.standard_normal((3, 4)).astype(np.float16)}
    want = _run(model, feeds)
    assert graph_passes.resolve_castlike(model) == 3
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["CastLike"] == 0 and ops["Cast"] == 2
    for w, g in zip(want, _run(model, feeds)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def _groupnorm_like(x_shape):
    """Reshape(x, [0, 2, -1]) -> Relu -> Reshape(., Shape(x)): a GroupNorm's reshape pair."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)
    nodes = [helper.make_node("Reshape", ["x", "groups"], ["g"]),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("Shape", ["x"], ["shape"], start=0),
             helper.make_node("Reshape", ["r", "shape"], ["y"])]
    return _model(nodes, [x], [y], [numpy_helper.from_array(np.array([0, 2, -1], np.int64), "groups")])


def test_constant_batch_reshapes_remove_the_runtime_shape(rng):
    model = _groupnorm_like(["batch", 8, 4, 3])
    feeds = [{"x": rng.standard_normal((b, 8, 4, 3)).astype(np.float32)} for b in (1, 3)]
    want = [_run(model, f)[0] for f in feeds]
    assert graph_passes.constant_batch_reshapes(model) == 1
    assert graph_passes.prune_dead_nodes(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert "Shape" not in {n.op_type for n in model.graph.node}
    for f, w in zip(feeds, want):
        np.testing.assert_array_equal(_run(model, f)[0], w)


@pytest.mark.parametrize("x_shape", [["batch", 8, "height", 3], [None, 8, 4, 3]])
def test_constant_batch_reshapes_leave_unknown_shapes_alone(x_shape):
    model = _groupnorm_like(x_shape)
    assert graph_passes.constant_batch_reshapes(model) == 0
    assert "Shape" in {n.op_type for n in model.graph.node}


def test_constants_become_initializers_of_the_onnx_type(rng):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])
    value = rng.standard_normal((2, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["f"], value_float=0.25),
             helper.make_node("Constant", [], ["shape"], value_ints=[3, 2]),
             helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(value)),
             helper.make_node("Mul", ["x", "f"], ["a"]),
             helper.make_node("Add", ["a", "t"], ["b"]),
             helper.make_node("Reshape", ["b", "shape"], ["y"])]
    model = _model(nodes, [x], [y])
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32)}
    want = _run(model, feeds)[0]
    assert graph_passes.constants_to_initializers(model) == 3
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["f"].data_type == TensorProto.FLOAT and list(inits["f"].dims) == []
    assert inits["shape"].data_type == TensorProto.INT64
    np.testing.assert_array_equal(numpy_helper.to_array(inits["t"]), value)
    np.testing.assert_array_equal(_run(model, feeds)[0], want)


def test_prune_dead_nodes_keeps_what_outputs_need():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Mul", ["x", "unused_w"], ["dead1"]),
             helper.make_node("Neg", ["dead1"], ["dead2"])]
    model = _model(nodes, [x], [y], [numpy_helper.from_array(np.ones(2, np.float32), "unused_w")])
    assert graph_passes.prune_dead_nodes(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Relu"] and not model.graph.initializer


def _pointwise_graph(rng, shape, second_reader=False):
    """y = Conv(x, Reshape(w [4, 3], shape)) (+ w itself as an output's input when ``second_reader``)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 5, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 5, 6])
    outputs, nodes = [y], [helper.make_node("Reshape", ["pw.weight", "shape"], ["w4"]),
                           helper.make_node("Conv", ["x", "w4", "pw.bias"], ["y"])]
    if second_reader:
        nodes.append(helper.make_node("Neg", ["pw.weight"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 3]))
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "pw.weight"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "pw.bias"),
             numpy_helper.from_array(np.array(shape, np.int64), "shape")]
    return _model(nodes, [x], outputs, inits)


def test_fold_weight_reshapes_gives_the_conv_its_weight_under_its_own_name(rng):
    model = _pointwise_graph(rng, [4, 3, 1, 1])
    feeds = {"x": rng.standard_normal((2, 3, 5, 6)).astype(np.float32)}
    want = _run(model, feeds)[0]
    assert graph_passes.fold_weight_reshapes(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv"] and model.graph.node[0].input[1] == "pw.weight"
    assert {i.name: list(i.dims) for i in model.graph.initializer} == {"pw.weight": [4, 3, 1, 1], "pw.bias": [4]}
    np.testing.assert_array_equal(_run(model, feeds)[0], want)


@pytest.mark.parametrize("shape, second_reader", [([4, 3, 1, 1], True), ([0, 3, 1, 1], False), ([4, -1, 1, 1], False)])
def test_fold_weight_reshapes_leaves_shared_weights_and_onnx_only_dims_alone(rng, shape, second_reader):
    model = _pointwise_graph(rng, shape, second_reader)
    assert graph_passes.fold_weight_reshapes(model) == 0
    assert [n.op_type for n in model.graph.node][:2] == ["Reshape", "Conv"]


def test_quantized_deploy_graph_with_folded_reshapes_feeds_each_conv_its_weight_dq(fresh_torch_seed, tmp_path):
    """quantize_onnx on a folded deploy graph: every pointwise Conv reads its weight's
    DequantizeLinear directly (what ORT fuses), and the graph means what the unfolded one does."""
    from edgekit.calibration.ptq import calibrate
    from edgekit.export.qdq import quantize_onnx

    model = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5).eval()
    _wake_up(model, torch.Generator().manual_seed(fresh_torch_seed))
    fp32 = export_onnx(model, tmp_path / "deploy.onnx", image_size=64)
    folded = onnx.load(str(fp32))
    assert graph_passes.fold_weight_reshapes(folded) == 2 * 4
    onnx.save(folded, str(tmp_path / "folded.onnx"))
    spec = calibrate(model, [torch.randn(2, 3, 64, 64)], weight_bits=7, progress=False)
    plain = onnx.load(str(quantize_onnx(fp32, spec, tmp_path / "q.onnx", model=model)))
    ours = onnx.load(str(quantize_onnx(tmp_path / "folded.onnx", spec, tmp_path / "qf.onnx", model=model)))
    producers = {o: n for n in ours.graph.node for o in n.output}
    pointwise = [n for n in ours.graph.node if n.op_type == "Conv" and "pwconv" in n.input[1]]
    assert len(pointwise) == 8 and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in pointwise)
    x = torch.randn(2, 3, 64, 64).numpy()
    meaning = [ReferenceEvaluator(m).run(None, {"images": x})[0] for m in (plain, ours)]
    np.testing.assert_allclose(meaning[1], meaning[0], rtol=1e-5, atol=1e-5 * float(np.abs(meaning[0]).max()))
