"""Peers in the bench: the same FP32 export quantized by other tools, on the same images.

edgekit's own INT8 row (``ort-int8``, ``openvino-int8``) is a PTQ min-max spec exported as
QDQ. Beside it, ``edgekit bench`` can put:

- ``ort-static``: ONNX Runtime's ``quantize_static`` on the FP32 ONNX export (QDQ,
  per-channel weights, MinMax calibration, u8 activations / s8 weights), run by ONNX Runtime;
- ``nncf``: NNCF's ``nncf.quantize`` (its defaults: mixed preset, fast bias correction,
  overflow fix on the first layer) on the OpenVINO FP32 IR of that export, run by OpenVINO.

All of them calibrate on the same images (:func:`edgekit.calibration.pipeline.sample_batches`
with one seed: the accuracy split's images when the bench has ``--data``). Each tool is
used as its documentation recommends for the CPU it runs on: on x86 without VNNI the u8 x
s8 integer kernels sum pairs in int16 and saturate with full 8-bit weights, so edgekit's
spec takes 7-bit weights there (``edgekit calibrate --weight-bits 7``), quantize_static
its ``reduce_range`` (7-bit weights) and NNCF its own default overflow fix.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_vnni() -> bool:
    """Whether this CPU has integer dot-product instructions (no u8 x s8 int16 saturation)."""
    from edgekit.sysinfo import cpu_flags

    return any(f in cpu_flags() for f in VNNI_FLAGS)


def int8_weight_bits() -> int:
    """edgekit's recommended INT8 weight width on this CPU (7 without VNNI)."""
    return 8 if has_vnni() else 7


def calibration_arrays(batches) -> list:
    """Calibration batches ((images, targets) or tensors) -> float32 NCHW numpy arrays."""
    import numpy as np

    out = []
    for batch in batches:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        out.append(np.ascontiguousarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images,
                                        dtype=np.float32))
    return out


def ort_static(fp32_onnx: Path, batches, out: Path) -> Path:
    """ONNX Runtime's ``quantize_static`` of ``fp32_onnx`` (QDQ, per-channel, MinMax) -> ``out``."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    arrays = calibration_arrays(batches)
    name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(arrays)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {name: x}

    out = Path(out)
    with quiet_tools():
        quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=not has_vnni(), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return out


def nncf_int8(fp32_xml: Path, batches, out_xml: Path) -> Path:
    """NNCF's post-training INT8 of an OpenVINO IR (its defaults) on the same images -> ``out_xml``."""
    from edgekit.export.openvino import no_telemetry, require_openvino

    ov = require_openvino()
    with no_telemetry():
        import nncf

    samples = [x[i:i + 1] for x in calibration_arrays(batches) for i in range(x.shape[0])]  # NNCF's statistics are per sample
    model = ov.Core().read_model(str(fp32_xml))
    with quiet_tools():
        quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    quantized.set_rt_info("int8", ["edgekit", "precision"])
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return Path(out_xml)


def openvino_profile(xml: Path, image_size: int, threads: int | None, runs: int = 20) -> dict:
    """Where an IR's time goes: OpenVINO's per-node counters (``PERF_COUNT``) summed by node
    type, ms per inference over ``runs`` batch-1 calls, and which kernels (exec types: e.g.
    ``brgconv_avx2_I8`` for an integer convolution) its convolutions and matmuls ran."""
    import numpy as np

    from edgekit.export.openvino import compile_model

    compiled = compile_model(xml, threads, profile=True)
    request = compiled.create_infer_request()
    x = np.random.default_rng().standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    for _ in range(3):
        request.infer([x])
    by_type: dict[str, float] = {}
    kernels: dict[str, dict[str, int]] = {}
    for _ in range(runs):
        request.infer([x])
        for info in request.profiling_info:
            if str(info.status).endswith("EXECUTED") and not str(info.status).endswith("NOT_RUN"):
                by_type[info.node_type] = by_type.get(info.node_type, 0.0) + info.real_time.total_seconds() * 1e3
                if info.node_type in ("Convolution", "MatMul", "FullyConnected", "DeformableConvolution"):
                    kinds = kernels.setdefault(info.node_type, {})
                    kinds[info.exec_type] = kinds.get(info.exec_type, 0) + 1
    per_run = {k: v / runs for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
    return {"total_ms": sum(per_run.values()), "by_type_ms": per_run,
            "kernels": {t: {k: n // runs for k, n in kinds.items()} for t, kinds in kernels.items()}}


@contextlib.contextmanager
def quiet_tools():
    """NNCF logs INFO lines and draws progress bars; ORT's quantizer prints its own notes:
    the bench's output stays edgekit's (EDGEKIT_VERBOSE=1 keeps them)."""
    from edgekit.output import verbose

    if verbose():
        yield
        return
    loggers = [logging.getLogger(n) for n in ("nncf", "onnxruntime", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
