"""Where a quantized ONNX export runs in integer and where in float, and why.

A QDQ graph states the quantization; which kernels run is ONNX Runtime's choice when it
fuses "DequantizeLinear -> op -> QuantizeLinear" node units. :func:`placement_report` asks
ORT itself: it builds a CPU session at the "extended" optimization level (every QDQ
fusion, but none of the hardware-specific layout passes, so node and weight names survive
and the answer does not depend on the machine's instruction set), reads back the graph
ORT would run, and sorts every node:

- *integer*: an integer kernel (QLinearConv, QLinearAdd, MatMulIntegerToFloat, ...);
- *float compute*: a convolution or matrix product left in float, with the reason;
- *float other*: element-wise, normalisation and reduction nodes in float, by op type, with
  the reason (most have no integer kernel in ORT's CPU provider);
- *conversion*: the QuantizeLinear / DequantizeLinear nodes that move between the two;
- *data movement*: reshapes, transposes, concatenations, resizes.

Compute nodes are named by the module path of their weight (a module shared across pyramid
levels is one entry with several calls), so the report lines up with the quant spec.
:func:`openvino_placement_report` does the same for an OpenVINO IR from the runtime
precision of each node of the compiled model.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path

from edgekit.errors import EdgekitError

INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearAdd", "QLinearMul", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "QGemm", "ConvInteger", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere",
    "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization"})
CONVERSION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm",
                               "FusedGemm", "DeformConv"})
DATA_MOVEMENT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split",
                               "Slice", "Gather", "Shape", "Identity", "Expand", "Resize", "Tile", "Pad",
                               "ConstantOfShape", "Range", "Cast", "CastLike"})
# Float ops that do have an integer form in ORT's CPU provider, fused from DQ inputs + Q output
# (each checked against ORT in tests/test_placement.py).
_FUSABLE_WITH_QDQ = {"Add": "QLinearAdd", "Mul": "QLinearMul", "Sigmoid": "QLinearSigmoid",
                     "LeakyRelu": "QLinearLeakyRelu", "Softmax": "QLinearSoftmax",
                     "GlobalAveragePool": "QLinearGlobalAveragePool", "AveragePool": "QLinearAveragePool",
                     "Concat": "QLinearConcat", "Where": "QLinearWhere"}
_WEIGHT_SUFFIXES = re.compile(r"(/duplicated.*|_token_\d+)+$")
OPTIMIZATION_LEVEL = "extended"


def _layer_of(weight_name: str, renamed: dict) -> str | None:
    """'head.cls_out.weight_quantized/duplicated_token_4' -> 'head.cls_out'; None when the
    name is not a module weight. ``renamed``: {ONNX weight name: module path} for weights the
    exporter renamed (the QDQ writer records them in the metadata)."""
    name = _WEIGHT_SUFFIXES.sub("", weight_name).removesuffix("_quantized")
    if name in renamed:
        return renamed[name]
    return name[: -len(".weight")] if name.endswith(".weight") else None


def _weight_input(node) -> str:
    """The weight input of a compute node (QLinearConv: x, x_scale, x_zp, w, ...)."""
    if node.op_type in ("QLinearConv", "QLinearMatMul", "QGemm"):
        return node.input[3]
    if node.op_type in ("MatMulIntegerToFloat", "MatMulInteger", "MatMul", "FusedMatMul", "DynamicQuantizeMatMul"):
        return next((name for name in node.input[:2] if ".weight" in name), node.input[1])
    return node.input[1]


NO_SPEC = "float (no quant spec given: pass it to the report for the reason)"


def _float_compute_reason(op_type: str, layer: str | None, spec_layers: dict | None) -> str:
    """Why a conv/matmul runs in float; ``spec_layers`` None: no spec to tell."""
    if op_type == "DeformConv":
        if spec_layers is not None and layer not in spec_layers:
            return "not in the quant spec and ONNX Runtime has no integer DeformConv"
        return "ONNX Runtime has no integer DeformConv kernel: it runs in float on the dequantized weight"
    if spec_layers is None:
        return NO_SPEC
    if layer is None or layer not in spec_layers:
        return "not in the quant spec: kept float by design"
    entry = spec_layers[layer]
    if entry.get("input") is None:
        return "the spec gives it no input grid: a conv needs a quantized input to fuse"
    if entry.get("output") is None:
        return "the spec gives it no output grid: ORT fuses DQ -> Conv -> Q only with a quantized output"
    return "in the spec with input and output grids, yet not fused by ONNX Runtime (check the graph)"


def _float_other_reason(op_type: str) -> str:
    integer = _FUSABLE_WITH_QDQ.get(op_type)
    if integer:
        return f"{integer} exists, but needs every input dequantized and the one output quantized here"
    return "no integer kernel for this op in ONNX Runtime's CPU provider"


def optimized_graph(onnx_path: str | Path):
    """The graph ONNX Runtime's CPU provider runs for ``onnx_path`` at the extended level."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="edgekit_placement_") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises Fail, InvalidGraph, NotImplemented, ... with long texts
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgekitError(f"{onnx_path}: ONNX Runtime cannot load it for the placement report ({first[:300]}); "
                               f"export a graph its CPU provider runs") from None
        return onnx.load(options.optimized_model_filepath, load_external_data=False).graph


class _Placement:
    """Collects nodes into the report's sections (see the module docstring)."""

    def __init__(self):
        self.layers: dict[str, dict] = {}
        self.sections = {name: Counter() for name in ("integer_other", "float_other", "conversion", "data_movement")}

    def compute(self, key: str, kernel: str, integer: bool, why: str | None = None) -> None:
        entry = self.layers.setdefault(key, {"kernel": kernel, "integer": integer, "calls": 0})
        entry["calls"] += 1
        if why is not None:
            entry["why"] = why

    def count(self, section: str, op: str) -> None:
        self.sections[section][op] += 1

    def report(self, runtime: str, level: str, why_float_other) -> dict:
        integer = sorted(k for k, e in self.layers.items() if e["integer"])
        floats = sorted(k for k, e in self.layers.items() if not e["integer"])
        s = self.sections
        return {
            "runtime": runtime, "optimization_level": level,
            "summary": {"integer_compute_nodes": sum(self.layers[k]["calls"] for k in integer),
                        "integer_other_nodes": sum(s["integer_other"].values()),
                        "float_compute_nodes": sum(self.layers[k]["calls"] for k in floats),
                        "float_other_nodes": sum(s["float_other"].values()),
                        "conversion_nodes": sum(s["conversion"].values()),
                        "data_movement_nodes": sum(s["data_movement"].values())},
            "integer": {k: {"kernel": self.layers[k]["kernel"], "calls": self.layers[k]["calls"]} for k in integer},
            "integer_other": dict(s["integer_other"].most_common()),
            "float_compute": {k: self.layers[k] for k in floats},
            "float_other": {op: {"nodes": n, "why": why_float_other(op)} for op, n in s["float_other"].most_common()},
            "conversion": dict(s["conversion"].most_common()),
            "data_movement": dict(s["data_movement"].most_common()),
        }


def _renamed_weights(proto) -> dict:
    """{ONNX weight name: module path} of the weights the exporter renamed (QDQ metadata)."""
    from edgekit.export.to_onnx import read_metadata

    return {name: path for path, name in read_metadata(proto).get("renamed_weights", {}).items()}


def placement_report(onnx_path: str | Path, spec: dict | None = None) -> dict:
    """Which nodes of ``onnx_path`` ORT runs in integer and which in float, and why (see the
    module docstring). ``spec``: the quant spec it was exported with (reasons name it)."""
    import onnx
    import onnxruntime as ort

    spec_layers = spec["layers"] if spec is not None else None
    graph = optimized_graph(onnx_path)  # first: a file ORT cannot load is one clear line
    renamed = _renamed_weights(onnx.load(str(onnx_path), load_external_data=False))
    placement = _Placement()
    for node in graph.node:
        op = node.op_type
        if op in INTEGER_OPS or op in FLOAT_COMPUTE_OPS:
            layer = _layer_of(_weight_input(node), renamed)
            if layer is None and op in INTEGER_OPS:  # QLinearAdd, QLinearMul, ...: no weight
                placement.count("integer_other", op)
            elif op in INTEGER_OPS:
                placement.compute(layer, op, True)
            else:
                placement.compute(layer or f"{op}:{node.name}", op, False,
                                  _float_compute_reason(op, layer, spec_layers))
        elif op in CONVERSION_OPS:
            placement.count("conversion", op)
        elif op in DATA_MOVEMENT_OPS:
            placement.count("data_movement", op)
        else:
            placement.count("float_other", op)
    return placement.report(f"onnxruntime {ort.__version__} CPUExecutionProvider", OPTIMIZATION_LEVEL,
                            _float_other_reason)


# OpenVINO CPU runtime layer types, by section (Const, Input and Output are not counted).
OPENVINO_COMPUTE = frozenset({"Convolution", "GroupConvolution", "DeformableConvolution", "FullyConnected",
                              "MatMul", "Deconvolution"})
OPENVINO_CONVERSION = frozenset({"FakeQuantize", "Convert"})
OPENVINO_DATA_MOVEMENT = frozenset({"Reorder", "Reshape", "Transpose", "Concatenation", "Split", "StridedSlice",
                                    "ShapeOf", "Gather", "Interpolate", "Broadcast", "Tile", "Pad"})
_OPENVINO_SKIP = frozenset({"Const", "Input", "Output", "Parameter", "Result"})
_OPENVINO_INTEGER = frozenset({"u8", "i8", "u4", "i4"})


def _onnx_node_layers(onnx_path) -> dict:
    """{ONNX node name: module path} of the compute nodes of the graph an IR was converted from."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    renamed = _renamed_weights(proto)
    layers = {}
    for node in proto.graph.node:
        if node.op_type in FLOAT_COMPUTE_OPS:
            layer = _layer_of(_weight_input(node), renamed)
            if layer is not None:
                layers[node.name] = layer
    return layers


def openvino_placement_report(xml_path: str | Path, onnx_path: str | Path, spec: dict | None = None) -> dict:
    """The placement report of an OpenVINO IR: each node's runtime precision as OpenVINO's
    CPU plugin compiles it (``runtimePrecision`` of the runtime model; u8/i8 is integer),
    layers named through the ONNX graph ``onnx_path`` the IR was converted from."""
    import openvino

    from edgekit.export.openvino import compile_model

    spec_layers = spec["layers"] if spec is not None else {}
    node_layers = _onnx_node_layers(onnx_path)
    placement = _Placement()
    for op in compile_model(xml_path).get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if kind in _OPENVINO_SKIP:
            continue
        integer = precision in _OPENVINO_INTEGER
        label = f"{kind} ({precision})"
        if kind in OPENVINO_COMPUTE:
            names = info["originalLayersNames"].astype(str).split(",")
            # OpenVINO names a split-off part '<node>/WithoutBiases'; node names may hold '/' themselves.
            candidates = [c for n in names for c in (n, n.rsplit("/", 1)[0])]
            layer = next((node_layers[c] for c in candidates if c in node_layers), None)
            why = None
            if not integer:
                why = ("OpenVINO's CPU plugin runs DeformableConvolution in float" if kind == "DeformableConvolution"
                       else NO_SPEC if spec is None
                       else "not in the quant spec: kept float by design" if layer not in spec_layers
                       else f"in the quant spec, yet compiled to {precision} by the CPU plugin")
            placement.compute(layer or f"{kind}:{op.get_friendly_name()}", label, integer, why)
        elif kind in OPENVINO_CONVERSION:
            placement.count("conversion", label)
        elif kind in OPENVINO_DATA_MOVEMENT:
            placement.count("data_movement", label)
        else:
            placement.count("integer_other" if integer else "float_other", label)
    runtime = f"openvino {openvino.__version__.split('-')[0]} CPU plugin"
    return placement.report(runtime, "compiled (f32 inference precision)",
                            lambda op: "the CPU plugin compiled it to this precision")


def summary_line(report: dict) -> str:
    """One line for the CLI: integer vs float nodes, and the float compute kernels by op."""
    s = report["summary"]
    floats = Counter(e["kernel"] for e in report["float_compute"].values() for _ in range(e["calls"]))
    float_part = ", ".join(f"{n} {op}" for op, n in floats.most_common()) or "none"
    integer = s["integer_compute_nodes"] + s["integer_other_nodes"]
    return (f"placement ({report['runtime'].split(' CPU')[0]}): {integer} integer kernels "
            f"({s['integer_compute_nodes']} conv/matmul), float compute: {float_part}; "
            f"{s['float_other_nodes']} float element-wise/norm nodes, {s['conversion_nodes']} Q/DQ")
