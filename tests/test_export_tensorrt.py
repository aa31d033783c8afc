"""TensorRT builder: the trtexec command text, the missing-TensorRT error, and which API
calls build_engine makes per TensorRT version (against a stand-in module: tensorrt cannot
be installed on CI, which has no GPU; a real build runs only where tensorrt is installed)."""

import shlex
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgekit.errors import EdgekitError
from edgekit.export.tensorrt import build_engine, tensorrt_version, trtexec_command
from export_helpers import FakeTensorRT

SHAPES = {"images": ([1, 3, 64, 64], [4, 3, 64, 64], [8, 3, 64, 64])}


def test_trtexec_tensorrt10_fp16_command():
    cmd = trtexec_command("out dir/model.onnx", "out dir/model.engine", "out dir/t.cache", precision="fp16",
                          trt_major=10, shapes=SHAPES, workspace_mib=2048)
    args = shlex.split(cmd)  # paths with spaces survive the shell
    assert args == ["trtexec", "--onnx=out dir/model.onnx", "--saveEngine=out dir/model.engine", "--fp16",
                    "--minShapes=images:1x3x64x64", "--optShapes=images:4x3x64x64", "--maxShapes=images:8x3x64x64",
                    "--timingCacheFile=out dir/t.cache", "--memPoolSize=workspace:2048M"]


@pytest.mark.parametrize("major, precision, strongly, flags", [
    (10, "fp32", False, []), (10, "int8", False, ["--int8", "--fp16"]), (10, "fp32", True, ["--stronglyTyped"]),
    (11, "fp16", False, []), (11, "int8", False, []), (11, "fp16", True, [])])
def test_trtexec_precision_flags_per_version(major, precision, strongly, flags):
    args = shlex.split(trtexec_command("m.onnx", "m.engine", precision=precision, trt_major=major,
                                       strongly_typed=strongly))
    assert args[3:] == flags  # TensorRT 11 removed every precision flag (strong typing always on)


def test_unknown_precision_is_an_error():
    with pytest.raises(EdgekitError, match="unknown TensorRT precision 'int4'"):
        trtexec_command("m.onnx", "m.engine", precision="int4")


@pytest.mark.skipif(tensorrt_version() is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_is_one_clear_line(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(), str(path))
    with pytest.raises(EdgekitError, match=r"TensorRT is not installed .*pip install 'edgekit\[tensorrt\]'") as info:
        build_engine(path, tmp_path / "m.engine")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.engine").exists()


def _graph(fp16=False, deform=False, qdq=False):
    """A one-Conv graph with a dynamic batch, optionally with float16, DeformConv or Q/DQ nodes."""
    nodes = [helper.make_node("Conv", ["images", "w"], ["y"], kernel_shape=[1, 1])]
    if deform:
        nodes.append(helper.make_node("DeformConv", ["y", "w", "off"], ["z"], kernel_shape=[1, 1]))
    if qdq:
        nodes.insert(0, helper.make_node("QuantizeLinear", ["images", "s"], ["q"]))
    if fp16:
        nodes.append(helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 1, 1], [0.0] * 9)])
    return helper.make_model(graph)


@pytest.fixture
def fake_trt(monkeypatch):
    def install(version):
        rec = FakeTensorRT(version)
        monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
        return rec
    return install


@pytest.mark.parametrize("version, precision, fp16_graph, flags, strongly", [
    ("10.3.0", "fp16", False, ["FP16"], False),
    ("10.3.0", "int8", False, ["FP16", "INT8"], False),
    ("10.3.0", "fp32", True, [], True),
    ("11.1.0", "fp16", True, [], True),
    ("11.1.0", "int8", False, [], True)])
def test_build_engine_api_calls_per_version(fake_trt, tmp_path, version, precision, fp16_graph, flags, strongly):
    rec = fake_trt(version)
    path = tmp_path / "m.onnx"
    onnx.save(_graph(fp16=fp16_graph, qdq=precision == "int8"), str(path))
    (tmp_path / "m.engine.timing.cache").write_bytes(b"OLD")
    info = build_engine(path, tmp_path / "m.engine", precision=precision, opt_batch=2, max_batch=4, workspace_mib=64)
    assert ("create_network", 2 if strongly else 0) in rec.calls
    assert [c[1] for c in rec.calls if c[0] == "flag"] == flags
    assert ("set_shape", "images", [1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8]) in rec.calls
    assert ("pool", "WORKSPACE", 64 << 20) in rec.calls and ("cache_in", b"OLD") in rec.calls
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE"
    assert (tmp_path / "m.engine.timing.cache").read_bytes() == b"CACHE"
    script = (tmp_path / "m.engine.trtexec.sh").read_text()
    assert info["trtexec"] in script and "--maxShapes=images:4x3x8x8" in script
    assert ("--fp16" in script) == ("FP16" in flags) and ("--stronglyTyped" in script) == (strongly and int(version.split(".")[0]) < 11)


@pytest.mark.parametrize("version, kwargs, graph, match", [
    ("11.0.0", {"precision": "fp16"}, {}, "FP32 graph and TensorRT 11.0.0 has no FP16 builder flag"),
    ("10.0.1", {"precision": "fp16"}, {"deform": True}, "cannot import ONNX DeformConv.*--deform decompose"),
    ("10.3.0", {"precision": "int8"}, {}, "no QuantizeLinear/DequantizeLinear nodes"),
    ("9.2.0", {}, {}, "too old"),
    ("10.3.0", {"min_batch": 4, "max_batch": 2}, {}, "min_batch <= opt_batch <= max_batch")])
def test_build_engine_refusals(fake_trt, tmp_path, version, kwargs, graph, match):
    fake_trt(version)
    path = tmp_path / "m.onnx"
    onnx.save(_graph(**graph), str(path))
    with pytest.raises(EdgekitError, match=match):
        build_engine(path, tmp_path / "m.engine", **kwargs)
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.skipif(tensorrt_version() is None or not torch.cuda.is_available(), reason="needs tensorrt and a GPU")
def test_real_engine_build(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(), str(path))
    info = build_engine(path, tmp_path / "m.engine", precision="fp32")
    assert (tmp_path / "m.engine").stat().st_size > 0 and info["build_seconds"] > 0



# ----------------------------------------------------------------------------- FP32 layer constraints

class _Layer:
    """A network layer as the stand-in parser makes it; records precision and output-type settings."""

    def __init__(self, name, node, layer_type, dtypes):
        self.name, self.type, self.metadata = name, layer_type, f"[ONNX Layer: {node}]" if node else ""
        self.outputs = [types.SimpleNamespace(dtype=d) for d in dtypes]
        self.num_outputs = len(dtypes)
        self.set_precision, self.output_types = None, {}

    def get_output(self, index):
        return self.outputs[index]

    @property
    def precision(self):
        return self.set_precision or "float32"

    @precision.setter
    def precision(self, dtype):
        self.set_precision = dtype

    def set_output_type(self, index, dtype):
        assert 0 <= index < self.num_outputs
        self.output_types[index] = dtype


TRT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}  # anything else: "int64"
# Ops that TensorRT's parser builds from several layers (e.g. ReduceL2: square, sum, sqrt); the
# extra layers get derived names and the node's metadata, as the parser tags them.
MULTI_LAYER_OPS = {"ReduceL2": 3, "Gelu": 2, "LayerNormalization": 2}


class LayeredTensorRT(FakeTensorRT):
    """FakeTensorRT whose parser fills a network from the ONNX file: a constant layer per
    initializer (no node metadata), one or more layers per node named and tagged after it,
    output types from ONNX shape inference; TensorRT 11 has no precision-constraint flags."""

    def __init__(self, version):
        super().__init__(version)
        module = self.module
        module.float32, module.float16 = "float32", "float16"
        module.LayerType = types.SimpleNamespace(CONSTANT="CONSTANT", OTHER="OTHER")
        flags = {"FP16": "FP16", "INT8": "INT8"}
        if int(version.split(".")[0]) < 11:
            flags |= {"OBEY_PRECISION_CONSTRAINTS": "OBEY", "PREFER_PRECISION_CONSTRAINTS": "PREFER"}
        else:  # removed in 11: using one fails, as on the real module
            flags = {}
        module.BuilderFlag = types.SimpleNamespace(**flags)
        self.layers = []

    def parse_from_file(self, path):
        super().parse_from_file(path)
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        graph = model.graph
        elem = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
        elem |= {i.name: i.data_type for i in graph.initializer}
        self.layers = [_Layer(i.name, None, "CONSTANT", [TRT_TYPES.get(i.data_type, "int64")])
                       for i in graph.initializer]
        for node in graph.node:
            dtypes = [TRT_TYPES.get(elem.get(o), "int64") for o in node.output]
            for k in range(MULTI_LAYER_OPS.get(node.op_type, 1)):
                last = k == MULTI_LAYER_OPS.get(node.op_type, 1) - 1
                self.layers.append(_Layer(node.name if last else f"{node.name}_{k + 1}", node.name,
                                          "CONSTANT" if node.op_type == "Constant" else "OTHER",
                                          dtypes if last else dtypes[:1]))
        return True

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, index):
        return self.layers[index]


class TinyNet(torch.nn.Module):
    """A stem and two ConvNeXt V2 blocks: enough for GRN in both export forms, exported in seconds."""

    def __init__(self):
        super().__init__()
        from edgekit.models.convnextv2 import Block

        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.stages = torch.nn.Sequential(Block(8, grn_backend="torch"), Block(8, grn_backend="torch"))
        self.head = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.stages(self.stem(x))).mean((2, 3))


def _export(path, **kwargs):
    from edgekit.export.to_onnx import export_onnx, read_metadata

    torch.manual_seed(0)  # the weights do not matter here, only the graph's structure
    export_onnx(TinyNet(), path, image_size=32, **kwargs)
    assert read_metadata(path)["simplified"].startswith("yes")  # the default, simplified graph is the one tested
    return path


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    """The default export (deploy form, onnxslim) and the training form, both FP32."""
    root = tmp_path_factory.mktemp("tiny")
    return {"deploy": _export(root / "deploy.onnx"), "training": _export(root / "training.onnx", form="training")}


def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def _ancestors(graph, value) -> set:
    """Names of the nodes that ``value`` is computed from (its producer included)."""
    producers, seen, todo = _producers(graph), set(), [value]
    while todo:
        node = producers.get(todo.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            todo.extend(node.input)
    return seen


def _weight_reader(graph, weight):
    """The node that applies ``weight`` (directly, or through the Reshape/Transpose of it)."""
    readers = [n for n in graph.node if weight in n.input]
    assert len(readers) == 1, (weight, [n.name for n in readers])
    if readers[0].op_type in ("Reshape", "Transpose"):
        return _weight_reader(graph, readers[0].output[0])
    return readers[0]


def grn_nodes_by_dataflow(graph, block: str) -> set:
    """The nodes computing a block's GRN, from the graph's data flow alone: what its output (the
    input of ``pwconv2``) is computed from, less what its input (the output of the activation
    after ``pwconv1``) is computed from."""
    pwconv1 = _weight_reader(graph, f"{block}.pwconv1.weight")
    consumers = [n for n in graph.node if any(o in n.input for o in pwconv1.output)]
    if pwconv1.op_type == "MatMul":  # training form: Linear = MatMul + Add(bias)
        consumers = [n for n in graph.node if any(o in n.input for o in consumers[0].output)]
    (act,) = consumers
    assert act.op_type == "Gelu", act.op_type
    grn_out = _weight_reader(graph, f"{block}.pwconv2.weight").input[0]
    return _ancestors(graph, grn_out) - _ancestors(graph, act.output[0])


@pytest.mark.parametrize("form", ["deploy", "training"])
def test_module_nodes_finds_grn_and_called_layers(tiny_graphs, form, rng):
    from edgekit.export.tensorrt import module_nodes

    graph = onnx.load(str(tiny_graphs[form])).graph
    block = f"stages.{rng.integers(2)}"
    found = module_nodes(graph, [f"{block}.grn", "stem", "stages.9.grn"])
    expected = grn_nodes_by_dataflow(graph, block)
    assert {graph.node[i].op_type for i, n in enumerate(graph.node) if n.name in expected} >= {"ReduceL2", "Div"}
    assert set(found[f"{block}.grn"]) == expected
    assert found["stem"] == [_weight_reader(graph, "stem.weight").name]
    assert found["stages.9.grn"] == []
    # Only the scopes and one source line travel: no file paths of this machine in the graph.
    values = [e.value for n in graph.node for e in n.metadata_props]
    assert values and not any(str(Path(__file__).parent) in v for v in values)


@pytest.fixture
def pinned_build(tiny_graphs, monkeypatch, tmp_path, rng):
    """build(...): a build (default: TensorRT 10, FP16, the default export) with one random block's GRN pinned."""
    def build(version="10.3.0", precision="fp16", path=None, pins=None):
        rec = LayeredTensorRT(version)
        monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
        block = f"stages.{rng.integers(2)}"
        info = build_engine(path or tiny_graphs["deploy"], tmp_path / "m.engine", precision=precision,
                            fp32_layers=pins or [f"{block}.grn"])
        return rec, info, block
    return build


def test_tensorrt10_fp16_constrains_the_pinned_layers(pinned_build, tiny_graphs, tmp_path):
    rec, info, block = pinned_build()
    graph = onnx.load(str(tiny_graphs["deploy"])).graph
    nodes = grn_nodes_by_dataflow(graph, block)
    expected = [layer for layer in rec.layers if layer.type != "CONSTANT" and layer.metadata[13:-1] in nodes
                and all(o.dtype == "float32" for o in layer.outputs)]
    (reduction,) = [n.name for n in graph.node if n.name in nodes and n.op_type == "ReduceL2"]
    assert sum(layer.metadata == f"[ONNX Layer: {reduction}]" for layer in expected) == 3  # all of its layers
    constrained = [layer for layer in rec.layers if layer.set_precision is not None]
    assert constrained == expected
    for layer in constrained:
        assert layer.set_precision == "float32"
        assert layer.output_types == dict.fromkeys(range(layer.num_outputs), "float32")
    assert not any(layer.output_types for layer in rec.layers if layer not in expected)
    assert [c[1] for c in rec.calls if c[0] == "flag"] == ["FP16", "OBEY"]
    assert info["fp32_layers"] == [f"{block}.grn"]
    assert info["fp32_constrained"] == {layer.name: layer.num_outputs for layer in expected}
    args = shlex.split((tmp_path / "m.engine.trtexec.sh").read_text().splitlines()[3])
    assert "--fp16" in args and "--precisionConstraints=obey" in args
    spec = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--layer")}
    assert [s.rsplit(":", 1) for s in spec["--layerPrecisions"].split(",")] == \
        [[layer.name, "fp32"] for layer in expected]
    assert [s.rsplit(":", 1) for s in spec["--layerOutputTypes"].split(",")] == \
        [[layer.name, "+".join(["fp32"] * layer.num_outputs)] for layer in expected]


def test_unknown_pin_is_refused_in_one_line_before_anything_is_written(pinned_build, tmp_path):
    with pytest.raises(EdgekitError, match="fp32 layer 'stages.0.nope' matches no node") as info:
        pinned_build(pins=["stages.0.nope"])
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tensorrt11_takes_the_pins_from_the_fp16_graph(pinned_build, tmp_path_factory):
    """TensorRT 11: strongly typed, no constraint and no removed flag (the stand-in has none of them)."""
    from edgekit.calibration.fp16_safety import pinned_fp32
    from edgekit.export.to_onnx import export_onnx

    path = tmp_path_factory.mktemp("fp16") / "fp16.onnx"
    model = TinyNet()
    with pinned_fp32(model, ["stages.1.grn"]):
        export_onnx(model, path, image_size=32, precision="fp16")
    rec, info, _ = pinned_build(version="11.1.0", path=path, pins=["stages.1.grn"])
    assert ("create_network", 2) in rec.calls and [c for c in rec.calls if c[0] == "flag"] == []
    assert not any(layer.set_precision or layer.output_types for layer in rec.layers)
    assert info["fp32_constrained"] == {} and "--precisionConstraints" not in info["trtexec"]
    with pytest.raises(EdgekitError, match="'stages.1.gone' matches no node"):  # still checked against the graph
        pinned_build(version="11.1.0", path=path, pins=["stages.1.gone"])


def test_fp32_layers_on_an_fp32_engine_is_an_error(pinned_build):
    with pytest.raises(EdgekitError, match="fp32_layers applies to fp16 and int8 engines"):
        pinned_build(precision="fp32")


@pytest.mark.slow
def test_every_grn_of_a_default_detector_export_is_found(tmp_path):
    """rsdet_atto as `edgekit export` writes it (deploy form, onnxslim): each GRN's nodes, by data flow."""
    from edgekit.export.tensorrt import module_nodes
    from edgekit.models import create_model
    from edgekit.models.grn import GRN

    model = create_model("rsdet_atto", num_classes=3)
    grns = [name for name, m in model.named_modules() if isinstance(m, GRN)]
    graph = onnx.load(str(_export_detector(model, tmp_path / "rsdet.onnx"))).graph
    found = module_nodes(graph, grns)
    assert len(grns) == 12  # atto: depths 2, 2, 6, 2
    for grn in grns:
        assert set(found[grn]) == grn_nodes_by_dataflow(graph, grn.rpartition(".")[0]), grn


def _export_detector(model, path):
    from edgekit.export.to_onnx import export_onnx, read_metadata

    export_onnx(model, path, image_size=64)
    assert read_metadata(path)["simplified"].startswith("yes")
    return path


@pytest.mark.slow
def test_export_stage_pins_grn_as_tensorrt10_constraints(tmp_path, monkeypatch):
    """export --format tensorrt --nms on TensorRT 10 (stand-in): the FP16 safety pins (set to
    every GRN: random weights overflow nothing) reach the builder as constraints on the real graph."""
    from edgekit.api import ExportConfig, export
    from edgekit.calibration import fp16_safety
    from edgekit.export import to_onnx
    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.models import create_model
    from edgekit.models.grn import GRN

    kw = {"num_classes": 3, "class_names": ["a", "b", "c"]}
    model = create_model("rsdet_atto", **kw)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", model, "rsdet_atto", kw, {"image_size": 64})
    grns = [name for name, m in model.named_modules() if isinstance(m, GRN)]
    check = fp16_safety.export_pins

    def pins(*args, **kwargs):
        report = check(*args, **kwargs)
        report.pin_fp32 = grns
        return report

    rec = LayeredTensorRT("10.3.0")
    export_onnx = to_onnx.export_onnx

    def export_without_stand_in(*args, **kwargs):  # torch's exporter probes sys.modules["tensorrt"].__spec__
        monkeypatch.delitem(sys.modules, "tensorrt")
        try:
            return export_onnx(*args, **kwargs)
        finally:
            monkeypatch.setitem(sys.modules, "tensorrt", rec.module)

    monkeypatch.setattr(fp16_safety, "export_pins", pins)
    monkeypatch.setattr(to_onnx, "export_onnx", export_without_stand_in)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    result = export(checkpoint, ExportConfig(format="tensorrt", out=str(tmp_path / "out"), nms=True))
    graph = onnx.load(str(result.out / "model.onnx"))
    nodes = set().union(*(grn_nodes_by_dataflow(graph.graph, grn.rpartition(".")[0]) for grn in grns))
    constrained = {layer.metadata[13:-1] for layer in rec.layers if layer.set_precision == "float32"}
    assert constrained == {n.name for n in graph.graph.node if n.name in nodes and n.op_type != "Constant"}
    assert ("flag", "OBEY") in rec.calls
    record = to_onnx.read_metadata(graph)["fp16_safety"]
    assert set(grns) <= set(record["pin_fp32"]) and record["pinned_in"] == "tensorrt layer precision constraints"
    assert "--precisionConstraints=obey" in (result.out / "model.engine.trtexec.sh").read_text()
