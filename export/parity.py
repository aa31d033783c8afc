"""Runtime parity: does the exported graph compute what the PyTorch model computes?

Every export is checked right after it is written (as Ultralytics does), with ONNX
Runtime's CPU provider on sample inputs:

- :func:`check_parity`: per output, max absolute error, max relative error and cosine
  similarity against the torch model, judged against :data:`TOLERANCES` (one row per
  precision); past them, :class:`ParityError` with the numbers in its one line.
- :func:`check_fake_quant`: a quantized (QDQ) graph against the torch fake-quant model
  of its spec under tight tolerances; the float comparison is kept as information.
- :func:`check_end2end`: an end-to-end (NMS) graph gives the detections that the torch
  post-processing gives on the raw graph's own boxes/scores (the NMS itself is checked,
  not the network twice).
- :func:`map_difference`: COCO mAP of the torch model and of the ONNX graph on a data
  set's split (the quantity users care about for int8 and mixed precision).
- :func:`layer_sqnr`: debug mode for quantized graphs, per-layer SQNR between torch
  activations (forward hooks) and the ONNX graph's intermediate tensors (exposed as extra
  outputs of a copy of the graph).

Reports are plain dicts (JSON-ready); the export stage writes them as ``<model>.parity.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

from edgekit.errors import CheckError, EdgekitError

# Per precision, an element passes when |onnx - torch| <= atol * max(scale, 1) + rtol * |torch|,
# scale = max |torch| of that output: boxes are in pixels (their atol grows with the image),
# scores in [0, 1] (their atol is absolute). An output passes when every element does and
# its cosine similarity >= min_cosine; max_map_drop bounds torch mAP - ONNX mAP when a data
# set is given. fp32 differs by arithmetic order and by ONNX Runtime's Sigmoid, which is
# coarse near 0 (steps of ~6e-8: 8.9e-8 at -16.5 against 6.8e-8, exactly 0 below about -18);
# a detector score sqrt(sigmoid(cls) * sigmoid(ctr)) amplifies that to up to
# sqrt(2 * 6e-8) = 3.5e-4 near zero (2.3e-4 measured), hence atol 4e-4. fp16 differs by
# half-precision rounding through ~30 layers; int8 and mixed (2-8 bit) by quantization
# noise, which the float model does not have, so their elementwise bounds are loose and
# cosine / mAP carry the judgement.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"atol": 4e-4, "rtol": 1e-4, "min_cosine": 0.99999, "max_map_drop": 0.002},
    "fp16": {"atol": 5e-3, "rtol": 5e-3, "min_cosine": 0.999, "max_map_drop": 0.01},
    "int8": {"atol": 0.2, "rtol": 0.2, "min_cosine": 0.98, "max_map_drop": 0.05},
    "mixed": {"atol": 0.5, "rtol": 0.5, "min_cosine": 0.9, "max_map_drop": 0.15},
    # A QDQ graph against the torch fake-quant model of the same spec (check_fake_quant), run
    # without ORT's graph optimizations so it computes the graph's own meaning: only
    # rounding-boundary flips (accumulation order) differ, each one grid step, which later
    # layers carry on. Measured on rsdet_atto (random weights, PTQ min-max spec, deformable,
    # 64 and 128 px, 2 runs each): W8A8 max err 6.1e-3*scale, cosine >= 0.999986; W4A6 3.0e-3,
    # 0.9999988; W2A4 4.7e-2, 0.99929 (most runs bit-exact, up to 7 px of 152 on a flip).
    "fake-quant": {"atol": 0.1, "rtol": 0.1, "min_cosine": 0.998},
}
SQNR_CAP_DB = 200.0  # reported for bit-identical tensors (infinite SQNR is not valid JSON)


class ParityError(CheckError):
    """The exported graph's outputs are further from the torch model's than the precision allows.

    Exit status 1, not 2: the input was valid, the result is not (as a failed test).
    ``result`` holds what was written (an :class:`~edgekit.export.pipeline.ExportResult`)."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


def _tolerance(precision: str) -> dict:
    if precision not in TOLERANCES:
        raise EdgekitError(f"unknown parity precision {precision!r}; choose one of {', '.join(TOLERANCES)}")
    return TOLERANCES[precision]


def _session(onnx_path, optimize: bool = True):
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise EdgekitError(f"{path}: no such ONNX file; export one first (edgekit export)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:  # each node as written: the graph's meaning, not ORT's fused integer kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid/unsupported graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgekitError(f"{path}: ONNX Runtime cannot load it ({first}); re-export it") from None


def _as_list(inputs) -> list:
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _feeds(session, inputs) -> dict:
    import numpy as np

    arrays = [x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in _as_list(inputs)]
    specs = session.get_inputs()
    if len(arrays) != len(specs):
        raise EdgekitError(f"the ONNX graph takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}), "
                           f"{len(arrays)} were given")
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    return {s.name: a.astype(dtypes.get(s.type, a.dtype)) for s, a in zip(specs, arrays)}


def run_onnx(onnx_path_or_session, inputs) -> dict:
    """{output name: numpy array} from ONNX Runtime CPU."""
    session = onnx_path_or_session if hasattr(onnx_path_or_session, "run") else _session(onnx_path_or_session)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, _feeds(session, inputs))))


def _flatten(out) -> list:
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return [out]


def _torch_outputs(model, inputs) -> list:
    import torch

    from edgekit.export.to_onnx import DetectorOutputs, is_detector

    if is_detector(model) and not isinstance(model, DetectorOutputs):
        model = DetectorOutputs(model)  # the graph export_onnx writes for a detector
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*[torch.as_tensor(x) for x in _as_list(inputs)])
    finally:
        model.train(was_training)
    return [t.detach().double().cpu().numpy() for t in _flatten(out)]


def compare_arrays(want, got, tol: dict) -> dict:
    """Error statistics of one output (float64), and whether they are within ``tol``."""
    import numpy as np

    want = np.asarray(want, np.float64)
    got = np.asarray(got, np.float64)
    if want.shape != got.shape:
        return {"shape_torch": list(want.shape), "shape_onnx": list(got.shape), "passed": False}
    diff = np.abs(got - want)
    scale = float(np.abs(want).max()) if want.size else 0.0
    if not np.isfinite(got).all():
        return {"max_abs_err": None, "max_rel_err": None, "cosine": None, "scale": scale, "passed": False,
                "non_finite": int((~np.isfinite(got)).sum())}
    denom = np.linalg.norm(want) * np.linalg.norm(got)
    cosine = float(want.ravel() @ got.ravel() / denom) if denom > 0 else float(np.array_equal(want, got))
    within = diff <= tol["atol"] * max(scale, 1.0) + tol["rtol"] * np.abs(want)
    max_rel = diff / np.maximum(np.abs(want), max(scale, 1e-12) * 1e-3)  # floor: near-zero refs don't explode
    return {"max_abs_err": float(diff.max()) if diff.size else 0.0,
            "max_rel_err": float(max_rel.max()) if diff.size else 0.0,
            "cosine": cosine, "scale": scale, "passed": bool(within.all() and cosine >= tol["min_cosine"])}


def check_parity(model, onnx_path, inputs, precision: str = "fp32", *, raise_on_failure: bool = True,
                 optimize: bool = True) -> dict:
    """Compare ``model(*inputs)`` with the ONNX graph at ``onnx_path`` on the same inputs.

    ``model`` is the torch module the graph was exported from (an RSDet is compared through
    :class:`~edgekit.export.to_onnx.DetectorOutputs`, as exported); its outputs, flattened
    in order, pair with the graph's outputs in order. Returns the report dict
    ``{"precision", "tolerance", "outputs": {name: stats}, "passed"}``; raises
    :class:`ParityError` when it did not pass and ``raise_on_failure``. ``optimize=False``
    runs the graph without ONNX Runtime's graph optimizations (fusions).
    """
    tol = _tolerance(precision)
    onnx_out = run_onnx(_session(onnx_path, optimize), inputs)
    torch_out = _torch_outputs(model, inputs)
    if len(torch_out) != len(onnx_out):
        raise EdgekitError(f"{onnx_path}: the graph has {len(onnx_out)} output(s) ({', '.join(onnx_out)}) but the "
                           f"torch model gives {len(torch_out)}; compare the model the graph was exported from")
    outputs = {name: compare_arrays(want, got, tol) for (name, got), want in zip(onnx_out.items(), torch_out)}
    report = {"precision": precision, "tolerance": dict(tol), "onnx": str(onnx_path),
              "input_shapes": [list(getattr(x, "shape", ())) for x in _as_list(inputs)],
              "outputs": outputs, "passed": all(o["passed"] for o in outputs.values())}
    if raise_on_failure:
        raise_if_failed(report)
    return report


def check_fake_quant(model, onnx_path, inputs, spec: dict, precision: str, *, raise_on_failure: bool = True) -> dict:
    """Parity of a QDQ graph made from ``spec``: judged against the torch fake-quant model
    (:func:`edgekit.calibration.ptq.apply_fake_quant`, the spec's meaning) under the tight
    "fake-quant" tolerances, which catch a wrong scale or zero point in the graph; the
    comparison with the float ``model`` (quantization noise, ORT's optimized integer
    kernels) is kept under "float_model" as information. ``precision`` (int8 or mixed)
    names the graph and sets ``max_map_drop``."""
    from edgekit.calibration.ptq import apply_fake_quant

    float_report = check_parity(model, onnx_path, inputs, precision, raise_on_failure=False)
    report = check_parity(apply_fake_quant(model, spec), onnx_path, inputs, "fake-quant", raise_on_failure=False,
                          optimize=False)
    report.update(precision=precision, reference="torch fake-quant model of the spec, ONNX Runtime unoptimized",
                  tolerance={**report["tolerance"], "max_map_drop": _tolerance(precision)["max_map_drop"]},
                  float_model={"note": "information: against the float model, ONNX Runtime optimized",
                               **{k: float_report[k] for k in ("tolerance", "outputs", "passed")}})
    if raise_on_failure:
        raise_if_failed(report)
    return report


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def summary_line(report: dict) -> str:
    """One line: verdict and the numbers of every output (and the mAP and NMS checks if present)."""
    parts = []
    for name, o in report.get("outputs", {}).items():
        if "shape_onnx" in o:
            parts.append(f"{name}: shape {o['shape_onnx']} vs torch {o['shape_torch']}")
        else:
            parts.append(f"{name}: max abs {_fmt(o['max_abs_err'])}, max rel {_fmt(o['max_rel_err'])}, "
                         f"cosine {_fmt(o['cosine'])}")
    if "nms" in report:
        n = report["nms"]
        parts.append(f"nms: {n['matched']}/{n['expected']} detections matched ({n['got']} from ONNX)")
    if "map" in report:
        m = report["map"]
        parts.append(f"mAP@.5 torch {m['torch']['map50']:.4f} vs onnx {m['onnx']['map50']:.4f}")
    tol = report.get("tolerance", {})
    verdict = "passed" if report.get("passed") else "FAILED"
    against = " vs torch fake-quant" if "float_model" in report else ""
    return (f"parity {verdict} ({report.get('precision')}{against}; tol atol {tol.get('atol')}*max(scale,1) + rtol {tol.get('rtol')}, "
            f"cosine >= {tol.get('min_cosine')}): " + "; ".join(parts))


def raise_if_failed(report: dict) -> None:
    if not report.get("passed"):
        raise ParityError(summary_line(report))


def check_end2end(raw_onnx, end2end_onnx, inputs, *, iou_match: float = 0.99) -> dict:
    """Detections of the end-to-end graph vs the torch post-processing of the raw graph's
    boxes/scores on the same inputs (thresholds read from the end-to-end graph's metadata).

    Returns {"expected", "got", "matched", "passed"}: a torch detection is matched by an
    ONNX one of the same image and class with IoU > ``iou_match``; exact score ties may
    order boxes differently, so all but 1 % must match and the counts must agree.
    """
    import json

    import onnx
    import torch

    from edgekit.boxes import box_iou
    from edgekit.export.end2end import OUTPUT_NAME, split_detections
    from edgekit.models.detect_post import postprocess

    meta = {p.key: p.value for p in onnx.load(str(end2end_onnx), load_external_data=False).metadata_props}
    if "edgekit.nms" not in meta:
        raise EdgekitError(f"{end2end_onnx}: no 'edgekit.nms' metadata; it was not written by edgekit's end2end export")
    nms = json.loads(meta["edgekit.nms"])
    raw = run_onnx(raw_onnx, inputs)
    images = torch.as_tensor(_as_list(inputs)[0])
    want = postprocess(torch.from_numpy(raw["boxes"]).float(), torch.from_numpy(raw["scores"]).float(),
                       nms["score_threshold"], nms["iou_threshold"], nms["max_detections"], nms["pre_nms_top_k"],
                       image_size=images.shape[-2:])
    got = split_detections(run_onnx(end2end_onnx, inputs)[OUTPUT_NAME], images.shape[0])
    expected = sum(len(w["scores"]) for w in want)
    found = sum(len(g["scores"]) for g in got)
    matched = 0
    for w, g in zip(want, got):
        if len(w["scores"]) and len(g["scores"]):
            same = (box_iou(w["boxes"], g["boxes"]) > iou_match) & (w["labels"][:, None] == g["labels"][None, :])
            matched += int(same.any(1).sum())
    passed = found == expected and matched >= math.floor(0.99 * expected)
    return {"expected": expected, "got": found, "matched": matched, "settings": nms, "passed": passed}


def _onnx_predictions(session, images, score_threshold: float) -> list[dict]:
    """Per-image {"boxes", "scores", "labels"} (and "rboxes") from a raw (boxes or rboxes,
    and scores) or end-to-end graph."""
    import torch

    from edgekit.export.end2end import OUTPUT_NAME, split_detections
    from edgekit.models.detect_post import postprocess
    from edgekit.models.obb_post import postprocess_rotated

    static = session.get_inputs()[0].shape[0]
    step = static if isinstance(static, int) and static > 0 else images.shape[0]
    preds = []
    for start in range(0, images.shape[0], step):
        chunk = images[start:start + step]
        out = run_onnx(session, chunk)
        if OUTPUT_NAME in out:
            preds += split_detections(out[OUTPUT_NAME], chunk.shape[0])
        elif "rboxes" in out:
            preds += postprocess_rotated(torch.from_numpy(out["rboxes"]).float(),
                                         torch.from_numpy(out["scores"]).float(), score_threshold,
                                         image_size=chunk.shape[-2:])
        else:
            preds += postprocess(torch.from_numpy(out["boxes"]).float(), torch.from_numpy(out["scores"]).float(),
                                 score_threshold, image_size=chunk.shape[-2:])
    return preds


def map_difference(model, onnx_path, dataset_root, classes, image_size: int, *, batch_size: int = 8,
                   score_threshold: float = 0.01) -> dict:
    """mAP of the torch detector and of the ONNX graph on a DOTA-format split
    (:func:`edgekit.engine.evaluate.detection_metrics`: rotated boxes for an oriented model).

    Both see the same letterboxed batches and the evaluator's post-processing
    (:func:`edgekit.engine.evaluate.evaluate`'s threshold); an end-to-end graph keeps its
    own thresholds, and the torch side then uses the same ones.
    Returns {"torch": {"map", "map50"}, "onnx": {...}, "map_drop", "map50_drop", "num_images"}.
    """
    import json

    import onnx
    import torch
    from torch.utils.data import DataLoader

    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.engine.evaluate import detection_metrics, target_in_original, to_original_coordinates

    session = _session(onnx_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    nms = json.loads(meta["edgekit.nms"]) if "edgekit.nms" in meta else None
    torch_kwargs = ({"score_threshold": nms["score_threshold"], "iou_threshold": nms["iou_threshold"],
                     "max_detections": nms["max_detections"]} if nms else {"score_threshold": score_threshold})
    loader = DataLoader(DetectionDataset(Path(dataset_root), classes, image_size=image_size),
                        batch_size=batch_size, collate_fn=collate_detection)
    model.eval()
    targets, torch_preds, onnx_preds = [], [], []
    with torch.no_grad():
        for images, batch_targets in loader:
            for t, p, o in zip(batch_targets, model.predict(images, **torch_kwargs),
                               _onnx_predictions(session, images, score_threshold)):
                torch_preds.append(to_original_coordinates(p, t))
                onnx_preds.append(to_original_coordinates(o, t))
                targets.append(target_in_original(t))
    result = {}
    oriented = bool(getattr(model, "obb", False))
    for key, preds in (("torch", torch_preds), ("onnx", onnx_preds)):
        metrics = detection_metrics(targets, preds, classes, oriented)
        result[key] = {"map": metrics["map"], "map50": metrics["map50"]}
    result["map_drop"] = result["torch"]["map"] - result["onnx"]["map"]
    result["map50_drop"] = result["torch"]["map50"] - result["onnx"]["map50"]
    result["num_images"] = len(targets)
    return result


def _layer_tensors(model_proto, weight_names: dict) -> dict:
    """{module path: [ONNX tensors holding that layer's output, one per call, graph order]}.

    ``weight_names`` maps module paths to their weight's ONNX name (in a QDQ graph, the
    DequantizeLinear output keeps it), followed to every compute node reading it
    (:func:`edgekit.export.qdq.layer_nodes`; a shared head runs once per pyramid level);
    a MatMul's bias Add, when it is the only reader, is part of the layer.
    """
    from edgekit.export.qdq import consumer_map, layer_nodes

    consumers = consumer_map(model_proto.graph)
    order = {id(node): i for i, node in enumerate(model_proto.graph.node)}
    found = {}
    for path, weight_name in weight_names.items():
        outs = []
        for node, _ in sorted(layer_nodes(weight_name, consumers), key=lambda n: order[id(n[0])]):
            out = node.output[0]
            readers = consumers.get(out, [])
            if node.op_type == "MatMul" and len(readers) == 1 and readers[0].op_type == "Add":
                out = readers[0].output[0]
            outs.append(out)
        if outs:
            found[path] = outs
    return found


def _with_extra_outputs(model_proto, names):
    """A copy of the graph that also outputs the tensors ``names`` (types from shape inference)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model_proto.SerializeToString())
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
    return model


def sqnr_db(reference, test) -> float:
    """10 log10(signal power / noise power), float64; capped at SQNR_CAP_DB."""
    import numpy as np

    ref = np.asarray(reference, np.float64)
    noise = float(((np.asarray(test, np.float64) - ref) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        return SQNR_CAP_DB
    if signal == 0:
        return -SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(signal / noise))


def layer_sqnr(model, onnx_path, inputs, layers=None, *, float_onnx=None) -> dict:
    """Debug mode: per-layer SQNR (dB) of the ONNX graph's activations against torch's.

    ``model`` is the float torch model the graph was exported from; ``layers`` (default:
    every Conv2d, Linear and deformable convolution) are torch module paths. Returns
    {"layers": {path: {"sqnr_db", "onnx_tensors"}}, "unmapped": [paths with no ONNX tensor]},
    layers in forward order; the lowest SQNR points at the layer whose quantization hurts.
    ``float_onnx``, the float graph a QDQ graph was made from, finds weights the exporter
    renamed (a Linear's folded transpose) by value: the QDQ graph keeps those names but
    no longer holds the float values.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgekit.export.qdq import find_layer_weights
    from edgekit.export.to_onnx import DetectorOutputs, is_detector, load_onnx
    from edgekit.models.deform import DeformConv2d

    kinds = (torch.nn.Conv2d, torch.nn.Linear, DeformConv2d)
    inner = model.model if isinstance(model, DetectorOutputs) else model
    modules = dict(inner.named_modules())
    paths = list(layers) if layers is not None else [n for n, m in modules.items() if isinstance(m, kinds)]
    unknown = [p for p in paths if p not in modules]
    if unknown:
        raise EdgekitError(f"layer_sqnr: no module {unknown[0]!r} in the model; use paths from named_modules()")
    proto = load_onnx(onnx_path)
    weights = {p: modules[p].weight.detach().float().cpu().numpy() for p in paths}
    named = find_layer_weights((load_onnx(float_onnx) if float_onnx else proto).graph, weights)
    tensors = _layer_tensors(proto, {path: name for path, (name, _) in named.items()})
    captured: dict[str, list] = {path: [] for path in tensors}
    hooks = [modules[path].register_forward_hook(
        lambda _m, _i, out, path=path: captured[path].append(out.detach().double().cpu().numpy()))
        for path in tensors]
    try:
        _torch_outputs(DetectorOutputs(inner) if is_detector(inner) else inner, inputs)
    finally:
        for h in hooks:
            h.remove()
    extended = _with_extra_outputs(proto, [n for names in tensors.values() for n in names])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(extended.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = run_onnx(session, inputs)
    result = {}
    for path, names in tensors.items():
        pairs = _pair_calls(captured[path], [(n, values[n]) for n in names])
        if pairs is not None:
            result[path] = {"sqnr_db": sqnr_db(np.concatenate([a.ravel() for a, _, _ in pairs]),
                                               np.concatenate([b.ravel() for _, _, b in pairs])),
                            "onnx_tensors": [n for _, n, _ in pairs]}
    return {"layers": result, "unmapped": [p for p in paths if p not in result]}


def _pair_calls(ours: list, theirs: list):
    """Pair each torch call of a layer with an ONNX tensor of the same shape (the graph's
    order of a shared head's levels need not be the call order); None when they differ."""
    if len(ours) != len(theirs):
        return None
    free, pairs = list(theirs), []
    for a in ours:
        match = next((t for t in free if t[1].shape == a.shape), None)
        if match is None:
            return None
        free.remove(match)
        pairs.append((a, match[0], match[1]))
    return pairs
