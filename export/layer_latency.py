"""Measured latency as the accuracy-control loop's cost unit (``--max-drop-cost latency``).

BOPs and bytes say what a move costs on paper; on a CPU with ONNX Runtime the paper is
wrong: every weight below 8 bits runs the same INT8 kernel (packed bit planes are folded
into INT8 weights), so 4 -> 8 bits costs nothing, and without VNNI an INT8 Conv is not
always faster than a float one (a layer's Q/DQ at its edges can cost more than its
arithmetic). So each layer a quant spec covers is exported alone, at every
input shape it sees in a batch-1 forward (a head shared across levels sees several), at
each width the loop can move it to, as the deployed op (the spec's QDQ rewrite with
export's default packed storage, the file :mod:`edgekit.export.deployed_metric` scores; a
Linear as a 1x1 Conv, the deploy form's pointwise layer; other layers in their deploy
form: a packed deformable conv with its offset branch, a float cost common to every
width), and timed by ONNX Runtime with the widths interleaved round by round (median per
width, so load drifts hit them alike).

A move's cost is the latency it adds, floored at 0: a move that makes the model faster,
or slower by no more than twice the timing's spread, is free, and the loop takes a free
move that helps first (free moves rank by their weight-error proxy, not by noise). The
record keeps the seconds per width and the spread. What a layer costs alone is
not what it costs in the fused whole graph (the Q/DQ pairs at its edges are shared
there); the table ranks moves, it does not predict the model's latency.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgekit.errors import EdgekitError

ROUNDS = 7          # interleaved rounds per layer
RUNS_PER_ROUND = 5  # timed runs per width in a round (the round's time: their median)


def layer_inputs(model, image_size: int, paths) -> dict:
    """``{path: [input shapes of each call]}`` of the layers ``paths`` in one batch-1
    forward: every tensor the layer takes (a plain deformable conv also takes its offset
    and mask), positional first, then ``offset`` and ``mask`` if passed by keyword."""
    from edgekit.calibration.profiler import forward_once

    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise EdgekitError(f"layer latency: the quant spec names layers the model does not have: {missing[:3]}")
    shapes = {p: [] for p in paths}

    def record(path, args, kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [kwargs[k] for k in ("offset", "mask") if isinstance(kwargs.get(k), torch.Tensor)]
        shapes[path].append(tuple(tuple(t.shape) for t in tensors))

    handles = [modules[p].register_forward_pre_hook(lambda module, args, kwargs, p=p: record(p, args, kwargs),
                                                    with_kwargs=True) for p in paths]
    try:
        forward_once(model, image_size)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _alone(module, shapes):
    """(module to export, input shapes): a Linear runs as a 1x1 Conv (as the deploy form runs
    the pointwise ones) over its leading dims laid out as (1, C, rows, 1); others in their
    deploy form (a packed deformable conv slices its offsets and mask, as export writes it)."""
    from edgekit.export.deploy_form import to_deploy_form

    if not isinstance(module, nn.Linear):
        return to_deploy_form(module), shapes
    conv = nn.Conv2d(module.in_features, module.out_features, 1, bias=module.bias is not None)
    conv.weight.data = module.weight.detach()[:, :, None, None].clone()
    if module.bias is not None:
        conv.bias.data = module.bias.detach().clone()
    rows = math.prod(shapes[0][:-1])  # (N, H, W, C) channels-last, (N, L, C) tokens or (N, C)
    return conv, ((1, module.in_features, rows, 1),)


class _Alone(nn.Module):
    """A one-layer model whose only submodule is ``layer``, the key of its spec entry."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(*inputs)


def _example(shapes, rng) -> list:
    """Inputs for timing: normal images; a deformable conv's offsets within a pixel and mask in (0, 1)."""
    import numpy as np

    arrays = [rng.standard_normal(shapes[0]).astype(np.float32)]
    arrays += [rng.uniform(-1, 1, s).astype(np.float32) if i == 0 else rng.uniform(0, 1, s).astype(np.float32)
               for i, s in enumerate(shapes[1:])]
    return arrays


def _graphs(folder: Path, module, shapes, entries: dict, spec: dict) -> tuple[dict, tuple]:
    """(``{width: ONNX path}``: the layer alone as float and under each width's spec entry,
    the graph's input shapes)."""
    from edgekit.export.qdq import quantize_onnx
    from edgekit.export.to_onnx import torch_to_onnx

    layer, input_shapes = _alone(module, shapes)
    net = _Alone(layer).eval()
    names = [f"input{i}" for i in range(len(input_shapes))]
    example = tuple(torch.from_numpy(a) for a in _example(input_shapes, np.random.default_rng(0)))
    proto = torch_to_onnx(net, example, input_names=names, output_names=["y"], opset=20, dynamic_batch=False)
    float_path = folder / "float.onnx"
    float_path.write_bytes(proto.SerializeToString())
    paths = {}
    for width, entry in entries.items():
        if entry is None:
            paths[width] = float_path
            continue
        paths[width] = quantize_onnx(float_path, dict(spec, layers={"layer": entry}), folder / f"w{width}.onnx",
                                     model=net)
    return paths, input_shapes


def _time_interleaved(paths: dict, input_shapes, threads: int) -> dict:
    """``{width: (median seconds per run, median absolute deviation over the rounds)}``,
    the widths' sessions timed in rotating rounds by the benchmarks' timing core."""
    import onnxruntime as ort

    from edgekit.benchmarks.latency import run_rounds

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = {w: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for w, p in paths.items()}
    arrays = _example(input_shapes, np.random.default_rng(0))
    feed = {f"input{i}": a for i, a in enumerate(arrays)}
    runs = {w: (lambda session=session: session.run(None, feed)) for w, session in sessions.items()}
    for run in runs.values():  # warm-up: first runs allocate
        run()
    times_ms = run_rounds(runs, max_rounds=ROUNDS, min_rounds=ROUNDS, budget_s=0.0, settle=1, calls=RUNS_PER_ROUND)
    seconds = {w: [t / 1e3 for t in ts] for w, ts in times_ms.items()}
    medians = {w: statistics.median(t) for w, t in seconds.items()}
    return {w: (medians[w], statistics.median(abs(v - medians[w]) for v in t)) for w, t in seconds.items()}


def latency_table(model, spec: dict, image_size: int, widths: dict, threads: int = 2) -> tuple[dict, dict]:
    """(``{layer: {width: seconds}}``, ``{layer: noise seconds}``) for each layer of
    ``widths`` (``{layer: [widths]}``, ints or ``"float"``), summed over the layer's calls
    in one batch-1 forward; a layer's noise is the largest spread (median absolute
    deviation over the rounds) among its widths, summed over its calls. A layer the forward
    pass never runs is left out (it costs nothing)."""
    from edgekit.calibration.accuracy_bound import spec_for_bits
    from edgekit.calibration.accuracy_control import FLOAT, width_rank

    shapes = layer_inputs(model, image_size, list(widths))
    modules = dict(model.named_modules())
    table, noise = {}, {}
    with tempfile.TemporaryDirectory(prefix="edgekit-latency-") as tmp:
        for path, ladder in widths.items():
            if not shapes[path]:
                continue  # not run by the forward pass: no cost to measure
            entries = {}
            for width in sorted(set(ladder), key=width_rank):
                layers = spec_for_bits(spec, model, {path: width})["layers"]
                entries[width] = None if width == FLOAT else copy.deepcopy(layers[path])
            total, spread = dict.fromkeys(entries, 0.0), 0.0
            for call, shape in enumerate(shapes[path]):
                folder = Path(tmp) / f"{len(table)}-{call}"
                folder.mkdir()
                graphs, input_shapes = _graphs(folder, modules[path], shape, entries, spec)
                timed = _time_interleaved(graphs, input_shapes, threads)
                for width, (seconds, _) in timed.items():
                    total[width] += seconds
                spread += max(deviation for _, deviation in timed.values())
            table[path], noise[path] = total, spread
    return table, noise


NOISE_FACTOR = 2.0  # a difference within this many spreads of the timing is no difference


def latency_cost(table: dict, noise: dict | None = None):
    """``cost(layer, from, to)``: the seconds a move adds by ``table``; 0 when it saves time
    or adds no more than ``NOISE_FACTOR`` x the layer's ``noise`` (then free moves are
    ranked by the loop's proxy, not by timing noise)."""
    noise = noise or {}

    def cost(layer, bits_from, bits_to):
        if layer not in table or bits_from not in table[layer] or bits_to not in table[layer]:
            raise EdgekitError(f"layer latency: no measurement of {layer!r} at {bits_from} and {bits_to} bits")
        added = table[layer][bits_to] - table[layer][bits_from]
        return added if added > NOISE_FACTOR * noise.get(layer, 0.0) else 0.0

    return cost


def onnxruntime_latency(model, spec: dict, image_size: int, ladders: dict, log=lambda _: None):
    """The ``layer_cost`` factory the quantize and calibrate stages take for
    ``--max-drop-cost latency``: (cost function, the record's ``{"seconds": {layer: {width:
    seconds}}, "noise": {layer: seconds}}``)."""
    started = time.perf_counter()
    widths = {path: (spec["layers"][path]["weight"]["bits"], *ladder) for path, ladder in ladders.items()}
    log(f"accuracy control: timing {len(widths)} layers alone in ONNX Runtime at each width they can take "
        f"(a few seconds a layer, a shared head once per call) ...")
    table, noise = latency_table(model, spec, image_size, widths)
    log(f"accuracy control: measured {len(table)} layers' latency per width in ONNX Runtime "
        f"({time.perf_counter() - started:.0f} s)")
    seconds = {p: {str(w): s for w, s in row.items()} for p, row in table.items()}
    return latency_cost(table, noise), {"seconds": seconds, "noise": noise}
