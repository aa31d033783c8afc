"""Runners: one callable per inference backend, with the same input and output convention.

Every runner takes a float32 NCHW ``torch.Tensor`` on the CPU and returns the model's
outputs as a flat list of CPU tensors (the order ``torch.onnx.export`` flattens nested
outputs in), so timing, decoding and accuracy code never branch on the backend.

A backend that cannot run here (no GPU, no TensorRT, torch.compile failing on this
platform, an ONNX file that ONNX Runtime rejects) is never an exception: :func:`make_runner`
returns a :class:`Skipped` record with the reason, and the report shows it as a row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Names users pass to --backends; the value is the Ultralytics-style "format" column.
BACKENDS = {
    "eager": "PyTorch eager",
    "eager-cuda": "PyTorch eager CUDA",
    "compile": "torch.compile",
    "ort": "ONNX Runtime CPU",
    "ort-int8": "ONNX Runtime CPU",   # a torch source's export, PTQ-calibrated, every layer INT8 (QDQ)
    "ort-mixed": "ONNX Runtime CPU",  # ... backbone and neck INT8, detection head float
    "ort-cuda": "ONNX Runtime CUDA EP",
    "ort-trt": "ONNX Runtime TensorRT EP",
    "tensorrt": "TensorRT engine",
    "cuda-graph": "PyTorch CUDA graph",
    "openvino": "OpenVINO CPU",        # the FP32 export as an OpenVINO IR (or a given .xml / .onnx)
    "openvino-int8": "OpenVINO CPU",   # ... the ort-int8 QDQ graph (edgekit's PTQ spec) as an IR
    "ort-static": "ONNX Runtime CPU",  # peer: ONNX Runtime's quantize_static of the FP32 export (benchmarks/peers.py)
    "nncf": "OpenVINO CPU",            # peer: NNCF's INT8 of the OpenVINO FP32 IR
}
ONNX_BACKENDS = ("ort", "ort-int8", "ort-mixed", "ort-static", "ort-cuda", "ort-trt")
OPENVINO_BACKENDS = ("openvino", "openvino-int8", "nncf")
QUANTIZED_BACKENDS = ("ort-int8", "ort-mixed", "openvino-int8")  # edgekit's own PTQ spec
PEER_BACKENDS = ("ort-static", "nncf")
PROVIDERS = {"ort": "CPUExecutionProvider", "ort-int8": "CPUExecutionProvider", "ort-mixed": "CPUExecutionProvider",
             "ort-static": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-trt": "TensorrtExecutionProvider"}


@dataclass
class Skipped:
    """A backend that did not run, and why (``status`` is "skipped" or "failed")."""

    backend: str
    reason: str
    status: str = "skipped"
    format: str = ""

    def __post_init__(self):
        self.format = self.format or BACKENDS.get(self.backend, self.backend)


@dataclass
class Runner:
    """A ready backend: ``runner(x)`` runs one batch; ``sync()`` waits for device work."""

    backend: str
    fn: Callable
    session_ms: float  # building the session / engine / compiled module (before the first call)
    format: str = ""
    precision: str = "fp32"
    sync: Callable[[], None] = field(default=lambda: None)
    fixed_batch: int | None = None  # an ONNX graph with a static batch dimension
    status: str = "ok"
    close: Callable[[], None] = field(default=lambda: None)  # release what the runner holds

    def __post_init__(self):
        self.format = self.format or BACKENDS.get(self.backend, self.backend)

    def __call__(self, x):
        return self.fn(x)


def flatten_outputs(out) -> list:
    """Nested tuples/lists of tensors -> a flat list, depth-first (torch.onnx.export's order)."""
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return [out]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def make_runner(backend: str, *, model=None, onnx_path: str | Path | None = None, threads: int | None = None,
                example=None) -> Runner | Skipped:
    """Build the runner for ``backend`` or say why it cannot run. ``model`` (a torch module)
    serves eager/compile/cuda-graph; ``onnx_path`` serves the ONNX Runtime backends,
    ``tensorrt`` (an engine file, ``.engine``/``.plan``) and the OpenVINO ones (an IR
    ``.xml``). ``example`` is an input used to capture CUDA graphs."""
    if backend not in BACKENDS:
        return Skipped(backend, f"unknown backend; choose from {', '.join(BACKENDS)}", status="failed")
    try:
        if backend in ("eager", "eager-cuda", "compile", "cuda-graph"):
            if model is None:
                return Skipped(backend, "needs a PyTorch model (an .onnx file was given)")
            build = {"eager": _eager, "eager-cuda": _eager_cuda, "compile": _compiled, "cuda-graph": _cuda_graph}
            return build[backend](model, threads, example)
        if backend in ONNX_BACKENDS:
            if onnx_path is None:
                return Skipped(backend, "needs an .onnx file (export the model first or pass one)")
            return _onnxruntime(backend, Path(onnx_path), threads)
        if backend in OPENVINO_BACKENDS:
            if onnx_path is None:
                return Skipped(backend, "needs an OpenVINO IR (.xml) or a model to convert")
            return _openvino(backend, Path(onnx_path), threads)
        return _tensorrt(onnx_path)
    except Exception as exc:  # a backend failing here is a result, not a crash
        return Skipped(backend, _one_line(exc), status="failed")


# ----------------------------------------------------------------------------- PyTorch


def _eager(model, threads, example):
    import torch

    t0 = time.perf_counter()
    model = model.eval()

    def run(x):
        with torch.inference_mode():
            return flatten_outputs(model(x))
    return Runner("eager", run, (time.perf_counter() - t0) * 1e3)


def _eager_cuda(model, threads, example):
    """Eager on the GPU: a copy of the model (the CPU rows keep theirs); the input's
    host-to-device copy is inside the timed call, outputs stay on the device."""
    import copy

    import torch

    if not torch.cuda.is_available():
        return Skipped("eager-cuda", "no CUDA device (torch.cuda.is_available() is False)")
    t0 = time.perf_counter()
    gpu_model = copy.deepcopy(model).eval().cuda()

    def run(x):
        with torch.inference_mode():
            return flatten_outputs(gpu_model(x.cuda(non_blocking=True)))
    return Runner("eager-cuda", run, (time.perf_counter() - t0) * 1e3, sync=torch.cuda.synchronize)


def _compiled(model, threads, example):
    """torch.compile of the model with GRN and deformable convolution routed to the export
    stage's traceable implementations (the Numba kernels are opaque to Dynamo): GRN as the
    torch reference, which Inductor fuses, and DCN as the ``edgekit::deform_conv2d``
    custom op. The routing is process-wide, so it is held only while this runner lives
    (``close()`` ends it). torch.compile is lazy: the first call compiles, and the timing
    reports it as first-inference time."""
    import contextlib

    import torch

    from edgekit.export.deform_export import export_backends

    t0 = time.perf_counter()
    stack = contextlib.ExitStack()
    stack.enter_context(export_backends("native"))
    try:
        compiled = torch.compile(model.eval())
    except Exception:
        stack.close()
        raise

    def run(x):
        with torch.inference_mode():
            return flatten_outputs(compiled(x))
    return Runner("compile", run, (time.perf_counter() - t0) * 1e3, format="torch.compile (Inductor)",
                  close=stack.close)


def _cuda_graph(model, threads, example):
    import torch

    if not torch.cuda.is_available():
        return Skipped("cuda-graph", "no CUDA device (torch.cuda.is_available() is False)")
    if example is None:
        return Skipped("cuda-graph", "needs an example input to capture the graph")
    import copy

    t0 = time.perf_counter()
    gpu_model = copy.deepcopy(model).eval().cuda()  # the CPU rows keep the original
    static_in = example.cuda().clone()
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as the CUDA-graph docs require
                gpu_model(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = flatten_outputs(gpu_model(static_in))
    session_ms = (time.perf_counter() - t0) * 1e3

    def run(x):
        if x.shape != static_in.shape:
            raise ValueError(f"CUDA graph captured for {tuple(static_in.shape)}, got {tuple(x.shape)}")
        static_in.copy_(x, non_blocking=True)
        graph.replay()
        return static_out
    return Runner("cuda-graph", run, session_ms, sync=torch.cuda.synchronize, fixed_batch=example.shape[0])


# ----------------------------------------------------------------------------- ONNX Runtime


def onnx_precision(path: Path) -> str:
    """The graph's precision label: "int8-qdq" (every weight quantized), "mixed" (some
    Conv/Gemm/MatMul weights float, or mixed bit widths), "fp16" or "fp32".

    The export's own metadata decides when present (``export_format`` onnx-int8/onnx-mixed
    from ``edgekit export``, or low bit widths recorded by
    :func:`edgekit.export.qdq.quantize_onnx`): it knows that deformable offset convs stay
    float by design. Otherwise the graph is inspected,
    following each weight back through pass-through ops (a Linear weight reaches MatMul via
    DequantizeLinear -> Transpose) and ignoring convs that only compute DeformConv offsets.
    """
    import onnx

    from edgekit.export.to_onnx import read_metadata

    m = onnx.load(str(path), load_external_data=False)
    meta = read_metadata(m)
    by_format = {"onnx-int8": "int8-qdq", "onnx-mixed": "mixed"}.get(meta.get("export_format"))
    if by_format is not None:
        return by_format
    if "quant_source" in meta and meta.get("precision") == "mixed":  # quantize_onnx: some layers below 8 bits
        return "mixed"
    if any(n.op_type == "DequantizeLinear" for n in m.graph.node):
        return "mixed" if _float_weights(m.graph) else "int8-qdq"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer):
        return "fp16"
    return "fp32"


def _float_weights(graph) -> list:
    """Compute nodes whose weight is a float constant (not DequantizeLinear's output),
    looking through pass-through ops; convs feeding only DeformConv offsets/masks excluded."""
    from edgekit.export.qdq import PASS_THROUGH_OPS

    producer = {o: n for n in graph.node for o in n.output}
    consts = {t.name for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    def source(name):  # the op that really produces a tensor, skipping pass-through ops
        node = producer.get(name)
        while node is not None and node.op_type in PASS_THROUGH_OPS and node.input:
            name, node = node.input[0], producer.get(node.input[0])
        return name, node

    def only_offsets(name, seen=()):  # every reader is a DeformConv offset/mask input (maybe via pass-through)
        uses = consumers.get(name, [])
        return bool(uses) and all((n.op_type == "DeformConv" and i in (2, 4)) or
                                  (n.op_type in PASS_THROUGH_OPS and all(only_offsets(o) for o in n.output))
                                  for n, i in uses)

    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "DeformConv") or len(node.input) < 2:
            continue
        name, src = source(node.input[1])
        constant = name in consts or (src is not None and src.op_type == "Constant")
        if constant and not only_offsets(node.output[0]):
            found.append(node)
    return found


def missing_provider(backend: str) -> Skipped | None:
    """The skip record of an ONNX Runtime backend whose execution provider this build lacks
    (checked before anything is exported for it), else None."""
    import onnxruntime as ort

    provider = PROVIDERS[backend]
    if provider in ort.get_available_providers():
        return None
    return Skipped(backend, f"{provider} is not in this onnxruntime build "
                            f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a GPU machine")


def _onnxruntime(backend: str, path: Path, threads: int | None):
    import onnxruntime as ort

    if not path.is_file():
        return Skipped(backend, f"{path} not found", status="failed")
    provider = PROVIDERS[backend]
    missing = missing_provider(backend)
    if missing is not None:
        return missing
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
    session_ms = (time.perf_counter() - t0) * 1e3
    if provider not in session.get_providers():
        return Skipped(backend, f"{provider} could not be created (ONNX Runtime fell back to "
                                f"{session.get_providers()})")
    inp = session.get_inputs()[0]
    batch_dim = inp.shape[0] if inp.shape else None
    import torch

    def run(x):
        return [torch.from_numpy(o) for o in session.run(None, {inp.name: x.numpy()})]
    precision = onnx_precision(path)
    # the requested variant names the row (a PTQ "int8" graph can keep a few float layers: precision says so)
    label = {"ort-int8": "int8 PTQ", "ort-mixed": "mixed: head float",
             "ort-static": "quantize_static INT8"}.get(backend, precision)
    return Runner(backend, run, session_ms, format=f"{BACKENDS[backend]} ({label})", precision=precision,
                  fixed_batch=batch_dim if isinstance(batch_dim, int) else None)


# ----------------------------------------------------------------------------- OpenVINO


def _openvino(backend: str, path: Path, threads: int | None):
    """An OpenVINO IR on the CPU plugin: latency mode, one stream, ``threads`` inference
    threads, float32 for the float layers (see :mod:`edgekit.export.openvino`)."""
    from edgekit.errors import EdgekitError
    from edgekit.export.openvino import compile_model, ir_precision, require_openvino

    try:
        require_openvino()
    except EdgekitError as exc:
        return Skipped(backend, str(exc))
    if not path.is_file():
        return Skipped(backend, f"{path} not found", status="failed")
    import numpy as np
    import torch

    t0 = time.perf_counter()
    compiled = compile_model(path, threads)
    request = compiled.create_infer_request()
    session_ms = (time.perf_counter() - t0) * 1e3
    outputs = list(compiled.outputs)

    def run(x):
        request.infer([x.numpy()])
        return [torch.from_numpy(np.array(request.get_tensor(o).data)) for o in outputs]  # copies: buffers are reused
    batch = compiled.inputs[0].get_partial_shape()[0]
    precision = ir_precision(path)
    label = {"openvino-int8": "int8 PTQ", "nncf": "NNCF INT8"}.get(backend, precision)
    return Runner(backend, run, session_ms, format=f"{BACKENDS[backend]} ({label})", precision=precision,
                  fixed_batch=batch.get_length() if batch.is_static else None)


# ----------------------------------------------------------------------------- TensorRT


def _tensorrt(engine_path):
    """A serialized TensorRT engine run through TensorRT's Python API with torch CUDA
    buffers (no pycuda). Written against TensorRT 10's tensor-address API; it runs only
    where TensorRT and a GPU exist, so the CPU test suite sees it as skipped."""
    try:
        import tensorrt as trt
    except ImportError:
        return Skipped("tensorrt", "the tensorrt package is not installed (pip install edgekit[tensorrt] on a GPU machine)")
    import torch

    if not torch.cuda.is_available():
        return Skipped("tensorrt", "no CUDA device")
    if engine_path is None or Path(engine_path).suffix not in (".engine", ".plan"):
        return Skipped("tensorrt", "needs a serialized engine (.engine/.plan); build one with `edgekit export`")
    t0 = time.perf_counter()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    stream = torch.cuda.Stream()
    session_ms = (time.perf_counter() - t0) * 1e3

    def run(x):
        xg = x.cuda(non_blocking=True).contiguous()
        context.set_input_shape(inputs[0], tuple(xg.shape))
        context.set_tensor_address(inputs[0], xg.data_ptr())
        outs = []
        for n in outputs:
            out = torch.empty(tuple(context.get_tensor_shape(n)), device="cuda", dtype=_torch_dtype(trt, engine, n))
            context.set_tensor_address(n, out.data_ptr())
            outs.append(out)
        stream.wait_stream(torch.cuda.current_stream())  # the input copy ran on the default stream
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return [o.cpu() for o in outs]
    return Runner("tensorrt", run, session_ms, sync=torch.cuda.synchronize)


def _torch_dtype(trt, engine, name):
    import numpy as np
    import torch

    return torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
