"""The timing method: warm-up by time, then a fixed count or a duration; percentile stats.

Why not ``benchmarks.harness.measure`` (the kernel suite's helper): latency reports need
the full distribution (every value, p95/p99, stdev, CV), warm-up by *time* (JIT/compile
caches and CPU frequency settle after a time, not a count), a separate first-call time,
and a clock that tests can replace. Why not ``torch.utils.benchmark``: it times torch
callables only, while ONNX Runtime and TensorRT runners must go through the same loop.

Conventions (trtexec / onnxruntime_perf_test / MLPerf):
- times are in milliseconds, one value per call, after ``sync()`` (a GPU runner passes
  its stream synchronisation, so device work is inside the measured interval);
- percentiles use linear interpolation between order statistics (numpy's default);
- stdev is the sample standard deviation (ddof=1); CV = stdev / mean, and a CV above
  10% gets a warning in the result (the machine was busy or the workload is unstable);
- MLPerf SingleStream reports the p90 latency of back-to-back batch-1 queries (none when
  batch 1 was not measured); Offline reports samples per second at the batch size with
  the best throughput among those measured.

Run ``python -m edgekit.benchmarks.latency --overhead`` to measure the harness's own
overhead on a ~1 ms calibrated busy-wait; it writes ``benchmarks/results/harness_overhead.json``.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

CV_WARN = 0.10
PERCENTILES = (50, 90, 95, 99)
RESULTS = Path(__file__).resolve().parent / "results"


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

    values: list[float] = []
    append = values.append
    loop_start = clock()
    if count is not None:
        for _ in range(count):
            t = clock()
            fn()
            sync()
            append((clock() - t) * 1e3)
    else:
        deadline = loop_start + duration_s
        while len(values) < max_count:
            t = clock()
            fn()
            sync()
            end = clock()
            append((end - t) * 1e3)
            if end >= deadline and len(values) >= min_count:
                break
    wall = clock() - loop_start
    return Timing(first_ms=first_ms, warmup_calls=warm_calls, warmup_s=warm_s,
                  latency=summarize(values, keep_values), wall_s=wall)


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


def main(argv: list[str] | None = None) -> int:
    import argparse

    from edgekit.benchmarks.harness import machine_info, write_json

    p = argparse.ArgumentParser(description="measure the latency harness's own overhead")
    p.add_argument("--overhead", action="store_true", help="run the ~1 ms busy-wait overhead measurement")
    p.add_argument("--duration", type=float, default=3.0)
    args = p.parse_args(argv)
    if not args.overhead:
        p.print_help()
        return 0
    result = {"machine": machine_info(), "overhead": harness_overhead(1.0, args.duration)}
    out = RESULTS / "harness_overhead.json"
    write_json(out, result)
    o = result["overhead"]
    print(f"harness overhead: median {o['overhead_us_per_call_median']:.2f} us per call (best round "
          f"{o['overhead_us_per_call_best']:.2f}, mean {o['overhead_us_per_call_mean']:.2f}) = "
          f"{o['overhead_fraction_of_target']:.3%} of a {o['target_ms']} ms model; measurement bias "
          f"{o['measurement_bias_fraction']:+.3%} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
