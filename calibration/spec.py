"""The quant spec: the one JSON file that quantization writes and export reads.

Format ``edgekit.quant-spec/1``::

    {"format": "edgekit.quant-spec/1", "model": str|null, "source": "ptq|qat|ghost|uniform|budget|sensitivity",
     "layers": {"<module path>": {"type": "Conv2d|Linear|DeformConv2d",
         "weight": {"bits", "signed": true, "axis": 0, "scale": [per out channel], "zero_point": [ints]},
         "input": {"bits", "signed", "scale", "zero_point", "observer"} | null,
         "output": same as "input", optional (PTQ writes it for conv outputs)}}}

``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` with round-half-to-even (as
ONNX QuantizeLinear does); signed weights use the narrow range ``[-(2^(b-1)-1),
2^(b-1)-1]`` so that the grid is symmetric, signed activations the full range.
Layers missing from ``layers`` stay float. Other top-level keys are a producer's record
of how it made the spec (PTQ writes ``calibration``); readers ignore them. Validation
lives here, not in each reader, so that every stage rejects a bad file the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fileio import read_json, write_text_atomic

FORMAT = "edgekit.quant-spec/1"
SOURCES = ("ptq", "qat", "ghost", "cluster", "uniform", "budget", "sensitivity")
LAYER_TYPES = ("Conv2d", "Linear", "DeformConv2d")
OBSERVERS = ("minmax", "percentile", "entropy", "mse", "qat")
MIN_BITS, MAX_BITS = 2, 8
DEFAULT_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))  # the widths a bit search may choose from


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of a ``bits``-wide integer; ``narrow`` drops the most negative value."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quantize(x, scale, zero_point, bits: int, signed: bool, axis: int | None = None, narrow: bool = False):
    """Quantize then dequantize ``x`` (torch) exactly as QuantizeLinear -> DequantizeLinear.

    ``scale``/``zero_point`` are scalars (per tensor) or sequences/tensors of one value
    per slice along ``axis`` (per channel). Arithmetic is float32 for float32 input,
    like ONNX Runtime, so that torch and ONNX agree to the last rounding.
    """
    import torch

    qmin, qmax = qrange(bits, signed, narrow)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.view(shape), zero_point.view(shape)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def new_spec(model_name: str | None, source: str) -> dict:
    """An empty spec; producers add entries to ``spec["layers"]``."""
    if source not in SOURCES:
        raise EdgekitError(f"quant spec source {source!r} is unknown; use one of {', '.join(SOURCES)}")
    return {"format": FORMAT, "model": model_name, "source": source, "layers": {}}


def validate_spec(spec, where: str = "quant spec") -> dict:
    """Check every field; raise one line naming the layer and field that is wrong."""
    if not isinstance(spec, dict):
        raise EdgekitError(f"{where}: expected a JSON object, got {type(spec).__name__}")
    if spec.get("format") != FORMAT:
        raise EdgekitError(f"{where}: format is {spec.get('format')!r}, expected {FORMAT!r}; "
                           f"write it with edgekit calibrate/quantize")
    if spec.get("source") not in SOURCES:
        raise EdgekitError(f"{where}: source {spec.get('source')!r} is not one of {', '.join(SOURCES)}")
    if spec.get("model") is not None and not isinstance(spec.get("model"), str):
        raise EdgekitError(f"{where}: model must be a string or null")
    layers = spec.get("layers")
    if not isinstance(layers, dict):
        raise EdgekitError(f"{where}: 'layers' must be an object mapping module paths to layer entries")
    for path, layer in layers.items():
        _validate_layer(layer, f"{where}: layer {path!r}")
    return spec


def _validate_layer(layer, where: str) -> None:
    if not isinstance(layer, dict):
        raise EdgekitError(f"{where}: expected an object")
    if layer.get("type") not in LAYER_TYPES:
        raise EdgekitError(f"{where}: type {layer.get('type')!r} is not one of {', '.join(LAYER_TYPES)}")
    weight = layer.get("weight")
    if not isinstance(weight, dict):
        raise EdgekitError(f"{where}: 'weight' must be an object with bits, signed, axis, scale, zero_point")
    bits = _check_bits(weight, f"{where} weight")
    if weight.get("signed") is not True:
        raise EdgekitError(f"{where} weight: signed must be true (weights are symmetric signed)")
    if not isinstance(weight.get("axis"), int) or weight["axis"] < 0:
        raise EdgekitError(f"{where} weight: axis must be a non-negative integer, got {weight.get('axis')!r}")
    scale, zp = weight.get("scale"), weight.get("zero_point")
    if not isinstance(scale, list) or not scale or not isinstance(zp, list) or len(zp) != len(scale):
        raise EdgekitError(f"{where} weight: scale and zero_point must be non-empty lists of equal length")
    for s in scale:
        _check_scale(s, f"{where} weight")
    qmin, qmax = qrange(bits, True, narrow=True)
    for z in zp:
        _check_zero_point(z, qmin, qmax, f"{where} weight")
    for key in ("input", "output"):
        _validate_activation(layer.get(key), f"{where} {key}")


def _validate_activation(act, where: str) -> None:
    """An activation quantizer ("input", or the optional "output" PTQ writes for convs)."""
    if act is None:
        return
    if not isinstance(act, dict):
        raise EdgekitError(f"{where}: expected an object or null")
    bits = _check_bits(act, where)
    if not isinstance(act.get("signed"), bool):
        raise EdgekitError(f"{where}: signed must be true or false")
    _check_scale(act.get("scale"), where)
    _check_zero_point(act.get("zero_point"), *qrange(bits, act["signed"]), where)
    if act.get("observer") not in OBSERVERS:
        raise EdgekitError(f"{where}: observer {act.get('observer')!r} is not one of {', '.join(OBSERVERS)}")


def check_bits(value, name: str) -> int:
    """The one bit-width check of the package: an int in [MIN_BITS, MAX_BITS] (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise EdgekitError(f"{name}: bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {value!r}")
    return value


def _check_bits(entry: dict, where: str) -> int:
    return check_bits(entry.get("bits"), where)


def _check_scale(s, where: str) -> None:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise EdgekitError(f"{where}: scale must be a positive finite number, got {s!r}")


def _check_zero_point(z, qmin: int, qmax: int, where: str) -> None:
    if isinstance(z, bool) or not isinstance(z, int) or not qmin <= z <= qmax:
        raise EdgekitError(f"{where}: zero_point must be an integer in [{qmin}, {qmax}], got {z!r}")


def save_spec(spec: dict, path) -> Path:
    """Validate, then write atomically (a reader never sees half a spec)."""
    validate_spec(spec, f"quant spec for {path}")
    return write_text_atomic(path, json.dumps(spec, indent=1) + "\n")


def load_spec(path) -> dict:
    """Read and validate a spec file; a missing or corrupt file is one clear line."""
    spec = read_json(path, "quant spec", "write it with `edgekit calibrate` or `edgekit quantize`")
    return validate_spec(spec, f"quant spec {path}")
