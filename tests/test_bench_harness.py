"""The timing helper's bookkeeping (not its timings: those belong in benchmark runs)."""

from __future__ import annotations

import pytest

from edgekit.benchmarks.latency import measure, measure_interleaved, ratio_of_rounds


def test_interleaved_rounds_call_every_function_once_in_turn():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    records = measure_interleaved(fns, warmup=1, repeats=4, min_repeats=4, budget_s=0.0, settle=1, calls=2)
    # one warm-up round, then four rounds of one untimed and two timed calls each, the
    # order rotating by one each round
    turns = [name for first in (0, 1, 2, 0) for name in ("abc" * 2)[first:first + 3]]
    assert turns == list("abcbcacababc")
    assert calls == ["a", "b", "c"] + [name for name in turns for _ in range(3)]
    for record in records.values():
        assert record["repeats"] == 4 and len(record["times_ms"]) == 4
        assert record["min_ms"] <= record["median_ms"] <= record["p90_ms"] <= record["max_ms"]


def test_interleaved_stops_on_the_budget_after_the_minimum_rounds():
    records = measure_interleaved({"x": lambda: None}, warmup=0, repeats=1000, min_repeats=3, budget_s=0.0)
    assert records["x"]["repeats"] == 3


def test_ratio_of_rounds_is_the_median_of_per_round_ratios():
    slow = {"times_ms": [10.0, 40.0, 12.0, 9.0, 100.0]}
    fast = {"times_ms": [5.0, 10.0, 4.0, 3.0, 50.0]}
    # per-round ratios 2, 4, 3, 3, 2: median 3 (the ratio of medians would be 12/5 = 2.4)
    assert ratio_of_rounds(slow, fast) == pytest.approx(3.0)
    assert ratio_of_rounds(slow, {"times_ms": [0.0] * 5}) != ratio_of_rounds(slow, {"times_ms": [0.0] * 5})  # nan


def test_measure_keeps_its_record_format():
    record = measure(lambda: None, warmup=0, repeats=5, min_repeats=5, budget_s=10.0)
    assert record["repeats"] == 5 and "times_ms" not in record
    assert set(record) == {"median_ms", "p90_ms", "min_ms", "max_ms", "repeats", "spread"}
