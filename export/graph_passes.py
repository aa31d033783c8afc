"""Exact ONNX graph rewrites that let constant folding finish what the dynamo exporter leaves.

The exporter writes dtype-generic code: ``CastLike(constant, activation)`` takes its
target type from a runtime tensor, so neither onnxslim nor ONNX Runtime folds it (nor the
``Expand`` behind it: a bias-free conv's zero bias stays a computed tensor, which keeps
ORT from running that conv as a blocked NCHWc kernel), and a reshape back to a runtime
``Shape`` keeps a Shape node per GroupNorm. Once shapes and types are inferred, both are
constants. onnxslim does not do these (it folds only what has constant inputs), hence
these passes; each returns how many nodes it rewrote. :func:`deploy_passes` runs them
(export_onnx: before onnxslim and after). :func:`fold_weight_reshapes` is not one of them:
it prepares a deploy graph for quantization (see its docstring).
"""

from __future__ import annotations


def _inferred(model):
    """(value name -> elem type, value name -> dims as ints or symbol names) after ONNX shape inference."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    types, shapes = {}, {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = v.type.tensor_type
        if t.elem_type:
            types[v.name] = t.elem_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                              for d in t.shape.dim]
    for init in model.graph.initializer:
        types[init.name] = init.data_type
        shapes[init.name] = list(init.dims)
    return types, shapes


def _rewire(model, renames: dict[str, str]) -> None:
    """Make every reader of a key of ``renames`` read its value instead (graph outputs excluded)."""
    if not renames:
        return

    def final(name):
        while name in renames:
            name = renames[name]
        return name

    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = final(name)


def constants_to_initializers(model) -> int:
    """``Constant`` nodes of the main graph become initializers of the same name and ONNX type
    (``value_float`` a float32 scalar, ``value_ints`` an int64 vector, ...): onnxslim 0.1.98
    folds a ``value_float`` Constant into a float64 tensor, which breaks the graph's types."""
    import numpy as np
    from onnx import helper, numpy_helper

    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    kept, changed = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                tensor = type(attr.t)()
                tensor.CopyFrom(attr.t)
                tensor.name = node.output[0]
            elif attr.name in kinds:
                tensor = numpy_helper.from_array(np.array(helper.get_attribute_value(attr), kinds[attr.name]),
                                                 node.output[0])
            else:  # sparse or string constants: left as they are
                kept.append(node)
                continue
            model.graph.initializer.append(tensor)
            changed += 1
            continue
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return changed


def resolve_castlike(model) -> int:
    """``CastLike(x, like)`` whose types are known becomes nothing (same type) or ``Cast(x, to)``."""
    from onnx import helper

    types, _ = _inferred(model)
    outputs = {o.name for o in model.graph.output}
    kept, renames, changed = [], {}, 0
    for node in model.graph.node:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx"):
            source, target = types.get(node.input[0]), types.get(node.input[1])
            if source and target:
                changed += 1
                if source == target and node.output[0] not in outputs:
                    renames[node.output[0]] = node.input[0]
                    continue
                node = helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=target)
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _rewire(model, renames)
    return changed


def constant_batch_reshapes(model) -> int:
    """``Reshape(data, Shape(x))`` becomes ``Reshape(data, [0, d1, d2, ...])`` when ``x`` has
    static dims after the first and its first dim is the same symbol (or number) as ``data``'s.

    Reshape's 0 copies ``data``'s first dim, which equals ``x``'s: the same tensor as before,
    without the runtime Shape. (A GroupNorm's reshape back to its input's shape, in a
    dynamic-batch graph.)"""
    import numpy as np
    from onnx import numpy_helper

    _, shapes = _inferred(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    taken = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        shape_node = producers.get(node.input[1])
        if shape_node is None or shape_node.op_type != "Shape" \
                or any(a.name != "start" or a.i != 0 for a in shape_node.attribute):  # only the whole shape
            continue
        target, data = shapes.get(shape_node.input[0]), shapes.get(node.input[0])
        if not target or not data or data[0] is None or data[0] != target[0] \
                or not all(isinstance(d, int) and d > 0 for d in target[1:]):
            continue
        name = f"{node.output[0]}_shape"
        while name in taken:
            name += "_"
        taken.add(name)
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, *target[1:]], np.int64), name))
        node.input[1] = name
        changed += 1
    return changed


def prune_dead_nodes(model) -> int:
    """Remove nodes none of whose outputs is read (by a node or as a graph output); return how many."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraphs read outer values by name
                for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    needed.update(i for inner in g.node for i in inner.input)
    removed = len(model.graph.node) - len(kept)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    used = needed
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    return removed


def fold_weight_reshapes(model) -> int:
    """``Conv(x, Reshape(W, shape))`` with ``W`` an initializer read by nothing else and ``shape``
    a constant: ``W`` takes the reshaped value under its own name and the Conv reads it.

    For quantizing a deploy-form graph, not for the float export (which keeps torch's
    shapes): there each pointwise Linear weight [out, in] reaches its 1x1 Conv through a
    Reshape to [out, in, 1, 1]; folded, the weight's per-channel DequantizeLinear (axis 0)
    feeds the Conv directly, the pattern ONNX Runtime fuses into QLinearConv."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in model.graph.output}
    dead = set()
    for node in model.graph.node:
        reshape = producers.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if reshape is None or reshape.op_type != "Reshape" or id(reshape) in dead:
            continue
        weight, shape = reshape.input[0], reshape.input[1]
        if weight not in inits or shape not in inits or readers.get(weight) != 1 or weight in outputs \
                or readers.get(reshape.output[0]) != 1:
            continue
        dims = numpy_helper.to_array(inits[shape])
        if (dims <= 0).any():  # ONNX's 0 (copy a dim) and -1 (infer) are not numpy's: leave those
            continue
        value = numpy_helper.to_array(inits[weight]).reshape(dims)
        inits[weight].CopyFrom(numpy_helper.from_array(value, weight))
        node.input[1] = weight
        dead.add(id(reshape))
    kept = [n for n in model.graph.node if id(n) not in dead]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    prune_dead_nodes(model)
    return len(dead)


def deploy_passes(model) -> dict[str, int]:
    """All passes, in order, on ``model`` in place; {pass name: nodes rewritten or removed}."""
    return {"constants_to_initializers": constants_to_initializers(model),
            "castlike_resolved": resolve_castlike(model),
            "batch_reshapes_made_constant": constant_batch_reshapes(model),
            "dead_nodes_removed": prune_dead_nodes(model)}


def weights_folded_copy(onnx_path, out_path) -> int:
    """Write ``onnx_path`` to ``out_path`` with :func:`fold_weight_reshapes` applied; return
    how many weights it folded.

    For tools that compress weights they find as Conv constants (OpenVINO's IR compression
    of NNCF's weight FakeQuantize): behind a Reshape, those weights stay float32 on disk (measured: NNCF's IR of the demo detector
    13.8 MB with the Reshapes, against the FP32 IR's 15.5 MB)."""
    import onnx

    proto = onnx.load(str(onnx_path))
    folded = fold_weight_reshapes(proto)
    onnx.save(proto, str(out_path))
    return folded

