"""The OpenVINO runner and the peers in the bench (ONNX Runtime's quantize_static, NNCF):
each runs the model it was given (outputs against ONNX Runtime's FP32 run on fresh random
inputs), each peer is what its tool makes (QDQ with per-channel weights; FakeQuantize),
and ``edgekit bench`` puts them beside edgekit's rows with accuracy and side-by-side
timing in one run. Small models only: timings here are never judged. The peers' builds
and the bench run take 10-40 s each on the 2-core CI machine: marked slow."""

import json

import numpy as np
import pytest
import torch

from edgekit.export.openvino import no_telemetry

with no_telemetry():
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")

from export_helpers import export_raw_detector  # noqa: E402
from test_export_cli import files, make_checkpoint  # noqa: E402,F401  (files: the module fixture)

from edgekit.benchmarks import model_bench as MB  # noqa: E402
from edgekit.benchmarks import peers  # noqa: E402
from edgekit.benchmarks.backends import Runner, Skipped, make_runner  # noqa: E402
from edgekit.export.deform_export import export_backends  # noqa: E402
from edgekit.export.deploy_form import to_deploy_form  # noqa: E402
from edgekit.export.openvino import convert  # noqa: E402
from edgekit.models import create_model  # noqa: E402

SIZE = 64


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reshape_pointwise_weights(path) -> int:
    """Give every 1x1 Conv of the ONNX file at ``path`` its weight as ``Reshape([out, in] ->
    [out, in, 1, 1])``, the form edgekit's deploy export writes (the Linear's own weight, so
    the parameter keeps its name); return how many."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, count = [], 0
    for node in proto.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is not None and list(weight.dims[2:]) == [1, 1]:
            value = numpy_helper.to_array(weight)
            weight.CopyFrom(numpy_helper.from_array(value.reshape(value.shape[:2]), weight.name))
            shape = f"{weight.name}.conv_shape"
            proto.graph.initializer.append(numpy_helper.from_array(np.array(value.shape, np.int64), shape))
            nodes.append(helper.make_node("Reshape", [weight.name, shape], [f"{weight.name}.as_conv"]))
            node.input[1] = f"{weight.name}.as_conv"
            count += 1
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return count


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """(model, FP32 ONNX, its OpenVINO IR) of an untrained, non-deformable rsdet_atto, its
    pointwise weights reshaped as in the deploy export."""
    root = tmp_path_factory.mktemp("peers")
    model = create_model("rsdet_atto", num_classes=3, deformable=False, grn_backend="torch").eval()
    with export_backends():
        onnx_path = export_raw_detector(to_deploy_form(model), root / "m.onnx", SIZE)
    assert reshape_pointwise_weights(onnx_path) >= 20
    return model, onnx_path, convert(onnx_path, root / "m.xml")


def test_openvino_runner_matches_onnxruntime(fp32, fresh_torch_seed):
    _, onnx_path, xml = fp32
    x = torch.randn(int(torch.randint(1, 4, ())), 3, SIZE, SIZE)
    runner = make_runner("openvino", onnx_path=xml, threads=1)
    assert isinstance(runner, Runner) and runner.precision == "fp32" and runner.format == "OpenVINO CPU (fp32)"
    want = make_runner("ort", onnx_path=onnx_path, threads=1)(x)
    got = runner(x)
    first = [t.clone() for t in got]
    runner(torch.randn_like(x))  # the runner's outputs are copies, not the request's reused buffers
    for g, f, w in zip(got, first, want):
        torch.testing.assert_close(g, f)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(w.abs().max())))


def test_openvino_runner_without_a_file_or_without_openvino(tmp_path, monkeypatch):
    import sys

    assert make_runner("openvino").reason.startswith("needs an OpenVINO IR")
    missing = make_runner("openvino", onnx_path=tmp_path / "none.xml")
    assert isinstance(missing, Skipped) and missing.status == "failed" and "not found" in missing.reason
    monkeypatch.setitem(sys.modules, "openvino", None)
    absent = make_runner("openvino", onnx_path=tmp_path / "none.xml")
    assert absent.status == "skipped" and "pip install 'edgekit[openvino]'" in absent.reason


def _calibration(rng):
    return [torch.from_numpy(rng.normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)) for _ in range(2)]


@pytest.mark.slow
def test_ort_static_is_per_channel_qdq_close_to_fp32(fp32, tmp_path, rng, monkeypatch):
    import onnx

    _, onnx_path, _ = fp32
    monkeypatch.setattr(peers, "has_vnni", lambda: False)  # 7-bit weights (reduce_range), as on this CI CPU
    out = peers.ort_static(onnx_path, _calibration(rng), tmp_path / "static.onnx")
    graph = onnx.load(str(out)).graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
               and consts[n.input[0]].dtype == np.int8 and consts[n.input[0]].ndim == 4]
    assert weights, "no quantized conv weight"
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    float_weights = [n.name for n in convs if producers.get(n.input[1]) != "DequantizeLinear"]
    assert not float_weights, f"{len(float_weights)} of {len(convs)} convs kept float weights"
    for node in weights:
        q = consts[node.input[0]]
        assert consts[node.input[1]].shape == (q.shape[0],)  # one scale per output channel
        assert np.abs(q).max() <= 64  # reduce_range: 7-bit weights
    x = _calibration(rng)[0]
    want = make_runner("ort", onnx_path=onnx_path, threads=1)(x)
    got = make_runner("ort-static", onnx_path=out, threads=1)(x)
    assert cosine(got[0], want[0]) > 0.99  # boxes


@pytest.mark.slow
def test_nncf_int8_is_fake_quantized_and_close_to_fp32(fp32, tmp_path, rng):
    _, _, xml = fp32
    out = peers.nncf_int8(xml, _calibration(rng), tmp_path / "nncf.xml")
    ops = [op.get_type_name() for op in ov.Core().read_model(str(out)).get_ops()]
    assert ops.count("FakeQuantize") >= 10, ops.count("FakeQuantize")
    # every conv weight stored as int8: the IR well under half the FP32 IR's weights on disk
    assert out.with_suffix(".bin").stat().st_size < 0.45 * xml.with_suffix(".bin").stat().st_size
    runner = make_runner("nncf", onnx_path=out, threads=1)
    assert runner.format == "OpenVINO CPU (NNCF INT8)" and runner.precision == "int8"
    x = _calibration(rng)[0]
    want = make_runner("openvino", onnx_path=xml, threads=1)(x)
    assert cosine(runner(x)[0], want[0]) > 0.99


def test_weight_width_follows_the_cpu(monkeypatch):
    import edgekit.sysinfo as sysinfo

    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: ["avx2", "fma"])
    assert not peers.has_vnni() and peers.int8_weight_bits() == 7
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: ["avx2", "avx512_vnni"])
    assert peers.has_vnni() and peers.int8_weight_bits() == 8


@pytest.mark.slow
def test_bench_puts_openvino_and_peers_beside_edgekit(files, tmp_path, fast_export):  # noqa: F811
    """One run: FP32 and INT8 in both runtimes and both peers, accuracy on the same split,
    and the side-by-side section with speed ratios against ORT FP32 and OpenVINO FP32."""
    backends = ["ort", "openvino", "ort-int8", "openvino-int8", "ort-static", "nncf"]
    config = MB.BenchConfig(backends=backends, threads=1, duration=0.05, warmup=0.0, min_count=2, roofline=False,
                            data=str(files["data"]), out=str(tmp_path / "bench"), interleave=True)
    result = MB.bench([files["plain"]], config)
    rows = {r["backend"]: r for r in result.rows}
    assert all(r["status"] == "ok" for r in rows.values()), {k: r.get("reason") for k, r in rows.items()}
    assert rows["openvino"]["format"] == "OpenVINO CPU (fp32)"
    assert rows["openvino-int8"]["precision"] == "int8" and rows["nncf"]["precision"] == "int8"
    assert rows["ort-static"]["format"] == "ONNX Runtime CPU (quantize_static INT8)"
    for r in rows.values():
        assert r["accuracy"]["num_images"] == 3 and r["size_mb"] > 0
    assert rows["openvino-int8"]["size_mb"] < 0.6 * rows["openvino"]["size_mb"]
    inter = result.record["interleaved"]
    assert [r["backend"] for r in inter["rows"]] == backends and inter["rounds"] >= 10
    for r in inter["rows"]:
        assert r["speed_vs"].keys() == {"ort", "openvino"} and r["repeats"] == inter["rounds"]
        assert r["speed_vs"]["ort"] > 0 and r["median_ms"] > 0
    by_name = {r["backend"]: r for r in inter["rows"]}
    assert by_name["ort"]["speed_vs"]["ort"] == 1.0 and by_name["openvino"]["speed_vs"]["openvino"] == 1.0
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "## Side by side (interleaved rounds)" in md and "NNCF INT8" in md
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["settings"]["interleave"] is True


def test_peers_need_a_torch_model(fp32, tmp_path):
    _, onnx_path, xml = fp32
    result = MB.bench([onnx_path, xml], MB.BenchConfig(backends=["openvino", "nncf", "ort-static"], threads=1,
                                                       duration=0.05, warmup=0.0, min_count=2, roofline=False))
    ok = [r["backend"] for r in result.rows if r["status"] == "ok"]
    assert ok == ["openvino", "openvino"]  # the .onnx (converted here) and the .xml
    assert all("quantizes a torch model's export" in r["reason"] for r in result.rows if r["backend"] != "openvino")


def test_peers_suite_reports_each_floor_met_or_by_how_much_not(tmp_path, monkeypatch, rng):
    """The floors come from the side-by-side ratios: met, or short by least / measured."""
    from edgekit.benchmarks.suites import PeersSuiteConfig

    fp32_speed, int8_speed = float(rng.uniform(1.0, 1.5)), float(rng.uniform(1.0, 1.7))
    ort_int8 = {"ort": float(rng.uniform(1.9, 2.5)), "ort-static": float(rng.uniform(0.5, 0.99)),
                "nncf": float(rng.uniform(1.0, 2.0))}
    maps = {"ort": 0.5, "ort-int8": 0.5 - float(rng.uniform(0.0051, 0.02)), "ort-static": 0.45, "nncf": 0.499}
    seen = {}

    def fake_bench(models, config):
        seen["config"] = config
        rows = [{"model": "m", "backend": b, "format": b, "status": "ok", "accuracy": {"map": maps.get(b)}}
                for b in MB.PEER_BACKENDS_RUN]
        speed = {"openvino": {"ort": fp32_speed, "openvino": 1.0},
                 "openvino-int8": {"ort": 2.0, "openvino": int8_speed}, "ort-int8": ort_int8}
        inter = [{"model": "m", "backend": b, "format": b, "median_ms": 1.0, "p90_ms": 1.0, "spread": 1.0,
                  "repeats": 10, "speed_vs": speed.get(b, {"ort": 1.0, "openvino": 1.0})} for b in MB.PEER_BACKENDS_RUN]
        record = {"format": MB.BENCH_FORMAT, "machine": {"cpu": "x", "cpu_flags": [], "cores": 2, "torch_threads": 2,
                                                         "load_average_1_5_15": None, "platform": "p", "versions": {},
                                                         "date": "d", "command": "c"},
                  "settings": {"backends": MB.PEER_BACKENDS_RUN, "batch_sizes": [1], "threads": 2, "duration_s": 1,
                               "warmup_s": 0, "image_size": None},
                  "rows": rows, "interleaved": {"rounds": 10, "gap_s": 0.05, "threads": 2, "batch": 1, "rows": inter}}
        return MB.BenchResult(record)

    monkeypatch.setattr(MB, "bench", fake_bench)
    monkeypatch.setattr(peers, "has_vnni", lambda: False)
    MB.peers_suite(PeersSuiteConfig(out=str(tmp_path)))
    assert seen["config"].interleave and seen["config"].batch_sizes == [1] and seen["config"].threads == 2
    record = json.loads((tmp_path / "peers_cpu.json").read_text())
    floors = {(f["row"], f["reference"]): f for f in record["floors"]}
    assert {k: f["met"] for k, f in floors.items()} == {
        ("ort-int8", "ort"): True, ("ort-int8", "ort-static"): False, ("ort-int8", "nncf"): True,
        ("openvino", "ort"): True, ("openvino-int8", "openvino"): False}
    assert floors[("openvino", "ort")]["measured"] == fp32_speed
    assert floors[("openvino-int8", "openvino")]["short_by"] == pytest.approx(1.8 / int8_speed)
    assert floors[("ort-int8", "ort-static")]["short_by"] == pytest.approx(1 / ort_int8["ort-static"])
    accuracy = {f["reference"]: f for f in record["accuracy_floors"]}
    assert accuracy["ort"]["points_lost"] == pytest.approx(100 * (maps["ort"] - maps["ort-int8"]))
    assert [accuracy[k]["met"] for k in ("ort", "ort-static", "nncf")] == [False, True, False]
    md = (tmp_path / "peers_cpu.md").read_text()
    assert f"{int8_speed:.2f}x (NOT met: 1.80x needed, short by a factor {1.8 / int8_speed:.2f})" in md
    assert "points lost (NOT met: at most 0.5 allowed)" in md
    assert "no VNNI" in md
