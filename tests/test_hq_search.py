"""Bit search: 1-D k-means against a dense Lloyd and the exact DP optimum, the uniform
quantizer against brevitas, the budget DP against brute force, sensitivity against
closed forms."""

import itertools
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgekit.calibration.hq_search import (allocate_bits, kmeans_1d, layer_errors, search_bits, threshold_bits,
                                           uniform_mse)
from edgekit.calibration.sensitivity import fisher_trace, hutchinson_estimate, hutchinson_trace, layer_sensitivity
from edgekit.errors import EdgekitError


def dense_lloyd(x, centres, iters):
    """Textbook Lloyd: full distance matrix, same init (an independent implementation)."""
    c = centres.copy()
    for _ in range(iters):
        a = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        new = np.array([x[a == j].mean() if np.any(a == j) else c[j] for j in range(len(c))])
        if np.array_equal(new, c):
            break
        c = new
    a = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    return np.mean((x - c[a]) ** 2)


def optimal_kmeans_sse(x, k):
    """Exact 1-D k-means by DP over sorted prefixes (O(k n^2), small n only)."""
    x = np.sort(x)
    n = len(x)
    cs, cs2 = np.concatenate(([0], np.cumsum(x))), np.concatenate(([0], np.cumsum(x * x)))

    def cost(i, j):  # x[i:j]
        m = j - i
        return cs2[j] - cs2[i] - (cs[j] - cs[i]) ** 2 / m

    dp = np.full((k + 1, n + 1), np.inf)
    dp[0, 0] = 0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            dp[c, j] = min(dp[c - 1, i] + cost(i, j) for i in range(c - 1, j))
    return dp[k, n]


def test_kmeans_is_exact_for_few_centres_and_a_lloyd_fixed_point_for_many(rng):
    x = np.concatenate([rng.normal(0, 1, 40), rng.laplace(2, 0.3, 30)])  # bimodal: traps quantile-init Lloyd
    for k in (2, 4, 8, 16, 32):  # few weights: the optimal segmentation itself
        centres, mse = kmeans_1d(x, k)
        assert np.all(np.diff(centres) >= 0)
        assert mse == pytest.approx(optimal_kmeans_sse(x, k) / len(x), rel=1e-9, abs=1e-15)
    big = np.concatenate([rng.normal(0, 1, 30_000), rng.laplace(2, 0.3, 10_000)])
    for k in (64, 256):  # many weights and centres: Lloyd from the companding start
        centres, mse = kmeans_1d(big, k)
        # An independent dense Lloyd started at the answer finds the same (converged) error.
        assert dense_lloyd(big, centres, 1) == pytest.approx(mse, rel=1e-3)


def test_kmeans_edge_cases_speed_and_lloyd_max_values(rng):
    assert kmeans_1d(np.full(100, 0.3), 4)[1] == pytest.approx(0.0, abs=1e-20)  # one distinct value
    assert kmeans_1d(np.array([1.0, 5.0, 9.0]), 256)[1] == pytest.approx(0.0, abs=1e-20)  # k > n
    big = rng.normal(0, 0.02, 400_000)
    start = time.perf_counter()
    errs = [kmeans_1d(big, 2 ** b)[1] / big.var() for b in range(2, 9)]
    assert time.perf_counter() - start < 5.0  # well under a second per width on a free core
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # Lloyd-Max quantizers of a Gaussian (Max 1960): 4, 8, 16, 32 levels; beyond, the
    # high-resolution optimum sqrt(3)*pi/2 * 4^-b (Panter-Dite) is approached from below.
    for got, want in zip(errs, (0.1175, 0.03454, 0.009497, 0.002499)):
        assert got == pytest.approx(want, rel=0.03)
    for b, got in zip((6, 7, 8), errs[4:]):
        assert got <= 1.1 * math.sqrt(3) * math.pi / 2 * 4.0 ** -b


def test_uniform_mse_matches_brevitas_quantizer(fresh_torch_seed):
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat

    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    w[2] = 0  # an all-zero channel has no error
    for bits in (2, 4, 8):
        conv = qnn.QuantConv2d(5, 6, 3, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits)
        conv.weight.data = w.float()
        deq = conv.quant_weight().value.double()
        assert uniform_mse(w.numpy(), bits) == pytest.approx(float(((deq - w) ** 2).mean()), rel=1e-5)


def test_threshold_rule_takes_the_first_width_below_the_threshold():
    layer = nn.Linear(64, 32)
    errors = layer_errors({"a": layer}, metric="kmeans")
    rel = {b: errors["a"].relative(b) for b in range(2, 9)}
    for t in (rel[3] * 1.0001, rel[5] * 1.0001, rel[8] / 2):
        expected = next((b for b in range(2, 9) if rel[b] <= t), 8)
        assert threshold_bits(errors, t)["a"] == expected
    with pytest.raises(EdgekitError, match="threshold"):
        threshold_bits(errors, 0)


def brute_force(cost, objective, budget):
    names = list(cost)
    best, best_value = None, math.inf
    for combo in itertools.product(*[sorted(cost[n]) for n in names]):
        if sum(cost[n][b] for n, b in zip(names, combo)) <= budget:
            value = sum(objective[n][b] for n, b in zip(names, combo))
            if value < best_value:
                best, best_value = dict(zip(names, combo)), value
    return best, best_value


def random_instance(rng, layers=5, bits=(2, 3, 4, 6, 8)):
    cost = {f"l{i}": {b: int(m) * b for b in bits} for i, m in enumerate(rng.integers(1, 20, layers))}
    objective = {n: dict(zip(bits, np.sort(rng.random(len(bits)))[::-1] * rng.random())) for n in cost}
    return cost, objective


def test_budget_dp_is_optimal_against_brute_force(rng):
    for _ in range(30):
        cost, objective = random_instance(rng)
        low = sum(min(c.values()) for c in cost.values())
        high = sum(max(c.values()) for c in cost.values())
        budget = int(rng.integers(low, high + 1))
        # Integer costs with a step of 1: the DP is exact.
        chosen = allocate_bits(cost, objective, budget, resolution=max(budget - low, 1))
        _, best_value = brute_force(cost, objective, budget)
        assert sum(cost[n][b] for n, b in chosen.items()) <= budget
        assert sum(objective[n][b] for n, b in chosen.items()) == pytest.approx(best_value, rel=1e-12)


def test_budget_dp_with_a_coarse_step_is_feasible_and_bounded(rng):
    for _ in range(30):
        cost, objective = random_instance(rng)
        low = sum(min(c.values()) for c in cost.values())
        budget = low + float(rng.random()) * 60
        resolution = 16
        chosen = allocate_bits(cost, objective, budget, resolution)
        value = sum(objective[n][b] for n, b in chosen.items())
        assert sum(cost[n][b] for n, b in chosen.items()) <= budget
        step = (budget - low) / resolution
        assert value >= brute_force(cost, objective, budget)[1] - 1e-12
        smaller = brute_force(cost, objective, budget - len(cost) * step)
        if smaller[0] is not None:
            assert value <= smaller[1] + 1e-12


def test_infeasible_budget_states_the_smallest_achievable(rng):
    cost, objective = random_instance(rng)
    low = sum(min(c.values()) for c in cost.values())
    with pytest.raises(EdgekitError, match=f"smallest achievable is {low}"):
        allocate_bits(cost, objective, low - 1)
    assert allocate_bits(cost, objective, low) == {n: min(c) for n, c in cost.items()}


class TwoBranches(nn.Module):
    """loss = a/2 |W1 x|^2 + b/2 |W2 x|^2: Hessian block of W_i is (a_i x x^T) per output row."""

    def __init__(self, a, b):
        super().__init__()
        self.one, self.two = nn.Linear(5, 3, bias=False), nn.Linear(5, 4, bias=False)
        self.a, self.b = a, b

    def loss(self, x):
        return (self.a * self.one(x).pow(2).sum() + self.b * self.two(x).pow(2).sum()) / (2 * len(x))


def _loss(model, x):
    return model.loss(x)


def test_sensitivity_against_closed_forms(fresh_torch_seed):
    a, b = 1.0, 4.0
    model = TwoBranches(a, b).double()
    batches = [torch.randn(8, 5, dtype=torch.float64) for _ in range(2)]
    layers = {"one": model.one, "two": model.two}
    # Exact trace: a * out * mean ||x||^2 (per batch, averaged); exact Fisher: sum of squared grads.
    trace = {"one": a * 3 * np.mean([float(x.pow(2).sum(1).mean()) for x in batches]),
             "two": b * 4 * np.mean([float(x.pow(2).sum(1).mean()) for x in batches])}
    fisher = {"one": np.mean([float((a * model.one.weight @ x.T @ x / len(x)).pow(2).sum()) for x in batches]),
              "two": np.mean([float((b * model.two.weight @ x.T @ x / len(x)).pow(2).sum()) for x in batches])}
    assert fisher_trace(model, _loss, batches, layers) == pytest.approx(fisher, rel=1e-9)
    gen = torch.Generator().manual_seed(fresh_torch_seed)
    est = hutchinson_trace(model, _loss, batches, layers, probes=300, generator=gen)
    assert est["one"] == pytest.approx(trace["one"], rel=0.15) and est["two"] == pytest.approx(trace["two"], rel=0.15)
    # The finite-difference HVP equals autograd's exact one probe by probe (quadratic loss).
    fd = hutchinson_trace(model, _loss, batches, layers, probes=3, generator=torch.Generator().manual_seed(7))
    ad = hutchinson_trace(model, _loss, batches, layers, probes=3, hvp="autograd",
                          generator=torch.Generator().manual_seed(7))
    assert fd == pytest.approx(ad, rel=1e-6)
    assert layer_sensitivity(model, _loss, batches, layers, "fisher") == pytest.approx(fisher, rel=1e-9)
    with pytest.raises(EdgekitError, match="unknown sensitivity method"):
        layer_sensitivity(model, _loss, batches, layers, "hawq")


def test_hutchinson_standard_error_covers_the_exact_trace_and_sets_the_upper_bound(fresh_torch_seed):
    """The exact trace lies within 4 standard errors of a 40-probe estimate (a miss has
    probability ~1e-4 per layer); layer_sensitivity takes mean + confidence x error,
    clipped at 0; a layer with no curvature (never in the loss) is exactly 0; one sample
    gets an error of |mean|."""
    a = 1.0
    model = TwoBranches(a, 0.0).double()
    batches = [torch.randn(8, 5, dtype=torch.float64)]
    layers = {"one": model.one, "two": model.two}
    exact = a * 3 * float(batches[0].pow(2).sum(1).mean())
    est = hutchinson_estimate(model, _loss, batches, layers, probes=40,
                              generator=torch.Generator().manual_seed(fresh_torch_seed))
    mean, spread = est["one"]
    assert 0 < spread < abs(mean) and abs(mean - exact) <= 4 * spread, (mean, spread, exact)
    assert est["two"] == (0.0, 0.0)
    for confidence in (0.0, 2.0):
        sens = layer_sensitivity(model, _loss, batches, layers, probes=40, confidence=confidence,
                                 generator=torch.Generator().manual_seed(fresh_torch_seed))
        assert sens == pytest.approx({"one": max(mean + confidence * spread, 0.0), "two": 0.0}, rel=1e-12)
    single = hutchinson_estimate(model, _loss, batches, layers, probes=1, generator=torch.Generator().manual_seed(3))
    assert single["one"][1] == abs(single["one"][0])
    with pytest.raises(EdgekitError, match="confidence"):
        layer_sensitivity(model, _loss, batches, layers, confidence=-1.0)


def test_search_modes_on_the_atto_detector_are_fast_and_meet_budgets():
    from edgekit.calibration.profiler import profile_model
    from edgekit.calibration.quantize import QuantConfig
    from edgekit.models import create_model

    model = create_model("rsdet_atto")
    ghost = search_bits(model, "ghost", threshold=0.02, image_size=64)
    assert ghost.seconds < 60
    assert set(ghost.fixed_bits) == {"backbone.downsample_layers.0.0", "head.cls_out", "head.box_out", "head.ctr_out"}
    assert all(ghost.errors[p].relative(b) <= 0.02 or b == 8 for p, b in ghost.weight_bits.items())
    all8 = profile_model(model, 64, QuantConfig(weight_bits=8, act_bits=8)).totals
    budget = all8["bops"] * 0.7  # the size budget is exercised by the quantize command's test
    result = search_bits(model, "budget", image_size=64, budget_bops=budget)
    used = profile_model(model, 64, QuantConfig(weight_bits=result.weight_bits, act_bits=8)).totals["bops"]
    assert budget * 0.97 < used <= budget
    with pytest.raises(EdgekitError, match="smallest achievable"):
        search_bits(model, "budget", budget_bops=1e6, image_size=64)
    with pytest.raises(EdgekitError, match="fixed activation bits"):
        search_bits(model, "budget", budget_bops=1e12, act_bits="tied", image_size=64)


class WithUnusedLinear(nn.Module):
    """Three convs in a chain (first/last fixed, the middle one searched) and a Linear never called."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


@pytest.mark.parametrize("method, budget", [("ghost", {}), ("budget", {"budget_bops": 1e12}),
                                            ("budget", {"budget_bytes": 1e9})])
def test_a_layer_the_forward_pass_never_calls_is_left_out_and_reported(fresh_torch_seed, method, budget):
    model = WithUnusedLinear()
    result = search_bits(model, method, image_size=16, **budget)
    assert result.unused == ["unused"] and result.to_dict()["unused"] == ["unused"]
    assert set(result.weight_bits) == {"middle"} and set(result.fixed_bits) == {"first", "last"}
    assert "unused" not in result.errors
    if budget:  # an ample budget buys the widest grid for the searched layer
        assert result.weight_bits == {"middle": 8}
