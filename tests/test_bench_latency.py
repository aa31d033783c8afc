"""The timing method (edgekit.benchmarks.latency): mechanics with a fake clock, statistics
against numpy, MLPerf summaries, memory and thread controls. No test asserts a real timing."""

import math

import numpy as np
import pytest
import torch

from edgekit.benchmarks import latency as L


class FakeClock:
    """A clock that only moves when the workload says so (``advance``)."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


def scripted(clock, durations_s):
    """A workload whose n-th call takes durations_s[n] seconds (then the last one again)."""
    calls = []

    def fn():
        d = durations_s[min(len(calls), len(durations_s) - 1)]
        calls.append(d)
        clock.advance(d)
    return fn, calls


def test_summary_matches_numpy(rng):
    values = list(rng.lognormal(0.0, 0.5, size=int(rng.integers(2, 500))))
    block = L.summarize(values)
    a = np.asarray(values)
    assert block["unit"] == "ms" and block["count"] == len(values) and block["values"] == values
    assert block["mean"] == pytest.approx(a.mean(), rel=1e-12)
    assert block["stdev"] == pytest.approx(a.std(ddof=1), rel=1e-9)
    assert block["min"] == a.min() and block["max"] == a.max()
    for q in L.PERCENTILES:
        assert block["percentiles"][f"p{q}"] == pytest.approx(np.percentile(a, q), rel=1e-12)
    assert block["cv"] == pytest.approx(a.std(ddof=1) / a.mean(), rel=1e-9)


def test_percentile_edges(rng):
    assert L.percentile([3.0], 90) == 3.0
    s = sorted(rng.normal(size=7).tolist())
    assert L.percentile(s, 0) == s[0] and L.percentile(s, 100) == s[-1]
    with pytest.raises(ValueError):
        L.percentile([], 50)
    with pytest.raises(ValueError):
        L.percentile(s, 101)
    with pytest.raises(ValueError):
        L.summarize([])


def test_single_value_has_zero_stdev_and_no_warning():
    block = L.summarize([2.5])
    assert block["stdev"] == 0.0 and block["warning"] is None


def test_cv_warning_threshold():
    steady = L.summarize([1.0, 1.01, 0.99, 1.0])
    noisy = L.summarize([1.0, 2.0, 1.0, 2.0])
    assert steady["warning"] is None
    assert noisy["warning"] is not None and "coefficient of variation" in noisy["warning"]
    assert "\n" not in noisy["warning"]


def test_fixed_count_times_each_call_exactly(rng):
    clock = FakeClock()
    durations = [0.5] + list(rng.uniform(0.001, 0.01, size=40))  # first call slow (lazy init)
    fn, calls = scripted(clock, durations)
    warm = 0.02
    t = L.time_callable(fn, warmup_s=warm, count=10, duration_s=None, clock=clock)
    assert t.first_ms == pytest.approx(500.0)
    # warm-up runs until the warm-up time has passed: the calls after the first until >= warm
    expected_warm, acc = 0, 0.0
    while acc < warm:
        acc += durations[1 + expected_warm]
        expected_warm += 1
    assert t.warmup_calls == expected_warm
    timed = durations[1 + expected_warm:1 + expected_warm + 10]
    assert t.latency["values"] == pytest.approx([d * 1e3 for d in timed])
    assert t.latency["count"] == 10 and len(calls) == 1 + expected_warm + 10


def test_duration_mode_stops_after_duration_and_min_count():
    clock = FakeClock()
    fn, _ = scripted(clock, [0.01])
    t = L.time_callable(fn, warmup_s=0.0, duration_s=0.1, min_count=3, clock=clock)
    assert t.latency["count"] == 10  # 10 calls of 10 ms reach 0.1 s
    clock2 = FakeClock()
    fn2, _ = scripted(clock2, [1.0])
    t2 = L.time_callable(fn2, warmup_s=0.0, duration_s=0.1, min_count=5, clock=clock2)
    assert t2.latency["count"] == 5  # slow calls: min_count wins
    assert t2.wall_s == pytest.approx(5.0)


def test_sync_runs_inside_the_timed_interval():
    clock = FakeClock()
    fn, _ = scripted(clock, [0.002])
    t = L.time_callable(fn, warmup_s=0.0, count=4, duration_s=None, clock=clock, sync=lambda: clock.advance(0.003))
    assert t.latency["values"] == pytest.approx([5.0] * 4)


def test_bad_arguments():
    with pytest.raises(ValueError):
        L.time_callable(lambda: None, count=None, duration_s=None)
    with pytest.raises(ValueError):
        L.time_callable(lambda: None, count=0)


def test_stages_add_up_to_end_to_end():
    clock = FakeClock()
    stages = [("pre", lambda x: (clock.advance(0.001), x)[1]), ("model", lambda x: (clock.advance(0.004), x)[1]),
              ("post", lambda x: (clock.advance(0.002), x)[1])]
    r = L.time_stages(stages, lambda: 0, warmup_s=0.0, count=6, clock=clock)
    assert r["end_to_end"]["count"] == 6
    assert r["end_to_end"]["mean"] == pytest.approx(7.0)
    assert [r["stages"][k]["mean"] for k in ("pre", "model", "post")] == pytest.approx([1.0, 4.0, 2.0])


def test_throughput_and_mlperf():
    b1 = L.summarize([10.0, 10.0, 12.0, 20.0])
    b4 = L.summarize([30.0, 30.0])
    b8 = L.summarize([50.0, 50.0])
    tp = L.throughput(b4, 4)
    assert tp["images_per_s"] == pytest.approx(4000 / 30) and tp["ms_per_image"] == pytest.approx(7.5)
    m = L.mlperf_summary({1: b1, 4: b4, 8: b8})
    assert m["single_stream_p90_ms"] == pytest.approx(np.percentile([10, 10, 12, 20], 90))
    assert m["offline_batch"] == 8 and m["offline_samples_per_s"] == pytest.approx(8000 / 50)
    assert "note" not in m
    slow8 = L.summarize([200.0, 200.0])  # Offline is the best throughput, not the largest batch
    m = L.mlperf_summary({1: b1, 4: b4, 8: slow8})
    assert m["offline_batch"] == 4 and m["offline_samples_per_s"] == pytest.approx(4000 / 30)
    m = L.mlperf_summary({4: b4, 8: b8})  # no batch 1: no SingleStream figure, and it says why
    assert m["single_stream_p90_ms"] is None and "batch 1" in m["note"] and m["offline_batch"] == 8


def test_peak_rss_sees_a_large_allocation():
    before = L.peak_rss_bytes()
    assert before > 0
    if not L.reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the peak RSS")
    after_reset = L.peak_rss_bytes()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    assert L.peak_rss_bytes() - after_reset >= 0.9 * block.nbytes


def test_thread_control_restores():
    before = torch.get_num_threads()
    with L.torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with L.torch_threads(0):
            pass
    assert torch.get_num_threads() == before


def test_busy_wait_and_overhead_mechanics():
    clock = FakeClock()

    def ticking():
        clock.advance(0.0001)
        return clock.t
    assert L.busy_wait(1.0, clock=ticking) == pytest.approx(1.0, abs=0.11)
    o = L.harness_overhead(target_ms=0.2, duration_s=0.05, warmup_s=0.0, rounds=3)
    assert o["rounds"] == len(o["overhead_us_per_call_rounds"]) == 3
    assert o["true_work_ms"] >= 0.2
    assert o["overhead_us_per_call_best"] <= o["overhead_us_per_call_median"]
    assert math.isfinite(o["overhead_fraction_of_target"]) and isinstance(o["meets_2_percent"], bool)
