"""The GPU kernel suite's script: its refusal without a GPU, and its whole pipeline
(timing, float64 checks, floors, reports) run on the CPU with ``--plumbing-cpu``."""

from __future__ import annotations

import json

import pytest
import torch

from edgekit.benchmarks.suites import GpuKernelSuiteConfig, run_suite
from edgekit.errors import CheckError, EdgekitError
from edgekit.kernels import numba_cpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu(tmp_path, capsys):
    from edgekit.cli import main

    with pytest.raises(EdgekitError, match="no CUDA GPU"):
        run_suite("kernels-gpu", GpuKernelSuiteConfig(quick=True, out=str(tmp_path)))
    assert main(["bench", "kernels-gpu", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "edgekit bench kernels-gpu: error: no CUDA GPU" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_plumbing_run_reports_wrong_and_failing_kernels(tmp_path, monkeypatch):
    """A GRN kernel that is off by 1e-3 is marked wrong; a deformable conv that raises is
    marked failed while the other implementations of that row are still timed; either
    fails the run. The floors that need a GPU peer are 'not measured'."""
    real_grn = numba_cpu.grn

    def broken_deform(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(numba_cpu, "grn", lambda *a, **k: real_grn(*a, **k) * (1 + 1e-3))
    monkeypatch.setattr(numba_cpu, "deform_conv2d", broken_deform)
    with pytest.raises(CheckError, match="timed outputs differ from the float64 reference.*implementation runs "
                                         "failed") as failed:
        run_suite("kernels-gpu", GpuKernelSuiteConfig(quick=True, plumbing_cpu=True, out=str(tmp_path)))
    assert failed.value.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_gpu_plumbing_quick.json",
                                                          "kernels_gpu_plumbing_quick.md"]
    record = json.loads((tmp_path / "kernels_gpu_plumbing_quick.json").read_text())
    md = (tmp_path / "kernels_gpu_plumbing_quick.md").read_text()
    assert record["backends"] == ["numba"] and record["copy"]["gb_per_s"] > 0
    assert [r["shape"] for r in record["grn"]["rows"]] == [[1, 7, 7, 320], [8, 7, 7, 320]]
    for row in record["grn"]["rows"]:
        assert row["errors"]["numba"] > 5e-4 and row["errors"]["eager"] < 1e-5
        assert row["times"]["numba"]["median_ms"] > 0 and row["bandwidth_fraction"]["numba"] > 0
    (dcn,) = record["dcn"]["rows"]
    assert dcn["failures"] == {"numba": "RuntimeError: planted failure"}
    assert dcn["errors"]["reference"] < 1e-5 and {"reference", "dense"} <= set(dcn["times"])
    rows = [line for line in md.splitlines() if line.startswith(("| atto", "| 64->64"))]
    assert "Plumbing check on the CPU" in md and "planted failure" in md
    assert [("**wrong**" in line, "**failed**" in line) for line in rows] == [(True, False), (True, False),
                                                                              (False, True)]
    if "torchvision" not in dcn["times"]:
        assert {f["met"] for f in record["floors"]} == {None}
