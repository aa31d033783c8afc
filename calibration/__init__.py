"""Calibration and quantization: PTQ observers, GHOST-style quantized models, hybrid bit
search, distillation QAT and the BOPs/size profiler.

Names are imported lazily (module ``__getattr__``) so that ``import edgekit.calibration``
stays cheap: torch and brevitas load only when a quantization function is used.
"""

_LAZY = {
    "quantize": "edgekit.calibration.quantize",
    "QuantConfig": "edgekit.calibration.quantize",
    "quant_spec_from_model": "edgekit.calibration.quantize",
    "save_quantized": "edgekit.calibration.quantize",
    "load_quantized": "edgekit.calibration.quantize",
    "search_bits": "edgekit.calibration.hq_search",
    "profile_model": "edgekit.calibration.profiler",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgekit.calibration' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
