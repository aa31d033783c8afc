"""The targets the benchmark suites are checked against, read from ``targets.json``.

The numbers (floors set for the project) and the explanations of why a target can be
missed on a given machine are data, kept beside the results they judge, not constants in
the suites' code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TARGETS_FILE = Path(__file__).resolve().parent / "targets.json"


def load_targets(suite: str):
    """The targets of one suite (a list of {key, description, comparison, threshold,
    why_not_met}, or a mapping of named thresholds)."""
    return json.loads(TARGETS_FILE.read_text(encoding="utf-8"))[suite]


def evaluate_target(target: dict, values: list[float], **labels) -> dict:
    """A target over every configuration it applies to: met only if met on all of them;
    worst, best and geometric mean of the measured values. ``labels`` fill the
    description's {placeholders} and are recorded."""
    op, threshold = target["comparison"], target["threshold"]
    ok = [(v >= threshold) if op == ">=" else (v <= threshold) for v in values]
    record = {**labels, "floor": target["key"], "description": target["description"].format(**labels),
              "threshold": threshold, "comparison": op, "configs": len(values), "configs_met": int(sum(ok))}
    if values:
        record.update(met=all(ok), worst=min(values) if op == ">=" else max(values),
                      best=max(values) if op == ">=" else min(values),
                      geomean=math.exp(sum(math.log(v) for v in values) / len(values)))
    else:
        record.update(met=None, worst=None, best=None, geomean=None)
    return record
