"""`edgekit demo --quick`: every stage runs and the report holds what was measured."""

import json

from edgekit.cli import main


def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stage_seconds"]) == {"data", "train", "predict", "profile", "quantize", "calibrate",
                                            "export fp32", "export int8", "export ghost", "bench"}
    deploy = report["deploy"]
    assert all(e["parity"]["passed"] for e in deploy["exports"].values())
    # the file sizes follow the bits: FP32 > INT8 > GHOST mixed (2..8-bit weights, bit-plane storage)
    sizes = [deploy["exports"][k]["size_mb"] for k in ("fp32", "int8", "ghost")]
    assert sizes[0] > 3 * sizes[1] and sizes[1] > sizes[2]
    assert (out / "deploy" / "bundle" / "infer.py").is_file()
    ok_rows = [r for r in deploy["bench"]["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok_rows} == {"eager", "ort"} and all(r["ms_per_img"] > 0 for r in ok_rows)
    assert 0.0 <= report["val"]["map50"] <= 1.0 and report["epochs_run"] == 1
    md = (out / "report.md").read_text()
    assert f"{report['val']['map50']:.3f}" in md  # the markdown shows the measured figure
    assert "## Deployment" in md and f"{sizes[1]:.2f}" in md
    assert "Mixed model, as a user should ship it:" in md  # the mixed model judged against FP32 and INT8
    # ... on the medians of rounds that time every ONNX Runtime row side by side
    medians = {r["model"]: r["median_ms"] for r in deploy["bench"]["interleaved"]["rows"] if r["backend"] == "ort"}
    assert len(medians) == 3 and "medians of interleaved rounds" in md
    assert f"{medians['model_mixed']:.1f} vs INT8 {medians['model_int8']:.1f} ms/img" in md
    assert (out / "predictions.png").stat().st_size > 0
    # placement of each quantized export, as its runtime compiled it
    assert deploy["exports"]["fp32"]["placement"] is None
    for name in ("int8", "ghost"):
        assert deploy["exports"][name]["placement"].startswith("placement (onnxruntime")
        assert f"- {name}: {deploy['exports'][name]['placement']}" in md
    assert "demo (oriented boxes): DOTA mAP@.5" in capsys.readouterr().out
    assert report["val"]["boxes"] == "oriented" and "DOTA Task 1" in md
