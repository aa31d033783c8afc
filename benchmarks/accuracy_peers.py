"""The peers of ``quantize --max-drop``, on the same model, images and metric as edgekit's rows:

- ONNX Runtime's ``quantize_static`` (uniform INT8, no accuracy control) of the FP32 export;
- NNCF's ``quantize_with_accuracy_control`` (INT8, reverting operations to float until the
  drop holds) of the OpenVINO IR of that export, with the bound in the same mAP points.

Every row is scored by running its own runtime over the validation subset that edgekit's
rows are scored on, decoded and NMS'd exactly as ``model.predict`` does (the bench's
:func:`~edgekit.benchmarks.model_bench.detections`), so "drop" means the same thing in
every row. The FP32 export is scored the same way as a check of the harness (its mAP must
equal the torch model's).
"""

from __future__ import annotations

from pathlib import Path


def runtime_map(run, batches, classes, strides) -> float:
    """COCO mAP@[.5:.95] x100 of a runtime on collated (images, targets) batches; ``run``
    maps a float32 NCHW numpy batch to the graph's outputs (numpy, in output order)."""
    import torch
    from edgekit.benchmarks.model_bench import detections

    from edgekit.engine.evaluate import (
        detection_metrics,
        target_in_original,
        to_original_coordinates,
    )

    targets, preds, oriented = [], [], False
    for images, batch in batches:
        runner = lambda x: [torch.from_numpy(o) for o in run(x.numpy())]
        for p, t in zip(detections(runner, images, strides), batch):
            oriented = "rboxes" in p
            preds.append(to_original_coordinates(p, t))
            targets.append(target_in_original(t))
    return 100.0 * detection_metrics(targets, preds, list(classes), oriented)["map"]


def ort_runner(onnx_path: Path, threads: int):
    """A function running ``onnx_path`` in ONNX Runtime on the CPU with ``threads`` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def openvino_runner(xml_path: Path, threads: int):
    """A function running an OpenVINO IR on the CPU (float32 inference of its float parts)."""
    from edgekit.export.openvino import compile_model

    compiled = compile_model(xml_path, threads)
    request = compiled.create_infer_request()
    return lambda x: [request.infer([x])[o] for o in compiled.outputs]


def nncf_accuracy_control(fp32_xml: Path, calibration, validation, classes, strides, max_drop_points: float,
                          out_xml: Path) -> tuple[Path, dict]:
    """NNCF's ``quantize_with_accuracy_control`` of the IR, its metric edgekit's mAP (absolute
    drop ``max_drop_points`` / 100 on the 0..1 scale NNCF is given), calibrated on the same
    images as edgekit's rows; returns the IR path and what NNCF reported."""
    import numpy as np
    from edgekit.benchmarks.peers import calibration_arrays, quiet_tools
    from edgekit.export.openvino import no_telemetry, require_openvino

    ov = require_openvino()
    with no_telemetry():
        import nncf
    samples = [x[i:i + 1] for x in calibration_arrays(calibration) for i in range(x.shape[0])]
    evaluations = []

    def validate(compiled, items) -> tuple[float, None]:
        run = lambda x: [compiled(x)[o] for o in compiled.outputs]
        value = runtime_map(run, list(items), classes, strides) / 100.0
        evaluations.append(value)
        return value, None

    model = ov.Core().read_model(str(fp32_xml))
    with quiet_tools():
        quantized = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(samples), nncf.Dataset(validation, lambda item: np.ascontiguousarray(item[0].numpy())),
            validate, max_drop=max_drop_points / 100.0, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(samples))
    quantized.set_rt_info("int8", ["edgekit", "precision"])
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return Path(out_xml), {"validations": len(evaluations)}


def file_mb(path: Path) -> float:
    """On-disk size of a deliverable: an ONNX file, or an IR's .xml with its .bin."""
    path = Path(path)
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6
