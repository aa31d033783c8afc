"""OpenVINO IR (model.xml + .bin) from edgekit's own ONNX graphs, and running it.

OpenVINO's ONNX frontend has no rule for ONNX ``DeformConv`` (opset 19), which the native
export emits for the deformable head. :func:`deform_conv_extension` maps it onto OpenVINO's
own ``DeformableConvolution`` (opset 8) with ``bilinear_interpolation_pad=True``: a sample
point in (-1, 0) or (H-1, H) then reads zero beyond the border and blends it bilinearly, as
torchvision's ``deform_conv2d`` (and :func:`edgekit.models.deform.deform_conv2d_reference`)
does; with ``False`` such points are dropped whole and the outputs differ at the borders
(tests/test_openvino_export.py checks both against the reference). ONNX's optional bias
becomes an ``Add``; its mask maps onto the opset-8 mask input. The IR holds
``DeformableConvolution`` natively, so reading it back needs no extension.

Precisions: ``fp32`` saves the weights as they are; ``fp16`` stores them as float16
(``compress_to_fp16``; the CPU plugin still computes in float32); ``int8`` converts
edgekit's QDQ graph, which OpenVINO turns into ``FakeQuantize`` and runs on integer
kernels. Runs are pinned to float32 inference (``INFERENCE_PRECISION_HINT``), so that a
CPU with bf16 or AMX units does not silently lower the float layers.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from edgekit.errors import EdgekitError

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = "pip install 'edgekit[openvino]'"
# An int8 IR against the spec's torch fake-quant model. OpenVINO has no "graph as written"
# mode (ONNX Runtime's unoptimized run, which check_fake_quant uses): its low-precision
# passes run Transpose, Reduce and Concat on u8 and requantize around them, so it departs
# from the fake-quant model by more than rounding flips. Measured (W7A8 min-max specs):
# rsdet_atto at 64 px with a random head, scores max err 0.099, cosine 0.9989 (ONNX Runtime's
# optimized kernels: 0.052, 0.9997); the demo's trained model at 256 px, 0.0067, 0.99995.
# With 8-bit weights on an x86 CPU without VNNI both runtimes' u8 x s8 kernels saturate
# (0.64 and 0.59) and the check fails, as it should.
INT8_TOLERANCE = {"atol": 0.2, "rtol": 0.2, "min_cosine": 0.995}
BILINEAR_PAD = True  # torchvision: zero beyond the border, blended bilinearly (see the module docstring)


@contextlib.contextmanager
def no_telemetry():
    """``import openvino`` (and ``import nncf``) report usage to Google Analytics from a
    forked process unless they find themselves in a CI job; edgekit sends nothing anywhere
    (and that fork, from a thread, upsets Numba's TBB pool). The flag is set only while
    they are imported, when openvino_telemetry decides."""
    import os

    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved


def require_openvino():
    """The openvino module, or one clear line saying how to install it."""
    try:
        with no_telemetry():
            import openvino
    except ImportError:
        raise EdgekitError(f"OpenVINO is not installed; {INSTALL_HINT} (OpenVINO IR export and the openvino "
                           f"bench rows need it)") from None
    return openvino


def _deform_conv(node):
    """ONNX DeformConv (X, W, offset[, B[, mask]]) -> opset-8 DeformableConvolution (+ bias)."""
    import numpy as np
    import openvino.opset8 as ops

    def optional(i):  # an omitted optional input arrives as a NullNode
        if i >= node.get_input_size():
            return None
        value = node.get_input(i)
        return None if value.get_node().get_type_name() == "NullNode" else value

    pads = list(node.get_attribute("pads", [0, 0, 0, 0]))
    out = ops.deformable_convolution(
        node.get_input(0), node.get_input(2), node.get_input(1), list(node.get_attribute("strides", [1, 1])),
        pads[:2], pads[2:], list(node.get_attribute("dilations", [1, 1])), mask=optional(4),
        group=node.get_attribute("group", 1), deformable_group=node.get_attribute("offset_group", 1),
        bilinear_interpolation_pad=BILINEAR_PAD)
    bias = optional(3)
    if bias is not None:
        out = ops.add(out, ops.reshape(bias, ops.constant(np.array([1, -1, 1, 1], np.int64)), False))
    return out.outputs()


def deform_conv_extension():
    from openvino.frontend import ConversionExtension

    return ConversionExtension("DeformConv", _deform_conv)


def _unsupported(message: str) -> str:
    """The op names in OpenVINO's conversion or compile error, if it names any."""
    found = re.search(r"No conversion rule found for operations?:\s*([^\n]+)", message)
    if found:
        return found.group(1).strip().rstrip(".")
    found = re.search(r"(?:Operation|Op|node)[ _-]?(?:type|name)?[: ]+([A-Za-z0-9_.:/-]+)", message)
    return found.group(1) if found else message.strip().splitlines()[-1][:200] if message.strip() else "unknown"


def read_onnx(onnx_path: str | Path):
    """An ``openvino.Model`` from an ONNX file, DeformConv mapped; one line naming the ops
    OpenVINO cannot convert."""
    ov = require_openvino()
    core = ov.Core()
    core.add_extension(deform_conv_extension())
    try:
        return core.read_model(str(onnx_path))
    except Exception as exc:  # OpenVINO raises OpConversionFailure / RuntimeError with a multi-line report
        raise EdgekitError(f"OpenVINO {ov.get_version().split('-')[0]} cannot convert {Path(onnx_path).name}: "
                           f"{_unsupported(str(exc))}; export with --deform decompose or use --format onnx") from None


def convert(onnx_path: str | Path, xml_path: str | Path, precision: str = "fp32") -> Path:
    """Write the IR (``xml_path`` and the .bin beside it) of an ONNX graph, compiled once
    on the CPU so that a graph OpenVINO reads but cannot run is refused here."""
    if precision not in PRECISIONS:
        raise EdgekitError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    import tempfile

    from edgekit.export.graph_passes import weights_folded_copy

    ov = require_openvino()
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / Path(onnx_path).name
        weights_folded_copy(onnx_path, folded)  # Conv weights as IR constants: NNCF and compression find them
        model = read_onnx(folded)
    model.set_rt_info(precision, ["edgekit", "precision"])
    compile_model(model)
    xml_path = Path(xml_path)
    ov.save_model(model, str(xml_path), compress_to_fp16=precision == "fp16")
    return xml_path


def compile_model(model, threads: int | None = None, profile: bool = False):
    """A CPU ``CompiledModel`` (from an ``openvino.Model`` or an IR path), float32 inference,
    latency mode (``profile``: per-node counters); one line naming the op when the CPU
    plugin cannot run the graph."""
    ov = require_openvino()
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": profile}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        source = model if not isinstance(model, (str, Path)) else core.read_model(str(model))
        return core.compile_model(source, "CPU", config)
    except Exception as exc:
        raise EdgekitError(f"OpenVINO's CPU plugin cannot run this graph: {_unsupported(str(exc))}") from None


def ir_precision(xml_path: str | Path) -> str:
    """The precision :func:`convert` recorded in the IR ("fp32" when it recorded none)."""
    ov = require_openvino()
    model = ov.Core().read_model(str(xml_path))
    key = ["edgekit", "precision"]
    return model.get_rt_info(key).astype(str) if model.has_rt_info(key) else "fp32"


def run_ir(compiled, inputs) -> dict:
    """{output name: numpy array} of a compiled IR on a batch (torch tensor or array)."""
    import numpy as np

    x = inputs.detach().cpu().numpy() if hasattr(inputs, "detach") else np.asarray(inputs)
    result = compiled.create_infer_request().infer([x.astype(np.float32)])
    return {out.get_any_name(): np.asarray(result[out]) for out in compiled.outputs}


def check_ir_parity(model, xml_path, inputs, precision: str, spec: dict | None = None) -> dict:
    """Parity of the IR against torch on ``inputs``, as :mod:`edgekit.export.parity` judges
    ONNX: float IRs against the model under the precision's tolerances; an int8 IR against
    the spec's torch fake-quant model under the "fake-quant" tolerances (the float
    comparison kept as information)."""
    from edgekit.export.parity import TOLERANCES, _torch_outputs, compare_arrays

    got = run_ir(compile_model(xml_path), inputs)

    def judge(reference, tol):
        want = _torch_outputs(reference, inputs)
        if len(want) != len(got):
            raise EdgekitError(f"{xml_path}: the IR has {len(got)} output(s), the torch model {len(want)}")
        outputs = {name: compare_arrays(w, g, tol) for (name, g), w in zip(got.items(), want)}
        return {"tolerance": dict(tol), "outputs": outputs, "passed": all(o["passed"] for o in outputs.values())}

    report = {"precision": precision, "runtime": "OpenVINO CPU (f32 inference)", "ir": Path(xml_path).name,
              "input_shapes": [list(inputs.shape)]}
    if spec is None:
        report.update(judge(model, TOLERANCES[precision]))
        return report
    from edgekit.calibration.ptq import apply_fake_quant

    report.update(judge(apply_fake_quant(model, spec), INT8_TOLERANCE),
                  reference="torch fake-quant model of the spec, OpenVINO's integer kernels")
    report["tolerance"]["max_map_drop"] = TOLERANCES[precision]["max_map_drop"]
    report["float_model"] = {"note": "information: against the float model", **judge(model, TOLERANCES[precision])}
    if not report["passed"] and any(layer["weight"]["bits"] == 8 for layer in spec["layers"].values()):
        report["hint"] = ("x86 CPUs without VNNI sum u8 x s8 pairs in int16 and saturate with 8-bit weights: "
                          "calibrate with 7-bit weights (edgekit calibrate --weight-bits 7)")
    return report
