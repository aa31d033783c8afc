"""The demo's accuracy floor (slow: ~6 minutes on 2 cores; run with `-m slow`).

Only accuracy is asserted; its time is a measurement, recorded in the report and in
benchmarks/results/demo/, not a test condition on a shared machine.
"""

import pytest

from edgekit.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_full_demo_reaches_the_map_floor(tmp_path):
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), progress=False))
    assert report["val"]["boxes"] == "oriented" and report["val"]["dota_map50"] >= 0.6, report["val"]
    assert report["val"]["num_images"] == report["plan"]["num_val"]
