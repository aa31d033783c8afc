"""GHOST-style quantized models: ``quantize(model, config)`` swaps layers for brevitas ones.

Conv2d, Linear and edgekit's deformable convolutions become fake-quantized layers with
per-channel signed narrow-range weights (scales start at the channel's abs-max and are
learnable) and a per-tensor quantizer on their input (scale from calibration statistics,
then learnable), so the result trains (QAT) and its quantizers are read by
:func:`quant_spec_from_model` for export. GRN and the norms are not replaced: they stay
float, like the offset/mask branch of deformable convs unless configured otherwise.
Quantized layers keep their module paths and parameter names, so a float state dict
loads (:func:`load_float_weights`).

Activation bits are either fixed or "tied" (GHOST): a layer's input gets the weight bits
of the quantized layer(s) that produced it, found by walking the autograd graph of one
forward pass; where several layers feed it (a residual sum), the widest wins, because a
sum of a 4-bit and an 8-bit stream is not representable in 4 bits. "First" layers (fed
by the model input) and "last" layers (feeding a model output without another quantized
layer in between) get their own bit policy (default 8, as in most low-bit papers).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import deque
from pathlib import Path

from edgekit.calibration.spec import check_bits
from edgekit.errors import EdgekitError

CONFIG_FORMAT = "edgekit.quant-config/1"


@dataclasses.dataclass
class QuantConfig:
    """What to quantize and with how many bits.

    ``weight_bits``: one width for all layers or ``{module path: bits}`` (layers not in
    the dict get ``default_bits``); ``act_bits``: an int, ``"tied"`` or a resolved
    ``{path: bits}``; ``first_layer_bits``/``last_layer_bits``: weight and input bits of
    the first/last layers (None: no special policy); ``skip``: fnmatch patterns of
    module paths kept float; ``quantize_offset_branch``: also quantize the offset/mask
    conv of deformable layers (default: keep it float, offsets need sub-pixel precision).
    """

    weight_bits: int | dict = 8
    act_bits: int | str | dict = 8
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    default_bits: int = 8
    act_signed: bool = True
    quantize_offset_branch: bool = False
    skip: tuple = ()

    def __post_init__(self):
        self.skip = tuple(self.skip)
        for name in ("first_layer_bits", "last_layer_bits", "default_bits"):
            value = getattr(self, name)
            if value is not None:
                check_bits(value, f"quant config {name}")
        if isinstance(self.weight_bits, dict):
            for path, b in self.weight_bits.items():
                check_bits(b, f"quant config weight_bits[{path!r}]")
        else:
            check_bits(self.weight_bits, "quant config weight_bits")
        if isinstance(self.act_bits, dict):
            for path, b in self.act_bits.items():
                check_bits(b, f"quant config act_bits[{path!r}]")
        elif self.act_bits != "tied":
            check_bits(self.act_bits, "quant config act_bits")

    @property
    def resolved(self) -> bool:
        """True when every layer's bits are explicit (no tracing needed to rebuild)."""
        return isinstance(self.weight_bits, dict) and isinstance(self.act_bits, dict) \
            and self.first_layer_bits is None and self.last_layer_bits is None

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "quant config") -> "QuantConfig":
        if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
            raise EdgekitError(f"{where}: not an {CONFIG_FORMAT} object; write it with edgekit quantize "
                               f"or QuantConfig.save")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"format"})
        if unknown:
            raise EdgekitError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path) -> Path:
        from edgekit.fileio import write_json_atomic
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "QuantConfig":
        from edgekit.fileio import read_json

        return cls.from_dict(read_json(path, "quant config", "fix or regenerate it (edgekit quantize writes one)"),
                             str(path))


# --------------------------------------------------------------------------- layers


def layer_type(module) -> str | None:
    """The quant spec's type name of a quantizable module (None: not quantizable)."""
    import torch.nn as nn

    from edgekit.models.deform import DeformConv2d

    for cls, name in ((DeformConv2d, "DeformConv2d"), (nn.Conv2d, "Conv2d"), (nn.Linear, "Linear")):
        if isinstance(module, cls):
            return name
    return None


def quantizable_layers(model, config: QuantConfig | None = None, layers=None) -> dict:
    """``{path: module}`` of the layers to quantize (Conv2d, Linear, deformable convs), the
    one definition that PTQ, GHOST quantization and the bit search share.

    Default: every such layer in ``named_modules`` order, except the offset/mask branch
    of deformable convs (unless ``config.quantize_offset_branch``) and ``config.skip``
    matches. ``layers``: an explicit list of paths instead (in that order; each must be
    a quantizable module, else one line naming it).
    """
    from edgekit.models.deform import DeformableSkip, DeformConv2d

    found = {path: module for path, module in model.named_modules() if layer_type(module)}
    if layers is not None:
        layers = list(layers)
        unknown = [p for p in layers if p not in found]
        if unknown:
            raise EdgekitError(f"layers {', '.join(unknown[:3])} are not Conv2d/Linear/DeformConv2d modules of the "
                               f"model; pick names from model.named_modules()")
        return {p: found[p] for p in layers}
    config = config or QuantConfig()
    offset_branch = set()
    if not config.quantize_offset_branch:
        for path, module in model.named_modules():
            if isinstance(module, (DeformConv2d, DeformableSkip)) and hasattr(module, "conv_offset"):
                offset_branch.add(f"{path}.conv_offset" if path else "conv_offset")
    return {path: module for path, module in found.items()
            if path not in offset_branch and not any(fnmatch.fnmatchcase(path, pat) for pat in config.skip)}


def quantizable_layer_types(model, config: QuantConfig | None = None, layers=None) -> dict:
    """``{path: spec type name}`` of :func:`quantizable_layers` (what a quant spec records)."""
    return {path: layer_type(module) for path, module in quantizable_layers(model, config, layers).items()}


@dataclasses.dataclass
class LayerGraph:
    """Data flow between quantizable layers, from one traced forward pass."""

    order: list          # paths in execution order
    producers: dict      # path -> sorted list of the nearest quantizable layers feeding its input
    first: set           # layers fed directly by the model input
    last: set            # layers feeding a model output directly


def trace_layers(model, layers: dict, example_input) -> LayerGraph:
    """Run ``model(example_input)`` once and read, from the autograd graph, which layers
    feed which: each layer's output ``grad_fn`` marks it; a breadth-first walk back from
    a layer's input stops at the first marked node on every path."""
    import torch

    outputs, inputs, order = {}, {}, []
    handles = []
    for path, module in layers.items():
        def pre(mod, args, path=path):
            if path not in inputs:  # a shared module: its first call stands for all
                inputs[path] = args[0].grad_fn
                order.append(path)

        def post(mod, args, out, path=path):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                outputs.setdefault(out.grad_fn, path)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = example_input.detach().clone().requires_grad_(True)
            out = model(x)
    except Exception as exc:
        raise EdgekitError(f"tracing the model with an input of shape {tuple(example_input.shape)} failed "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           f"pass an example_input the model accepts") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def frontier(start) -> set:
        found, seen, queue = set(), set(), deque([start] if start is not None else [])
        while queue:
            node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            if node in outputs:
                found.add(outputs[node])
                continue
            queue.extend(fn for fn, _ in node.next_functions if fn is not None)
        return found

    producers = {path: sorted(frontier(inputs[path])) for path in order}
    last = set()
    for t in _tensors(out):
        last |= frontier(t.grad_fn)
    first = {path for path in order if not producers[path]}
    return LayerGraph(order, producers, first, last)


def _tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _tensors(v)


def default_example_input(model, image_size: int = 64):
    """A random NCHW image batch sized from the model's first conv (for tracing)."""
    import torch
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return torch.randn(1, module.in_channels, image_size, image_size)
    raise EdgekitError(f"{type(model).__name__} has no Conv2d to size an example input from; "
                       f"pass example_input to quantize()")


def fixed_layer_bits(graph: LayerGraph, config: QuantConfig) -> dict:
    """``{path: bits}`` of the layers the first/last policy fixes (weights and inputs)."""
    fixed = {}
    if config.first_layer_bits is not None:
        fixed.update({p: config.first_layer_bits for p in graph.first})
    if config.last_layer_bits is not None:
        fixed.update({p: config.last_layer_bits for p in graph.last})
    return fixed


def resolve_config(model, config: QuantConfig, example_input=None) -> QuantConfig:
    """The same config with explicit per-layer weight and activation bits (first/last
    policies and tied activations applied), so that rebuilding needs no tracing."""
    if config.resolved:
        return config
    layers = quantizable_layers(model, config)
    graph = trace_layers(model, layers, example_input if example_input is not None else default_example_input(model))
    fixed = fixed_layer_bits(graph, config)
    explicit = isinstance(config.weight_bits, dict)
    weight = {p: fixed.get(p, config.weight_bits.get(p, config.default_bits) if explicit else config.weight_bits)
              for p in layers}
    act = {}
    for path in layers:
        if path in fixed:
            act[path] = fixed[path]
        elif isinstance(config.act_bits, dict):
            act[path] = config.act_bits.get(path, config.default_bits)
        elif config.act_bits == "tied":
            act[path] = max((weight[p] for p in graph.producers.get(path, [])), default=weight[path])
        else:
            act[path] = config.act_bits
    return dataclasses.replace(config, weight_bits=weight, act_bits=act, first_layer_bits=None, last_layer_bits=None)


# ---------------------------------------------------------------- quantized modules


def _quantizers(signed: bool):
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    return Int8WeightPerChannelFloat, (Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat)


def _quant_kwargs(weight_bits: int, act_bits: int, signed: bool) -> dict:
    from brevitas.inject.enum import ScalingImplType

    weight_quant, act_quant = _quantizers(signed)
    return dict(weight_quant=weight_quant, weight_bit_width=weight_bits,
                weight_scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS,  # learnable, starts at abs-max
                input_quant=act_quant, input_bit_width=act_bits, return_quant_tensor=False)


def _value(t):
    return t.value if hasattr(t, "value") else t


_QUANT_DEFORM_CLASSES: dict = {}


def quant_deform_classes() -> tuple:
    """(QuantDeformConv2d, QuantDeformConv2dPack), built on first use so that importing
    this module does not import torch or brevitas."""
    if _QUANT_DEFORM_CLASSES:
        return _QUANT_DEFORM_CLASSES["plain"], _QUANT_DEFORM_CLASSES["pack"]
    from brevitas.nn.mixin import QuantInputMixin, QuantWeightMixin

    from edgekit import ops
    from edgekit.models.deform import DeformConv2d, DeformConv2dPack

    class _QuantDeformCore(DeformConv2d):
        """The deformable sampling + GEMM on a fake-quantized input and weight; offsets
        and mask arrive in float (the higher-precision branch)."""

        def forward(self, x, offset, mask=None):
            want = 2 * self.offset_groups * self.kernel_points
            if offset.ndim != 4 or offset.shape[1] != want:
                raise ValueError(f"{type(self).__name__}: offset must have {want} channels "
                                 f"(2*offset_groups*kh*kw), got shape {tuple(offset.shape)}")
            qx, qw = _value(self.input_quant(x)), _value(self.quant_weight())
            return ops.deform_conv2d(qx, offset, qw, self.bias, self.stride, self.padding, self.dilation,
                                     mask=mask, backend=self.backend)

    def _init(self, base, float_module, quant_kwargs):
        base.__init__(self, **_deform_args(float_module))
        kw = {k: v for k, v in quant_kwargs.items() if k not in ("weight_quant", "input_quant", "return_quant_tensor")}
        QuantWeightMixin.__init__(self, quant_kwargs["weight_quant"], **kw)
        QuantInputMixin.__init__(self, quant_kwargs["input_quant"], **kw)

    class QuantDeformConv2d(QuantWeightMixin, QuantInputMixin, _QuantDeformCore):
        """edgekit DeformConv2d with brevitas weight and input quantizers."""

        def __init__(self, float_module, **quant_kwargs):
            _init(self, DeformConv2d, float_module, quant_kwargs)

        @property
        def output_channel_dim(self) -> int:
            return 0

    class QuantDeformConv2dPack(QuantWeightMixin, QuantInputMixin, DeformConv2dPack, _QuantDeformCore):
        """DeformConv2dPack whose DCN is quantized; ``conv_offset`` sees the float input."""

        def __init__(self, float_module, **quant_kwargs):
            _init(self, DeformConv2dPack, float_module, quant_kwargs)

        @property
        def output_channel_dim(self) -> int:
            return 0

    for cls in (QuantDeformConv2d, QuantDeformConv2dPack):
        cls.__qualname__ = cls.__name__
    _QUANT_DEFORM_CLASSES.update(plain=QuantDeformConv2d, pack=QuantDeformConv2dPack)
    return QuantDeformConv2d, QuantDeformConv2dPack


def _deform_args(m) -> dict:
    from edgekit.models.deform import DeformConv2dPack

    args = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                offset_groups=m.offset_groups, bias=m.bias is not None, backend=m.backend)
    if isinstance(m, DeformConv2dPack):
        args["modulated"] = m.modulated
    return args


def quantized_layer_types() -> tuple:
    """The module classes :func:`quantize` produces (for ``isinstance`` checks)."""
    import brevitas.nn as qnn

    return (qnn.QuantConv2d, qnn.QuantLinear) + quant_deform_classes()


def _make_quant_module(module, weight_bits: int, act_bits: int, signed: bool):
    import brevitas.nn as qnn
    import torch.nn as nn

    from edgekit.models.deform import DeformConv2d, DeformConv2dPack

    kw = _quant_kwargs(weight_bits, act_bits, signed)
    if isinstance(module, DeformConv2d):
        plain, pack = quant_deform_classes()
        q = (pack if isinstance(module, DeformConv2dPack) else plain)(module, **kw)
    elif isinstance(module, nn.Conv2d):
        q = qnn.QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, bias=module.bias is not None,
                            padding_mode=module.padding_mode, **kw)
    else:
        q = qnn.QuantLinear(module.in_features, module.out_features, bias=module.bias is not None, **kw)
    # The float module's tensors (conv_offset included) move over under the same names.
    if q.load_state_dict(module.state_dict(), strict=False).unexpected_keys:
        raise EdgekitError(f"quantize: {type(module).__name__} holds tensors its quantized twin lacks; "
                           f"add its path to QuantConfig.skip to keep it float")
    param = next(module.parameters())
    q.train(module.training)
    return q.to(device=param.device, dtype=param.dtype)


def quantize(model, config: QuantConfig | None = None, example_input=None):
    """Replace ``model``'s quantizable layers, in place, by quantized ones; return it.

    ``model.quant_config`` keeps the resolved config (explicit per-layer bits), which
    :func:`save_quantized` stores and :func:`load_quantized` rebuilds from.
    ``example_input`` is needed only to resolve tied activation bits and first/last
    layers (default: a random 64x64 image batch).
    """
    config = config or QuantConfig()
    layers = quantizable_layers(model, config)
    if any(isinstance(m, quantized_layer_types()) for m in layers.values()):
        raise EdgekitError("quantize: the model is already quantized; start from the float model")
    if not layers:
        raise EdgekitError(f"quantize: {type(model).__name__} has no Conv2d/Linear/DeformConv2d layer to "
                           f"quantize (check QuantConfig.skip)")
    named = [*(config.weight_bits if isinstance(config.weight_bits, dict) else ()),
             *(config.act_bits if isinstance(config.act_bits, dict) else ())]
    unknown = sorted(set(named) - set(layers))
    if unknown:
        raise EdgekitError(f"quant config names layers the model does not have or skips: {unknown[:3]}; "
                           f"use module paths from model.named_modules()")
    resolved = resolve_config(model, config, example_input)
    if "" in layers:
        raise EdgekitError("quantize: pass a model containing layers, not a single layer")
    for path, module in layers.items():
        q = _make_quant_module(module, resolved.weight_bits.get(path, resolved.default_bits),
                               resolved.act_bits.get(path, resolved.default_bits), resolved.act_signed)
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, q)
    model.quant_config = resolved
    return model


def load_float_weights(qmodel, state_dict) -> None:
    """Load a float model's state dict into its quantized twin: every float tensor must
    match; only the quantizers' own scales may be missing (they keep their init)."""
    result = qmodel.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if "_quant." not in k]
    if missing or result.unexpected_keys:
        raise EdgekitError(f"state dict does not fit the quantized model: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}; was it saved from the same model?")


def calibrate_activations(qmodel, batches, progress: bool = False) -> int:
    """Set every input quantizer's scale from statistics over ``batches`` (tensors or
    tuples whose first item is the input); returns the number of batches used."""
    import torch
    from brevitas.graph.calibrate import calibration_mode

    n = 0
    was_training = qmodel.training
    qmodel.eval()
    iterator = batches
    if progress:
        from tqdm import tqdm
        iterator = tqdm(batches, desc="calibrate", unit="batch")
    with torch.no_grad(), calibration_mode(qmodel):
        for batch in iterator:
            qmodel(batch[0] if isinstance(batch, (tuple, list)) else batch)
            n += 1
    qmodel.train(was_training)
    if n == 0:
        raise EdgekitError("calibrate_activations: no batches given; pass at least one input batch")
    return n


def _input_calibrated(quant_proxy) -> bool:
    for module in quant_proxy.modules():
        if hasattr(module, "counter") and hasattr(module, "collect_stats_steps"):
            return module.counter > module.collect_stats_steps
    return True


def quant_spec_from_model(qmodel, model_name: str | None = None, source: str = "qat",
                          observer: str = "qat") -> dict:
    """The ``edgekit.quant-spec/1`` dict of a quantized model, read from its brevitas
    quantizers (scales, zero points, bits), so export can consume a (QAT-)trained model."""
    import torch

    layers = {}
    uncalibrated = []
    with torch.no_grad():
        for path, module in qmodel.named_modules():
            if not isinstance(module, quantized_layer_types()):
                continue
            qw = module.quant_weight()
            scale = qw.scale.detach().flatten().double()
            channels = module.weight.shape[0]
            scale = scale.expand(channels) if scale.numel() == 1 else scale
            entry = {"type": layer_type(module),
                     "weight": {"bits": int(qw.bit_width), "signed": True, "axis": 0,
                                "scale": scale.tolist(),
                                "zero_point": [int(z) for z in qw.zero_point.detach().flatten().expand(channels)]},
                     "input": None}
            proxy = module.input_quant
            if proxy.is_quant_enabled:
                if not _input_calibrated(proxy):
                    uncalibrated.append(path)
                entry["input"] = {"bits": int(proxy.bit_width()), "signed": bool(proxy.is_signed),
                                  "scale": float(proxy.scale()), "zero_point": int(proxy.zero_point()),
                                  "observer": observer}
            layers[path] = entry
    if uncalibrated:
        raise EdgekitError(f"input quantizers of {len(uncalibrated)} layers (e.g. {uncalibrated[0]}) have no "
                           f"scale yet; run calibrate_activations(qmodel, batches) or train first")
    from edgekit.calibration.spec import new_spec, validate_spec

    spec = new_spec(model_name, source)
    spec["layers"] = layers
    return validate_spec(spec, "quant spec from model")


def save_quantized(path, qmodel, model_name: str, model_kwargs: dict, info: dict | None = None) -> Path:
    """A safetensors checkpoint of the quantized model (float weights + learned scales)
    with its resolved QuantConfig in the header; :func:`load_quantized` rebuilds it."""
    from edgekit.engine.checkpoint import save_checkpoint

    config = getattr(qmodel, "quant_config", None)
    if config is None:
        raise EdgekitError("save_quantized: the model has no quant_config; build it with quantize()")
    # brevitas creates weight-scale parameters lazily, on first use: reading every weight
    # quantizer here makes the saved state complete, so load_quantized can rebuild it.
    import torch

    with torch.no_grad():
        for module in qmodel.modules():
            if isinstance(module, quantized_layer_types()):
                module.quant_weight()
    return save_checkpoint(path, qmodel, model_name, model_kwargs, {**(info or {}), "quant_config": config.to_dict()})


def export_view(checkpoint):
    """(float model, info, quant spec) of a quantized checkpoint, for export: the float
    model carries the checkpoint's own (e.g. QAT-trained) weights, and the spec holds the
    scales its learned quantizers define. Export writes the float graph and then Q/DQ from
    the spec, the same route a PTQ spec takes."""
    qmodel, info = load_quantized(checkpoint)
    float_model = float_view(qmodel, info["model"], info["kwargs"], where=f"{checkpoint}: ")
    spec = quant_spec_from_model(qmodel, info["model"], source=info.get("quant_source", "qat"))
    for path, grid in (info.get("conv_output_grids") or {}).items():  # edgekit quantize's conv outputs
        if path in spec["layers"]:
            spec["layers"][path]["output"] = grid
    for path, grid in (info.get("input_grids") or {}).items():  # and the input grids its spec holds
        if path in spec["layers"]:
            spec["layers"][path]["input"] = grid
    return float_model.eval(), info, spec


def float_view(qmodel, model_name: str, kwargs: dict, where: str = ""):
    """A float model carrying ``qmodel``'s own float tensors (e.g. QAT-trained weights,
    norms and biases): what the quant spec's fake quantization is applied to."""
    from edgekit.models import create_model

    float_model = create_model(model_name, **kwargs)
    qstate = qmodel.state_dict()
    missing = [k for k in float_model.state_dict() if k not in qstate]
    if missing:
        raise EdgekitError(f"{where}the quantized model has no float tensor for {missing[:3]}; "
                           f"re-run edgekit quantize")
    float_model.load_state_dict({k: qstate[k] for k in float_model.state_dict()}, strict=True)
    return float_model.eval()


def load_quantized(checkpoint, qconfig=None):
    """(quantized model, info) from a quantized checkpoint, or from a float checkpoint
    plus a QuantConfig (object or JSON path)."""
    from edgekit.engine.checkpoint import read_checkpoint
    from edgekit.models import create_model

    state, name, kwargs, info = read_checkpoint(checkpoint)
    if qconfig is None:
        if "quant_config" not in info:
            raise EdgekitError(f"{checkpoint} is a float checkpoint; pass the qconfig JSON written by "
                               f"edgekit quantize to rebuild the quantized model")
        config = QuantConfig.from_dict(info["quant_config"], f"{checkpoint} quant_config")
    else:
        config = qconfig if isinstance(qconfig, QuantConfig) else QuantConfig.load(qconfig)
    model = create_model(name, **kwargs)
    if "quant_config" in info:
        quantize(model, config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EdgekitError(f"{checkpoint} does not match its quant config: {str(exc).splitlines()[0]}") from None
    else:
        model.load_state_dict(state, strict=True)
        quantize(model, config)
    model.eval()
    return model, {"model": name, "kwargs": kwargs, **info}
