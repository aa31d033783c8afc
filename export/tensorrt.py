"""TensorRT engines from exported ONNX graphs, through the TensorRT Python API (10.x and 11.x).

Precision follows what each TensorRT version offers:

- ``fp32``: the ONNX graph as is.
- ``fp16``: TensorRT 10 builds an FP32 graph with ``BuilderFlag.FP16`` (weak typing:
  TensorRT may pick FP16 kernels). TensorRT 11 removed every precision flag (all networks
  are strongly typed), so FP16 must be in the graph itself: pass an FP16 ONNX export
  (``export_onnx(precision="fp16")``, ``edgekit export --format onnx-fp16``); a graph
  with no float16 tensor is refused with that advice.
- ``int8`` (also int8/mixed-bit QDQ graphs): explicit quantization from the graph's
  QuantizeLinear/DequantizeLinear nodes, never calibration. TensorRT 10: ``INT8`` and
  ``FP16`` flags (quantized layers in INT8, the rest free to use FP16); TensorRT 11: the
  strongly typed graph alone.

Deformable convolution: TensorRT's ONNX parser imports ``DeformConv`` natively from
10.1 on; older versions are refused with the advice to export with ``--deform decompose``
(standard ops only). End-to-end graphs use ONNX ``NonMaxSuppression``, which the parser
maps to its NMS layer.

FP16-unsafe layers (``fp32_layers``, module paths such as ``backbone.stages.0.0.grn`` from
:mod:`edgekit.calibration.fp16_safety`): TensorRT 10 with its FP16/INT8 flags (weak typing)
may run any layer in FP16, so the layers that came from those modules get layer precision
constraints (``layer.precision`` and every output type float32) with
``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` (the build fails rather than drop one;
``PREFER_`` would only warn). The ONNX nodes of a module are found from the module scopes
and source line that ``export_onnx`` keeps on each node (:func:`module_nodes`, which also
covers the deploy form's GRN, computed inline by its block), and a network layer belongs to
the node its ``[ONNX Layer: <node>]`` metadata names (TensorRT 10's parser; else its name,
which the parser derives from the node's). A pin that matches no node is refused by name
before anything is built. Strongly typed builds (TensorRT 11, which removed the flag) take
no constraints: the pins are in the FP16 graph itself (``export_onnx(precision="fp16")``),
and ``fp32_layers`` there is only checked against the graph.

Every build reads and updates a timing cache (faster rebuilds, reproducible tactic
choices) and writes beside the engine ``<engine>.trtexec.sh``, the equivalent ``trtexec``
command, so the same engine can be rebuilt on the target (a Jetson) without Python.

What was never run: tensorrt cannot be installed on the machine this was written on (no
NVIDIA GPU), so :func:`build_engine` has only run against a stand-in module that checks
which API calls it makes (tests/test_export_tensorrt.py); no engine has been built, no
``trtexec`` command executed, and the TensorRT 11 strong-typing path and native
DeformConv import are written from NVIDIA's migration guide and release notes, untested.
The FP32 layer constraints likewise: the stand-in checks which layers get
``precision``/``set_output_type``, the flag and the trtexec flags, with layers made from the
nodes of real ``export_onnx`` graphs, but no engine was built with them: whether this
TensorRT's parser names and tags layers as assumed, whether it honours the constraints
(and what the FP32 layers cost in speed) is not known.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fileio import write_bytes_atomic

PRECISIONS = ("fp32", "fp16", "int8")
MIN_VERSION = (10, 0)
DEFORM_VERSION = (10, 1)  # ONNX parser imports DeformConv natively from TensorRT 10.1
# Modules wrapping the user's model in an export (export.to_onnx: DetectorOutputs "model",
# _Precision "net"): a node's recorded scope is the module path behind one of these.
WRAPPER_PREFIXES = ("", "model.", "net.", "net.model.")
INSTALL_HINT = "pip install 'edgekit[tensorrt]' (tensorrt>=10.1) on a machine with an NVIDIA GPU and driver"


def tensorrt_version() -> tuple[int, int] | None:
    """(major, minor) of the installed tensorrt package, None when it is not importable."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    major, minor = (trt.__version__.split(".") + ["0"])[:2]
    return int(major), int(minor)


def require_tensorrt():
    """The tensorrt module, or one clear error saying why it cannot be used."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EdgekitError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}, or export --format onnx-fp16 "
                           f"and build on the target with trtexec") from None
    version = tensorrt_version()
    if version < MIN_VERSION:
        raise EdgekitError(f"TensorRT {trt.__version__} is too old; edgekit builds with TensorRT >= 10.0 "
                           f"({INSTALL_HINT})")
    return trt


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise EdgekitError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _shape(dims) -> str:
    return "x".join(str(int(d)) for d in dims)


def trtexec_command(onnx_path, engine_path, timing_cache=None, *, precision: str = "fp16", trt_major: int = 10,
                    shapes: dict | None = None, workspace_mib: int | None = None,
                    strongly_typed: bool = False, fp32_layers: dict | None = None) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine`.

    ``shapes`` maps dynamic input names to (min, opt, max) shapes. TensorRT 10 gets the
    precision flags (``--fp16``; ``--int8 --fp16`` for QDQ graphs); TensorRT 11 gets none,
    its precision coming from the graph (strong typing is always on); ``strongly_typed``
    asks TensorRT 10 for the same (``--stronglyTyped``, no precision flags).
    ``fp32_layers`` ({network layer name: number of outputs}, as :func:`build_engine`
    constrains them) become ``--precisionConstraints=obey --layerPrecisions=<layer>:fp32,...
    --layerOutputTypes=<layer>:fp32[+fp32...],...`` (TensorRT 10 weak typing only).
    """
    _check_precision(precision)
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if trt_major < 11 and strongly_typed:
        args.append("--stronglyTyped")
    elif trt_major < 11:
        args += {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}[precision]
        if fp32_layers:
            args += ["--precisionConstraints=obey", "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers),
                     "--layerOutputTypes=" + ",".join(f"{n}:" + "+".join(["fp32"] * k) for n, k in fp32_layers.items())]
    for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if shapes:
            args.append(f"{flag}=" + ",".join(f"{name}:{_shape(s[index])}" for name, s in shapes.items()))
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    if workspace_mib is not None:
        args.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
    return " ".join(shlex.quote(a) for a in args)


def module_nodes(graph, modules) -> dict:
    """{module path: names of the graph's nodes that came from it}.

    From each node's origin as :func:`edgekit.export.to_onnx.node_origins` reads it (torch's
    module scopes, kept through onnxslim by ``export_onnx``), a node comes from module ``P``
    when

    - ``P`` is one of its scopes: ``P``, or a module inside it, was called and made the node; or
    - ``P`` is never called in the graph, ``P`` is ``S.<rest>`` for the node's innermost scope
      ``S``, and the source line that made the node names ``self.<rest>``: ``S``'s forward
      computed ``P``'s function inline, as the deploy form's blocks do with their GRN
      (``grn_channels_first(y, self.grn.gamma, ...)``) and pointwise layers. Everything that
      line computes counts (``F.gelu(pointwise_conv(self.pwconv1, y))`` gives the Gelu to
      ``pwconv1`` too): more FP32, never less. A module reached by index (``self.stages[0]``)
      or from a line that does not name it is not found this way.

    Scopes are read behind the export wrappers (:data:`WRAPPER_PREFIXES`).
    """
    import ast

    from edgekit.export.to_onnx import node_origins

    origins = []
    for name, (scopes, line) in node_origins(graph).items():
        scopes = [s for s in ast.literal_eval(scopes)[:-1] if s]  # the last entry is the op itself
        origins.append((name, set().union(*map(_unwrapped, scopes)), _unwrapped(scopes[-1]) if scopes else {""}, line))
    called = set().union(*(paths for _, paths, _, _ in origins))
    found = {m: [] for m in modules}
    for name, paths, inner, line in origins:
        for module in modules:
            if module in paths or (module not in called and _inlined(module, inner, line)):
                found[module].append(name)
    return found


def _unwrapped(scope: str) -> set:
    """The module paths a recorded scope can stand for behind the export wrappers ("": a wrapper itself)."""
    return {scope[len(p):] for p in WRAPPER_PREFIXES if (scope + ".").startswith(p)}


def _inlined(module: str, inner: set, line: str) -> bool:
    """Whether ``line``, run in the forward of one of the modules ``inner``, names ``module`` as ``self.<rest>``."""
    import re

    for scope in inner:
        if not scope or module.startswith(scope + "."):
            rest = module[len(scope) + 1:] if scope else module
            if re.search(rf"\bself\.{re.escape(rest)}(?!\w)", line):
                return True
    return False


def pinned_nodes(graph, fp32_layers, onnx_path) -> dict:
    """{module path: its nodes (:func:`module_nodes`)}; a module with no node is refused by name."""
    bad = [m for m in fp32_layers if not isinstance(m, str) or not m]
    if bad:
        raise EdgekitError(f"fp32_layers takes module paths such as 'backbone.stages.0.0.grn', got {bad[0]!r}")
    found = module_nodes(graph, fp32_layers)
    for module, nodes in found.items():
        if not nodes:
            raise EdgekitError(f"fp32 layer {module!r} matches no node of {onnx_path}: no node came from that module; "
                               f"give a module path of this model (model.named_modules()), in a graph written by "
                               f"edgekit's export_onnx (it keeps each node's module scopes)")
    return found


def _layer_nodes(layer) -> list:
    """The ONNX nodes a network layer was parsed from: its ``[ONNX Layer: <node>]`` metadata
    entries (TensorRT 10's parser), else its name (which the parser derives from the node's)."""
    import re

    return re.findall(r"\[ONNX Layer: ([^\]]+)\]", getattr(layer, "metadata", "") or "") or [layer.name]


def constrain_fp32(trt, network, pinned: dict, onnx_path) -> dict:
    """Give the network layers parsed from the ``pinned`` nodes ({module: node names}) FP32
    precision and FP32 outputs; return {layer name: number of outputs}. Layers with a
    non-float output (shape arithmetic, indices) and constants (weights, not computation)
    are left to TensorRT: they are not FP16 candidates. A module whose nodes gave no
    floating-point layer is refused by name (nothing has been written yet)."""
    floats = (trt.float32, trt.float16)
    by_node = {}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != trt.LayerType.CONSTANT and layer.num_outputs and all(
                layer.get_output(i).dtype in floats for i in range(layer.num_outputs)):
            for node in _layer_nodes(layer):
                by_node.setdefault(node, []).append(layer)
    constrained = {}
    for module, nodes in pinned.items():
        layers = [layer for node in nodes for layer in by_node.get(node, ())]
        if not layers:
            raise EdgekitError(f"fp32 layer {module!r}: its {len(nodes)} node(s) in {onnx_path} gave no floating-point "
                               f"TensorRT layer to constrain; pin a module that computes (see the fp16 safety report)")
        for layer in layers:
            layer.precision = trt.float32
            for i in range(layer.num_outputs):
                layer.set_output_type(i, trt.float32)
            constrained[layer.name] = layer.num_outputs
    return constrained


def _graph_facts(onnx_path: Path) -> dict:
    """What the builder must know before parsing: float16 tensors, DeformConv, dynamic inputs."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    dynamic = {}
    for value in graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        dynamic[value.name] = dims
    fp16 = any(i.data_type == TensorProto.FLOAT16 for i in graph.initializer) or any(
        a.name == "to" and a.i == TensorProto.FLOAT16 for n in graph.node if n.op_type == "Cast" for a in n.attribute)
    return {"graph": graph, "fp16": fp16, "deform": any(n.op_type == "DeformConv" for n in graph.node),
            "qdq": any(n.op_type == "QuantizeLinear" or n.op_type == "DequantizeLinear" for n in graph.node),
            "inputs": dynamic}


def _profile_shapes(inputs: dict, min_batch: int, opt_batch: int, max_batch: int) -> dict:
    """(min, opt, max) shapes for inputs with a dynamic batch; other dynamic dims are refused."""
    shapes = {}
    for name, dims in inputs.items():
        if -1 not in dims:
            continue
        if -1 in dims[1:]:
            raise EdgekitError(f"input {name!r} has dynamic dimensions besides the batch ({dims}); "
                               f"export with a fixed image size for TensorRT")
        shapes[name] = tuple([b, *dims[1:]] for b in (min_batch, opt_batch, max_batch))
    return shapes


def _script_paths(engine_path: Path, onnx_path: Path, cache_path: Path) -> list:
    """Paths for the trtexec script, which runs in the engine's folder: files in that folder
    by name (the folder can move, e.g. onto the target device), others absolute."""
    folder = engine_path.resolve().parent
    return [p.name if p.resolve().parent == folder else str(p.resolve()) for p in (onnx_path, engine_path, cache_path)]


def build_engine(onnx_path, engine_path, *, precision: str = "fp16", min_batch: int = 1, opt_batch: int = 1,
                 max_batch: int = 8, timing_cache=None, workspace_mib: int | None = None, fp32_layers=()) -> dict:
    """Build and serialize a TensorRT engine from an ONNX file; return what was done.

    ``fp32_layers``: module paths to keep in FP32 (see the module docstring); with TensorRT
    10's FP16/INT8 flags their layers get precision constraints, a strongly typed build
    takes them from the graph. Writes ``engine_path``, the timing cache (default
    ``<engine>.timing.cache``) and ``<engine>.trtexec.sh``, each atomically. Returns
    {"engine", "trtexec", "timing_cache", "tensorrt", "precision", "build_seconds",
    "fp32_layers", "fp32_constrained"} (the last: {constrained layer name: outputs}).
    """
    _check_precision(precision)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EdgekitError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}/{opt_batch}/{max_batch}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EdgekitError(f"{onnx_path}: no such ONNX file; export one first (edgekit export)")
    trt = require_tensorrt()
    version = tensorrt_version()
    facts = _graph_facts(onnx_path)
    if facts["deform"] and version < DEFORM_VERSION:
        raise EdgekitError(f"TensorRT {trt.__version__} cannot import ONNX DeformConv (needs >= 10.1); upgrade "
                           f"TensorRT or export with --deform decompose")
    if precision == "fp16" and version[0] >= 11 and not facts["fp16"]:
        raise EdgekitError(f"{onnx_path} is an FP32 graph and TensorRT {trt.__version__} has no FP16 builder flag "
                           f"(strong typing only); export it with --format onnx-fp16 (precision='fp16') first")
    if precision == "int8" and not facts["qdq"]:
        raise EdgekitError(f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes; int8 engines come from QDQ "
                           f"graphs (--format onnx-int8 with --calibration SPEC.json)")
    fp32_layers = list(dict.fromkeys(fp32_layers))
    if fp32_layers and precision == "fp32" and not facts["fp16"]:
        raise EdgekitError("fp32_layers applies to fp16 and int8 engines; an fp32 engine runs every layer in FP32 "
                           "already: remove it")
    pinned = pinned_nodes(facts["graph"], fp32_layers, onnx_path)  # refused before anything is built or written
    cache_path = Path(timing_cache) if timing_cache is not None else engine_path.with_name(engine_path.name + ".timing.cache")
    shapes = _profile_shapes(facts["inputs"], min_batch, opt_batch, max_batch)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 11.x: always strongly typed (the flag is accepted); 10.x: only to keep an FP16 graph's
    # own types when FP32 was asked for (weak typing could not honour it).
    strongly_typed = version[0] >= 11 or (precision == "fp32" and facts["fp16"])
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgekitError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[0] if errors else 'unknown error'}"
                           f" ({len(errors)} error(s)); check the opset and operators against TensorRT {trt.__version__}")
    config = builder.create_builder_config()
    constrained = {}
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
        if pinned:  # strongly typed builds take the pins' float32 from the graph (TensorRT 11 removed this flag)
            constrained = constrain_fp32(trt, network, pinned, onnx_path)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)  # fail the build rather than drop one
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EdgekitError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path}; "
                           f"its log above says why (often an unsupported layer or too small a workspace)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(engine_path, bytes(serialized))
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    command = trtexec_command(*_script_paths(engine_path, onnx_path, cache_path), precision=precision,
                              trt_major=version[0], shapes=shapes, workspace_mib=workspace_mib,
                              strongly_typed=strongly_typed, fp32_layers=constrained)
    script = engine_path.with_name(engine_path.name + ".trtexec.sh")
    write_bytes_atomic(script, f"#!/bin/sh\n# Rebuilds {engine_path.name} as edgekit did (TensorRT {trt.__version__}).\n"
                          f"cd \"$(dirname \"$0\")\" || exit 1\n{command}\n".encode())
    return {"engine": str(engine_path), "trtexec": command, "trtexec_script": str(script),
            "timing_cache": str(cache_path), "tensorrt": trt.__version__, "precision": precision,
            "build_seconds": seconds, "fp32_layers": fp32_layers, "fp32_constrained": constrained}
