"""Measured latency as the accuracy-control loop's cost unit (``--max-drop-cost latency``).

BOPs and bytes say what a move costs on paper; on a CPU with ONNX Runtime the paper is
wrong in both directions: INT4 weights get no integer kernel (DequantizeLinear + a float
Conv, so 4 -> 8 bits can make a layer faster), and without VNNI an INT8 Conv is not much
faster than a float one. So each layer a quant spec covers is exported alone, at every
input shape it sees in a batch-1 forward (a head shared across levels sees several), at
each width the loop can move it to, as the deployed op (the spec's QDQ rewrite with
native INT4/INT8 storage, the file :mod:`edgekit.export.deployed_metric` scores; a
pointwise Linear as the deploy form's 1x1 Conv), and timed by ONNX Runtime with the
widths interleaved round by round (median per width, so load drifts hit them alike).

A move's cost is the latency it adds, floored at 0: a move that makes the model faster
is free, and the loop takes a free move that helps first. The table keeps the signed
figures for the record. What a layer costs alone is not what it costs in the fused whole
graph (the Q/DQ pairs at its edges are shared there); the table ranks moves, it does not
predict the model's latency.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from edgekit.errors import EdgekitError

ROUNDS = 7          # interleaved rounds per layer
RUNS_PER_ROUND = 5  # session runs timed together in a round


def layer_inputs(model, image_size: int, paths) -> dict:
    """``{path: [input shape of each call]}`` of the layers ``paths`` in one batch-1 forward."""
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise EdgekitError(f"layer latency: the quant spec names layers the model does not have: {missing[:3]}")
    shapes = {p: [] for p in paths}
    handles = [modules[p].register_forward_pre_hook(
        lambda module, args, p=p: shapes[p].append(tuple(args[0].shape))) for p in paths]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _alone(module, shape):
    """(module to export, NCHW input shape): a Linear becomes the deploy form's 1x1 Conv."""
    if not isinstance(module, nn.Linear):
        return module, shape
    conv = nn.Conv2d(module.in_features, module.out_features, 1, bias=module.bias is not None)
    conv.weight.data = module.weight.detach()[:, :, None, None].clone()
    if module.bias is not None:
        conv.bias.data = module.bias.detach().clone()
    spatial = shape[1:-1] if len(shape) == 4 else (1, 1)  # channels-last (N, H, W, C) or (N, C)
    return conv, (1, module.in_features, *spatial)


class _Alone(nn.Module):
    """A one-layer model whose only submodule is ``layer``, the key of its spec entry."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _graphs(folder: Path, module, shape, entries: dict, spec: dict) -> dict:
    """``{width: ONNX path}``: the layer alone as float, and under each width's spec entry."""
    from edgekit.export.qdq import quantize_onnx
    from edgekit.export.to_onnx import torch_to_onnx

    layer, input_shape = _alone(module, shape)
    net = _Alone(layer).eval()
    proto = torch_to_onnx(net, (torch.randn(input_shape),), input_names=["x"], output_names=["y"],
                          opset=20, dynamic_batch=False)
    float_path = folder / "float.onnx"
    float_path.write_bytes(proto.SerializeToString())
    paths = {}
    for width, entry in entries.items():
        if entry is None:
            paths[width] = float_path
            continue
        paths[width] = quantize_onnx(float_path, dict(spec, layers={"layer": entry}), folder / f"w{width}.onnx",
                                     model=net, weight_storage="native")
    return paths


def _time_interleaved(paths: dict, input_shape, threads: int) -> dict:
    """``{width: median seconds per run}`` with the widths' sessions timed round-robin."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = {w: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for w, p in paths.items()}
    feed = {"x": np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)}
    times = {w: [] for w in sessions}
    for session in sessions.values():  # warm-up: first runs allocate
        session.run(None, feed)
    for _ in range(ROUNDS):
        for w, session in sessions.items():
            start = time.perf_counter()
            for _ in range(RUNS_PER_ROUND):
                session.run(None, feed)
            times[w].append((time.perf_counter() - start) / RUNS_PER_ROUND)
    return {w: statistics.median(t) for w, t in times.items()}


def latency_table(model, spec: dict, image_size: int, widths: dict, threads: int = 2) -> dict:
    """``{layer: {width: seconds}}`` for each layer of ``widths`` (``{layer: [widths]}``,
    ints or ``"float"``), summed over the layer's calls in one batch-1 forward."""
    from edgekit.calibration.accuracy_bound import spec_for_bits
    from edgekit.calibration.accuracy_control import FLOAT, width_rank

    shapes = layer_inputs(model, image_size, list(widths))
    modules = dict(model.named_modules())
    table = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-latency-") as tmp:
        for path, ladder in widths.items():
            if not shapes[path]:
                continue  # not run by the forward pass: no cost to measure
            entries = {}
            for width in sorted(set(ladder), key=width_rank):
                layers = spec_for_bits(spec, model, {path: width})["layers"]
                entries[width] = None if width == FLOAT else copy.deepcopy(layers[path])
            total = dict.fromkeys(entries, 0.0)
            for call, shape in enumerate(shapes[path]):
                folder = Path(tmp) / f"{len(table)}-{call}"
                folder.mkdir()
                graphs = _graphs(folder, modules[path], shape, entries, spec)
                input_shape = _alone(modules[path], shape)[1]
                for width, seconds in _time_interleaved(graphs, input_shape, threads).items():
                    total[width] += seconds
            table[path] = total
    return table


def latency_cost(table: dict):
    """``cost(layer, from, to)``: the seconds a move adds by ``table``, floored at 0."""

    def cost(layer, bits_from, bits_to):
        if layer not in table or bits_from not in table[layer] or bits_to not in table[layer]:
            raise EdgekitError(f"layer latency: no measurement of {layer!r} at {bits_from} and {bits_to} bits")
        return max(0.0, table[layer][bits_to] - table[layer][bits_from])

    return cost


def onnxruntime_latency(model, spec: dict, image_size: int, ladders: dict, log=lambda _: None):
    """The ``layer_cost`` factory the quantize and calibrate stages take for
    ``--max-drop-cost latency``: (cost function, the signed table for the record)."""
    started = time.perf_counter()
    widths = {path: (spec["layers"][path]["weight"]["bits"], *ladder) for path, ladder in ladders.items()}
    table = latency_table(model, spec, image_size, widths)
    log(f"accuracy control: measured {len(table)} layers' latency per width in ONNX Runtime "
        f"({time.perf_counter() - started:.0f} s)")
    return latency_cost(table), {p: {str(w): s for w, s in row.items()} for p, row in table.items()}
