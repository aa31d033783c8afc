"""HQ: hybrid bit-width search (GHOST's threshold rule, and a budgeted exact allocation).

Per layer and bit width n we measure how well n bits can represent the weights:
``kmeans`` clusters them with 2^n centres (GHOST's rule), ``uniform`` uses the quantizer
that :func:`edgekit.calibration.quantize` really applies (per-channel symmetric,
narrow range, scale = channel abs-max / (2^(n-1)-1)). Errors are mean squared errors;
the relative error divides by the mean squared weight, so one threshold fits all layers.

The k-means is :func:`edgekit.calibration.kmeans.kmeans_1d`.

``allocate_bits`` picks one width per layer minimising ``sum(objective[l][b])`` under a
budget on ``sum(cost[l][b])``: a multiple-choice knapsack solved by dynamic programming
over the cost *above each layer's cheapest choice*, discretised in ``resolution`` steps
with costs rounded up (so the answer always meets the real budget). It is exact when
those excess costs are multiples of the step; otherwise it is at least as good as the
true optimum under a budget smaller by ``layers x step``. The all-cheapest allocation is
always representable, so the DP is infeasible exactly when the budget is.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from edgekit.calibration.kmeans import kmeans_1d
from edgekit.calibration.spec import DEFAULT_BITS
from edgekit.errors import EdgekitError

SEARCH_METHODS = ("ghost", "cluster", "budget", "sensitivity")


def uniform_mse(weight, bits: int) -> float:
    """Mean squared error of per-channel (axis 0) symmetric narrow-range quantization."""
    w = np.asarray(weight, dtype=np.float64)
    w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.round(w / scale), -qmax, qmax)
    return float(np.mean((q * scale - w) ** 2))


@dataclasses.dataclass
class LayerErrors:
    """Per-bit-width MSE of one layer's weights."""

    path: str
    numel: int
    mean_square: float
    mse: dict  # bits -> mean squared error

    def relative(self, bits: int) -> float:
        return self.mse[bits] / self.mean_square if self.mean_square > 0 else 0.0


def layer_errors(layers: dict, bits=DEFAULT_BITS, metric: str = "uniform", progress: bool = False) -> dict:
    """``{path: LayerErrors}`` for ``{path: module}`` (each with a ``weight``)."""
    if metric not in ("kmeans", "uniform"):
        raise EdgekitError(f"unknown error metric {metric!r}; use kmeans or uniform")
    items = layers.items()
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"weight error ({metric})", unit="layer")
    out = {}
    for path, module in items:
        w = module.weight.detach().cpu().double().numpy()
        if metric == "kmeans":
            flat = np.sort(w.ravel())
            mse = {b: kmeans_1d(flat, 2 ** b, presorted=True)[1] for b in bits}
        else:
            mse = {b: uniform_mse(w, b) for b in bits}
        out[path] = LayerErrors(path, w.size, float(np.mean(w * w)), mse)
    return out


def threshold_bits(errors: dict, threshold: float, bits=DEFAULT_BITS) -> dict:
    """GHOST's rule: per layer the smallest width whose relative error is <= threshold
    (the largest width when none is)."""
    if not threshold > 0:
        raise EdgekitError(f"threshold must be > 0, got {threshold}")
    bits = sorted(bits)
    return {path: next((b for b in bits if e.relative(b) <= threshold), bits[-1]) for path, e in errors.items()}


def allocate_bits(cost: dict, objective: dict, budget: float, resolution: int = 4096) -> dict:
    """``{layer: bits}`` minimising ``sum objective[l][b]`` with ``sum cost[l][b] <= budget``.

    ``cost`` and ``objective`` map layer -> {bits: value} (same keys). Raises
    EdgekitError stating the smallest achievable total when the budget is too small.
    """
    names = list(cost)
    if not names:
        return {}
    choices = [sorted(cost[n]) for n in names]
    floor = sum(min(cost[n].values()) for n in names)
    spare = budget - floor
    if spare < 0:
        raise EdgekitError(f"budget {budget:.6g} is infeasible: the smallest achievable is {floor:.6g} "
                           f"(every searched layer at its fewest bits); raise the budget or allow fewer bits")
    step = spare / resolution if spare > 0 else 1.0
    steps = resolution if spare > 0 else 0
    dp = np.zeros(steps + 1)
    picks = np.zeros((len(names), steps + 1), dtype=np.int64)
    for i, (name, opts) in enumerate(zip(names, choices)):
        low = min(cost[name].values())
        best = np.full(steps + 1, np.inf)
        for j, b in enumerate(opts):
            units = math.ceil((cost[name][b] - low) / step - 1e-9)
            if units > steps:
                continue
            cand = np.full(steps + 1, np.inf)
            cand[units:] = dp[: steps + 1 - units] + objective[name][b]
            better = cand < best
            best[better] = cand[better]
            picks[i, better] = j
        dp = best
    out, r = {}, steps
    for i in range(len(names) - 1, -1, -1):
        b = choices[i][picks[i, r]]
        out[names[i]] = b
        low = min(cost[names[i]].values())
        r -= math.ceil((cost[names[i]][b] - low) / step - 1e-9)
    return out


@dataclasses.dataclass
class SearchResult:
    method: str
    metric: str
    weight_bits: dict       # searched layers only
    fixed_bits: dict        # layers the policy fixes (first/last): path -> bits
    errors: dict            # path -> LayerErrors
    sensitivity: dict | None
    seconds: float                      # the search itself
    sensitivity_seconds: float = 0.0    # estimating the sensitivities, when search_bits did it
    unused: list = dataclasses.field(default_factory=list)  # quantizable layers the forward pass never calls
    clusters: dict | None = None        # cluster method: path -> the cluster count the index chose

    def to_dict(self) -> dict:
        return {"method": self.method, "metric": self.metric, "weight_bits": self.weight_bits,
                "fixed_bits": self.fixed_bits, "seconds": self.seconds,
                "sensitivity_seconds": self.sensitivity_seconds,
                "relative_error": {p: {b: e.relative(b) for b in e.mse} for p, e in self.errors.items()},
                "sensitivity": self.sensitivity, "unused": self.unused, "clusters": self.clusters}


def search_bits(model, method: str = "ghost", bits=DEFAULT_BITS, threshold: float = 0.01, metric: str | None = None,
                budget_bops: float | None = None, budget_bytes: float | None = None, act_bits: int | str = 8,
                config=None, image_size=256, sensitivity: dict | None = None, progress: bool = False,
                cluster_index: str = "silhouette") -> SearchResult:
    """Per-layer weight bits for ``model`` (float) by ``method``:

    ``ghost``: threshold rule (default metric kmeans); ``cluster``: the number of clusters
    a cluster validity index finds in each layer's weights (``cluster_index``, see
    :mod:`edgekit.calibration.cluster_bits`), no threshold; ``budget``: minimise the summed
    relative error under ``budget_bops`` or ``budget_bytes``; ``sensitivity``: the same
    with each layer's MSE weighted by its Hessian trace (``sensitivity``: a dict or a
    callable returning one, called only once the budget is known to be feasible; see
    :mod:`edgekit.calibration.sensitivity`), HAWQ-v2's objective. Layers the config's
    first/last policy fixes are not searched but count in the budget, as do float
    layers (at 32 bits) and other parameters; BOPs budgets need fixed activation bits.
    Quantizable layers the forward pass never calls are left out of the search and
    listed in ``SearchResult.unused`` (their bits change neither the output nor the
    BOPs; a size budget counts their weights as float, an upper bound).
    """
    from edgekit.calibration.profiler import FLOAT_BITS, measure_layers
    from edgekit.calibration.quantize import (QuantConfig, default_example_input, fixed_layer_bits,
                                              quantizable_layers, trace_layers)
    from edgekit.calibration.spec import check_bits

    start, sens_seconds = time.perf_counter(), 0.0
    if method not in SEARCH_METHODS:
        raise EdgekitError(f"unknown search method {method!r}; use {', '.join(SEARCH_METHODS)}")
    bits = tuple(sorted({check_bits(int(b), "bit widths") for b in bits}))
    if not bits:
        raise EdgekitError("no bit widths to search; pass some, e.g. bits=(2, 4, 8)")
    metric = metric or ("kmeans" if method == "ghost" else "uniform")
    if method != "ghost" and budget_bops is not None and not isinstance(act_bits, int):
        raise EdgekitError("a BOPs budget needs fixed activation bits (tied ones couple the layers); "
                           "use --act-bits-mode fixed, or a size budget (--budget-mb)")
    config = config or QuantConfig(act_bits=act_bits)
    layers = quantizable_layers(model, config)
    graph = trace_layers(model, layers, default_example_input(model))
    fixed = fixed_layer_bits(graph, config)
    unused = [p for p in layers if p not in graph.order]
    searched = {p: m for p, m in layers.items() if p not in fixed and p not in unused}
    if method == "ghost":
        errors = layer_errors(searched, bits, metric, progress)
        chosen = threshold_bits(errors, threshold, bits)
        return SearchResult(method, metric, chosen, fixed, errors, None, time.perf_counter() - start, unused=unused)
    if method == "cluster":
        from edgekit.calibration.cluster_bits import choose_bits_by_cluster_validity

        picked = choose_bits_by_cluster_validity(model, bits, index=cluster_index, layers=searched, progress=progress)
        errors = layer_errors(searched, bits, "kmeans", progress)  # reported beside the choice, not used by it
        return SearchResult(method, cluster_index, {p: v["bits"] for p, v in picked.items()}, fixed, errors, None,
                            time.perf_counter() - start, unused=unused,
                            clusters={p: v["k"] for p, v in picked.items()})
    if (budget_bops is None) == (budget_bytes is None):
        raise EdgekitError(f"method {method} needs exactly one budget: --budget-bops or --budget-mb")
    if method == "sensitivity" and sensitivity is None:
        raise EdgekitError("method sensitivity needs per-layer sensitivities (edgekit.calibration.sensitivity)")
    measured = measure_layers(model, image_size)
    if budget_bops is not None:
        cost = {p: {b: measured[p][2] * b * act_bits for b in bits} for p in searched}
        outside = sum(measured[p][2] * b * b for p, b in fixed.items())  # fixed layers: W and A at b
        outside += sum(v[2] * FLOAT_BITS * FLOAT_BITS for p, v in measured.items() if p not in layers)
        budget, unit = budget_bops, ("GBOPs", 1e9)
    else:
        cost = {p: {b: math.ceil(measured[p][1] * b / 8) for b in bits} for p in searched}
        outside = sum(math.ceil(measured[p][1] * b / 8) for p, b in fixed.items())
        weights = {f"{p}.weight" for p in measured if p in layers}
        outside += 4 * sum(t.numel() for n, t in model.named_parameters() if n not in weights and "_quant." not in n)
        budget, unit = budget_bytes, ("MB", 1e6)
    floor = outside + sum(min(c.values()) for c in cost.values())
    if budget < floor:  # checked before the (possibly slow) errors and sensitivities
        raise EdgekitError(f"budget {budget / unit[1]:.6g} {unit[0]} is infeasible for this model: the smallest "
                           f"achievable is {floor / unit[1]:.6g} {unit[0]} (searched layers at {bits[0]} bits, "
                           f"first/last and float layers fixed); raise the budget")
    errors = layer_errors(searched, bits, metric, progress)
    if method == "sensitivity":
        if callable(sensitivity):
            began = time.perf_counter()
            sensitivity = sensitivity()
            sens_seconds = time.perf_counter() - began
        objective = {p: {b: sensitivity[p] * errors[p].mse[b] for b in bits} for p in searched}
    else:
        objective = {p: {b: errors[p].relative(b) for b in bits} for p in searched}
    chosen = allocate_bits(cost, objective, budget - outside)
    return SearchResult(method, metric, chosen, fixed, errors, sensitivity,
                        time.perf_counter() - start - sens_seconds, sens_seconds, unused)


def config_from_search(result: SearchResult, config=None):
    """The QuantConfig applying ``result`` (searched widths; first/last by the policy)."""
    from edgekit.calibration.quantize import QuantConfig

    config = config or QuantConfig()
    return dataclasses.replace(config, weight_bits=dict(result.weight_bits))
