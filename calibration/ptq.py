"""Post-training calibration: run data through a float model, observe what each quantized
layer sees, and write a quant spec (``edgekit.calibration.spec``).

Weights are symmetric per output channel on the narrow signed range (what integer conv
kernels expect: zero points of 0); each layer's INPUT activation gets one asymmetric
grid, unsigned when everything observed was >= 0 (post-ReLU data wastes no code on
negatives), signed otherwise. With ``conv_outputs=True`` (the default) each Conv2d and
Linear layer's OUTPUT gets a grid too (an ``output`` entry): ONNX Runtime fuses DQ -> Conv -> Q
into an integer QLinearConv only when the output is quantized, and the deploy-form export
writes Linear layers as 1x1 Convs (measured on the demo's detector: without their output
grids its 24 pointwise layers ran as DequantizeLinear + float Conv, 30% of the INT8 graph's
time). :func:`apply_fake_quant` simulates a spec in torch, the reference that the QDQ ONNX
model is checked against.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterable

from edgekit.errors import EdgekitError

# Offset/mask predictors of deformable convs stay float: a one-step error in an offset
# moves a sampling point, which costs far more accuracy than the layer's size saves.
DEFAULT_EXCLUDE = ("*conv_offset",)
# Layers whose output gets a grid (``conv_outputs``): every Conv2d, and Linear, which the
# deploy-form export writes as a 1x1 Conv (ConvNeXt's pointwise layers: most of the model's
# MACs); without an output grid ORT runs those as DequantizeLinear + float Conv.
OUTPUT_GRID_TYPES = ("Conv2d", "Linear")


def weight_qparams(weight, bits: int, per_channel: bool = True, observer: str = "minmax") -> dict:
    """The spec's ``weight`` entry: symmetric, narrow range, one scale per output channel
    (per-tensor calibration repeats its one scale, so readers see one layout)."""
    from edgekit.calibration.observers import make_observer

    obs = make_observer(observer, axis=0 if per_channel else None)
    obs.update(weight)
    scale, _ = obs.compute(bits, signed=True, symmetric=True, narrow=True)
    channels = weight.shape[0]
    scales = [float(s) for s in scale] if per_channel else [float(scale)] * channels
    return {"bits": bits, "signed": True, "axis": 0, "scale": scales, "zero_point": [0] * channels}


def calibrate(model, batches: Iterable, *, observer: str = "minmax", weight_bits: int = 8, act_bits: int = 8,
              per_channel: bool = True, layers: Iterable[str] | None = None, exclude: Iterable[str] = DEFAULT_EXCLUDE,
              weight_observer: str = "minmax", model_name: str | None = None, progress: bool = True,
              conv_outputs: bool = True) -> dict:
    """Observe ``model`` on ``batches`` (tensors, or tuples whose first item is the input)
    and return a PTQ quant spec for the chosen layers (``conv_outputs``: also quantize
    Conv2d and Linear outputs, without which ONNX Runtime runs the convs in float and the
    INT8 model is slower than FP32: 0.80x against 1.26x, ``benchmarks/results/qdq_ort_cpu.md``)."""
    from edgekit.calibration.observers import make_observer
    from edgekit.calibration.quantize import QuantConfig, quantizable_layer_types
    from edgekit.calibration.spec import check_bits, new_spec

    check_bits(weight_bits, "weight_bits")
    check_bits(act_bits, "act_bits")
    # One layer selection for PTQ and QAT; ``exclude`` patterns play QuantConfig.skip's part.
    chosen = quantizable_layer_types(model, QuantConfig(skip=tuple(exclude), quantize_offset_branch=True), layers)
    if not chosen:
        raise EdgekitError("the model has no Conv2d/Linear/DeformConv2d layer left to quantize")
    modules = dict(model.named_modules())
    observers = {p: make_observer(observer) for p in chosen}
    hooks = [modules[p].register_forward_pre_hook(_recorder(observers[p])) for p in chosen]
    out_observers = {p: make_observer(observer) for p, k in chosen.items() if conv_outputs and k in OUTPUT_GRID_TYPES}
    hooks += [modules[p].register_forward_hook(_output_recorder(out_observers[p])) for p in out_observers]
    seen = _feed(model, batches, hooks, f"calibrate ({observer})", progress)
    if seen == 0:
        raise EdgekitError("calibration got no batches; give it at least one (--batches N with a non-empty --data)")
    spec = new_spec(model_name, "ptq")
    spec["calibration"] = {"observer": observer, "weight_observer": weight_observer, "batches": seen,
                           "weight_bits": weight_bits, "act_bits": act_bits, "per_channel": per_channel,
                           "exclude": list(exclude) if layers is None else None}
    for path, kind in chosen.items():
        obs = observers[path]
        if obs.min is None:
            raise EdgekitError(f"layer {path!r} was never called on the calibration batches; leave it out "
                               f"(layers=/exclude=) or give data that reaches it")
        spec["layers"][path] = {
            "type": kind,
            "weight": weight_qparams(modules[path].weight.detach(), weight_bits, per_channel, weight_observer),
            "input": _act_qparams(obs, act_bits, observer),
        }
        if path in out_observers:
            spec["layers"][path]["output"] = _act_qparams(out_observers[path], act_bits, observer)
    return spec


def observe_input_grids(model, spec: dict, batches: Iterable, *, observer: str = "percentile") -> dict:
    """``spec`` with every layer's input grid observed anew on the float ``model`` by
    edgekit's own observer, at the grid's bit width (as :func:`calibrate` observes them).
    Why: the bit search's brevitas quantizers calibrate wider grids (1.1-1.8x the scale on the
    demo's detector), which cost GHOST's export 1.3 points of mAP@[.5:.95] with every weight at
    8 bits, against 0.16 with these grids. Returns a new spec."""
    from edgekit.calibration.observers import make_observer

    spec = copy.deepcopy(spec)
    modules = dict(model.named_modules())
    paths = [p for p, layer in spec["layers"].items() if layer.get("input") is not None]
    observers = {p: make_observer(observer) for p in paths}
    hooks = [modules[p].register_forward_pre_hook(_recorder(observers[p])) for p in paths]
    if _feed(model, batches, hooks) == 0:
        raise EdgekitError("input grid calibration got no batches; give it at least one")
    for path in paths:
        if observers[path].min is not None:  # a layer the batches never reach keeps its grid
            spec["layers"][path]["input"] = _act_qparams(observers[path], spec["layers"][path]["input"]["bits"],
                                                         observer)
    return spec


def calibrate_conv_outputs(model, spec: dict, batches: Iterable, *, observer: str = "percentile",
                           bits: int = 8, progress: bool = False) -> dict:
    """``spec`` with an ``output`` grid on every Conv2d and Linear layer that has none, observed on
    ``batches`` through the spec's own fake quantization (so each grid sees the values the
    QDQ graph produces). Why: ONNX Runtime runs a conv as an integer kernel only when its
    output is quantized too; a spec from QAT or a bit search (``edgekit quantize``) has
    input grids only, and its convs would run in float. A conv whose output is directly the
    input of a quantized layer with a ``bits``-wide grid takes that layer's input grid as its
    output grid: two grids on one tensor leave a Q -> DQ -> Q -> DQ chain that ONNX Runtime
    cannot fold (four extra float conversions per such edge in GHOST's exports, where input
    grids come from the bit search, not from this observer). Returns a new spec."""
    import torch
    from tqdm.auto import tqdm

    from edgekit.calibration.observers import make_observer
    from edgekit.calibration.spec import check_bits

    check_bits(bits, "bits")
    spec = copy.deepcopy(spec)
    wanted = [p for p, layer in spec["layers"].items()
              if layer["type"] in OUTPUT_GRID_TYPES and layer.get("output") is None]
    qmodel = apply_fake_quant(model, spec)
    modules = dict(qmodel.named_modules())
    observers = {p: make_observer(observer) for p in wanted}
    hooks = [modules[p].register_forward_hook(_output_recorder(observers[p])) for p in wanted]
    readers = {p: layer for p, layer in spec["layers"].items()
               if layer.get("input") is not None and layer["input"]["bits"] == bits}
    tracer = _DirectFeedTracer(modules, wanted, readers)
    qmodel.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"conv outputs ({observer})", disable=not progress):
                with tracer if seen == 0 else contextlib.nullcontext():
                    qmodel(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise EdgekitError("conv output calibration got no batches; give it at least one")
    for path in wanted:
        if path in tracer.feeds:
            spec["layers"][path]["output"] = copy.deepcopy(readers[tracer.feeds[path]]["input"])
        elif observers[path].min is not None:  # a layer the batches never reach keeps a float output
            spec["layers"][path]["output"] = _act_qparams(observers[path], bits, observer)
    return spec


class _DirectFeedTracer:
    """While active, finds which producer's output tensor is, as the very same object with
    the same values, the input of a reader layer (no op in between): ``feeds`` = {producer:
    first such reader}. The reader hooks run before the fake quantizers' own pre-hooks, so
    they see the raw tensor."""

    def __init__(self, modules: dict, producers: list[str], readers: dict):
        self.modules, self.producers, self.readers = modules, producers, readers
        self.feeds: dict[str, str] = {}
        self._outputs: dict[str, tuple] = {}
        self._hooks: list = []

    def __enter__(self):
        def record(path):
            def hook(module, args, output):
                self._outputs[path] = (output, getattr(output, "_version", None))
            return hook

        def match(path):
            def hook(module, args):
                for producer, (output, version) in self._outputs.items():
                    # the version counter rules out a tensor changed in place on the way
                    if args and args[0] is output and output._version == version and producer != path:
                        self.feeds.setdefault(producer, path)
            return hook

        self._hooks = [self.modules[p].register_forward_hook(record(p)) for p in self.producers]
        self._hooks += [self.modules[p].register_forward_pre_hook(match(p), prepend=True) for p in self.readers]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._outputs.clear()  # drop the tensors held for the identity check
        return False


def _feed(model, batches: Iterable, hooks: list, desc: str = "", progress: bool = False) -> int:
    """Run ``model`` in eval mode without gradients on ``batches`` (tensors, or tuples whose
    first item is the input) for its observing ``hooks``, which are removed afterwards;
    returns the number of batches run."""
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=total, desc=desc, disable=not progress):
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def _act_qparams(obs, bits: int, observer: str) -> dict:
    """An activation grid: unsigned when everything observed was >= 0, signed otherwise."""
    signed = bool(obs.min.min() < 0)
    scale, zp = obs.compute(bits, signed)
    return {"bits": bits, "signed": signed, "scale": scale, "zero_point": zp, "observer": observer}


def _recorder(obs):
    def hook(module, args):
        obs.update(args[0])
    return hook


def _output_recorder(obs):
    def hook(module, args, output):
        obs.update(output)
    return hook


def apply_fake_quant(model, spec: dict):
    """A copy of ``model`` that computes as the spec's QDQ model does: fake-quantized
    weights, each quantized layer's input fake-quantized on entry, and its output on
    exit where the layer has an ``output`` entry."""
    from edgekit.calibration.spec import fake_quantize, validate_spec

    import torch

    validate_spec(spec)
    qmodel = copy.deepcopy(model)
    modules = dict(qmodel.named_modules())
    missing = [p for p in spec["layers"] if p not in modules or not hasattr(modules[p], "weight")]
    if missing:
        raise EdgekitError(f"quant spec layers {', '.join(missing[:3])} are not weighted modules of this model; "
                           f"was the spec written for another model?")
    for path, layer in spec["layers"].items():
        module, w = modules[path], layer["weight"]
        _check_layer_shape(path, module, w)
        with torch.no_grad():
            module.weight.copy_(fake_quantize(module.weight, w["scale"], w["zero_point"], w["bits"], True,
                                              axis=w["axis"], narrow=True))
        if layer.get("output") is not None:
            module.register_forward_hook(_output_quantizer(layer["output"]))
        if layer.get("input") is None:
            continue
        if _is_deform(module):
            # Only the deformable op's data input is quantized (as on the QDQ graph's edge);
            # a DeformConv2dPack's own offset conv keeps reading the float input.
            module.__class__ = _deform_quantizer_class(type(module))
            module.edgekit_input_qparams = layer["input"]
        else:
            module.register_forward_pre_hook(_input_quantizer(layer["input"]))
    return qmodel


def _check_layer_shape(path: str, module, w: dict) -> None:
    shape = tuple(module.weight.shape)
    if w["axis"] >= len(shape) or len(w["scale"]) != shape[w["axis"]]:
        raise EdgekitError(f"quant spec layer {path!r} has {len(w['scale'])} weight scales along axis {w['axis']}, "
                           f"but the module's weight has shape {list(shape)}; the spec is for another model")


def _is_deform(module) -> bool:
    from edgekit.models.deform import DeformConv2d

    return isinstance(module, DeformConv2d)


def _quantize_input(x, a: dict):
    from edgekit.calibration.spec import fake_quantize

    return fake_quantize(x, a["scale"], a["zero_point"], a["bits"], a["signed"])


def _input_quantizer(a: dict):
    def hook(module, args):
        return (_quantize_input(args[0], a),) + tuple(args[1:])
    return hook


def _output_quantizer(a: dict):
    def hook(module, args, output):
        return _quantize_input(output, a)
    return hook


@functools.cache
def _deform_quantizer_class(cls):
    """``cls`` with DeformConv2d.forward preceded by input fake-quantization: the mixin sits
    between ``cls`` and DeformConv2d in the MRO, so subclasses' ``super().forward`` reach it."""
    from edgekit.models.deform import DeformConv2d

    class InputQuantized(DeformConv2d):
        def forward(self, x, offset, mask=None):
            return super().forward(_quantize_input(x, self.edgekit_input_qparams), offset, mask)

    if cls is DeformConv2d:
        return type(f"FakeQuant{cls.__name__}", (InputQuantized,), {})
    return type(f"FakeQuant{cls.__name__}", (cls, InputQuantized), {})
