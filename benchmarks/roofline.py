"""Roofline latency prediction from per-layer FLOPs and bytes moved (weights at their bit widths).

One real forward pass with hooks records, for every layer that does work (Conv2d, Linear,
DeformConv2d, and every other leaf module), its multiply-accumulates, FLOPs and the
numbers of weight, input and output elements. A device (:mod:`edgekit.benchmarks.devices`)
then turns each layer into

    t = max(FLOPs / peak(precision), bytes / bandwidth) + launch overhead

and the model's predicted latency is the sum (layers run one after another at batch 1).
Everything this module returns is labelled ``"predicted"``; :func:`validate_on_cpu`
puts it beside a measured eager latency.

MACs of Conv2d, Linear and deformable convs (its bilinear sampling included) are the
profiler's (:func:`edgekit.calibration.profiler.measure_layers`), so BOPs, ``edgekit
profile`` and the roofline give one count; this module adds the bytes moved and FLOPs =
2 x MACs. Why hooks rather than ``torch.utils.flop_counter`` alone: the flop counter sees
aten ops, not module paths with weights and bit widths, and it does not know the
deformable convolution's sampling; it is used in the tests as the independent check of
the Conv2d/Linear counts. Ops outside modules (residual additions, reshapes) are not counted.

Costs per element for non-matmul layers (FLOPs per output element) are rough constants,
stated in ``ELEMENTWISE_FLOPS``; they matter little next to the convolutions, and those
layers are memory-bound on every device here anyway.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgekit.errors import EdgekitError

ELEMENTWISE_FLOPS = {"LayerNorm": 5, "GroupNorm": 5, "BatchNorm2d": 2, "GELU": 8, "ReLU": 1, "SiLU": 4,
                     "Sigmoid": 4, "GRN": 6, "Scale": 1, "Identity": 0, "Dropout": 0, "DropPath": 0}
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
            weighted = isinstance(mod, (nn.Conv2d, nn.Linear, DeformConv2d))
            # weighted layers: MACs/FLOPs from the profiler below; others: a rough per-element cost
            flops = 0 if weighted else ELEMENTWISE_FLOPS.get(tname, 1) * _numel(output)
            q = quant.get(name) or {}
            costs.append(LayerCost(name, tname, 0, int(flops), int(own), int(_numel(inputs)),
                                   int(_numel(output)), (q.get("weight") or {}).get("bits"),
                                   (q.get("input") or {}).get("bits")))
        return fn

    for name, m in _hooked_modules(model):
        hooks.append(m.register_forward_hook(hook(name, m)))
    try:
        with torch.inference_mode():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    _profiler_counts(costs, model, example)
    return costs


def _profiler_counts(costs: list[LayerCost], model, example) -> None:
    """MACs of Conv2d/Linear/DeformConv2d layers from :func:`edgekit.calibration.profiler.measure_layers`
    (the one count edgekit reports, BOPs and sizes included), scaled to the example's batch;
    FLOPs = 2 x (MACs + the deformable sampling's multiply-adds). A module called several
    times (a shared head) has its total split evenly over its calls."""
    from collections import Counter

    from edgekit.calibration.profiler import measure_layers

    counted = measure_layers(model, tuple(example.shape[-2:]), in_channels=example.shape[1])
    calls = Counter(c.name for c in costs if c.name in counted)
    batch = example.shape[0]
    for c in costs:
        if c.name in counted:
            _, _, macs, sampling = counted[c.name]
            c.macs = macs * batch // calls[c.name]
            c.flops = 2 * (macs + sampling) * batch // calls[c.name]


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


def _hooked_modules(model):
    from edgekit.models.deform import DeformConv2d

    for name, m in model.named_modules():
        if not any(True for _ in m.children()) or isinstance(m, DeformConv2d):
            yield name, m


def measure_layers(model, example, repeats: int = 5) -> dict[str, float]:
    """Measured eager time of each profiled layer (median over ``repeats`` forwards, in
    microseconds), exclusive of hooked children (a DeformConv2dPack minus its offset conv).
    The hooks add about a microsecond per layer; the total is reported beside them."""
    import statistics
    import time

    import torch

    times: dict[str, list[float]] = {}
    stack: list[list] = []  # [name, start, children_time]
    hooks = []

    def pre(name):
        def fn(mod, inputs):
            stack.append([name, time.perf_counter(), 0.0])
        return fn

    def post(mod, inputs, output):
        name, start, children = stack.pop()
        elapsed = time.perf_counter() - start
        times.setdefault(name, []).append((elapsed - children) * 1e6)
        if stack:
            stack[-1][2] += elapsed

    for name, m in _hooked_modules(model):
        hooks += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            model.eval()
            for _ in range(repeats):
                model(example)
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.median(v) for k, v in times.items()}


def validate_on_cpu(model, example, measured_ms: float | None = None, device=None, repeats: int = 5,
                    gemm_tflops: float | None = None) -> dict:
    """Predicted (FP32 roofline on this CPU) against measured eager time, for the whole model
    (``measured_ms``: a latency-harness mean of the same input) and per layer type (hooks).

    Two ceilings are reported: the theoretical peak (clock x FMA width, what the device
    table holds for every other device) and the attained one (``gemm_tflops``, measured:
    :func:`edgekit.benchmarks.devices.gemm_tflops`), which separates "the kernels reach
    only part of the peak" from "the model does work the roofline does not count"."""
    import dataclasses

    from edgekit.benchmarks.devices import ci_cpu
    from edgekit.benchmarks.devices import gemm_tflops as measure_gemm

    device = device or ci_cpu()
    costs = profile_layers(model, example)
    pred = predict(costs, device, "fp32")
    attained_rate = gemm_tflops or measure_gemm()
    attained = predict(costs, dataclasses.replace(device, fp32_tflops=attained_rate), "fp32")
    attained["gemm_source"] = "given" if gemm_tflops else "measured 1024^3 matmul"
    attained_times = [layer["time_us"] for layer in attained.pop("layers")]  # one per call, as pred's
    measured = measure_layers(model, example, repeats)
    by_type: dict[str, dict] = {}
    for layer, attained_us in zip(pred["layers"], attained_times):
        t = by_type.setdefault(layer["type"], {"layers": 0, "predicted_ms": 0.0, "predicted_attained_ms": 0.0,
                                               "measured_ms": 0.0})
        t["layers"] += 1
        t["predicted_ms"] += layer["time_us"] / 1e3
        t["predicted_attained_ms"] += attained_us / 1e3
        t["measured_ms"] += measured.get(layer["name"], 0.0) / 1e3
    for t in by_type.values():
        t["measured_over_predicted"] = t["measured_ms"] / t["predicted_ms"] if t["predicted_ms"] else None
    top = sorted(pred["layers"], key=lambda l: -l["time_us"])[:10]
    for layer in top:
        layer["measured_us"] = measured.get(layer["name"])
    pred.pop("layers")
    layers_ms = sum(measured.values()) / 1e3
    attained.update(gemm_tflops=attained_rate,
                    measured_over_predicted=(measured_ms or layers_ms) / attained["total_ms"]
                    if attained["total_ms"] else None)
    return {"label": "predicted vs measured", "device": device.to_dict(), "predicted": pred,
            "predicted_attained": attained,
            "measured_eager_ms": measured_ms, "measured_sum_of_layers_ms": layers_ms,
            "measured_over_predicted": (measured_ms or layers_ms) / pred["total_ms"] if pred["total_ms"] else None,
            "by_layer_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["measured_ms"])),
            "top_layers_predicted": top, "layer_costs": [asdict(c) for c in costs]}


def validation_markdown(v: dict, machine: dict) -> str:
    d = v["device"]
    lines = ["# Roofline validation on this CPU (FP32, batch 1)", "",
             f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, load average "
             f"{machine.get('load_average_1_5_15')}, {machine.get('date')}. Command: `{machine.get('command')}`", "",
             f"Roofline device: peak {d['fp32_tflops'] * 1e3 if d['fp32_tflops'] else float('nan'):.0f} GFLOP/s "
             f"({d['derived'].get('fp32_tflops')}), bandwidth {d['bandwidth_gbs']:.1f} GB/s (measured copy), "
             f"{d['launch_us']:.1f} µs per layer (measured eager call).", "",
             f"**Predicted {v['predicted']['total_ms']:.2f} ms; measured eager "
             f"{v['measured_eager_ms'] if v['measured_eager_ms'] is not None else float('nan'):.2f} ms (latency harness "
             f"mean), sum of hooked layers {v['measured_sum_of_layers_ms']:.2f} ms; measured / predicted "
             f"{v['measured_over_predicted']:.2f}.**", ""]
    att = v.get("predicted_attained")
    if att:
        ratio = att["measured_over_predicted"]
        lines += [f"**With the attained compute ceiling ({att.get('gemm_source', 'measured')}: "
                  f"{att['gemm_tflops'] * 1e3:.0f} GFLOP/s) in place of the theoretical peak: predicted "
                  f"{att['total_ms']:.2f} ms; measured / predicted {'-' if ratio is None else f'{ratio:.2f}'}.**", ""]
    lines += ["| layer type | layers | predicted ms (peak) | predicted ms (attained) | measured ms | "
              "measured / predicted (peak) |", "|---|---|---|---|---|---|"]
    for name, t in v["by_layer_type"].items():
        ratio = t["measured_over_predicted"]
        lines.append(f"| {name} | {t['layers']} | {t['predicted_ms']:.3f} | {t.get('predicted_attained_ms', 0):.3f} | "
                     f"{t['measured_ms']:.3f} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    lines += ["", "Ops outside modules (residual additions, reshapes, the detector's decoding) are in the measured "
              "whole-model time but in no layer.", ""]
    return "\n".join(lines)


def roofline_suite(config) -> dict:
    """Validate the roofline predictor against eager latency on this CPU (a
    :class:`~edgekit.benchmarks.suites.RooflineSuiteConfig`): writes ``roofline_cpu.{json,md}``."""
    from pathlib import Path

    import torch

    from edgekit.benchmarks.latency import time_callable, torch_threads
    from edgekit.engine.checkpoint import load
    from edgekit.fileio import write_json_atomic, write_text_atomic
    from edgekit.sysinfo import environment

    model = load(config.model).model
    x = torch.randn(1, 3, config.image_size, config.image_size)
    with torch_threads(None), torch.inference_mode():
        t = time_callable(lambda: model(x), warmup_s=1.0, duration_s=config.duration, min_count=5, keep_values=False)
    v = validate_on_cpu(model, x, t.latency["mean"])
    v["model"], v["image_size"], v["measured_latency"] = config.model, config.image_size, t.latency
    machine = environment()
    out = Path(config.out)
    write_json_atomic(out / "roofline_cpu.json", {"machine": machine, **v})
    write_text_atomic(out / "roofline_cpu.md", validation_markdown(v, machine))
    print(f"predicted {v['predicted']['total_ms']:.2f} ms, measured {t.latency['mean']:.2f} ms -> {out / 'roofline_cpu.md'}")
    return v
