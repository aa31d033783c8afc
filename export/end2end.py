"""End-to-end detector graphs: the ONNX runtime output is the final detections (``--nms``).

Output contract of an end-to-end graph (what MMDeploy end2end / Ultralytics ``nms=True``
give, in one tensor):

- one output ``detections``, float32 ``[M, 7]``, rows ``(batch_index, x1, y1, x2, y2,
  score, class_id)``; ``M`` is dynamic (0 when nothing passes), boxes are in input pixels
  clipped to the input image, ``class_id`` indexes the model's class names;
- rows are grouped by ``batch_index`` (ascending) and sorted by decreasing score within
  an image; at most ``max_detections`` rows per image;
- the batch is dynamic when the raw graph's is.

The same rule as :func:`edgekit.models.detect_post.postprocess` (and so ``RSDet.predict``):
scores ``> score_threshold``, the ``pre_nms_top_k`` best (box, class) pairs per image,
class-aware greedy NMS (suppress when IoU ``> iou_threshold``), the best
``max_detections`` per image. Thresholds are graph constants, recorded in the model's
metadata (``edgekit.nms``).

Why append ONNX nodes to an exported boxes/scores graph (instead of tracing NMS from
torch): the standard ``NonMaxSuppression`` op runs in ONNX Runtime and TensorRT's ONNX
parser (INMSLayer) with no torchvision and no plugin, and the same function turns any
user graph with ``boxes [B, N, 4]`` / ``scores [B, N, C]`` outputs into an end-to-end one.
Known limit: TensorRT's TopK takes K <= 3840, so batch * classes * max_detections must
stay below that for a TensorRT engine of this graph.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import EdgekitError

OUTPUT_NAME = "detections"
MIN_OPSET = 13  # Unsqueeze/ReduceSum with axes as inputs, stable TopK
PREFIX = "end2end/"


class _Graph:
    """Appends nodes and constants with unique names under one prefix."""

    def __init__(self, graph):
        self.graph = graph
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{PREFIX}{hint}_{self.count}"

    def const(self, value, hint: str = "const", dtype=None) -> str:
        import numpy as np
        from onnx import numpy_helper

        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs):
        from onnx import helper

        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.graph.node.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names


def _check_args(score_threshold: float, iou_threshold: float, max_detections: int, pre_nms_top_k: int) -> None:
    if not 0 <= score_threshold <= 1:
        raise EdgekitError(f"score threshold must be in [0, 1], got {score_threshold}")
    if not 0 < iou_threshold <= 1:
        raise EdgekitError(f"IoU threshold must be in (0, 1], got {iou_threshold}")
    if max_detections < 1 or pre_nms_top_k < 1:
        raise EdgekitError(f"max detections and pre-NMS top-k must be >= 1, got {max_detections}/{pre_nms_top_k}")


def append_nms(model, *, score_threshold: float = 0.05, iou_threshold: float = 0.6, max_detections: int = 100,
               pre_nms_top_k: int = 1000, boxes_output: str = "boxes", scores_output: str = "scores",
               image_input: str | None = None):
    """A copy of ``model`` (an ``onnx.ModelProto`` whose outputs include boxes [B, N, 4]
    and scores [B, N, C]) whose only output is ``detections`` (see the module docstring).

    ``image_input`` (default: the first graph input) is the NCHW image whose height and
    width clip the boxes, read at run time so dynamic image sizes stay correct.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    _check_args(score_threshold, iou_threshold, max_detections, pre_nms_top_k)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    outputs = [o.name for o in graph.output]
    if "rboxes" in outputs:
        raise EdgekitError("end-to-end NMS is ONNX's NonMaxSuppression, which overlaps horizontal boxes only; an "
                           "oriented model's rotated NMS runs after the graph: export without --nms (the deploy "
                           "bundle's infer.py does it in numpy)")
    for wanted in (boxes_output, scores_output):
        if wanted not in outputs:
            raise EdgekitError(f"the ONNX graph has no output {wanted!r} (outputs: {', '.join(outputs)}); "
                               f"end-to-end NMS needs boxes [B, N, 4] and scores [B, N, C] outputs")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise EdgekitError(f"end-to-end NMS needs ONNX opset >= {MIN_OPSET}, the graph has {opset}; "
                           f"re-export with a newer opset")
    initializers = {i.name for i in graph.initializer}
    real_inputs = [i.name for i in graph.input if i.name not in initializers]
    image = image_input or real_inputs[0]

    g = _Graph(graph)
    f32 = TensorProto.FLOAT
    boxes = g.op("Cast", [boxes_output], to=f32)
    scores = g.op("Cast", [scores_output], to=f32)

    # Clip to the image: x to [0, W], y to [0, H] (as postprocess does with image_size).
    hw = g.op("Cast", [g.op("Gather", [g.op("Shape", [image]), g.const([2, 3], "hw", np.int64)])], to=f32)
    whwh = g.op("Gather", [hw, g.const([1, 0, 1, 0], "whwh", np.int64)])
    boxes = g.op("Min", [g.op("Max", [boxes, g.const(0.0, "zero", np.float32)]), whwh])

    # Pre-NMS top-k over (class, box) pairs per image: exactly the k pairs TopK returns keep
    # their scores (scattered into zeros), so ties at the k-th score cannot let more through;
    # the zeroed rest fail the score threshold (>= 0) inside NonMaxSuppression.
    scores_bcn = g.op("Transpose", [scores], perm=[0, 2, 1])
    flat = g.op("Reshape", [scores_bcn, g.const([0, -1], "flat", np.int64)])
    pairs = g.op("Gather", [g.op("Shape", [flat]), g.const([1], "one", np.int64)])
    k = g.op("Min", [pairs, g.const([pre_nms_top_k], "topk", np.int64)])
    top_values, top_index = g.op("TopK", [flat, k], outputs=2, axis=1)
    zeros = g.op("ConstantOfShape", [g.op("Shape", [flat])], value=helper.make_tensor("zero", f32, [1], [0.0]))
    kept = g.op("ScatterElements", [zeros, top_index, top_values], axis=1)
    masked = g.op("Reshape", [kept, g.op("Shape", [scores_bcn])])

    selected = g.op("NonMaxSuppression", [boxes, masked, g.const([max_detections], "max_out", np.int64),
                                          g.const([iou_threshold], "iou", np.float32),
                                          g.const([score_threshold], "score_thr", np.float32)],
                    center_point_box=0)
    col = {i: g.op("Gather", [selected, g.const(i, f"col{i}", np.int64)], axis=1) for i in range(3)}
    batch_idx, class_idx, box_idx = col[0], col[1], col[2]
    det_scores = g.op("GatherND", [scores_bcn, selected])
    batch_box = g.op("Concat", [g.op("Unsqueeze", [batch_idx, g.const([1], "axis1", np.int64)]),
                                g.op("Unsqueeze", [box_idx, g.const([1], "axis1", np.int64)])], axis=1)
    det_boxes = g.op("GatherND", [boxes, batch_box])

    # Order by (image, -score): a score sort, then a stable sort on the image index
    # (ONNX TopK breaks ties by the lower index).
    num = g.op("Shape", [det_scores])
    _, by_score = g.op("TopK", [det_scores, num], outputs=2, axis=0, largest=1, sorted=1)
    batch_sorted = g.op("Gather", [batch_idx, by_score])
    _, by_image = g.op("TopK", [g.op("Cast", [batch_sorted], to=f32), num], outputs=2, axis=0, largest=0, sorted=1)
    order = g.op("Gather", [by_score, by_image])
    batch_sorted = g.op("Gather", [batch_idx, order])

    # Rank of each row within its image = position - first position of that image.
    scalar0 = g.const(0, "s0", np.int64)
    scalar1 = g.const(1, "s1", np.int64)
    batch = g.op("Gather", [g.op("Shape", [scores]), scalar0])
    images = g.op("Range", [scalar0, batch, scalar1])
    onehot = g.op("Cast", [g.op("Equal", [g.op("Unsqueeze", [batch_sorted, g.const([1], "axis1", np.int64)]),
                                          g.op("Unsqueeze", [images, g.const([0], "axis0", np.int64)])])],
                  to=TensorProto.INT64)
    counts = g.op("ReduceSum", [onehot, g.const([0], "axis0", np.int64)], keepdims=0)
    starts = g.op("CumSum", [counts, scalar0], exclusive=1)
    position = g.op("Range", [scalar0, g.op("Gather", [num, scalar0]), scalar1])
    rank = g.op("Sub", [position, g.op("Gather", [starts, batch_sorted])])
    keep = g.op("Reshape", [g.op("NonZero", [g.op("Less", [rank, g.const(max_detections, "max_det", np.int64)])]),
                            g.const([-1], "flat1", np.int64)])
    final = g.op("Gather", [order, keep])

    def column(t):
        return g.op("Unsqueeze", [g.op("Cast", [g.op("Gather", [t, final])], to=f32),
                                  g.const([1], "axis1", np.int64)])

    graph.node.append(helper.make_node(
        "Concat", [column(batch_idx), g.op("Gather", [det_boxes, final]), column(det_scores), column(class_idx)],
        [OUTPUT_NAME], name=g.name("Concat"), axis=1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, f32, ["num_detections", 7]))
    settings = {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                "max_detections": max_detections, "pre_nms_top_k": pre_nms_top_k,
                "columns": ["batch_index", "x1", "y1", "x2", "y2", "score", "class_id"]}
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "edgekit.nms": json.dumps(settings)})
    onnx.checker.check_model(model)
    return model


def make_end2end(raw_onnx: str | Path, out_path: str | Path, **nms) -> Path:
    """Read a boxes/scores ONNX file, append NMS (keyword arguments of :func:`append_nms`)
    and write the end-to-end graph atomically."""
    import onnx

    from edgekit.fileio import atomic_target

    raw_onnx, out_path = Path(raw_onnx), Path(out_path)
    try:
        model = onnx.load(str(raw_onnx))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise EdgekitError(f"{raw_onnx} is not a readable ONNX file ({type(exc).__name__}); export it again") from None
    model = append_nms(model, **nms)
    with atomic_target(out_path) as tmp:
        onnx.save(model, str(tmp))
    return out_path


def split_detections(detections, batch_size: int) -> list[dict]:
    """``detections`` [M, 7] (numpy or torch) -> per image {"boxes", "scores", "labels"} torch
    tensors, the format ``RSDet.predict`` returns."""
    import torch

    det = torch.as_tensor(detections, dtype=torch.float32)
    out = []
    for b in range(batch_size):
        rows = det[det[:, 0] == b]
        out.append({"boxes": rows[:, 1:5], "scores": rows[:, 5], "labels": rows[:, 6].long()})
    return out
