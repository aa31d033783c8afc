"""Accuracy-bounded quantization: raise layers' bit widths until the metric drop holds.

NNCF's and AIMET's accuracy-aware loops in edgekit's terms: start from a bit assignment
(a searched or uniform one), and while ``baseline - metric`` (or that over ``baseline``
with ``relative``) exceeds ``max_drop``, try one move up per candidate layer, keep the
move with the best metric gain per unit of cost (BOPs, bytes or latency: the caller's
``cost``), and record it. It stops when the bound holds, when no move is left (then the
result is infeasible and holds the smallest drop reached) or after ``max_steps``.

Choosing a move: among moves that raise the metric, the largest gain / cost (a move that
costs nothing and helps is taken first); when none helps (noise, or a plateau), the one
that loses least, cheaper first on ties, so the loop keeps moving towards float rather
than stalling with the bound unmet. Every assignment is evaluated once (a cache), so a
step costs one evaluation per move tried; ``proxy`` with ``top_n`` bounds that to the
``top_n`` moves with the largest ``proxy / cost`` (e.g. a Hessian-trace x error drop).

Bit widths are ints in 2..8 or :data:`FLOAT` (the layer stays float). A candidate moves
up its ladder one rung at a time: the default ladder is every width 2..8 (next width up);
``{layer: (8,)}`` jumps straight to 8, ``{layer: (4, 8, FLOAT)}`` climbs to float.
"""

from __future__ import annotations

import dataclasses
import math

from edgekit.calibration.spec import FORMAT as SPEC_FORMAT
from edgekit.calibration.spec import MAX_BITS, MIN_BITS, check_bits
from edgekit.errors import EdgekitError

FLOAT = "float"
DEFAULT_LADDER = tuple(range(MIN_BITS, MAX_BITS + 1))
STOP_BOUND, STOP_EXHAUSTED, STOP_MAX_STEPS = "bound met", "no candidates left", "max_steps reached"


def width_rank(bits) -> float:
    """Order of widths: ints by value, FLOAT above every int."""
    return math.inf if bits == FLOAT else bits


def check_width(bits, where: str):
    """An int width in MIN_BITS..MAX_BITS or FLOAT, else one line saying so."""
    if bits == FLOAT:
        return FLOAT
    try:
        return check_bits(bits, where)
    except EdgekitError:
        raise EdgekitError(f"{where}: a width must be an integer in [{MIN_BITS}, {MAX_BITS}] or {FLOAT!r}, "
                           f"got {bits!r}") from None


def bits_from_spec(spec_or_bits) -> dict:
    """``{layer: width}`` from an ``edgekit.quant-spec/1`` dict (its layers' weight bits;
    layers missing from a spec are float and not listed) or a ``{layer: width}`` dict."""
    from edgekit.calibration.spec import validate_spec

    if not isinstance(spec_or_bits, dict):
        raise EdgekitError(f"expected a quant spec or a {{layer: bits}} dict, got {type(spec_or_bits).__name__}")
    if spec_or_bits.get("format") == SPEC_FORMAT:
        spec = validate_spec(spec_or_bits)
        return {path: layer["weight"]["bits"] for path, layer in spec["layers"].items()}
    return {path: check_width(b, f"bit assignment for layer {path!r}") for path, b in spec_or_bits.items()}


def quant_config_for(bits: dict, config=None):
    """The QuantConfig applying ``bits``: int widths as ``weight_bits``, FLOAT layers added to
    ``skip`` (escaped, so a path matches only itself); other fields from ``config``."""
    import glob

    from edgekit.calibration.quantize import QuantConfig

    config = config or QuantConfig()
    weight_bits = {p: b for p, b in bits.items() if b != FLOAT}
    skip = tuple(config.skip) + tuple(glob.escape(p) for p, b in bits.items() if b == FLOAT)
    return dataclasses.replace(config, weight_bits=weight_bits, skip=skip)


def bops_cost(model, image_size=256, act_bits: int = 8):
    """``cost(layer, from, to)``: the BOPs a move adds (MACs x b_w x b_a from one batch-1
    forward at ``image_size``; a FLOAT layer counts at 32 x 32, as the profiler does)."""
    from edgekit.calibration.profiler import FLOAT_BITS, measure_layers

    check_bits(act_bits, "accuracy control act_bits")
    macs = {path: entry[2] for path, entry in measure_layers(model, image_size).items()}

    def bops(layer, bits):
        return macs[layer] * (FLOAT_BITS * FLOAT_BITS if bits == FLOAT else bits * act_bits)

    return lambda layer, bits_from, bits_to: bops(layer, bits_to) - bops(layer, bits_from)


def size_cost(model, image_size=256):
    """``cost(layer, from, to)``: the weight bytes a move adds (FLOAT at 32 bits)."""
    from edgekit.calibration.profiler import FLOAT_BITS, measure_layers

    params = {path: entry[1] for path, entry in measure_layers(model, image_size).items()}

    def size(layer, bits):
        return params[layer] * (FLOAT_BITS if bits == FLOAT else bits) / 8

    return lambda layer, bits_from, bits_to: size(layer, bits_to) - size(layer, bits_from)


@dataclasses.dataclass
class Step:
    """One move: ``layer`` from ``bits_from`` to ``bits_to``, the metric and drop after it,
    its cost, its gain over the metric before, and how many moves were tried to pick it."""

    layer: str
    bits_from: int | str
    bits_to: int | str
    metric: float
    drop: float
    cost: float
    gain: float
    tried: int


@dataclasses.dataclass
class AccuracyControlResult:
    """``bits``: the assignment returned (the first meeting the bound, else the one with the
    smallest drop, which is the state after ``path[:steps_applied]``); ``path``: every step
    taken; ``evaluations``: calls of ``evaluate``, the starting assignment included."""

    bits: dict
    metric: float
    drop: float
    feasible: bool
    stop: str
    baseline: float
    max_drop: float
    relative: bool
    initial_metric: float
    initial_drop: float
    path: list
    steps_applied: int
    cost: float
    evaluations: int

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "path": [dataclasses.asdict(s) for s in self.path]}


def restore_until_bound(spec_or_bits, evaluate, cost, candidates, max_drop: float, baseline: float,
                        relative: bool = False, max_steps: int | None = None, progress: bool = False,
                        proxy=None, top_n: int | None = None) -> AccuracyControlResult:
    """Raise candidate layers' widths, best metric gain per unit cost first, until the drop
    from ``baseline`` is at most ``max_drop`` (see the module doc).

    ``evaluate(bits) -> metric`` (higher is better, e.g. mAP) gets a fresh ``{layer:
    width}`` dict; ``cost(layer, bits_from, bits_to) -> float >= 0``; ``candidates``: layer
    paths (next width up, 2..8) or ``{layer: ladder of widths}``; ``relative``: the drop is
    ``(baseline - metric) / baseline``; ``proxy(layer, bits_from, bits_to) -> float`` with
    ``top_n``: try only the ``top_n`` moves of largest ``proxy / cost`` per step.
    """
    max_drop, baseline = _check_bound(max_drop, baseline, relative)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
        raise EdgekitError(f"max_steps must be a non-negative integer or None, got {max_steps!r}")
    if top_n is not None and (proxy is None or isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise EdgekitError(f"top_n must be a positive integer and needs a proxy callable, got top_n={top_n!r}, "
                           f"proxy={'set' if proxy is not None else 'None'}")
    bits = bits_from_spec(spec_or_bits)
    ladders = _ladders(candidates, bits)
    cache = {}

    def run(assignment: dict) -> float:
        key = tuple(sorted(assignment.items(), key=lambda item: item[0]))
        if key not in cache:
            metric = evaluate(dict(assignment))
            if isinstance(metric, bool) or not isinstance(metric, (int, float)) or not math.isfinite(metric):
                raise EdgekitError(f"evaluate returned {metric!r} for a bit assignment; it must return a finite "
                                   f"number (the metric, higher is better)")
            cache[key] = float(metric)
        return cache[key]

    def drop_of(metric: float) -> float:
        return (baseline - metric) / baseline if relative else baseline - metric

    metric = initial = run(bits)
    best = (drop_of(metric), 0, dict(bits), metric)
    path, stop, spent = [], None, [0.0]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="accuracy control", unit="step")
    try:
        while stop is None:
            if drop_of(metric) <= max_drop:
                stop = STOP_BOUND
            elif max_steps is not None and len(path) >= max_steps:
                stop = STOP_MAX_STEPS
            else:
                moves = [(layer, bits[layer], nxt) for layer, ladder in ladders.items()
                         if (nxt := _next_rung(ladder, bits[layer])) is not None]
                if not moves:
                    stop = STOP_EXHAUSTED
                    break
                costs = {move: _checked_cost(cost(*move), move) for move in moves}
                if top_n is not None:  # ties (free moves: an infinite ratio) go to the larger proxy
                    ranked = {m: float(proxy(*m)) for m in moves}
                    moves = sorted(moves, key=lambda m: (-_ratio(ranked[m], costs[m]), -ranked[m]))[:top_n]
                trials = [(move, run({**bits, move[0]: move[2]})) for move in moves]
                move, after = _pick(trials, metric, costs)
                bits[move[0]] = move[2]
                spent.append(spent[-1] + costs[move])
                path.append(Step(move[0], move[1], move[2], after, drop_of(after), costs[move], after - metric,
                                 len(trials)))
                metric = after
                if drop_of(metric) < best[0]:
                    best = (drop_of(metric), len(path), dict(bits), metric)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(layer=move[0], to=move[2], drop=f"{drop_of(metric):.4g}")
    finally:
        if bar is not None:
            bar.close()
    if stop == STOP_BOUND:
        best = (drop_of(metric), len(path), dict(bits), metric)
    drop, applied, chosen, final = best
    return AccuracyControlResult(chosen, final, drop, stop == STOP_BOUND, stop, baseline, max_drop, relative,
                                 initial, drop_of(initial), path, applied, spent[applied], len(cache))


def _check_bound(max_drop, baseline, relative: bool) -> tuple[float, float]:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not (0 <= max_drop < math.inf):
        raise EdgekitError(f"max_drop must be a finite number >= 0 (the largest metric drop allowed), "
                           f"got {max_drop!r}")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
        raise EdgekitError(f"baseline must be a finite number (the float model's metric), got {baseline!r}")
    if relative and not baseline > 0:
        raise EdgekitError(f"a relative max_drop needs a positive baseline metric, got {baseline!r}; "
                           f"use an absolute bound")
    return float(max_drop), float(baseline)


def _ladders(candidates, bits: dict) -> dict:
    """``{layer: sorted widths it may climb}`` from a list of paths or a ``{path: ladder}``."""
    if isinstance(candidates, (str, bytes)):
        raise EdgekitError("candidates must be a list of layer paths or a {layer: widths} dict, not a string")
    pairs = candidates.items() if isinstance(candidates, dict) else ((c, DEFAULT_LADDER) for c in candidates)
    ladders = {}
    for layer, ladder in pairs:
        if layer not in bits:
            raise EdgekitError(f"candidate layer {layer!r} is not in the bit assignment (float already, or "
                               f"misspelt); pick from: {', '.join(list(bits)[:5])}{', ...' if len(bits) > 5 else ''}")
        widths = {check_width(b, f"candidate ladder of {layer!r}") for b in ladder}
        ladders[layer] = sorted(widths, key=width_rank)
    return ladders


def _next_rung(ladder: list, current):
    return next((b for b in ladder if width_rank(b) > width_rank(current)), None)


def _checked_cost(value, move) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise EdgekitError(f"cost{move} returned {value!r}; a move's cost must be a finite number >= 0")
    return float(value)


def _ratio(gain: float, cost: float) -> float:
    if cost == 0:
        return math.inf if gain > 0 else (0.0 if gain == 0 else -math.inf)
    return gain / cost


def _pick(trials: list, metric: float, costs: dict):
    """(move, metric after) by the rule in the module doc; trials keep their order on ties."""
    helping = [(m, after) for m, after in trials if after > metric]
    if helping:
        return max(helping, key=lambda t: (_ratio(t[1] - metric, costs[t[0]]), t[1] - metric, -costs[t[0]]))
    return max(trials, key=lambda t: (t[1], -costs[t[0]]))
