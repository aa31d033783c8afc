"""`edgekit bench` and the model benchmark: one-line errors, the JSON schema, the table,
plots, --compare ratios, end-to-end stages, accuracy and the roofline section, on a tiny
detector-shaped model so nothing here is a real (slow) benchmark."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.benchmarks import model_bench as MB
from edgekit.cli import main

FAST = ["--duration", "0.05", "--warmup", "0", "--no-roofline"]


class TinyDet(nn.Module):
    """RSDet's output layout (cls, box, ctr per level at strides 8/16/32) in a few ops."""

    strides = (8, 16, 32)

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.cls, self.box, self.ctr = nn.Conv2d(8, num_classes, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        feats = [F.avg_pool2d(f, s) for s in self.strides]
        return ([self.cls(p) for p in feats], [torch.exp(self.box(p).clamp(max=4.0)) for p in feats],
                [self.ctr(p) for p in feats])


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code, err, needle):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0] and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err


@pytest.fixture
def tiny_onnx(tmp_path):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(TinyDet().eval(), (torch.zeros(1, 3, 64, 64),), str(path), input_names=["images"],
                      opset_version=17, dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    return path


def test_bad_inputs_are_one_line_errors(capsys, tmp_path):
    not_bench = tmp_path / "x.json"
    not_bench.write_text(json.dumps({"rows": []}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    cases = [
        ((), "name at least one model"),
        (("rsdet_atto", "--backends", "eager,warp-drive"), "warp-drive"),
        (("rsdet_atto", "--batch-sizes", "0"), "--batch-sizes"),
        (("rsdet_atto", "--batch-sizes", "1,x"), "--batch-sizes"),
        (("rsdet_atto", "--threads", "0"), "--threads"),
        (("rsdet_atto", "--duration", "0"), "--duration"),
        (("no_such_model_or_file",), "neither a checkpoint file nor a model name"),
        (("rsdet_atto", "--image-size", "32000"), "between 32 and 4096"),
        ((str(tmp_path / "missing.onnx"),), "not found"),
        (("rsdet_atto", "--data", str(tmp_path / "nope")), "--data"),
        (("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")), "not found"),
        (("--compare", str(not_bench), str(not_bench)), "not an edgekit bench result"),
        (("--compare", str(broken), str(broken)), "not valid JSON"),
        (("rsdet_atto", "--compare", str(not_bench), str(not_bench)), "no models"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, "bench", *argv)
        assert_one_line_error(code, err, needle)


def test_onnx_file_gives_table_json_plots_and_compare(capsys, tmp_path, tiny_onnx):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "bench", str(tiny_onnx), "--backends", "ort,eager,ort-cuda,ort-int8",
                          "--batch-sizes", "1,2", "--threads", "1", "--image-size", "64", "--out", str(out), *FAST)
    assert code == 0
    header = stdout.splitlines()[0]
    for column in ("format", "status", "size MB", "mAP50-95", "ms/img", "FPS"):
        assert column in header
    record = json.loads((out / "bench.json").read_text())
    assert record["format"] == MB.BENCH_FORMAT and record["machine"]["cores"] >= 1
    rows = {r["backend"]: r for r in record["rows"]}
    assert set(rows) == {"ort", "eager", "ort-cuda", "ort-int8"}
    ok = rows["ort"]
    assert ok["status"] == "ok" and ok["size_mb"] == pytest.approx(tiny_onnx.stat().st_size / 1e6)
    lat = ok["latency"]
    assert lat["unit"] == "ms" and lat["count"] == len(lat["values"]) >= 10
    assert set(lat["percentiles"]) == {"p50", "p90", "p95", "p99"}
    assert lat["min"] <= lat["percentiles"]["p50"] <= lat["percentiles"]["p99"] <= lat["max"]
    assert ok["ms_per_img"] == pytest.approx(lat["mean"]) and ok["fps"] == pytest.approx(1e3 / lat["mean"])
    assert set(ok["throughput"]) == {"1", "2"} and ok["mlperf"]["offline_batch"] in (1, 2)
    assert ok["first_ms"] > 0 and ok["session_ms"] > 0 and ok["peak_rss_mb"] > 0
    e2e = ok["end_to_end"]
    assert e2e["status"] == "ok" and set(e2e["stages"]) == {"preprocess", "inference", "decode_nms"}
    for name, r in rows.items():
        if name != "ort" and r["status"] != "ok":
            assert r["reason"] and "\n" not in r["reason"]
    assert rows["eager"]["status"] == "skipped" and rows["ort-int8"]["status"] == "skipped"
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny |" in (out / "bench.md").read_text()

    code, stdout, _ = run(capsys, "bench", "--compare", str(out / "bench.json"), str(out / "bench.json"))
    assert code == 0 and "1.000" in stdout


def _record(ms_by_format):
    rows = [{"model": "m", "backend": "ort", "format": f, "status": "ok", "ms_per_img": ms, "fps": 1e3 / ms,
             "latency": {"percentiles": {"p90": ms * 1.1}}} for f, ms in ms_by_format.items()]
    return {"format": MB.BENCH_FORMAT, "rows": rows}


def test_compare_prints_ratios_of_matching_rows(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_record({"fp32": 10.0, "only-a": 3.0})))
    b.write_text(json.dumps(_record({"fp32": 4.0, "only-b": 1.0})))
    text = MB.compare(str(a), str(b))
    line = next(line for line in text.splitlines() if "fp32" in line)
    assert [float(v) for v in line.split()[-3:]] == pytest.approx([0.4, 0.4, 2.5])
    assert "only-a" not in text and "only-b" not in text


def test_torch_source_row_stages_accuracy_and_roofline(tiny_data):
    from edgekit.data.synthetic import SYNTHETIC_CLASSES

    source = MB.ModelSource("tiny", model=TinyDet(len(SYNTHETIC_CLASSES)).eval(), size_bytes=1000, image_size=128,
                            class_names=list(SYNTHETIC_CLASSES))
    row = MB.bench_row(source, "eager", batch_sizes=(1,), threads=1, duration=0.05, warmup=0.0,
                       data=tiny_data / "val", onnx_dir=None)
    assert row["status"] == "ok" and row["format"] == "PyTorch eager"
    e2e = row["end_to_end"]
    # every end-to-end call encloses its three stages, so the means keep that order
    assert e2e["end_to_end"]["mean"] >= sum(s["mean"] for s in e2e["stages"].values())
    acc = row["accuracy"]
    assert acc["num_images"] == 4 and 0.0 <= acc["map"] <= acc["map50"] <= 1.0
    roof = MB.roofline_section([source], [row])
    m = roof["models"]["tiny"]
    assert m["cpu_predicted"]["label"] == "predicted" and m["cpu_predicted"]["total_ms"] > 0
    assert m["cpu_measured_eager_ms"] == row["latency"]["mean"]
    stem_macs = 128 * 128 * 8 * 3 * 9                      # 3x3 conv, 3 -> 8 channels, at full size
    head_macs = (5 + 4 + 1) * 8 * (16 * 16 + 8 * 8 + 4 * 4)  # 1x1 convs on the three pooled levels
    assert m["bops"] == (stem_macs + head_macs) * 32 * 32   # float layers count 32 x 32 bits
    assert m["flops"] >= 2 * (stem_macs + head_macs)
    assert any(d["total_ms"] is None and d["reason"] for d in m["devices"])  # unknown figures say so
    assert any(d["total_ms"] for d in m["devices"])
    md = MB.markdown({"machine": {"cpu": "x", "cores": 1, "torch_threads": 1, "load_average_1_5_15": None,
                                  "platform": "p", "versions": {}, "date": "d", "command": "c"},
                      "settings": {"backends": ["eager"], "batch_sizes": [1], "threads": 1, "duration_s": 0.05,
                                   "warmup_s": 0.0}, "rows": [row], "roofline": roof})
    assert "predicted" in md and "measured eager ms" in md


def test_decode_outputs_accepts_raw_heads_and_decoded_graphs():
    raw = [t for group in TinyDet()(torch.zeros(2, 3, 64, 64)) for t in group]
    boxes, scores = MB.decode_outputs(raw, TinyDet.strides)
    assert boxes.shape == (2, 64 + 16 + 4, 4) and scores.shape == (2, 84, 5)
    again = MB.decode_outputs([boxes, scores], TinyDet.strides)
    assert again[0] is boxes and again[1] is scores
    assert MB.decode_outputs([torch.zeros(2, 10)], TinyDet.strides) is None


def test_sources_resolve_from_checkpoint_name_and_onnx(tmp_path, tiny_onnx):
    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.models import create_model

    classes = ["car", "boat"]
    model = create_model("rsdet_atto", class_names=classes)
    ckpt = save_checkpoint(tmp_path / "det.safetensors", model, "rsdet_atto", {"class_names": classes},
                           {"image_size": 96})
    s = MB.resolve_source(str(ckpt))
    assert (s.name, s.image_size, s.class_names, s.strides) == ("det", 96, classes, (8, 16, 32))
    assert s.size_bytes == ckpt.stat().st_size and s.onnx is None
    for k, v in model.state_dict().items():
        torch.testing.assert_close(s.model.state_dict()[k], v)
    named = MB.resolve_source("rsdet_atto", image_size=64)
    params = sum(p.numel() for p in named.model.parameters())
    assert named.image_size == 64 and named.size_bytes >= 4 * params
    o = MB.resolve_source(str(tiny_onnx))
    assert o.model is None and o.onnx == tiny_onnx and o.class_names is None and o.image_size == 256
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized")
    e = MB.resolve_source(str(engine))
    assert e.engine == engine and e.model is None and e.onnx is None
    row = MB.bench_row(e, "tensorrt", onnx_dir=tmp_path)
    if not torch.cuda.is_available():
        assert row["status"] == "skipped" and row["reason"]


def test_onnx_source_reads_the_export_metadata(tmp_path, tiny_onnx):
    import onnx

    from edgekit.export.to_onnx import set_metadata

    proto = onnx.load(str(tiny_onnx))
    set_metadata(proto, {"classes": ["a", "b", "c"], "input_size": [64, 64], "strides": [8, 16, 32]})
    path = tmp_path / "with_meta.onnx"
    onnx.save(proto, str(path))
    s = MB.resolve_source(str(path))
    assert (s.class_names, s.image_size, s.strides) == (["a", "b", "c"], 64, (8, 16, 32))
    assert MB.resolve_source(str(path), image_size=96).image_size == 96  # the flag wins


@pytest.mark.slow
def test_int8_and_mixed_rows_of_the_default_detector(tmp_path):
    """Slow: exports rsdet_atto (dynamo exporter), calibrates and writes QDQ graphs."""
    src = MB.resolve_source("rsdet_atto", image_size=64)
    rows = {b: MB.bench_row(src, b, duration=0.05, warmup=0.0, min_count=2, onnx_dir=tmp_path, e2e=False)
            for b in ("ort", "ort-int8", "ort-mixed")}
    for b, r in rows.items():
        assert r["status"] == "ok", (b, r.get("reason"))
    assert rows["ort-int8"]["size_mb"] < rows["ort-mixed"]["size_mb"] < rows["ort"]["size_mb"]
    assert rows["ort-int8"]["quantized_layers"] > rows["ort-mixed"]["quantized_layers"] > 0
    assert rows["ort-int8"]["bops"] < rows["ort-mixed"]["bops"]


def test_static_batch_graph_with_only_other_batch_sizes_is_a_skipped_row(capsys, tmp_path):
    static = tmp_path / "static2.onnx"  # batch fixed at 2; asking for 1 and 4 leaves nothing to time
    torch.onnx.export(TinyDet().eval(), (torch.zeros(2, 3, 64, 64),), str(static), input_names=["images"],
                      opset_version=17, dynamo=False)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "bench", str(static), "--backends", "ort", "--batch-sizes", "1,4",
                            "--image-size", "64", "--out", str(out), *FAST)
    # nothing measured is a failure (exit 2), but the record saying why is written
    assert_one_line_error(code, err, "no measurement succeeded")
    row = json.loads((out / "bench.json").read_text())["rows"][0]
    assert row["status"] == "skipped" and "static batch of 2" in row["reason"] and "1, 4" in row["reason"]
    assert set(row["skipped_batches"]) == {"1", "4"} and "latency" not in row


def test_a_failed_row_makes_the_command_exit_1(capsys, tmp_path, tiny_onnx, monkeypatch):
    from edgekit.benchmarks import backends

    real, made = backends.make_runner, []

    def broken(backend, **kwargs):  # the first runner fails, the second works
        runner = real(backend, **kwargs)
        made.append(backend)
        if len(made) == 1:
            def fail(x):
                raise RuntimeError("planted failure")
            runner.fn = fail
        return runner

    monkeypatch.setattr(backends, "make_runner", broken)
    code, stdout, err = run(capsys, "bench", str(tiny_onnx), str(tiny_onnx), "--backends", "ort", "--image-size",
                            "64", "--out", str(tmp_path / "o"), *FAST)
    assert code == 1 and "1 of 2 rows failed" in err and "planted failure" in stdout
