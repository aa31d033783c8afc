"""Checks and small graph utilities for exported ONNX models.

Kept apart from the exporter so that every ONNX file the project writes (plain, QDQ,
end-to-end) can be validated the same way, right after it is written.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from edgekit.errors import EdgekitError

# Simplification must not move any output by more than this (relative to the output's scale).
SIMPLIFY_TOLERANCE = 1e-4


def check(model, output_names=None) -> None:
    """onnx.checker (full check: strict shape inference included) and the expected output names."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise EdgekitError(f"exported ONNX model failed the ONNX checker: {first}; this is an edgekit export bug, "
                           f"please report it with the model name") from None
    if output_names is not None:
        got = [o.name for o in model.graph.output]
        if got != list(output_names):
            raise EdgekitError(f"exported ONNX model has outputs {got}, expected {list(output_names)}; "
                               f"this is an edgekit export bug")


def op_types(model) -> Counter:
    """Node count per op type over the main graph and its functions."""
    counts = Counter(n.op_type for n in model.graph.node)
    for f in model.functions:
        counts.update(n.op_type for n in f.node)
    return counts


def batch_dims(model) -> dict[str, object]:
    """First dimension of every graph input and output: a name (symbolic) or an int (fixed)."""
    dims = {}
    for v in list(model.graph.input) + list(model.graph.output):
        shape = v.type.tensor_type.shape
        d = shape.dim[0] if shape.dim else None
        dims[v.name] = None if d is None else (d.dim_param or d.dim_value)
    return dims


def rename_values(model, renames: dict[str, str]) -> None:
    """Rename graph values (initializers, node inputs/outputs, graph inputs/outputs) in place."""
    if not renames:
        return

    def sub(values):
        for i, name in enumerate(values):
            if name in renames:
                values[i] = renames[name]

    graph = model.graph
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        sub(node.input)
        sub(node.output)
        for attr in node.attribute:  # subgraphs (If/Loop) see outer values by name
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                for inner in g.node:
                    sub(inner.input)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = renames.get(v.name, v.name)


def session(model, providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session for a ModelProto, serialized bytes or a path."""
    import onnxruntime as ort

    if not isinstance(model, (str, bytes)) and hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=list(providers))


def random_feeds(model, batch: int = 2, seed: int | None = None) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs for every graph input, ``batch`` for symbolic dims."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for v in model.graph.input:
        if v.name in inits:
            continue
        shape = [d.dim_value if d.dim_value > 0 else batch for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def max_relative_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """max |a - b| / (max |a| + 1e-6) over the outputs; inf when shapes or finiteness differ."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape or not np.array_equal(np.isfinite(x), np.isfinite(y)):
            return float("inf")
        ok = np.isfinite(x)
        if ok.any():
            worst = max(worst, float(np.abs(x[ok] - y[ok]).max() / (np.abs(x[ok]).max() + 1e-6)))
    return worst


def _lift(model, names) -> list:
    """Turn the initializers named in ``names`` into graph inputs (so no pass folds them);
    returns them for :func:`_lower`."""
    from onnx import helper

    lifted = [init for init in model.graph.initializer if init.name in names]
    keep = [init for init in model.graph.initializer if init.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for init in lifted:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return lifted


def _lower(model, lifted) -> None:
    """Undo :func:`_lift`: the lifted inputs become initializers again (dropped if now unused)."""
    names = {init.name for init in lifted}
    used = {i for node in model.graph.node for i in node.input}
    inputs = [v for v in model.graph.input if v.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(init for init in lifted if init.name in used)


def simplify(model, keep=()) -> tuple[object, str]:
    """(graph, note): onnxslim's graph when it runs and matches the original's outputs in ONNX
    Runtime on a random batch of 2, else the original graph and why it was kept.

    Initializers named in ``keep`` (the torch parameters) are shielded from constant
    folding, so they keep their names and torch layouts: a Linear weight stays
    [out, in] behind a Transpose instead of becoming a folded, renamed [in, out] copy.
    """
    try:
        import onnxslim
    except ImportError:
        return model, "no (onnxslim is not installed: pip install onnxslim)"
    try:
        work = type(model)()
        work.CopyFrom(model)
        lifted = _lift(work, set(keep))
        slim = onnxslim.slim(work)
        _lower(slim, lifted)
        check(slim, [o.name for o in model.graph.output])
        feeds = random_feeds(model, batch=2)
        diff = max_relative_difference(session(model).run(None, feeds), session(slim).run(None, feeds))
    except Exception as exc:  # any failure means: keep the exporter's graph
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return model, f"no (onnxslim failed: {first})"
    if not diff <= SIMPLIFY_TOLERANCE:
        return model, f"no (onnxslim changed the outputs by {diff:.2e} relative)"
    if batch_dims(slim) != batch_dims(model):
        return model, "no (onnxslim fixed the batch dimension)"
    before, after = len(model.graph.node), len(slim.graph.node)
    return slim, f"yes (onnxslim {onnxslim.__version__}: {before} -> {after} nodes)"
