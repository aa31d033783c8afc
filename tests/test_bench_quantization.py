"""The quantization evidence benchmark: a --quick run writes a complete, sane report."""

import json
import math

import pytest

from edgekit.benchmarks import quantization as Q
from edgekit.benchmarks.suites import QuantizationSuiteConfig, run_suite


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qbench")
    run_suite("quantization", QuantizationSuiteConfig(quick=True, progress=False, out=str(out)))
    record = json.loads((out / "quantization.json").read_text())
    print("seed", record["seed"])  # the data split; rerun with --seed to reproduce
    return out, record


def test_files_written_and_every_row_reported(quick_run):
    out, record = quick_run
    md = (out / "quantization.md").read_text()
    assert (out / "quantization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["config"]["quick"] is True and record["config"]["out"] == str(out) and record["environment"]["cpu"]
    (task,) = record["tasks"]
    assert task["task"] == "digits"
    assert [r["key"] for r in task["rows"]] == [row.key for row in Q.ROWS]
    for row in Q.ROWS:
        assert f"| {row.label} |" in md
    for f in task["floors"]:
        assert f"| {f['floor']} |" in md


def test_numbers_finite_and_in_range(quick_run):
    _, record = quick_run
    for r in record["tasks"][0]["rows"]:
        for key in ("top1", "bops", "size_mb", "search_seconds", "sensitivity_seconds", "qat_seconds"):
            assert math.isfinite(r[key]) and r[key] >= 0, (r["key"], key, r[key])
        assert r["top1"] <= 100
        assert (r["qat_seconds"] > 0) == r["key"].endswith("_qat")
        searched = {row.key for row in Q.ROWS if row.method in ("ghost", "budget", "sensitivity")}
        assert (r["search_seconds"] > 0) == (r["key"] in searched)


def test_bops_and_size_ordering(quick_run):
    _, record = quick_run
    by = {r["key"]: r for r in record["tasks"][0]["rows"]}
    assert by["fp32"]["bops"] > by["w8a8_ptq"]["bops"] > by["w4a8_ptq"]["bops"] > by["w4a4_qat"]["bops"]
    assert by["fp32"]["size_mb"] > by["w8a8_ptq"]["size_mb"] > by["w4a8_ptq"]["size_mb"]
    # PTQ and QAT of one recipe are the same bits; QAT changes scales only.
    assert by["w8a8_ptq"]["bops"] == by["w8a8_qat"]["bops"]
    assert by["w4a8_ptq"]["bops"] == by["w4a8_qat"]["bops"]
    assert by["w4a8_all_ptq"]["bops"] < by["w4a8_ptq"]["bops"]  # its first/last layers are 4-bit too
    assert by["w3a8_all_ptq"]["bops"] < by["w3a8_ptq"]["bops"] < by["w4a8_ptq"]["bops"]
    for row in Q.ROWS:  # each hybrid's budget is its uniform row's BOPs, and the search keeps it
        if row.method in ("budget", "sensitivity"):
            assert by[row.key]["bops"] <= by[row.budget_of]["bops"]
            assert by[row.key]["budget_bops"] == by[row.budget_of]["bops"]
            assert set(by[row.key]["weight_bits"].values()) <= set(Q.BITS)


def _rows(**metric):
    bops = {"fp32": 100.0, "w8a8_ptq": 8.0, "w4a8_ptq": 4.0, "w4a8_qat": 4.0, "ghost_qat": 5.0,
            "budget_qat": 4.0, "sensitivity_qat": 3.0, "fisher_qat": 4.0, "w3a8_ptq": 3.1, "w3a8_all_ptq": 3.0,
            "w3a8_all_qat": 3.0, "budget3_qat": 3.0, "sensitivity3_qat": 2.95, "fisher3_qat": 2.9}
    return [{"key": k, "method": k, "bops": b, "m": metric[k], "search_seconds": 1.0, "sensitivity_seconds": 0.5}
            for k, b in bops.items()]


def test_floors_margins_and_misses():
    import random

    fp32 = random.uniform(50, 90)
    rows = _rows(fp32=fp32, w8a8_ptq=fp32 - 1.25, w4a8_ptq=fp32 - 9, w4a8_qat=fp32 - 6,
                 ghost_qat=fp32 - 1, budget_qat=fp32 - 1, sensitivity_qat=fp32 - 4.5, fisher_qat=fp32 - 2,
                 w3a8_ptq=fp32 - 3, w3a8_all_ptq=fp32 - 12, w3a8_all_qat=fp32 - 8, budget3_qat=fp32 - 5, sensitivity3_qat=fp32 - 5.5,
                 fisher3_qat=fp32 - 7)
    floors = {f["floor"]: f for f in Q.check_floors(rows, "m", search_floor=True)}
    assert floors["W8A8 PTQ loses <= 1 point"]["margin"] == pytest.approx(-0.25)
    assert not floors["W8A8 PTQ loses <= 1 point"]["met"]
    assert floors["budget_qat: >= FP32 - 1.5 points"]["margin"] == pytest.approx(0.5)
    assert floors["budget_qat: beats W4A8 QAT by >= 2.0 points"]["margin"] == pytest.approx(3.0)
    assert floors["sensitivity_qat: >= FP32 - 1.5 points"]["margin"] == pytest.approx(-3.0)
    assert floors["sensitivity_qat: beats W4A8 QAT by >= 2.0 points"]["margin"] == pytest.approx(-0.5)
    assert not floors["sensitivity_qat: beats W4A8 QAT by >= 2.0 points"]["met"]
    assert floors["fisher_qat: beats W4A8 QAT by >= 2.0 points"]["margin"] == pytest.approx(2.0)
    beyond = "(beyond the targets) {}: beats every-layer W3A8 QAT by >= 2.0 points"
    assert floors[beyond.format("budget3_qat")]["margin"] == pytest.approx(1.0)
    assert floors[beyond.format("sensitivity3_qat")]["margin"] == pytest.approx(0.5)
    assert floors[beyond.format("fisher3_qat")]["margin"] == pytest.approx(-1.0)
    assert floors["ghost_qat: bit search <= 60 s"]["met"]
    assert floors["budget_qat: bit search <= 60 s"]["margin"] == pytest.approx(58.5)
    # GHOST landed above the W4A8 BOPs: not a hybrid at that budget, so not judged as one.
    assert not any(name.startswith("ghost_qat: beats") for name in floors)
