"""Rewrite an FP32 ONNX graph into explicit QDQ form from a quant spec.

Every spec layer is found by its weight initializer ``<module path>.weight`` (the name
torch's exporters keep) or, given the torch model, by value (the dynamo exporter folds a
channels-last Linear's weight into a renamed, transposed MatMul initializer; its output
channels are then axis 1). The weight becomes a quantized initializer followed by a
per-channel ``DequantizeLinear`` whose output keeps the original name, so every consumer
is untouched; each Conv/Gemm/MatMul/DeformConv node reading it (a module shared across
pyramid levels is one node per call) gets ``QuantizeLinear -> DequantizeLinear`` on its
data-input edge only (other readers of the same tensor stay float) and, where the layer
has an ``output`` entry, after its output (after the bias Add where a Linear exports as
MatMul + Add). Biases stay float: ONNX Runtime's QDQ fusion
quantizes them itself when it fuses (which needs them as initializers: see
:func:`fold_conv_biases`). Activation grids are written as UINT8 (a signed grid is
the same values with the zero point shifted by 2^(bits-1)).

Which runtime kernels result (ONNX Runtime 1.32, CPU): ORT fuses a node unit "DQ on
data and weight -> op -> Q" into an integer kernel, so a layer with an ``output`` entry
in the spec (PTQ writes one for each Conv2d by default, ``calibrate(..., conv_outputs=True)``) gets
Q -> DQ after its node as well, and its Conv becomes QLinearConv whatever follows it
(norms, adds). Without it a conv runs DequantizeLinear + float Conv (slower than the FP32
graph: ORT's blocked NCHWc float convs are lost too); that includes Linear layers, which
the deploy-form export writes as 1x1 Convs, so PTQ gives them output grids as well (a
MatMul with a quantized input becomes MatMulIntegerToFloat either way).
On x86 CPUs without VNNI those integer kernels sum u8 x s8 pairs in int16 and can
saturate with 8-bit weights (measured: they then depart from the graph's meaning; with
7-bit weights they match it exactly); calibrate with ``weight_bits=7`` for such targets
(ORT's "reduce range"; TensorRT is unaffected).

Storage by bit width (``weight_storage="packed"``, the default): 7- and 8-bit weights
are INT8 (the int8 export's widths) and every narrower width (2-6 bits) bit planes (:mod:`edgekit.export.bitpack`: b/8 byte
per weight, unpacked to INT8 by a chain of standard bitwise ops in front of the usual
per-channel DequantizeLinear), so the file shrinks with every bit. ONNX Runtime folds the
chain into an INT8 initializer at session creation and then fuses the layer into
QLinearConv / MatMulIntegerToFloat as with INT8 storage (tested for 2-6 bits). That is
also why 4-bit weights are bit planes rather than ONNX's INT4, which is the same size:
INT4 weights get no integer kernel in ORT 1.32 (DequantizeLinear + float Conv/MatMul).
The chain costs about 0.53 KB a layer, more than bit planes save on layers of fewer than
about 4300 / (c - b) weights (c = 4 or 8, the native container; export/README.md).
``weight_storage="native"`` keeps the ONNX types only, 2-4 bits INT4 and 5-8 bits INT8, for
runtimes without BitShift (TensorRT: onnx-tensorrt lists it as unsupported). The
metadata records each layer's storage ("int4", "int8", "bitplane<b>"). Activations
of every width are UINT8 QuantizeLinear -> DequantizeLinear, with a Clip of the integers to
[0, 2^b - 1] in between for b < 8 (the narrower grid, exactly ``fake_quantize``'s), which
keeps ORT's integer kernels for 2-7-bit activations too.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.export import bitpack
from edgekit.fileio import atomic_target

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "DeformConv")
PASS_THROUGH_OPS = ("Transpose", "Identity", "Cast", "Reshape")


def quantize_onnx(fp32_onnx_path, spec: dict, out_path, *, opset: int = 21, model=None,
                  weight_storage: str = "packed") -> Path:
    """Write the QDQ model of ``fp32_onnx_path`` under ``spec`` to ``out_path``; return the path.

    ``model`` (the float torch model, optional) lets weights that the exporter renamed or
    transposed be found by value when '<path>.weight' is not in the graph.
    ``weight_storage``: "packed" stores 2- to 6-bit weights as bit planes, "native" as
    INT4/INT8 only (see the module docstring); 7- and 8-bit weights are INT8 either way.
    """
    import onnx

    from edgekit.calibration.spec import validate_spec
    from edgekit.export.to_onnx import set_metadata

    spec = validate_spec(spec)
    src = Path(fp32_onnx_path)
    if not src.is_file():
        raise EdgekitError(f"ONNX model {src} not found; export one first (edgekit export)")
    try:
        proto = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a corrupt file
        raise EdgekitError(f"{src} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None
    proto = _with_opset(proto, opset, src)
    from edgekit.export.graph_passes import fold_weight_reshapes

    fold_weight_reshapes(proto)  # deploy-form pointwise weights reach their 1x1 Conv through a Reshape
    fold_conv_biases(proto)
    if weight_storage not in WEIGHT_STORAGES:
        raise EdgekitError(f"weight_storage={weight_storage!r} is not one of {', '.join(WEIGHT_STORAGES)}")
    rewriter = _QDQRewriter(proto, src, weight_storage)
    rewriter.apply(spec["layers"], model)
    set_metadata(proto, quantization_metadata(spec, opset, rewriter.storages) | {"renamed_weights": rewriter.renamed})
    onnx.checker.check_model(proto)
    out = Path(out_path)
    with atomic_target(out) as tmp:
        onnx.save(proto, str(tmp))
    return out


# Bit widths an INT8 export holds: 7-bit weights are the "reduced range" int8 that x86 CPUs
# without VNNI need (their u8s8 kernels saturate with full 8-bit weights), stored as INT8.
INT8_WEIGHT_BITS = (7, 8)


WEIGHT_STORAGES = ("packed", "native")
# Widths stored as bit planes under weight_storage="packed": those with no ONNX type of
# their own, and 4 (INT4 gets no integer kernel in ONNX Runtime 1.32). 7 bits stay INT8:
# an int8 export (7-bit "reduce range" weights) keeps plain INT8 initializers that every
# runtime reads, for a saving of only 1/8 byte a weight.
BITPLANE_BITS = (2, 3, 4, 5, 6)


def storage_for(bits: int, mode: str = "packed") -> str:
    """How a ``bits``-wide weight is stored: "int4", "int8" or "bitplane<bits>"."""
    if mode == "packed" and bits in BITPLANE_BITS:
        return f"bitplane{bits}"
    return "int4" if bits <= 4 else "int8"


def spec_precision(spec: dict) -> str:
    """"int8" when every quantized weight is int8-stored (7 or 8 bits) and every activation
    8-bit, else "mixed" (some layer below that)."""
    layers = spec["layers"].values()
    weights_int8 = all(layer["weight"]["bits"] in INT8_WEIGHT_BITS for layer in layers)
    acts_int8 = all(layer[key]["bits"] == 8 for layer in layers for key in ("input", "output") if layer.get(key))
    return "int8" if weights_int8 and acts_int8 else "mixed"


def quantization_metadata(spec: dict, opset: int, storages: dict | None = None) -> dict:
    """What a runtime or a reader of the file needs to know: the precision as the export
    names it, the opset, per-layer bits and per-layer weight storage (:func:`storage_for`;
    default: the packed layout)."""
    layers = spec["layers"]
    weight_bits = {path: layer["weight"]["bits"] for path, layer in layers.items()}
    act_bits = {path: layer["input"]["bits"] for path, layer in layers.items() if layer.get("input")}
    storages = storages or {path: storage_for(bits) for path, bits in weight_bits.items()}
    return {"precision": spec_precision(spec), "opset": str(opset), "quant_source": spec.get("source"),
            "weight_bits": weight_bits, "act_bits": act_bits, "weight_storage": storages}


def fold_conv_biases(proto) -> int:
    """Make Conv biases that are computed constants initializers; return how many.

    The dynamo exporter writes a bias-free conv's zeros as Expand(CastLike(0, <activation>),
    [C]); the CastLike reads a runtime tensor (only for its dtype), so ORT cannot fold it,
    and ORT fuses a QDQ conv into QLinearConv (and a float conv into its blocked NCHWc
    kernel) only when the bias is an initializer.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    folded, dead = 0, []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2] or node.input[2] in inits:
            continue
        expand = producers.get(node.input[2])
        if expand is None or expand.op_type != "Expand" or expand.input[1] not in inits:
            continue
        value = expand.input[0]
        if value in producers and producers[value].op_type == "CastLike":
            value = producers[value].input[0]  # the graph is float32: the cast is to float32
        if value not in inits:
            continue
        shape = tuple(numpy_helper.to_array(inits[expand.input[1]]))
        bias = np.broadcast_to(numpy_helper.to_array(inits[value]).astype(np.float32), shape)
        name = f"{node.name or node.output[0]}_bias"
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(bias), name)
        graph.initializer.append(inits[name])
        node.input[2] = name
        folded += 1
        dead += [expand] + ([producers[expand.input[0]]] if expand.input[0] in producers else [])
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in dead:  # Expand first, then its CastLike: each only once nothing reads it
        if node.output[0] not in used and node in graph.node:
            graph.node.remove(node)
            used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    stale = {i for n in dead for i in n.input if i in inits and i not in used}
    for name in stale:
        graph.initializer.remove(inits[name])
    return folded


def find_layer_weights(graph, weights: dict) -> dict:
    """{module path: (ONNX name of its weight, output-channel axis)} for the paths of
    ``weights`` ({path: float numpy weight of the torch layer, or None}); paths found
    nowhere are left out. How the QDQ writer and the parity checks find a layer:

    - by name: '<path>.weight', an initializer (torch's exporters keep parameter names) or
      a node output (in a QDQ graph the weight's DequantizeLinear keeps the name), axis 0;
    - else by value: an initializer holding the weight (axis 0) or, for a 2-D weight, its
      transpose (axis 1): the dynamo exporter folds a channels-last Linear's weight into a
      renamed, transposed MatMul initializer.
    """
    import numpy as np
    from onnx import numpy_helper

    names = {t.name for t in graph.initializer} | {o for node in graph.node for o in node.output}
    found = {p: (f"{p}.weight", 0) for p in weights if f"{p}.weight" in names}
    by_shape: dict[tuple, list] = {}
    for path, w in weights.items():
        if path in found or w is None:
            continue
        if not by_shape:
            for init in graph.initializer:
                by_shape.setdefault(tuple(init.dims), []).append(init)
        for target, axis in [(w, 0)] + ([(w.T, 1)] if w.ndim == 2 else []):
            match = next((i.name for i in by_shape.get(target.shape, [])
                          if np.array_equal(numpy_helper.to_array(i), target)), None)
            if match is not None:
                found[path] = (match, axis)
                break
    return found


def consumer_map(graph) -> dict:
    """{tensor name: [nodes reading it]}."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def layer_nodes(weight_name: str, consumers: dict) -> list:
    """[(node, data input index)] of every Conv/Gemm/MatMul/DeformConv reading the weight
    ``weight_name`` (through pass-through ops such as Transpose), in the order found; a
    module shared across pyramid levels is one node per call. ``consumers``: :func:`consumer_map`."""
    found, frontier, seen = [], [weight_name], set()
    while frontier:
        name = frontier.pop()
        for node in consumers.get(name, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in COMPUTE_OPS:
                index = list(node.input).index(name)
                if node.op_type == "MatMul":
                    found.append((node, 1 - index))
                elif index == 1:
                    found.append((node, 0))
            elif node.op_type in PASS_THROUGH_OPS:
                frontier.extend(node.output)
    return found


def _with_opset(model, opset: int, src: Path):
    """INT4 DequantizeLinear needs opset 21; older graphs are converted up to it."""
    import onnx
    from onnx import version_converter

    if opset < 21:
        raise EdgekitError(f"QDQ export needs opset >= 21 (INT4 and per-channel DequantizeLinear), got {opset}")
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current >= opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        raise EdgekitError(f"{src} uses opset {current} and could not be converted to {opset} ({exc}); "
                           f"re-export it with opset_version={opset}") from None


class _QDQRewriter:
    """One pass over the graph: weight DQ for each spec layer, QDQ on its data input."""

    def __init__(self, model, src: Path, storage: str = "packed"):
        self.model, self.graph, self.src, self.storage = model, model.graph, src, storage
        self.storages: dict[str, str] = {}  # path -> how its weight is stored (storage_for)
        self.renamed: dict[str, str] = {}  # path -> its weight's ONNX name, where not '<path>.weight'
        self.chains = 0  # bit-plane unpacking chains written so far
        self.inits = {t.name: t for t in self.graph.initializer}
        self.names = set(self.inits) | {n for node in self.graph.node for n in (*node.input, *node.output)}
        self.consumers = consumer_map(self.graph)
        self.new_nodes: list = []  # (anchor node, node to insert before it)
        self.after: dict[int, list] = {}  # id(node) -> nodes to insert right after it

    def apply(self, layers: dict, model=None) -> None:
        weights = self._weight_initializers(layers, model)
        self.renamed = {path: name for path, (name, _) in weights.items() if name != f"{path}.weight"}
        for path, layer in layers.items():
            wname, axis = weights[path]
            nodes = self._compute_nodes(wname, path)
            self._quantize_weight(wname, layer["weight"], axis, path)
            for k, (node, data_index) in enumerate(nodes):
                suffix = f"_{k}" if k else ""
                if layer.get("input") is not None:
                    self._quantize_input(node, data_index, layer["input"], f"{path}.input{suffix}")
                if layer.get("output") is not None:
                    self._quantize_output(self._module_output_node(node), layer["output"], f"{path}.output{suffix}")
        self._insert_nodes()

    def _weight_initializers(self, layers: dict, model) -> dict:
        """{path: (initializer name, output-channel axis)} (see :func:`find_layer_weights`),
        with the spec's axis for weights found by name."""
        modules = dict(model.named_modules()) if model is not None else {}
        weights = {p: modules[p].weight.detach().cpu().float().numpy() if hasattr(modules.get(p), "weight") else None
                   for p in layers}
        found = find_layer_weights(self.graph, weights)
        found = {p: (name, layers[p]["weight"]["axis"] if name == f"{p}.weight" else axis)
                 for p, (name, axis) in found.items()}
        computed = [f"{name} ({p})" for p, (name, _) in found.items() if name not in self.inits]
        if computed:
            raise EdgekitError(f"{self.src}: the weight {computed[0]} of a spec layer is computed by a node, not "
                               f"stored (is the graph quantized already?); quantize the float export")
        missing = [p for p in layers if p not in found]
        names = [name for name, _ in found.values()]
        shared = {n for n in names if names.count(n) > 1}
        if shared:
            raise EdgekitError(f"{self.src}: spec layers share weight initializer(s) {', '.join(sorted(shared)[:3])} "
                               f"(identical weights merged by the exporter); quantize one of them or re-export "
                               f"without simplification")
        if missing:
            hint = ("" if model is not None else "; pass the torch model (quantize_onnx(..., model=m)) so that "
                    "renamed or transposed weights are found by value")
            raise EdgekitError(f"{self.src}: {len(missing)} spec layer(s) match no weight initializer, e.g. "
                               f"{', '.join(missing[:3])} (looked for '<path>.weight'){hint}; check that the spec "
                               f"was made for this model")
        return found

    def _compute_nodes(self, wname: str, path: str) -> list:
        found = layer_nodes(wname, self.consumers)
        if not found:
            raise EdgekitError(f"{self.src}: weight {wname} of spec layer {path!r} feeds no Conv/Gemm/MatMul/"
                               f"DeformConv node; the spec's layer types do not match this graph")
        return found

    def _quantize_weight(self, wname: str, wspec: dict, axis: int, path: str) -> None:
        import numpy as np
        from onnx import helper, numpy_helper

        from edgekit.calibration.spec import qrange

        w = numpy_helper.to_array(self.inits[wname]).astype(np.float32)
        bits = wspec["bits"]
        if axis >= w.ndim or len(wspec["scale"]) != w.shape[axis]:
            raise EdgekitError(f"spec layer {path!r}: {len(wspec['scale'])} weight scales along axis {axis}, "
                               f"but initializer {wname} has shape {list(w.shape)}; the spec is for another model")
        shape = [1] * w.ndim
        shape[axis] = -1
        scale = np.asarray(wspec["scale"], np.float32)
        zp = np.asarray(wspec["zero_point"], np.float32)
        qmin, qmax = qrange(bits, True, narrow=True)
        q = np.clip(np.round(w / scale.reshape(shape)) + zp.reshape(shape), qmin, qmax).astype(np.int8)
        storage = storage_for(bits, self.storage)
        elem = _int_type(8 if storage.startswith("bitplane") else bits, signed=True)
        qname = f"{wname}_quantized"
        init = self.inits[wname]
        if storage.startswith("bitplane"):
            nodes, inits = bitpack.packed_tensor(qname, q, bits, f"{wname}_bitplanes", self._short_prefix())
            init.CopyFrom(inits[0])
            self.graph.initializer.extend(i for i in inits[1:] if i.name not in self.inits)
            self.inits.update((i.name, i) for i in inits)
            self.new_nodes += [(None, n) for n in nodes]
        else:
            init.CopyFrom(_int_tensor(qname, q, elem))
        self.storages[path] = storage
        self.graph.initializer.extend([numpy_helper.from_array(scale, f"{wname}_scale"),
                                       _int_tensor(f"{wname}_zero_point", zp.astype(np.int8), elem)])
        dq = helper.make_node("DequantizeLinear", [qname, f"{wname}_scale", f"{wname}_zero_point"], [wname],
                              name=f"{wname}_DequantizeLinear", axis=axis)
        self.new_nodes.append((None, dq))

    def _short_prefix(self) -> str:
        """A fresh short name prefix for an unpacking chain's intermediate tensors."""
        while True:
            prefix = f"bp{self.chains}."
            self.chains += 1
            if not any(name.startswith(prefix) for name in self.names):
                return prefix

    def _qdq(self, x: str, aspec: dict, base: str, out: str | None = None) -> list:
        """QuantizeLinear (UINT8) (-> Clip to a 2-7 bit grid, on the integers) ->
        DequantizeLinear from tensor ``x``; the DequantizeLinear writes ``out`` (default
        ``<base>_dequantized``). Narrow grids live in an 8-bit container, clipped between Q
        and DQ, so that every conv still reads DequantizeLinear directly and ONNX Runtime
        fuses it into QLinearConv (with UINT4 activations, or a float Clip after the DQ,
        it runs DequantizeLinear + float Conv instead)."""
        import numpy as np
        from onnx import helper, numpy_helper

        bits, signed = aspec["bits"], aspec["signed"]
        # A signed grid is the unsigned one shifted by 2^(bits-1) (the same float values),
        # so every grid is [0, 2^bits - 1] here. Activations are written unsigned: ORT's x86
        # integer kernels are u8 x s8, and its transpose optimizer fails on graphs that mix
        # INT8 and UINT8 activations.
        zero_point = aspec["zero_point"] + (2 ** (bits - 1) if signed else 0)
        self.graph.initializer.extend([
            numpy_helper.from_array(np.array(aspec["scale"], np.float32), f"{base}_scale"),
            _int_tensor(f"{base}_zero_point", np.array(zero_point), _int_type(8, signed=False))])
        nodes = [helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zero_point"],
                                  [f"{base}_quantized"], name=f"{base}_QuantizeLinear")]
        codes = f"{base}_quantized"
        if bits < 8:
            self.graph.initializer.append(numpy_helper.from_array(np.array(2 ** bits - 1, np.uint8),
                                                                  f"{base}_clip_max"))
            nodes.append(helper.make_node("Clip", [codes, "", f"{base}_clip_max"], [f"{base}_clipped"],
                                          name=f"{base}_Clip"))
            codes = f"{base}_clipped"
        nodes.append(helper.make_node("DequantizeLinear", [codes, f"{base}_scale", f"{base}_zero_point"],
                                      [out or f"{base}_dequantized"], name=f"{base}_DequantizeLinear"))
        return nodes

    def _quantize_input(self, node, data_index: int, aspec: dict, base: str) -> None:
        nodes = self._qdq(node.input[data_index], aspec, base)
        self.new_nodes += [(node, n) for n in nodes]
        node.input[data_index] = nodes[-1].output[0]

    def _module_output_node(self, node):
        """The node that writes the module's output: the compute node itself, or, for a
        MatMul (a Linear exported in training form), the Add of its bias when that Add is
        its one reader, so that the grid lands where the torch module's output is."""
        if node.op_type != "MatMul":
            return node
        readers = self.consumers.get(node.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "Add":
            other = [name for name in readers[0].input if name != node.output[0]]
            if len(other) == 1 and other[0] in self.inits:
                return readers[0]
        return node

    def _quantize_output(self, node, aspec: dict, base: str) -> None:
        """Q/DQ after the node, which then writes a new name: its readers keep theirs."""
        original = node.output[0]
        node.output[0] = f"{base}_float"
        self.after.setdefault(id(node), []).extend(self._qdq(node.output[0], aspec, base, out=original))

    def _insert_nodes(self) -> None:
        """Weight DQs first, input QDQ right before their node, output QDQ right after it:
        topological order kept."""
        before: dict[int, list] = {}
        head = []
        for anchor, new in self.new_nodes:
            (head if anchor is None else before.setdefault(id(anchor), [])).append(new)
        ordered = list(head)
        for node in self.graph.node:
            ordered += before.get(id(node), [])
            ordered.append(node)
            ordered += self.after.get(id(node), [])
        del self.graph.node[:]
        self.graph.node.extend(ordered)


def _int_type(bits: int, signed: bool) -> int:
    from onnx import TensorProto

    if bits <= 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def _int_tensor(name: str, values, elem: int):
    """An integer initializer; INT4/UINT4 are packed two per byte by onnx.helper."""
    import numpy as np
    from onnx import TensorProto, helper

    values = np.asarray(values)
    if elem in (TensorProto.INT8, TensorProto.UINT8):
        dtype = np.int8 if elem == TensorProto.INT8 else np.uint8
        return helper.make_tensor(name, elem, values.shape, values.astype(dtype).tobytes(), raw=True)
    # Raw bytes, two values per byte, first value in the low nibble (the ONNX layout);
    # non-raw int32_data would spend a varint per pair and not shrink the file.
    nibbles = (values.astype(np.int64).ravel() & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return helper.make_tensor(name, elem, values.shape, packed.tobytes(), raw=True)
