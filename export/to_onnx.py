"""PyTorch -> ONNX: one function, :func:`export_onnx`, that writes a checked, self-describing file.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch 2.13's default; the TorchScript
exporter is deprecated). It keeps every parameter initializer under its torch name
("<module path>.weight"), which is how the QDQ writer finds layers; the custom
deformable op reaches ONNX ``DeformConv`` through a translation table
(:mod:`edgekit.export.deform_export`).

By default the graph is the model's deploy form (:mod:`edgekit.export.deploy_form`: the
same parameters, channels-first ConvNeXt V2 blocks with one ``Gelu`` node each, which
needs opset >= 20), cleaned by :mod:`edgekit.export.graph_passes`; ``form="training"``
exports the modules as written.

Every file gets: the checker (full check) and strict shape inference, onnxslim
simplification only when the simplified graph gives the same outputs, and metadata
(edgekit version, model name, classes, input size, normalisation, precision, deform
mode, form, plus the caller's entries) that :func:`read_metadata` returns as Python values.

Each node the exporter made keeps where it came from (:func:`node_origins`): torch's module
scopes and the source line that made it, which onnxslim would drop; TensorRT builds use them
to find the layers of FP16-pinned modules (:func:`edgekit.export.tensorrt.module_nodes`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from edgekit.errors import EdgekitError
from edgekit.export.deform_export import DEFORM_MODES
from edgekit.export.deploy_form import FORMS

PRECISIONS = ("fp32", "fp16")
DETECTOR_OUTPUTS = ("boxes", "scores")
ORIENTED_OUTPUTS = ("rboxes", "scores")
CLASSIFIER_OUTPUTS = ("logits",)
INPUT_NAME = "images"
# Metadata values that are not strings are stored as JSON; this key lists them, so
# :func:`read_metadata` gives back exactly what was written (strings stay readable).
JSON_KEYS = "edgekit.json_keys"
# Node metadata: the dynamo exporter's module scopes (['', 'model', 'model.backbone', ...,
# op name]) and stack trace, and the trace's innermost source line as export_onnx keeps it.
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
STACK_KEY = "pkg.torch.onnx.stack_trace"
SOURCE_KEY = "edgekit.source_line"


class DetectorOutputs(nn.Module):
    """An RSDet whose forward gives ``boxes`` [B, N, 4] (xyxy, input pixels) and ``scores``
    [B, N, C], computed by :func:`edgekit.models.detect_post.decode_predictions`; an
    oriented RSDet gives ``rboxes`` [B, N, 5] (cx, cy, w, h, angle in (-pi/2, pi/2), not
    canonicalised: see :func:`edgekit.models.obb_post.decode_rotated_predictions`) instead
    of ``boxes``.

    The per-level outputs are decoded in float32 whatever the model's dtype: pixel
    coordinates of a 1024-px input have a float16 spacing of 0.5-1 px.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> tuple[str, ...]:
        return ORIENTED_OUTPUTS if getattr(self.model, "obb", False) else DETECTOR_OUTPUTS

    def forward(self, images: torch.Tensor):
        from edgekit.models.detect_post import decode_predictions
        from edgekit.models.obb_post import decode_rotated_predictions

        raw = self.model(images)
        raw = tuple([t.float() for t in level] for level in raw)
        if getattr(self.model, "obb", False):
            return decode_rotated_predictions(raw, self.model.strides, canonical=False)
        return decode_predictions(raw, self.model.strides)


class _Precision(nn.Module):
    """Runs ``net`` in ``dtype`` behind float32 graph inputs and outputs."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, images: torch.Tensor):
        out = self.net(images.to(self.dtype))
        if isinstance(out, torch.Tensor):
            return out.float()
        return tuple(t.float() for t in out)


def is_detector(model: nn.Module) -> bool:
    from edgekit.models.detector import RSDet

    return isinstance(model, (RSDet, DetectorOutputs))


def registry_name(model: nn.Module) -> str:
    """The registry name of an edgekit model (``rsdet_atto``, ``convnextv2_femto``), else its class name."""
    from edgekit.models.convnextv2 import VARIANTS, ConvNeXtV2

    inner = model.model if isinstance(model, DetectorOutputs) else model
    config = getattr(inner, "config", None)
    if isinstance(config, dict) and "backbone" in config:
        return f"rsdet_{config['backbone']}"
    if isinstance(inner, ConvNeXtV2):
        for size, arch in VARIANTS.items():
            if list(arch["dims"]) == list(inner.dims) and list(arch["depths"]) == list(inner.depths):
                return f"convnextv2_{size}"
    return type(inner).__name__


def _check_options(image_size, precision, deform, opset, form="deploy"):
    if precision not in PRECISIONS:
        raise EdgekitError(f"export: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if deform not in DEFORM_MODES:
        raise EdgekitError(f"export: unknown deform mode {deform!r}; choose one of {', '.join(DEFORM_MODES)}")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise EdgekitError(f"export: image_size must be a positive multiple of 32 (the backbone's stride), "
                           f"got {image_size!r}; e.g. image_size=640")
    if opset < 19:
        raise EdgekitError(f"export: opset {opset} has no DeformConv/float16 GridSample; use opset >= 19")
    if form not in FORMS:
        raise EdgekitError(f"export: unknown form {form!r}; choose one of {', '.join(FORMS)}")


def _graph_module(model: nn.Module, precision: str) -> tuple[nn.Module, tuple[str, ...], str]:
    """(module to export, output names, prefix its parameter names carry)."""
    detector = is_detector(model)
    net = model if isinstance(model, DetectorOutputs) or not detector else DetectorOutputs(model)
    prefix = "model." if isinstance(net, DetectorOutputs) else ""
    names = net.output_names if detector else CLASSIFIER_OUTPUTS
    if precision == "fp16":
        net = to_precision(net, precision)
        prefix = "net." + prefix
    return net.eval(), names, prefix


def to_precision(net: nn.Module, precision: str) -> nn.Module:
    """``net`` itself for fp32; for fp16 a float16 copy behind float32 inputs and outputs
    (GRN and deformable-convolution parameters stay float32, and layers the FP16 safety
    check pinned run in float32, see :func:`_half`)."""
    import copy

    if precision == "fp32":
        return net
    if precision != "fp16":
        raise EdgekitError(f"export: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return _Precision(_half(copy.deepcopy(net)), torch.float16)


def _half(net: nn.Module) -> nn.Module:
    """float16 parameters, except those of GRN and deformable convolution: those layers
    compute in float32 anyway, and float32 parameters keep their initializer names (a
    cast parameter would become a folded constant with a generated name). A module marked
    ``edgekit_fp32`` (``calibration.fp16_safety.pinned_fp32``: its FP16 run overflows or
    loses accuracy) stays float32 whole, runs on a float32 cast of its input and hands on
    float32; with any such pin, every other module holding float16 parameters casts its
    input to float16, so float32 lasts from a pinned layer to the next float16 one."""
    from edgekit.calibration.fp16_safety import FP32_MARK
    from edgekit.models.deform import DeformConv2d
    from edgekit.models.grn import GRN

    def cast(value, dtype):
        if isinstance(value, torch.Tensor):
            return value.to(dtype) if value.is_floating_point() else value
        if isinstance(value, (tuple, list)):
            return type(value)(cast(v, dtype) for v in value)
        return {k: cast(v, dtype) for k, v in value.items()} if isinstance(value, dict) else value

    pinned = {m for top in net.modules() if getattr(top, FP32_MARK, False) for m in top.modules()}
    kept = {t: t.data for m in pinned for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
            if t.is_floating_point()}  # float32 as they were, not float32 of their float16 rounding
    net.half()
    for tensor, data in kept.items():
        tensor.data = data
    for module in net.modules():
        if getattr(module, FP32_MARK, False):
            module.register_forward_pre_hook(lambda m, args, kwargs: cast((args, kwargs), torch.float32),
                                              with_kwargs=True)
        elif isinstance(module, (GRN, DeformConv2d)):
            for param in module.parameters(recurse=False):
                param.data = param.data.float()
        elif pinned and module not in pinned and any(p.dtype == torch.float16 for p in module.parameters(False)):
            module.register_forward_pre_hook(lambda m, args, kwargs: cast((args, kwargs), torch.float16),
                                             with_kwargs=True)
    return net


def torch_to_onnx(net: nn.Module, args: tuple, *, input_names, output_names, deform: str = "native",
                  opset: int = 19, dynamic_batch: bool = True):
    """``torch.onnx.export`` (dynamo) of ``net(*args)`` -> ModelProto, not checked or simplified.

    The building block of :func:`export_onnx`, public for graphs with other inputs (tests
    of single layers, tools). The edgekit ops are routed to traceable implementations;
    with ``dynamic_batch`` the first axis of every input is one symbolic ``batch``.
    """
    import contextlib
    import io
    import warnings

    from edgekit.export.deform_export import export_backends, onnx_translations

    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic = tuple(None if a is None else {0: batch} for a in args)
        if _takes_varargs(net):  # torch.export sees forward(*inputs) as one tuple argument
            dynamic = (dynamic,)
    chatter = io.StringIO()  # the exporter prints its steps; an error below says what failed
    with export_backends(deform), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")  # deprecation warnings from inside torch.export
        try:
            # optimize=False: the exporter's optimizer folds parameters into renamed
            # constants; onnx_checks.simplify folds everything else and keeps them.
            program = torch.onnx.export(net, tuple(args), dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), opset_version=opset,
                                        dynamic_shapes=dynamic, custom_translation_table=onnx_translations(),
                                        optimize=False, verbose=False)
        except Exception as exc:
            raise EdgekitError(f"export: torch.onnx.export failed for {type(net).__name__}: {_summary(exc)}; "
                               f"the chained traceback has the exporter's full report") from exc
    return program.model_proto


def _takes_varargs(net: nn.Module) -> bool:
    import inspect

    params = list(inspect.signature(net.forward).parameters.values())
    return len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL


def _summary(exc: Exception) -> str:
    """The one line that says what went wrong in the exporter's pages-long report."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for n, line in enumerate(lines):
        if line.startswith("## Exception summary") and n + 1 < len(lines):
            return lines[n + 1][:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _parameter_names(model: nn.Module) -> set[str]:
    inner = model.model if isinstance(model, DetectorOutputs) else model
    return {name for name, _ in inner.named_parameters()} | {name for name, _ in inner.named_buffers()}


def _strip_prefix(model, prefix: str) -> None:
    """Rename initializers '<prefix><torch name>' (the export wrappers' names) to the user's torch names."""
    if not prefix:
        return
    graph = model.graph
    taken = {v for node in graph.node for v in node.output} | {i.name for i in graph.input}
    renames = {}
    for init in graph.initializer:
        if init.name.startswith(prefix) and init.name[len(prefix):] not in taken:
            renames[init.name] = init.name[len(prefix):]
    from edgekit.export.onnx_checks import rename_values

    rename_values(model, renames)


def node_origins(graph) -> dict[str, tuple[str, str]]:
    """{node name: (module scopes as the exporter wrote them, source line that made the node)}
    for the nodes that carry torch's scopes (the exporter's own, or those export_onnx kept)."""
    origins = {}
    for node in graph.node:
        meta = {entry.key: entry.value for entry in node.metadata_props}
        if SCOPES_KEY in meta:
            trace = meta.get(STACK_KEY, "").strip().splitlines()
            origins[node.name] = (meta[SCOPES_KEY], meta.get(SOURCE_KEY, trace[-1].strip() if trace else ""))
    return origins


def _keep_origins(graph, origins: dict) -> None:
    """Put each recorded origin back on the node of that name: onnxslim and the graph passes
    drop node metadata but keep the names of the nodes they keep. Only the scopes and one
    source line travel (the full trace would ship this machine's file paths)."""
    for node in graph.node:
        if node.name in origins:
            have = {entry.key for entry in node.metadata_props}
            for key, value in zip((SCOPES_KEY, SOURCE_KEY), origins[node.name]):
                if key not in have:
                    entry = node.metadata_props.add()
                    entry.key, entry.value = key, value


def _metadata(model: nn.Module, image_size, precision, deform, opset, extra: dict | None, form: str) -> dict:
    import edgekit
    from edgekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    inner = model.model if isinstance(model, DetectorOutputs) else model
    classes = getattr(inner, "class_names", None)
    meta = {
        "edgekit_version": edgekit.__version__,
        "model": registry_name(model),
        "task": "detect" if is_detector(model) else "classify",
        "classes": list(classes) if classes is not None else None,
        "input_size": [int(image_size), int(image_size)],
        "input_layout": "NCHW RGB float32, letterboxed (top-left), (x/255 - mean) / std",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "precision": precision,
        "deform": deform,
        "opset": int(opset),
        "form": form,
    }
    if is_detector(model):
        meta["strides"] = list(inner.strides)
        meta["boxes"] = "oriented" if getattr(inner, "obb", False) else "horizontal"
    meta.update(extra or {})
    return meta


def set_metadata(model, metadata: dict) -> None:
    """Write ``metadata`` into ``model.metadata_props`` (replacing keys already there)."""
    current = read_metadata(model)
    current.pop(JSON_KEYS, None)
    current.update(metadata)
    del model.metadata_props[:]
    json_keys = []
    for key, value in current.items():
        if not isinstance(value, str):
            try:
                value = json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise EdgekitError(f"export: metadata[{key!r}] cannot be stored ({exc}); pass strings, numbers, "
                                   f"lists or dicts of them") from None
            json_keys.append(key)
        entry = model.metadata_props.add()
        entry.key, entry.value = str(key), value
    if json_keys:
        entry = model.metadata_props.add()
        entry.key, entry.value = JSON_KEYS, json.dumps(json_keys)


def read_metadata(source) -> dict:
    """Metadata of an ONNX file or ModelProto, non-string values decoded from JSON."""
    model = load_onnx(source) if isinstance(source, (str, os.PathLike)) else source
    props = {p.key: p.value for p in model.metadata_props}
    json_keys = json.loads(props.pop(JSON_KEYS, "[]"))
    for key in json_keys:
        if key in props:
            props[key] = json.loads(props[key])
    return props


def load_onnx(path) -> "onnx.ModelProto":  # noqa: F821
    """Load an ONNX file (external data included) or raise one clear line."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{path}: no such ONNX file; check the path (export one with `edgekit export`)")
    if path.stat().st_size == 0:
        raise EdgekitError(f"{path}: the file is empty; re-export the model")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError, onnx.checker.ValidationError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgekitError(f"{path}: not a readable ONNX model ({msg}); the file is corrupt or truncated, "
                           f"re-export it") from None
    if not model.graph.node or not model.graph.output:
        raise EdgekitError(f"{path}: the ONNX model has no graph (truncated or not an ONNX file); re-export it")
    return model


def export_onnx(model: nn.Module, path, *, image_size: int, precision: str = "fp32", deform: str = "native",
                opset: int = 20, dynamic_batch: bool = True, metadata: dict | None = None,
                simplify: bool = True, model_name: str | None = None, form: str = "deploy") -> Path:
    """Export ``model`` (an RSDet, a :class:`DetectorOutputs` or a classifier) to ``path``.

    Input ``images`` [B, 3, image_size, image_size] float32; outputs ``boxes`` and
    ``scores`` (detectors) or ``logits`` (classifiers), float32 in both precisions.
    ``precision="fp16"`` runs the body in float16 (GRN's L2 reduction and the deformable
    sampling stay float32); ``deform`` picks ONNX ``DeformConv`` (``native``) or standard
    ops (``decompose``). ``form="deploy"`` (default) exports
    :func:`edgekit.export.deploy_form.to_deploy_form` of the model (same outputs to float
    rounding, same initializer names and shapes; GELU is one ``Gelu`` node from opset 20
    on, the Erf formula below it), ``"training"`` the modules as written. ``metadata``
    entries are added to the file's metadata (any JSON-able values); ``model_name``
    overrides the recorded model name. Returns the path written (atomically).
    """
    from edgekit.export import graph_passes, onnx_checks
    from edgekit.export.deploy_form import deployed_layers, to_deploy_form

    _check_options(image_size, precision, deform, opset, form)
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        source = to_deploy_form(model) if form == "deploy" else model
        net, output_names, prefix = _graph_module(source, precision)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # Batch 2, not 1: torch.export specialises a dimension whose example size is 1.
        example = torch.randn(2 if dynamic_batch else 1, 3, image_size, image_size, device=device)
        proto = torch_to_onnx(net, (example,), input_names=[INPUT_NAME], output_names=output_names,
                              deform=deform, opset=opset, dynamic_batch=dynamic_batch)
    finally:
        model.train(was_training)
    if len(proto.graph.output) != len(output_names):
        raise EdgekitError(f"export: {model_name or registry_name(model)} returns "
                           f"{len(proto.graph.output)} outputs; export_onnx takes detectors (RSDet -> boxes, scores) "
                           f"and models returning one tensor (-> logits): wrap the model so that forward returns one")
    _strip_prefix(proto, prefix)
    origins = node_origins(proto.graph)
    proto.producer_name = "edgekit"
    meta = _metadata(model, image_size, precision, deform, opset, metadata, form)
    if model_name is not None:
        meta["model"] = model_name
    onnx_checks.check(proto, output_names)
    if form == "deploy":  # before onnxslim, so that it folds what they free; after, for what it exposes
        meta["deployed_layers"] = deployed_layers(model)
        passes = graph_passes.deploy_passes(proto)
        onnx_checks.check(proto, output_names)
    if simplify:
        proto, meta["simplified"] = onnx_checks.simplify(proto, keep=_parameter_names(model))
    else:
        meta["simplified"] = "no (simplify=False)"
    if form == "deploy":
        for name, count in graph_passes.deploy_passes(proto).items():
            passes[name] += count
        onnx_checks.check(proto, output_names)
        meta["graph_passes"] = passes
    _keep_origins(proto.graph, origins)
    set_metadata(proto, meta)
    from edgekit.fileio import write_bytes_atomic

    return write_bytes_atomic(path, proto.SerializeToString())
