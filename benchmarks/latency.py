"""Timing: one core loop (:func:`run_rounds`) behind every measurement edgekit makes.

Two ways to use it. :func:`time_callable` for latency reports: the full distribution
(every value, p95/p99, stdev, CV), warm-up by *time* (JIT/compile caches and CPU
frequency settle after a time, not a count), a separate first-call time, a clock that
tests can replace. :func:`measure_interleaved` for side-by-side comparisons (the kernel
suites): several functions timed in alternating rounds, compared by
:func:`ratio_of_rounds`. Why not ``torch.utils.benchmark``: it times torch callables only,
while ONNX Runtime and TensorRT runners must go through the same loop; why not
``timeit``: no device-sync hook, no per-call record.

Conventions (trtexec / onnxruntime_perf_test / MLPerf):
- times are in milliseconds, one value per call, after ``sync()`` (a GPU runner passes
  its stream synchronisation, so device work is inside the measured interval);
- percentiles use linear interpolation between order statistics (numpy's default);
- stdev is the sample standard deviation (ddof=1); CV = stdev / mean, and a CV above
  10% gets a warning in the result (the machine was busy or the workload is unstable);
- MLPerf SingleStream reports the p90 latency of back-to-back batch-1 queries (none when
  batch 1 was not measured); Offline reports samples per second at the batch size with
  the best throughput among those measured.

``edgekit bench overhead`` measures the harness's own overhead on a ~1 ms calibrated
busy-wait; it writes ``benchmarks/results/harness_overhead.json``.
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

CV_WARN = 0.10
PERCENTILES = (50, 90, 95, 99)


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation
    (numpy's default "linear" method), written out so tests can check it against numpy."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize(values_ms: list[float], keep_values: bool = True) -> dict:
    """The latency block written to JSON: unit, count, min, mean, stdev, cv, percentiles,
    max and (optionally) every value in call order."""
    n = len(values_ms)
    if n == 0:
        raise ValueError("no timings to summarize")
    s = sorted(values_ms)
    mean = math.fsum(values_ms) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values_ms) / (n - 1)) if n > 1 else 0.0
    block = {"unit": "ms", "count": n, "min": s[0], "mean": mean, "stdev": stdev,
             "cv": stdev / mean if mean > 0 else None,
             "percentiles": {f"p{q}": percentile(s, q) for q in PERCENTILES}, "max": s[-1]}
    block["warning"] = cv_warning(block)
    if keep_values:
        block["values"] = list(values_ms)
    return block


def cv_warning(block: dict, threshold: float = CV_WARN) -> str | None:
    """A one-line warning when the coefficient of variation is above ``threshold``."""
    cv = block.get("cv")
    if cv is None or cv <= threshold:
        return None
    return (f"coefficient of variation {cv:.0%} > {threshold:.0%}: the timings are unstable "
            f"(busy machine, frequency scaling or a noisy workload); re-run on a quiet machine")


@dataclass
class Timing:
    """What :func:`time_callable` measured: first call, warm-up and the timed block."""

    first_ms: float
    warmup_calls: int
    warmup_s: float
    latency: dict
    wall_s: float  # whole timed loop, clock overhead included (for the overhead figure)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"first_ms": self.first_ms, "warmup_calls": self.warmup_calls, "warmup_s": self.warmup_s,
                "wall_s": self.wall_s, "latency": self.latency, **self.extra}


def time_callable(fn: Callable[[], object], *, warmup_s: float = 1.0, count: int | None = None,
                  duration_s: float | None = 5.0, min_count: int = 10, max_count: int = 100_000,
                  sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                  keep_values: bool = True) -> Timing:
    """Time ``fn()``: one first call (timed apart: lazy init, allocation, JIT), warm-up calls
    until ``warmup_s`` has passed, then either exactly ``count`` calls or calls until
    ``duration_s`` has passed (at least ``min_count``, at most ``max_count``).

    ``sync`` runs after every call inside the timed interval (device synchronisation).
    ``clock`` returns seconds; tests pass a fake one.
    """
    if count is None and duration_s is None:
        raise ValueError("give a count or a duration")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    sync = sync or (lambda: None)

    t0 = clock()
    fn()
    sync()
    first_ms = (clock() - t0) * 1e3

    warm_start = clock()
    warm_calls = 0
    while clock() - warm_start < warmup_s:
        fn()
        sync()
        warm_calls += 1
    warm_s = clock() - warm_start

    loop_start = clock()
    if count is not None:
        values = run_rounds({"fn": fn}, max_rounds=count, min_rounds=count, budget_s=math.inf, sync=sync,
                            clock=clock)["fn"]
    else:
        values = run_rounds({"fn": fn}, max_rounds=max_count, min_rounds=min_count, budget_s=duration_s, sync=sync,
                            clock=clock)["fn"]
    wall = clock() - loop_start
    return Timing(first_ms=first_ms, warmup_calls=warm_calls, warmup_s=warm_s,
                  latency=summarize(values, keep_values), wall_s=wall)


def run_rounds(fns: dict[str, Callable[[], object]], *, max_rounds: int, min_rounds: int, budget_s: float,
               settle: int = 0, calls: int = 1, gap_s: float = 0.0, sync: Callable[[], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """The one timing core. Rounds of every function in turn (the order rotating by one
    each round): sleep ``gap_s``, ``settle`` untimed calls, then ``calls`` timed calls
    whose median is the round's time (ms; ``sync`` runs inside each timed interval). Stops
    after ``max_rounds``, or once ``budget_s`` has passed and ``min_rounds`` are done."""
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    start = clock()
    rounds = 0
    while rounds < max_rounds:
        for name, fn in order[rounds % len(order):] + order[:rounds % len(order)]:
            if gap_s:
                time.sleep(gap_s)
            for _ in range(settle):
                fn()
                sync()
            block = []
            for _ in range(calls):
                t0 = clock()
                fn()
                sync()
                block.append((clock() - t0) * 1e3)
            times[name].append(block[0] if calls == 1 else statistics.median(block))
        rounds += 1
        if rounds >= min_rounds and clock() - start >= budget_s:
            break
    return times


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 20,
                        min_repeats: int = 3, budget_s: float = 2.0, settle: int = 1,
                        calls: int = 1, gap_s: float = 0.0, sync: Callable[[], None] | None = None) -> dict[str, dict]:
    """Time several functions side by side, in rounds (:func:`run_rounds`), after ``warmup``
    untimed calls of each: a change in the machine's load (other users of a shared machine)
    then hits all of them alike. The gap and the untimed calls let the thread pool of the
    function before go idle, so that no function is timed against another's spinning
    threads: ONNX Runtime's workers spin for 10-50 ms after a run (measured on the 2-core
    EPYC: a DCN forward right after an ORT run took 2-4x its time 50 ms later). A gap has
    its own cost on a VM: after a sleep, a sub-millisecond kernel runs 2-4x slower for its
    first few calls, so short functions want untimed calls rather than a gap.

    Returns, per name, :func:`round_summary` of the round times (``times_ms`` kept for
    :func:`ratio_of_rounds`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = run_rounds(fns, max_rounds=repeats, min_rounds=min_repeats, budget_s=budget_s, settle=settle,
                       calls=calls, gap_s=gap_s, sync=sync)
    return {name: round_summary(ts) for name, ts in times.items()}


def measure(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 20, min_repeats: int = 3,
            budget_s: float = 2.0) -> dict:
    """One function's :func:`measure_interleaved` record, without the per-round times."""
    record = measure_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, min_repeats=min_repeats,
                                 budget_s=budget_s, settle=0)["fn"]
    del record["times_ms"]
    return record


def round_summary(times_ms: list[float]) -> dict:
    """Median, p90, min, max (ms), repeats, spread = p90/median (above ~1.3 the machine was
    noisy during the measurement) and the times themselves: the kernel suites' record."""
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    median = statistics.median(ordered)
    return {"median_ms": median, "p90_ms": p90, "min_ms": ordered[0], "max_ms": ordered[-1],
            "repeats": len(ordered), "spread": p90 / median if median > 0 else float("nan"),
            "times_ms": [round(t, 6) for t in times_ms]}


def ratio_of_rounds(numerator: dict, denominator: dict) -> float:
    """Median over rounds of numerator/denominator, for two records of one
    :func:`measure_interleaved` call: robust to load that changes between rounds."""
    ratios = [a / b for a, b in zip(numerator["times_ms"], denominator["times_ms"]) if b > 0]
    return statistics.median(ratios) if ratios else float("nan")


def time_stages(stages: list[tuple[str, Callable]], make_input: Callable[[], object], *, warmup_s: float = 1.0,
                count: int | None = None, duration_s: float | None = 5.0, min_count: int = 10,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """End-to-end timing of a pipeline ``x -> stage1 -> stage2 -> ...`` with each stage's
    share measured in the same calls, so end-to-end and model-only come from one run.

    Returns ``{"end_to_end": block, "stages": {name: block}}``.
    """
    per_stage: dict[str, list[float]] = {name: [] for name, _ in stages}

    def run_once(record: bool):
        x = make_input()
        start = clock()
        for name, fn in stages:
            t = clock()
            x = fn(x)
            if record:
                per_stage[name].append((clock() - t) * 1e3)
        return (clock() - start) * 1e3

    run_once(False)
    warm_start = clock()
    while clock() - warm_start < warmup_s:
        run_once(False)
    totals = []
    loop_start = clock()
    while True:
        totals.append(run_once(True))
        if count is not None:
            if len(totals) >= count:
                break
        elif clock() - loop_start >= duration_s and len(totals) >= min_count:
            break
    return {"end_to_end": summarize(totals), "stages": {k: summarize(v) for k, v in per_stage.items()}}


def throughput(block: dict, batch: int) -> dict:
    """Images per second from a latency block of batch-``batch`` calls (mean and median)."""
    return {"batch": batch, "ms_per_batch": block["mean"], "ms_per_image": block["mean"] / batch,
            "images_per_s": 1e3 * batch / block["mean"],
            "images_per_s_p50": 1e3 * batch / block["percentiles"]["p50"]}


def mlperf_summary(by_batch: dict[int, dict]) -> dict:
    """MLPerf-style scenarios from latency summaries per batch size: SingleStream p90
    latency of batch 1 (None, with a note, when batch 1 was not measured: another batch's
    latency is not SingleStream) and Offline throughput (samples/s at the batch size with
    the best throughput)."""
    best = max(by_batch.items(), key=lambda kv: 1e3 * kv[0] / kv[1]["mean"]) if by_batch else None
    summary = {"single_stream_p90_ms": by_batch[1]["percentiles"]["p90"] if 1 in by_batch else None,
               "offline_samples_per_s": 1e3 * best[0] / best[1]["mean"] if best else None,
               "offline_batch": best[0] if best else None}
    if 1 not in by_batch:
        summary["note"] = "SingleStream not measured: batch 1 was not among the timed batch sizes"
    return summary


# ----------------------------------------------------------------------------- memory, threads


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux VmHWM, else getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0, ``clear_refs`` value 5) so the next
    :func:`peak_rss_bytes` is the peak of what follows; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(n)`` (None: leave as is); restores it."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- harness overhead


def busy_wait(ms: float, clock: Callable[[], float] = time.perf_counter) -> float:
    """Spin for ``ms`` milliseconds; returns the time actually spun (ms), measured inside."""
    start = clock()
    end = start + ms * 1e-3
    now = start
    while now < end:
        now = clock()
    return (now - start) * 1e3


def harness_overhead(target_ms: float = 1.0, duration_s: float = 3.0, warmup_s: float = 0.5, rounds: int = 10) -> dict:
    """Overhead of :func:`time_callable` on a ~``target_ms`` workload of known duration.

    The workload records how long it really spun; the harness's whole loop wall time per
    call minus that is what the harness adds (clock reads, list appends, loop control).
    It is measured in ``rounds`` short rounds: a round in which another process preempted
    the harness between two calls shows a large figure, so the median and the best round
    are reported beside the mean (timeit's reasoning: interference only ever adds time)."""
    per_round = []
    measured, true_all = [], []
    for _ in range(rounds):
        inside: list[float] = []
        timing = time_callable(lambda: inside.append(busy_wait(target_ms)), warmup_s=warmup_s / rounds,
                               duration_s=duration_s / rounds, keep_values=False)
        n = timing.latency["count"]
        true_ms = math.fsum(inside[-n:]) / n
        per_round.append((timing.wall_s * 1e3 / n - true_ms) * 1e3)  # microseconds added per call
        measured.append(timing.latency["mean"])
        true_all.append(true_ms)
    median_us = percentile(sorted(per_round), 50)
    return {"target_ms": target_ms, "rounds": rounds, "true_work_ms": math.fsum(true_all) / rounds,
            "overhead_us_per_call_rounds": per_round, "overhead_us_per_call_median": median_us,
            "overhead_us_per_call_best": min(per_round),
            "overhead_us_per_call_mean": math.fsum(per_round) / rounds,
            "overhead_fraction_of_target": median_us * 1e-3 / target_ms,
            "measurement_bias_fraction": math.fsum(measured) / math.fsum(true_all) - 1,
            "meets_2_percent": median_us * 1e-3 / target_ms < 0.02,
            "note": "true_work_ms above target_ms means the spin itself was preempted (a busy machine); the "
                    "overhead per call is what the harness adds whatever the workload's length"}


def overhead_suite(config) -> dict:
    """Measure the harness's own overhead on a ~1 ms busy-wait (a
    :class:`~edgekit.benchmarks.suites.OverheadSuiteConfig`); writes harness_overhead.json."""
    from edgekit.fileio import write_json_atomic
    from edgekit.sysinfo import environment

    result = {"machine": environment(), "overhead": harness_overhead(1.0, config.duration)}
    write_json_atomic(Path(config.out) / "harness_overhead.json", result)
    o = result["overhead"]
    print(f"harness overhead: median {o['overhead_us_per_call_median']:.2f} us per call = "
          f"{o['overhead_fraction_of_target']:.3%} of a {o['target_ms']} ms model")
    return result
