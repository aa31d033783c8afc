"""`edgekit demo --quick`: every stage runs and the report holds what was measured."""

import json

from edgekit.cli import main


def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stage_seconds"]) == {"data", "train", "predict"}
    assert 0.0 <= report["val"]["map50"] <= 1.0 and report["epochs_run"] == 1
    md = (out / "report.md").read_text()
    assert f"{report['val']['map50']:.3f}" in md  # the markdown shows the measured figure
    assert (out / "predictions.png").stat().st_size > 0
    assert "demo: mAP@.5" in capsys.readouterr().out
