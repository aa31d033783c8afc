"""Roofline latency prediction from per-layer FLOPs and bytes moved (weights at their bit widths).

One real forward pass with hooks records, for every layer that does work (Conv2d, Linear,
DeformConv2d, and every other leaf module), its multiply-accumulates, FLOPs and the
numbers of weight, input and output elements. A device (:mod:`edgekit.benchmarks.devices`)
then turns each layer into

    t = max(FLOPs / peak(precision), bytes / bandwidth) + launch overhead

and the model's predicted latency is the sum (layers run one after another at batch 1).
Everything this module returns is labelled ``"predicted"``; :func:`validate_on_cpu`
puts it beside a measured eager latency.

Why hooks rather than ``torch.utils.flop_counter`` alone: the flop counter sees aten
ops, not module paths with weights and bit widths, and it does not know the deformable
convolution's sampling; it is used in the tests as the independent check of the
Conv2d/Linear counts. Ops outside modules (residual additions, reshapes) are not counted.

Costs per element for non-matmul layers (FLOPs per output element) are rough constants,
stated in ``ELEMENTWISE_FLOPS``; they matter little next to the convolutions, and those
layers are memory-bound on every device here anyway.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgekit.errors import EdgekitError

ELEMENTWISE_FLOPS = {"LayerNorm": 5, "GroupNorm": 5, "BatchNorm2d": 2, "GELU": 8, "ReLU": 1, "SiLU": 4,
                     "Sigmoid": 4, "GRN": 6, "Scale": 1, "Identity": 0, "Dropout": 0, "DropPath": 0}
BILINEAR_FLOPS = 7  # per sampled value of a deformable conv: 4 products + 3 sums (+1 for the v2 mask)
FLOAT_BITS = {"fp32": 32, "fp16": 16, "int8": 8}


@dataclass
class LayerCost:
    name: str
    type: str
    macs: int
    flops: int
    weight_numel: int
    in_numel: int
    out_numel: int
    w_bits: int | None = None  # from a quant spec; None = the precision's float width
    a_bits: int | None = None

    def bytes_moved(self, precision: str = "fp32") -> float:
        """Weights at their bit width, inputs at the layer's input width, outputs at the
        float width of ``precision`` (a quantized layer's output is requantized by the next)."""
        fbits = FLOAT_BITS[precision]
        wb = self.w_bits or fbits
        ab = self.a_bits or fbits
        return (self.weight_numel * wb + self.in_numel * ab + self.out_numel * fbits) / 8

    def bops(self) -> float:
        """Bit operations: MACs x weight bits x activation bits (float layers count as 32 x 32)."""
        return self.macs * (self.w_bits or 32) * (self.a_bits or 32)


def _numel(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(t) for t in x)
    return 0


def _conv_macs(out, weight, groups: int) -> int:
    # every output element: (Cin/groups) x kh x kw multiply-accumulates
    return out.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]


def profile_layers(model, example, spec: dict | None = None) -> list[LayerCost]:
    """Per-layer costs from one forward of ``model(example)`` (no gradient).

    ``spec`` is a quant spec (``calibration/spec.py`` format): its layers get their weight
    and input bit widths; other layers stay float."""
    import torch
    import torch.nn as nn

    from edgekit.models.deform import DeformConv2d

    quant = (spec or {}).get("layers", {})
    costs: list[LayerCost] = []
    hooks = []

    def hook(name, module):
        def fn(mod, inputs, output):
            tname = type(mod).__name__
            own = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, DeformConv2d):
                x = inputs[0]
                macs = _conv_macs(output, mod.weight, mod.groups)
                k = mod.kernel_points
                has_mask = (len(inputs) > 2 and inputs[2] is not None) or getattr(mod, "modulated", False)
                per_sample = BILINEAR_FLOPS + (1 if has_mask else 0)
                samples = output.shape[0] * output.shape[2] * output.shape[3] * k * x.shape[1]
                flops = 2 * macs + per_sample * samples
            elif isinstance(mod, nn.Conv2d):
                macs = _conv_macs(output, mod.weight, mod.groups)
                flops = 2 * macs
            elif isinstance(mod, nn.Linear):
                macs = output.numel() * mod.in_features
                flops = 2 * macs
            else:
                macs = 0
                flops = ELEMENTWISE_FLOPS.get(tname, 1) * _numel(output)
            q = quant.get(name) or {}
            costs.append(LayerCost(name, tname, int(macs), int(flops), int(own), int(_numel(inputs)),
                                   int(_numel(output)), (q.get("weight") or {}).get("bits"),
                                   (q.get("input") or {}).get("bits")))
        return fn

    for name, m in model.named_modules():
        leaf = not any(True for _ in m.children())
        if leaf or isinstance(m, DeformConv2d):
            hooks.append(m.register_forward_hook(hook(name, m)))
    try:
        with torch.inference_mode():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return costs


def predict(costs: list[LayerCost], device, precision: str = "fp32") -> dict:
    """Roofline time per layer and in total on ``device`` (a :class:`Device`), labelled predicted.

    Layers with spec bit widths (<= 8) run at the device's INT8 peak; the rest at
    ``precision``'s peak."""
    if precision not in FLOAT_BITS:
        raise EdgekitError(f"precision must be one of {', '.join(FLOAT_BITS)}, got {precision!r}")
    bw = device.bandwidth_gbs
    if bw is None:
        raise EdgekitError(f"device {device.key} has no known memory bandwidth; add a cited figure to "
                           f"benchmarks/devices.py or pick another device")
    layers = []
    for c in costs:
        prec = "int8" if c.w_bits is not None and c.w_bits <= 8 else precision
        peak = device.peak_ops(prec)
        if peak is None and c.flops:
            raise EdgekitError(f"device {device.key} has no known {prec} peak (layer {c.name}); "
                               f"add a cited figure to benchmarks/devices.py or predict another precision")
        nbytes = c.bytes_moved(precision)
        t_compute = c.flops / peak if c.flops else 0.0
        t_memory = nbytes / (bw * 1e9)
        t = max(t_compute, t_memory) + device.launch_us * 1e-6
        layers.append({"name": c.name, "type": c.type, "precision": prec, "flops": c.flops, "bytes": nbytes,
                       "compute_us": t_compute * 1e6, "memory_us": t_memory * 1e6, "time_us": t * 1e6,
                       "bound": "compute" if t_compute >= t_memory else "memory"})
    total_us = sum(layer["time_us"] for layer in layers)
    return {"label": "predicted", "device": device.key, "device_name": device.name, "precision": precision,
            "total_ms": total_us / 1e3, "launch_ms": len(layers) * device.launch_us / 1e3,
            "flops": sum(c.flops for c in costs), "bytes": sum(layer["bytes"] for layer in layers),
            "bops": sum(c.bops() for c in costs), "layers_compute_bound": sum(l["bound"] == "compute" for l in layers),
            "layers_memory_bound": sum(l["bound"] == "memory" for l in layers), "num_layers": len(layers),
            "layers": layers}


def predict_all(costs: list[LayerCost], devices, precisions=("fp32", "fp16", "int8")) -> list[dict]:
    """Predictions for every (device, precision) that has the figures; the others are listed
    with the reason instead of a number."""
    out = []
    for d in devices:
        for p in precisions:
            try:
                r = predict(costs, d, p)
                r.pop("layers")
                out.append(r)
            except EdgekitError as exc:
                out.append({"label": "predicted", "device": d.key, "device_name": d.name, "precision": p,
                            "total_ms": None, "reason": str(exc)})
    return out


def validate_on_cpu(model, example, measured_ms: float, device=None) -> dict:
    """Predicted (FP32 roofline on this CPU) vs a measured eager latency of the same input."""
    from edgekit.benchmarks.devices import ci_cpu

    device = device or ci_cpu()
    costs = profile_layers(model, example)
    pred = predict(costs, device, "fp32")
    top = sorted(pred["layers"], key=lambda l: -l["time_us"])[:10]
    pred.pop("layers")
    return {"device": device.to_dict(), "predicted": pred, "measured_eager_ms": measured_ms,
            "ratio_measured_over_predicted": measured_ms / pred["total_ms"] if pred["total_ms"] else None,
            "top_layers_predicted": top, "layer_costs": [asdict(c) for c in costs]}
