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
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    median = statistics.median(times)
    return {"median_ms": median, "p90_ms": p90, "min_ms": times[0], "max_ms": times[-1],
            "repeats": len(times), "spread": p90 / median if median > 0 else float("nan")}


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
