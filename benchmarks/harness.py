"""A small timing helper: warm-up, repeats, median/p90, and the machine that measured.

Written here rather than using ``timeit``/``torch.utils.benchmark`` because the suites
need one record format (median, p90, min, spread, repeats) and a per-measurement time
budget, so that a slow baseline cannot stall a run on a 2-core machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgekit.sysinfo import cpu_model, last_level_cache_bytes


def measure(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 20, min_repeats: int = 3,
            budget_s: float = 2.0) -> dict:
    """Time ``fn()`` (milliseconds): ``warmup`` untimed calls, then up to ``repeats`` timed
    calls, stopping early once ``budget_s`` is spent and ``min_repeats`` are done.

    Returns median, p90, min and max in ms, the repeats, and ``spread`` = p90/median
    (above ~1.3 the machine was noisy during the measurement).
    """
    record = measure_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, min_repeats=min_repeats,
                                 budget_s=budget_s, settle=0)["fn"]
    del record["times_ms"]
    return record


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 20,
                        min_repeats: int = 3, budget_s: float = 2.0, settle: int = 1,
                        calls: int = 1, gap_s: float = 0.0) -> dict[str, dict]:
    """Time several functions side by side, in rounds: in each round every function, in
    turn, sleeps ``gap_s``, makes ``settle`` untimed calls and then ``calls`` timed ones
    (the round's time is their median); the order rotates by one each round.

    A change in the machine's load (other users of a shared machine) then hits all of them
    alike. The gap and the untimed calls let the thread pool of the function before go
    idle, so that no function is timed against another's spinning threads: ONNX Runtime's
    workers spin for 10-50 ms after a run (measured on the 2-core EPYC: a DCN forward right
    after an ORT run took 2-4x its time 50 ms later). A gap has its own cost on a VM: after
    a sleep, a sub-millisecond kernel runs 2-4x slower for its first few calls, so short
    functions want untimed calls rather than a gap.

    Stops after ``repeats`` rounds, or once ``budget_s`` is spent and ``min_repeats``
    rounds are done. Returns, per name, :func:`measure`'s record over the round times plus
    ``times_ms`` (one per round, in order) for :func:`ratio_of_rounds`."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    order = list(fns.items())
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats:
        # Rotated each round, so that no function always follows the same one.
        for name, fn in order[rounds % len(order):] + order[:rounds % len(order)]:
            if gap_s:
                time.sleep(gap_s)
            for _ in range(settle):
                fn()
            block = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                block.append((time.perf_counter() - t0) * 1e3)
            times[name].append(statistics.median(block))
        rounds += 1
        if rounds >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return {name: summarize(ts) for name, ts in times.items()}


def summarize(times_ms: list[float]) -> dict:
    """Median, p90, min, max (ms), repeats, spread = p90/median and the times themselves."""
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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _command() -> str:
    """The command line as typed: ``python -m pkg.mod args`` when run as a module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return " ".join(["python", "-m", spec.name, *sys.argv[1:]])
    return " ".join([Path(sys.executable).name, *sys.argv])


def machine_info() -> dict:
    """Machine, software versions and the command line, for a result file's header."""
    import torch
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "numba", "numpy", "onnxruntime", "onnx")},
        "command": _command(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, so no half-written result exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, record: dict) -> None:
    write_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
