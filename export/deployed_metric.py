"""A quant spec's mAP as deployed: the metric ``--max-drop-on onnxruntime`` bounds.

By default the accuracy-control loop scores a spec through torch's fake quantization
(:mod:`edgekit.calibration.accuracy_bound`). The QDQ graph that ONNX Runtime runs departs
from that simulation: the deploy-form graph quantizes the same tensors in a different op
order, ONNX Runtime fuses Q/DQ pairs into integer kernels, and the float ops around them
round differently. On the demo detector (32 validation images) the deployed mAP@[.5:.95]
differed from the simulated one by 0.1 to 0.45 points, in either direction, with ONNX
Runtime's graph optimizations on or off: the size of the bounds users ask for. So here
each spec becomes the ``onnx-mixed`` deliverable ``edgekit export`` writes by default
(packed storage: ONNX Runtime folds the bit planes into INT8 weights and runs every
quantized layer on its integer kernels) of one FP32 deploy-form export of the float
model, and ONNX Runtime scores it on the loop's validation batches with the decoding,
NMS and metric of :func:`edgekit.engine.evaluate.evaluate_model`. Not the native
storage: its INT4 weights get no integer kernel (DequantizeLinear + float Conv), which
rounds differently (boxes up to 2.6 px apart on the demo detector) and ran 1.3-1.6x slower.

It lives in the export package (the quantize stage cannot import export: export reads
quant specs), and the stages take it as ``deployed_measure``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SCORE_THRESHOLD = 0.01  # evaluate_model's: the same detections reach the metric


def onnx_map_points(onnx_path, batches, classes, oriented: bool = False) -> float:
    """COCO mAP@[.5:.95] x100 of an ONNX detector (raw boxes/scores or rotated boxes) run by
    ONNX Runtime over collated (images, targets) batches."""
    from edgekit.engine.evaluate import detection_metrics, target_in_original, to_original_coordinates
    from edgekit.export.parity import _onnx_predictions, _session

    session = _session(onnx_path)
    targets, preds = [], []
    for images, batch in batches:
        for p, t in zip(_onnx_predictions(session, images, SCORE_THRESHOLD), batch):
            preds.append(to_original_coordinates(p, t))
            targets.append(target_in_original(t))
    return 100.0 * detection_metrics(targets, preds, list(classes), oriented)["map"]


class OnnxRuntimeMeasure:
    """``measure(spec) -> mAP points`` of the spec's QDQ graph in ONNX Runtime; the FP32
    graph it quantizes is exported once, into a folder removed by :meth:`close`."""

    def __init__(self, model, image_size: int, batches, classes):
        from edgekit.export.to_onnx import export_onnx

        self.model, self.batches, self.classes = model, batches, list(classes)
        self.oriented = bool(getattr(model, "obb", False))
        self._folder = tempfile.TemporaryDirectory(prefix="edgekit-deployed-")
        self.float_graph = Path(self._folder.name) / "float.onnx"
        export_onnx(model, self.float_graph, image_size=image_size)
        self.evaluations = 0

    def __call__(self, spec: dict) -> float:
        from edgekit.export.qdq import quantize_onnx

        graph = Path(self._folder.name) / "deployed.onnx"
        quantize_onnx(self.float_graph, spec, graph, model=self.model)  # export's default storage
        self.evaluations += 1
        return onnx_map_points(graph, self.batches, self.classes, self.oriented)

    def close(self) -> None:
        self._folder.cleanup()


def onnxruntime_measure(model, image_size: int, batches, classes) -> OnnxRuntimeMeasure:
    """The ``deployed_measure`` factory the quantize and calibrate stages take."""
    return OnnxRuntimeMeasure(model, image_size, batches, classes)
