"""The detector-safe-defaults suite: its rows lower exactly one protected group each (the
groups derived here from the layer names the tracer reports), bad options are one line, and
(slow) a run on a tiny trained detector writes both files with every row scored twice."""

import json

import pytest

from conftest import one_line_error
from edgekit.benchmarks.safe_defaults import _groups
from edgekit.benchmarks.suites import SafeDefaultsSuiteConfig, run_suite


def test_each_row_lowers_one_protected_group():
    first, last = {"backbone.stem"}, {"head.box_out", "head.cls_out", "head.ctr_out"}
    rows = dict(_groups(first, last))
    assert rows.pop("the default: first layer and output layers 8-bit") == set()
    assert rows.pop("every layer 4-bit") == first | last
    assert sorted(map(frozenset, rows.values()), key=sorted) == sorted(
        [frozenset(first), frozenset({"head.box_out"}), frozenset({"head.cls_out", "head.ctr_out"})], key=sorted)
    oriented = dict(_groups(first, last | {"head.angle_out"}))
    assert {"head.box_out", "head.angle_out"} in oriented.values()  # the angle is box regression too


def test_bad_options_are_one_line(tmp_path):
    assert "--checkpoint" in one_line_error(SafeDefaultsSuiteConfig, checkpoint=str(tmp_path / "none.safetensors"),
                                            data=str(tmp_path))
    (tmp_path / "c.safetensors").write_bytes(b"")
    assert "--data" in one_line_error(SafeDefaultsSuiteConfig, checkpoint=str(tmp_path / "c.safetensors"),
                                      data=str(tmp_path))


@pytest.mark.slow
def test_a_run_scores_every_row_simulated_and_deployed(tmp_path, tiny_run, tiny_data):
    config = SafeDefaultsSuiteConfig(checkpoint=str(tiny_run[1] / "last.safetensors"), data=str(tiny_data),
                                     val_images=4, calib_batches=1, out=str(tmp_path))
    record = run_suite("safe-defaults", config)
    assert json.loads((tmp_path / "safe_defaults_cpu.json").read_text())["rows"] == record["rows"]
    assert len(record["rows"]) == 5 and record["output_layers"] and record["first_layers"]
    for row in record["rows"]:
        assert row["drop"] == pytest.approx(record["float_map"] - row["map"])
        assert row["ort_drop"] == pytest.approx(record["float_map"] - row["ort_map"])
    # lowering layers to 4 bits shrinks the weights by the bits saved
    sizes = {r["row"]: r["size_mb"] for r in record["rows"]}
    assert sizes["every layer 4-bit"] < sizes["the default: first layer and output layers 8-bit"]
    assert "every layer 4-bit" in (tmp_path / "safe_defaults_cpu.md").read_text()
