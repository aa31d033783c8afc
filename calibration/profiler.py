"""Per-layer parameters, MACs, bit widths, BOPs and packed weight bytes of a model.

MACs come from forward hooks on one real forward pass at the given image size (batch 1),
so they follow whatever the model really does (strides, groups, NHWC Linear layers,
dynamic shapes). A deformable conv costs its convolution (counted like a Conv2d) plus
its bilinear sampling, reported apart as ``sampling_macs``: 4 multiply-adds per sampled
value (plus 1 for the v2 mask) for every input channel, kernel point and output pixel.
The sampling is not in BOPs, which follow the usual definition for quantized layers,
``BOPs = MACs x b_w x b_a``; layers that stay float count at 32 x 32.

Size: each profiled layer's weight at its real bit width, packed (``ceil(n*b/8)``
bytes); every other parameter (biases, norms, GRN, float layers) at 32 bits; the
quantizers' own scales are not counted. MB means 10^6 bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from edgekit.errors import EdgekitError

FLOAT_BITS = 32


@dataclasses.dataclass
class LayerProfile:
    path: str
    type: str
    params: int
    macs: int
    sampling_macs: int
    weight_bits: int
    act_bits: int

    @property
    def bops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits

    @property
    def weight_bytes(self) -> int:
        return math.ceil(self.params * self.weight_bits / 8)


@dataclasses.dataclass
class ProfileReport:
    model: str
    image_size: tuple
    layers: list
    other_params: int   # parameters outside the profiled layers' weights, counted at 32 bits

    @property
    def totals(self) -> dict:
        params = sum(layer.params for layer in self.layers) + self.other_params
        weight_bytes = sum(layer.weight_bytes for layer in self.layers)
        size = weight_bytes + self.other_params * FLOAT_BITS // 8
        return {"params": params, "macs": sum(layer.macs for layer in self.layers),
                "sampling_macs": sum(layer.sampling_macs for layer in self.layers),
                "bops": sum(layer.bops for layer in self.layers), "weight_bytes": weight_bytes,
                "other_bytes": self.other_params * FLOAT_BITS // 8, "size_bytes": size, "size_mb": size / 1e6}

    def to_dict(self) -> dict:
        rows = [{**dataclasses.asdict(layer), "bops": layer.bops, "weight_bytes": layer.weight_bytes}
                for layer in self.layers]
        return {"model": self.model, "image_size": list(self.image_size), "layers": rows, "totals": self.totals,
                "notes": "MACs per image; BOPs = MACs*b_w*b_a (deformable sampling excluded, float layers at "
                         "32x32); size packs each weight at its bit width, other parameters at 32 bits"}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from edgekit.fileio import write_text_atomic
            write_text_atomic(path, text + "\n")
        return text

    def to_table(self) -> str:
        width = max([len("layer")] + [len(layer.path) for layer in self.layers])
        head = f"{'layer':<{width}}  {'type':<12} {'params':>9} {'MMACs':>9} {'W':>2} {'A':>2} {'GBOPs':>9} {'KB':>8}"
        lines = [f"{self.model} at {self.image_size[0]}x{self.image_size[1]}", head, "-" * len(head)]
        for layer in self.layers:
            extra = f"  (+{layer.sampling_macs / 1e6:.2f} M sampling)" if layer.sampling_macs else ""
            lines.append(f"{layer.path:<{width}}  {layer.type:<12} {layer.params:>9} {layer.macs / 1e6:>9.3f} "
                         f"{layer.weight_bits:>2} {layer.act_bits:>2} {layer.bops / 1e9:>9.4f} "
                         f"{layer.weight_bytes / 1e3:>8.2f}{extra}")
        t = self.totals
        lines += ["-" * len(head),
                  f"total: {t['params']} params, {t['macs'] / 1e6:.2f} M MACs (+{t['sampling_macs'] / 1e6:.2f} M "
                  f"deformable sampling), {t['bops'] / 1e9:.3f} GBOPs, size {t['size_mb']:.4f} MB "
                  f"(weights {t['weight_bytes'] / 1e6:.4f} MB packed + {t['other_bytes'] / 1e6:.4f} MB other)"]
        return "\n".join(lines)


def _image_hw(image_size) -> tuple:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise EdgekitError(f"image size must be a positive int or (height, width), got {image_size}")
    return image_size


def forward_once(model, image_size=256, in_channels: int | None = None) -> None:
    """One batch-1 forward of zeros in eval mode without gradients (the hooks' pass), the
    training mode restored; ``in_channels`` defaults to the first conv's. A model that
    cannot run at that size is one line naming the size."""
    import torch
    import torch.nn as nn

    h, w = _image_hw(image_size)
    if in_channels is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_channels = first.in_channels if first is not None else 3
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, h, w, device=param.device, dtype=param.dtype))
    except (RuntimeError, ValueError) as exc:
        raise EdgekitError(f"a forward pass at image size {h}x{w} failed ({str(exc).splitlines()[0]}); "
                           f"choose another --image-size (ConvNeXt models need sides >= 32)") from None
    finally:
        model.train(was_training)


def measure_layers(model, image_size=256, in_channels: int | None = None) -> dict:
    """``{path: (type, weight params, MACs, sampling MACs)}`` for every Conv2d, Linear and
    deformable conv that runs in one forward pass of a batch-1 image (summed over calls)."""
    import torch.nn as nn

    from edgekit.models.deform import DeformConv2d

    h, w = _image_hw(image_size)
    found = {}

    def hook(module, args, kwargs, out, path):
        per_image = out.numel() // out.shape[0]
        weight = module.weight
        if isinstance(module, DeformConv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs = per_image * (module.in_channels // module.groups) * k
            mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
            modulated = getattr(module, "modulated", False) or mask is not None
            pixels = out.shape[-2] * out.shape[-1]
            entry = ("DeformConv2d", weight.numel(), macs, module.in_channels * k * pixels * (4 + modulated))
        elif isinstance(module, nn.Conv2d):
            macs = per_image * (module.in_channels // module.groups) * weight.shape[2] * weight.shape[3]
            entry = ("Conv2d", weight.numel(), macs, 0)
        else:
            entry = ("Linear", weight.numel(), per_image * module.in_features, 0)
        if path in found:  # a module called several times (a head shared across levels) adds up
            entry = (*entry[:2], found[path][2] + entry[2], found[path][3] + entry[3])
        found[path] = entry

    handles = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, DeformConv2d)):
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, path=path: hook(m, a, k, o, path), with_kwargs=True))
    try:
        forward_once(model, (h, w), in_channels)
    finally:
        for handle in handles:
            handle.remove()
    return found


def bits_table(model, bits=None) -> dict:
    """``{path: (weight bits, act bits)}`` from a QuantConfig, a quant spec, a qconfig or
    spec JSON file, a plain ``{path: bits | [w, a]}`` dict, or (None) the model's own
    quantizers. Layers missing from it are float."""
    if bits is None:
        return _bits_of_quantized(model)
    where = "quant spec"
    if isinstance(bits, (str, Path)):
        from edgekit.fileio import read_json
        where = f"quant spec {bits}"
        bits = read_json(bits, "bits file", "give a quant spec or qconfig JSON (edgekit calibrate / quantize)")
    from edgekit.calibration.quantize import CONFIG_FORMAT, QuantConfig, resolve_config

    if isinstance(bits, dict) and bits.get("format") == CONFIG_FORMAT:
        bits = QuantConfig.from_dict(bits)
    if isinstance(bits, QuantConfig):
        config = resolve_config(model, bits)
        return {p: (b, config.act_bits.get(p, config.default_bits)) for p, b in config.weight_bits.items()}
    if isinstance(bits, dict) and str(bits.get("format", "")).startswith("edgekit.quant-spec"):
        from edgekit.calibration.spec import validate_spec
        validate_spec(bits, where)  # a missing or malformed entry is one line, not a KeyError
        out = {}
        for path, layer in bits.get("layers", {}).items():
            act = layer.get("input")
            out[path] = (layer["weight"]["bits"], act["bits"] if act else FLOAT_BITS)
        return out
    if isinstance(bits, dict) and "format" not in bits:
        return {p: (tuple(b) if isinstance(b, (list, tuple)) else (b, b)) for p, b in bits.items()}
    what = f"a dict with format {bits.get('format')!r}" if isinstance(bits, dict) else type(bits).__name__
    raise EdgekitError(f"bits must be a QuantConfig, a quant spec or qconfig (dict or JSON path), or "
                       f"{{path: bits}}; got {what}")


def _bits_of_quantized(model) -> dict:
    out = {}
    for path, module in model.named_modules():
        if hasattr(module, "weight_quant") and hasattr(module, "input_quant"):
            act = int(module.input_quant.bit_width()) if module.input_quant.is_quant_enabled else FLOAT_BITS
            out[path] = (int(module.weight_quant.bit_width()), act)
    return out


def profile_model(model, image_size=256, bits=None, model_name: str | None = None) -> ProfileReport:
    """Profile ``model`` at ``image_size`` with ``bits`` (see :func:`bits_table`)."""
    measured = measure_layers(model, image_size)
    table = bits_table(model, bits)
    unknown = sorted(set(table) - set(measured))
    if unknown:
        raise EdgekitError(f"bit table names layers that do not run in the model: {unknown[:3]}; "
                           f"was it written for another model?")
    layers = [LayerProfile(path, kind, params, macs, sampling, *table.get(path, (FLOAT_BITS, FLOAT_BITS)))
              for path, (kind, params, macs, sampling) in measured.items()]
    profiled = {f"{path}.weight" for path in measured}
    other = sum(p.numel() for name, p in model.named_parameters() if name not in profiled and "_quant." not in name)
    return ProfileReport(model_name or type(model).__name__, _image_hw(image_size), layers, other)
