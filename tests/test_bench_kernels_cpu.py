"""The CPU kernel suite's GRN half end to end on one small case: where the numba output
pool serves an output, the same kernel into a fresh output is timed beside it and
reported; a bad pool setting stops the run before anything is written."""

from __future__ import annotations

import json

import pytest

from edgekit.benchmarks import kernels
from edgekit.benchmarks.suites import KernelSuiteConfig, run_suite
from edgekit.errors import EdgekitError
from edgekit.kernels import numba_cpu, output_pool

QUICK_GRN = KernelSuiteConfig(quick=True, only="grn")

CASE = {"model": "atto", "resolution": 224, "batch": 2, "stage": 0, "dim": 24, "size": 32}


def small_run(monkeypatch, pool):
    monkeypatch.setattr(kernels, "grn_cases", lambda quick: [dict(CASE)])
    monkeypatch.setattr(kernels, "compiled_grn", lambda *a, **k: (None, None))  # compiling takes ~10 s
    monkeypatch.setattr(kernels, "OUTPUTS", pool)
    monkeypatch.setattr(numba_cpu, "OUTPUTS", pool)


def test_pooled_rows_time_a_fresh_output_beside_the_pooled_one(tmp_path, monkeypatch):
    small_run(monkeypatch, output_pool.OutputPool(min_bytes=1 << 10, capacity=1 << 26))
    run_suite("kernels", QUICK_GRN.replace(out=str(tmp_path)))
    record = json.loads((tmp_path / "kernels_cpu_quick_grn.json").read_text())
    (row,) = record["grn"]["rows"]
    assert record["output_pool"] == {"min_bytes": 1 << 10, "capacity_bytes": 1 << 26}
    assert row["numba_fresh_output"]["median_ms"] > 0
    assert row["fresh_output_bandwidth_fraction"] == row["limit_ms"] / row["numba_fresh_output"]["median_ms"]
    md = (tmp_path / "kernels_cpu_quick_grn.md").read_text()
    assert "The same kernel into a fresh output" in md and "- 2x32x32x24: " in md


def test_unpooled_rows_have_no_fresh_output_timing(tmp_path, monkeypatch):
    small_run(monkeypatch, output_pool.OutputPool(min_bytes=1 << 30, capacity=1 << 26))
    run_suite("kernels", QUICK_GRN.replace(out=str(tmp_path)))
    (row,) = json.loads((tmp_path / "kernels_cpu_quick_grn.json").read_text())["grn"]["rows"]
    assert "numba_fresh_output" not in row
    assert "fresh output" not in (tmp_path / "kernels_cpu_quick_grn.md").read_text()


def test_a_bad_pool_setting_stops_before_anything_is_written(tmp_path, monkeypatch, capsys):
    small_run(monkeypatch, output_pool.OutputPool())
    monkeypatch.setenv(output_pool.ENV_CAPACITY, "-3")
    with pytest.raises(EdgekitError, match="^EDGEKIT_OUTPUT_POOL_MB must be"):
        run_suite("kernels", QUICK_GRN.replace(out=str(tmp_path)))
    assert not list(tmp_path.iterdir())
