"""Accuracy control: a synthetic metric that is a known function of the bits, so every step,
the stopping point and (with equal costs) the optimal path can be checked independently."""

import itertools
import math

import pytest
import torch

from edgekit.calibration import accuracy_control as ac
from edgekit.calibration.accuracy_control import FLOAT, restore_until_bound
from edgekit.errors import EdgekitError


def width(bits) -> int:
    return 32 if bits == FLOAT else bits


class Synthetic:
    """metric = baseline - offset - sum_l s_l * 4^-b_l (quantization noise power per layer;
    float has none); cost = size_l x added bits. Counts its evaluations."""

    def __init__(self, rng, layers: int, baseline: float = 0.6, offset: float = 0.0, equal_cost: bool = False):
        self.names = [f"layer{i}" for i in range(layers)]
        self.s = {n: float(rng.uniform(0.5, 8.0)) for n in self.names}
        self.size = {n: 1.0 if equal_cost else float(rng.uniform(1.0, 10.0)) for n in self.names}
        self.baseline, self.offset, self.calls = baseline, offset, 0

    def metric(self, bits: dict) -> float:
        return self.baseline - self.offset - sum(self.s[n] * 4.0 ** -width(b) for n, b in bits.items() if b != FLOAT)

    def evaluate(self, bits: dict) -> float:
        self.calls += 1
        return self.metric(bits)

    def cost(self, layer, bits_from, bits_to) -> float:
        return self.size[layer] * (width(bits_to) - width(bits_from))


def replay(start: dict, path: list) -> list:
    """The assignments before each step and after the last, rebuilt from the path alone."""
    states, bits = [dict(start)], dict(start)
    for step in path:
        assert bits[step.layer] == step.bits_from
        bits[step.layer] = step.bits_to
        states.append(dict(bits))
    return states


def test_each_step_takes_the_best_gain_per_cost_and_stops_at_the_bound(rng):
    syn = Synthetic(rng, int(rng.integers(3, 7)))
    start = {n: 2 for n in syn.names}
    initial_drop = syn.baseline - syn.metric(start)
    max_drop = float(rng.uniform(0.05, 0.3)) * initial_drop
    res = restore_until_bound(start, syn.evaluate, syn.cost, syn.names, max_drop, syn.baseline)
    assert res.feasible and res.stop == ac.STOP_BOUND and res.path
    states = replay(start, res.path)
    for before, step, after in zip(states, res.path, states[1:]):
        assert step.metric == pytest.approx(syn.metric(after), abs=1e-12)
        assert step.drop == pytest.approx(syn.baseline - syn.metric(after), abs=1e-12)
        assert step.cost == pytest.approx(syn.cost(step.layer, step.bits_from, step.bits_to))
        assert step.bits_to == step.bits_from + 1  # the default ladder: next width up
        chosen = (syn.metric(after) - syn.metric(before)) / step.cost
        for n in syn.names:
            if before[n] < 8:
                other = (syn.metric({**before, n: before[n] + 1}) - syn.metric(before)) / syn.cost(n, before[n],
                                                                                                   before[n] + 1)
                assert chosen >= other - 1e-12, (step.layer, n)
        assert step.tried == sum(b < 8 for b in before.values())
    assert res.path[-1].drop <= max_drop < (res.path[-2].drop if len(res.path) > 1 else initial_drop)
    assert res.bits == states[-1] and res.steps_applied == len(res.path)
    assert res.drop == pytest.approx(syn.baseline - syn.metric(res.bits), abs=1e-12)
    assert res.cost == pytest.approx(sum(s.cost for s in res.path))
    assert res.evaluations == syn.calls == 1 + sum(s.tried for s in res.path)  # each assignment once
    assert res.initial_drop == pytest.approx(initial_drop)


def test_equal_costs_reach_the_brute_force_optimum(rng):
    """One rung per layer (straight to 8 bits) and equal costs: the cheapest set of layers
    meeting the bound is found by enumeration and matches the greedy path."""
    syn = Synthetic(rng, int(rng.integers(4, 8)), equal_cost=True)
    start = {n: 2 for n in syn.names}
    initial_drop = syn.baseline - syn.metric(start)
    max_drop = float(rng.uniform(0.05, 0.6)) * initial_drop
    best = min(len(subset) for r in range(len(syn.names) + 1) for subset in itertools.combinations(syn.names, r)
               if syn.baseline - syn.metric({**start, **{n: 8 for n in subset}}) <= max_drop)
    res = restore_until_bound(start, syn.evaluate, syn.cost, {n: (8,) for n in syn.names}, max_drop, syn.baseline)
    assert res.feasible and len(res.path) == best
    assert res.cost == pytest.approx(best * 6.0)
    order = [s.layer for s in res.path]
    assert order == sorted(syn.names, key=lambda n: -syn.s[n])[:best]


def test_infeasible_bound_returns_the_smallest_drop(rng):
    syn = Synthetic(rng, 3, offset=0.05)
    start = {n: int(rng.integers(2, 8)) for n in syn.names}
    ladders = {n: (4, 8) for n in syn.names}
    res = restore_until_bound(start, syn.evaluate, syn.cost, ladders, 0.04, syn.baseline)
    assert not res.feasible and res.stop == ac.STOP_EXHAUSTED
    assert all(b == max(start[n], 8) for n, b in res.bits.items())
    expected = 0.05 + sum(syn.s[n] * 4.0 ** -8 for n in syn.names)
    assert res.drop == pytest.approx(expected, abs=1e-12) and res.drop > 0.04
    rungs = sum((start[n] < 4) + (start[n] < 8) for n in syn.names)
    assert len(res.path) == rungs


def test_infeasible_with_a_harmful_move_keeps_the_best_state():
    metric = {("a", 2, "b", 2): 0.40, ("a", 8, "b", 2): 0.45, ("a", 2, "b", FLOAT): 0.38,
              ("a", 8, "b", FLOAT): 0.43}

    def evaluate(bits):
        return metric[("a", bits["a"], "b", bits["b"])]

    res = restore_until_bound({"a": 2, "b": 2}, evaluate, lambda *m: 1.0, {"a": (8,), "b": (FLOAT,)},
                              max_drop=0.01, baseline=0.5)
    assert [(s.layer, s.bits_to) for s in res.path] == [("a", 8), ("b", FLOAT)]
    assert res.path[1].gain == pytest.approx(-0.02)
    assert not res.feasible and res.bits == {"a": 8, "b": 2} and res.steps_applied == 1
    assert res.metric == 0.45 and res.drop == pytest.approx(0.05) and res.cost == 1.0


def test_relative_bound(rng):
    syn = Synthetic(rng, 4, baseline=0.5)
    start = {n: 2 for n in syn.names}
    scale = 0.2 / (syn.baseline - syn.metric(start))  # initial absolute drop 0.2
    syn.s = {n: v * scale for n, v in syn.s.items()}
    absolute = restore_until_bound(start, syn.evaluate, syn.cost, syn.names, 0.1, syn.baseline)
    relative = restore_until_bound(start, syn.evaluate, syn.cost, syn.names, 0.1, syn.baseline, relative=True)
    assert relative.feasible and relative.relative
    assert relative.drop == pytest.approx((0.5 - syn.metric(relative.bits)) / 0.5) and relative.drop <= 0.1
    assert relative.initial_drop == pytest.approx(0.4)
    assert absolute.feasible and absolute.drop <= 0.1
    # Same greedy choices, the relative bound (0.05 absolute here) goes on further when unmet.
    assert len(relative.path) >= len(absolute.path)
    if absolute.drop > 0.05:
        assert len(relative.path) > len(absolute.path)
    assert [s.layer for s in relative.path[: len(absolute.path)]] == [s.layer for s in absolute.path]


def test_already_within_bound_and_max_steps(rng):
    syn = Synthetic(rng, 3)
    start = {n: 8 for n in syn.names}
    res = restore_until_bound(start, syn.evaluate, syn.cost, syn.names, 0.01, syn.baseline)
    assert res.feasible and res.path == [] and res.evaluations == 1 and res.bits == start and res.cost == 0
    low = {n: 2 for n in syn.names}
    res = restore_until_bound(low, syn.evaluate, syn.cost, syn.names, 0.0, syn.baseline, max_steps=2)
    assert not res.feasible and res.stop == ac.STOP_MAX_STEPS and len(res.path) == 2
    assert low == {n: 2 for n in syn.names}  # the caller's dict is not changed


def test_proxy_top_n_bounds_evaluations(rng):
    syn = Synthetic(rng, 6)
    start = {n: 2 for n in syn.names}
    max_drop = 0.1 * (syn.baseline - syn.metric(start))
    full = restore_until_bound(start, syn.evaluate, syn.cost, syn.names, max_drop, syn.baseline)

    def exact_gain(layer, bits_from, bits_to):  # a perfect proxy: the true metric gain
        return syn.s[layer] * (4.0 ** -bits_from - 4.0 ** -bits_to)

    syn.calls = 0
    cheap = restore_until_bound(start, syn.evaluate, syn.cost, syn.names, max_drop, syn.baseline,
                                proxy=exact_gain, top_n=1)
    assert [s.layer for s in cheap.path] == [s.layer for s in full.path]
    assert all(s.tried == 1 for s in cheap.path) and cheap.evaluations == syn.calls == 1 + len(cheap.path)
    assert cheap.evaluations < full.evaluations

def test_free_moves_are_ranked_by_their_proxy(rng):
    """With every move free (a latency cost floored at 0), the pre-selection must still pick
    the moves with the largest proxy, not the first layers in order."""
    syn = Synthetic(rng, 12)
    start = {n: 2 for n in syn.names}

    def exact_gain(layer, bits_from, bits_to):
        return syn.s[layer] * (4.0 ** -bits_from - 4.0 ** -bits_to)

    best = max(syn.names, key=lambda n: exact_gain(n, 2, 3))
    last_in_order = [n for n in syn.names if n != best] + [best]  # layer order alone would pick another
    res = restore_until_bound(start, syn.evaluate, lambda *move: 0.0, last_in_order, 0.0, syn.baseline,
                              proxy=exact_gain, top_n=1, max_steps=1)
    assert res.path[0].layer == best and res.path[0].tried == 1 and res.path[0].cost == 0.0



def test_spec_input_and_float_ladder():
    from edgekit.calibration.spec import new_spec

    spec = new_spec("m", "ghost")
    for path, bits in (("conv1", 4), ("conv2", 2)):
        spec["layers"][path] = {"type": "Conv2d", "input": None,
                                "weight": {"bits": bits, "signed": True, "axis": 0, "scale": [0.1], "zero_point": [0]}}
    assert ac.bits_from_spec(spec) == {"conv1": 4, "conv2": 2}
    seen = []

    def evaluate(bits):
        seen.append(bits)
        return 0.5 if bits["conv2"] == FLOAT else 0.3

    res = restore_until_bound(spec, evaluate, lambda *m: 1.0, {"conv2": (8, FLOAT)}, 0.0, 0.5)
    assert res.feasible and res.bits == {"conv1": 4, "conv2": FLOAT}
    assert [(s.bits_from, s.bits_to) for s in res.path] == [(2, 8), (8, FLOAT)]
    assert seen[0] == {"conv1": 4, "conv2": 2}


@pytest.mark.parametrize("kwargs, match", [
    ({"max_drop": -0.01}, "max_drop"),
    ({"max_drop": float("nan")}, "max_drop"),
    ({"baseline": float("inf")}, "baseline"),
    ({"relative": True, "baseline": 0.0}, "positive baseline"),
    ({"candidates": ["nope"]}, "not in the bit assignment"),
    ({"candidates": {"a": (9,)}}, "ladder"),
    ({"evaluate": lambda bits: float("nan")}, "evaluate returned"),
    ({"cost": lambda *m: -1.0}, "cost"),
    ({"top_n": 2}, "proxy"),
    ({"max_steps": -1}, "max_steps"),
    ({"spec_or_bits": {"a": 1}}, "a width must be"),
])
def test_bad_arguments(kwargs, match):
    args = {"spec_or_bits": {"a": 2, "b": 4}, "evaluate": lambda bits: 0.3, "cost": lambda *m: 1.0,
            "candidates": ["a"], "max_drop": 0.01, "baseline": 0.5, **kwargs}
    with pytest.raises(EdgekitError, match=match):
        restore_until_bound(**args)


class TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("move", [("conv1", 2, 4), ("conv2", 4, 8), ("conv2", 8, FLOAT), ("conv1", 3, FLOAT)])
def test_costs_match_the_profiler(move):
    from edgekit.calibration.profiler import profile_model

    model = TwoConvs()
    layer, before, after = move
    other = "conv2" if layer == "conv1" else "conv1"

    def totals(bits):
        table = {other: [4, 8]}
        if bits != FLOAT:
            table[layer] = [bits, 8]
        return profile_model(model, 32, table).totals

    bops = ac.bops_cost(model, 32, act_bits=8)(*move)
    size = ac.size_cost(model, 32)(*move)
    assert bops == totals(after)["bops"] - totals(before)["bops"]
    assert math.ceil(size) == pytest.approx(totals(after)["size_bytes"] - totals(before)["size_bytes"], abs=1)


def test_quant_config_for_skips_float_layers():
    from edgekit.calibration.quantize import QuantConfig, quantizable_layers

    model = TwoConvs()
    config = ac.quant_config_for({"conv1": 4, "conv2": FLOAT}, QuantConfig(act_bits=8, skip=("x*",)))
    assert config.weight_bits == {"conv1": 4} and config.skip == ("x*", "conv2")
    assert list(quantizable_layers(model, config)) == ["conv1"]


@pytest.mark.slow
def test_real_model_fidelity_bound(fresh_torch_seed):
    """The loop on a real network, convnextv2_atto (random init): the metric is the cosine
    similarity of the logits to the float model's with every layer's weight fake-quantized
    at its width (the spec's per-channel symmetric grid, ``ptq.weight_qparams`` +
    ``spec.fake_quantize``; float layers untouched). Start at W2 everywhere, climb (4, 8)
    with a proxy (uniform-quantizer relative weight error saved by the move) on the top 4
    moves, BOPs as the cost. The returned assignment is re-evaluated from scratch."""
    from edgekit.calibration.hq_search import layer_errors
    from edgekit.calibration.ptq import weight_qparams
    from edgekit.calibration.quantize import QuantConfig, quantizable_layers
    from edgekit.calibration.spec import fake_quantize
    from edgekit.models import create_model

    model = create_model("convnextv2_atto").eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reference = model(x).flatten().double()
    layers = quantizable_layers(model, QuantConfig(first_layer_bits=None, last_layer_bits=None))
    originals = {p: m.weight.detach().clone() for p, m in layers.items()}
    errors = layer_errors(layers, bits=(2, 4, 8))

    def fidelity(bits):
        try:
            with torch.no_grad():
                for path, b in bits.items():
                    if b != FLOAT:
                        q = weight_qparams(originals[path], b)
                        layers[path].weight.copy_(fake_quantize(originals[path], q["scale"], q["zero_point"], b,
                                                                True, axis=0, narrow=True))
                out = model(x).flatten().double()
        finally:
            with torch.no_grad():
                for path, w in originals.items():
                    layers[path].weight.copy_(w)
        return float(torch.nn.functional.cosine_similarity(out, reference, dim=0))

    def proxy(layer, bits_from, bits_to):
        return errors[layer].relative(bits_from) - errors[layer].relative(bits_to)

    start = {p: 2 for p in layers}
    res = restore_until_bound(start, fidelity, ac.bops_cost(model, 32), {p: (4, 8) for p in layers},
                              max_drop=0.01, baseline=1.0, proxy=proxy, top_n=4)
    print(f"initial cosine {res.initial_metric:.4f}, final {res.metric:.4f} after {res.steps_applied} steps "
          f"({res.evaluations} evaluations, {res.stop}); widths {sorted(res.bits.values())}")
    assert res.path and all(s.tried <= 4 for s in res.path)
    assert res.metric == pytest.approx(fidelity(res.bits), abs=1e-12)  # the returned state is what was measured
    assert res.feasible and 1.0 - res.metric <= 0.01 < res.initial_drop  # all-8-bit weights keep cosine > 0.99
