"""`edgekit export`: formats, end-to-end NMS, parity report and exit codes, bundle, and
one-line errors that leave --out untouched.

The default run swaps in the TorchScript export of tests/export_helpers.py (seconds
instead of tens of seconds), which writes the same boxes/scores graph with the same
initializer names; the slow tests run the real exporter (export_onnx: fp32 with native
DeformConv, fp16, decomposed deformable convolution) behind the same command.
"""

import json

import onnx
import pytest
import torch

from edgekit.cli import main
from edgekit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset
from edgekit.engine.checkpoint import save_checkpoint
from edgekit.errors import EdgekitError
from edgekit.models import create_model

SIZE = 64


def make_checkpoint(path, **kwargs):
    kw = {"num_classes": len(SYNTHETIC_CLASSES), "class_names": list(SYNTHETIC_CLASSES), **kwargs}
    model = create_model("rsdet_atto", **kw)
    for conv in (model.head.cls_out, model.head.ctr_out):  # spread the scores: NMS gets real work
        torch.nn.init.normal_(conv.weight, std=0.3)
    return save_checkpoint(path, model, "rsdet_atto", kw, {"image_size": SIZE})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    generate_synthetic_dataset(root / "data", num_train=1, num_val=3, image_size=SIZE, seed=5)
    return {"root": root, "data": root / "data" / "val",
            "deformable": make_checkpoint(root / "deformable.safetensors"),
            "plain": make_checkpoint(root / "plain.safetensors", deformable=False, grn_backend="torch")}


def run_cli(args, capsys):
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def check_onnx_nms_and_bundle(checkpoint, tmp_path, capsys):
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    code, stdout, err = run_cli([checkpoint, "--format", "onnx", "--out", out, "--nms", "--score-threshold",
                                 "0.05", "--max-detections", "30", "--bundle", bundle], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.parity.json"]
    assert leftovers(tmp_path) == []
    report = json.loads((out / "model.parity.json").read_text())
    assert report["passed"] and report["precision"] == "fp32"
    assert report["nms"]["passed"] and report["nms"]["matched"] == report["nms"]["expected"] > 0
    model = onnx.load(str(out / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["detections"]
    assert {"labels.txt", "preprocess.json", "infer.py", "parity.json"} <= {p.name for p in bundle.iterdir()}
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"exported onnx -> {out / 'model.onnx'}") and lines[1].startswith("parity passed")
    assert lines[2] == f"bundle -> {bundle}"
    return model


def test_onnx_nms_and_bundle(files, tmp_path, capsys, fast_export):
    check_onnx_nms_and_bundle(files["plain"], tmp_path, capsys)


@pytest.mark.slow
def test_real_export_onnx_nms_and_bundle(files, tmp_path, capsys):
    """The real exporter (export_onnx, dynamo; ~25 s on 2 cores) behind the same command."""
    model = check_onnx_nms_and_bundle(files["deformable"], tmp_path, capsys)
    assert any(n.op_type == "DeformConv" for n in model.graph.node)  # --deform native


def test_int8_and_mixed_qdq_formats(files, tmp_path, capsys, fast_export):
    from edgekit.calibration.spec import new_spec, qrange, save_spec

    model = create_model("rsdet_atto", num_classes=5, deformable=False)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]

    # Per-channel scales from the checkpoint's own weights (a weight-only spec).
    from edgekit.engine.checkpoint import load_model

    ckpt_model, _ = load_model(files["plain"])
    modules = dict(ckpt_model.named_modules())

    def spec_with(bits_of, name):
        spec = new_spec("rsdet_atto", "uniform")
        for path in convs:
            w = modules[path].weight.detach()
            bits = bits_of(path)
            scale = (w.abs().amax(dim=(1, 2, 3)).clamp(min=1e-8) / qrange(bits, True, narrow=True)[1]).tolist()
            spec["layers"][path] = {"type": "Conv2d", "input": None, "weight": {
                "bits": bits, "signed": True, "axis": 0, "scale": scale, "zero_point": [0] * len(scale)}}
        return save_spec(spec, tmp_path / name)

    int8 = spec_with(lambda p: 8, "int8.json")
    code, stdout, err = run_cli([files["plain"], "--format", "onnx-int8", "--calibration", int8, "--out",
                                 tmp_path / "q8", "--nms", "--score-threshold", "0.05"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "q8" / "model_int8.parity.json").read_text())
    assert report["precision"] == "int8" and report["passed"] and report["nms"]["matched"] > 0, report
    graph = onnx.load(str(tmp_path / "q8" / "model_int8.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == len(convs)  # weight-only: one per layer
    assert [o.name for o in graph.output] == ["detections"]  # end-to-end on top of the QDQ graph
    # Weight-only: every conv runs DQ + float Conv, and the placement report says why.
    placement = json.loads((tmp_path / "q8" / "model_int8.placement.json").read_text())
    floats = placement["float_compute"]
    assert placement["summary"]["integer_compute_nodes"] == 0 and set(convs) <= set(floats)
    assert all("no input grid" in floats[c]["why"] for c in convs)
    assert all("not in the quant spec" in e["why"] for k, e in floats.items() if k not in convs)  # the Linears
    assert "placement (onnxruntime" in stdout and "0 integer kernels" in stdout

    mixed = spec_with(lambda p: 6 if p.startswith("backbone") else 8, "mixed.json")
    code, _, err = run_cli([files["plain"], "--format", "onnx-int8", "--calibration", mixed, "--out",
                            tmp_path / "bad"], capsys)
    assert code == 2 and "use --format onnx-mixed" in err and not (tmp_path / "bad").exists()
    code, _, err = run_cli([files["plain"], "--format", "onnx-mixed", "--calibration", mixed, "--out",
                            tmp_path / "mixed", "--sqnr"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "mixed" / "model_mixed.parity.json").read_text())["precision"] == "mixed"
    sqnr = json.loads((tmp_path / "mixed" / "sqnr.json").read_text())
    layers = [m for m in ckpt_model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sqnr["unmapped"] == [] and len(sqnr["layers"]) == len(layers)  # Linear layers found by value
    # 6-bit backbone weights are noisier than the 8-bit head's own quantization alone.
    first = sqnr["layers"]["backbone.downsample_layers.0.0"]["sqnr_db"]
    assert 10 < first < 60, first
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == ["model_mixed.onnx", "model_mixed.parity.json",
                                                                   "model_mixed.placement.json", "sqnr.json"]


def test_tensorrt_format_with_a_stand_in_tensorrt(files, tmp_path, capsys, fast_export, monkeypatch):
    """The CLI side of engine building with TensorRT 10 (the builder itself: test_export_tensorrt.py)."""
    import shlex
    import sys

    from export_helpers import FakeTensorRT

    from edgekit.calibration import fp16_safety

    rec = FakeTensorRT("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    # No FP16 pins: fast_export's graph carries no module scopes to constrain (pinned layers
    # through the CLI: test_export_tensorrt.py, on real exports).
    monkeypatch.setattr(fp16_safety, "export_pins", lambda *a, **k: fp16_safety.Fp16SafetyReport({}, [], 1e-2, 0))
    out = tmp_path / "trt"
    code, stdout, err = run_cli([files["plain"], "--format", "tensorrt", "--out", out, "--nms"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.engine", "model.engine.timing.cache",
                                                     "model.engine.trtexec.sh", "model.onnx", "model.parity.json"]
    assert stdout.startswith(f"exported tensorrt -> {out / 'model.engine'}")
    # The script runs in its own folder and names the files there: it survives the move out of staging.
    lines = (out / "model.engine.trtexec.sh").read_text().splitlines()
    assert lines[2] == 'cd "$(dirname "$0")" || exit 1'
    assert shlex.split(lines[3])[:4] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine", "--fp16"]
    assert "--timingCacheFile=model.engine.timing.cache" in lines[3]
    assert json.loads((out / "model.parity.json").read_text())["precision"] == "fp32"  # the graph TensorRT 10 reads


def test_parity_failure_exits_1_and_keeps_the_files(files, tmp_path, capsys, fast_export, monkeypatch):
    from edgekit.export import parity

    monkeypatch.setitem(parity.TOLERANCES, "fp32", {"atol": 0.0, "rtol": 0.0, "min_cosine": 1.5,
                                                    "max_map_drop": 0.0})
    out = tmp_path / "out"
    bundle = tmp_path / "bundle"
    code, _, err = run_cli([files["plain"], "--format", "onnx", "--out", out, "--data", files["data"],
                            "--bundle", bundle], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "parity FAILED (fp32" in err and "files kept in" in err
    assert "no bundle written" in err and not bundle.exists()
    report = json.loads((out / "model.parity.json").read_text())
    assert report["passed"] is False and report["map"]["num_images"] == 3
    assert (out / "model.onnx").is_file()


def test_python_api_same_stage(files, tmp_path, fast_export, monkeypatch):
    from edgekit.api import ExportConfig, ParityError, export
    from edgekit.export import parity

    result = export(files["plain"], ExportConfig(format="onnx", out=str(tmp_path / "a")))
    assert result.target == tmp_path / "a" / "model.onnx" and result.parity["passed"]
    assert sorted(p.name for p in result.files) == ["model.onnx", "model.parity.json"] and result.bundle is None
    with pytest.raises(EdgekitError, match="--max-detections must be an integer, got 2.5"):
        ExportConfig(nms=True, max_detections=2.5)
    with pytest.raises(EdgekitError, match="--max-detections applies with --nms or --bundle"):
        ExportConfig(max_detections=5)
    monkeypatch.setitem(parity.TOLERANCES, "fp32", {"atol": 0.0, "rtol": 0.0, "min_cosine": 1.5, "max_map_drop": 0})
    with pytest.raises(ParityError, match="parity FAILED") as failed:  # the CLI's exit 1 is this exception
        export(files["plain"], ExportConfig(out=str(tmp_path / "c")))
    assert (tmp_path / "c" / "model.onnx").is_file() and failed.value.result.target == tmp_path / "c" / "model.onnx"


def test_consecutive_exports_to_one_folder_keep_each_parity_report(files, tmp_path, capsys, fast_export):
    from edgekit.api import ExportConfig, export

    export(files["plain"], ExportConfig(format="onnx", out=str(tmp_path)))
    export(files["plain"], ExportConfig(format="onnx", out=str(tmp_path), nms=True))  # replaces model.onnx
    int8 = tmp_path / "spec.json"
    from edgekit.api import CalibrateConfig, calibrate_checkpoint

    calibrate_checkpoint(files["plain"], files["data"], CalibrateConfig(batches=1, batch_size=2, progress=False),
                         out=int8)
    export(files["plain"], ExportConfig(format="onnx-int8", out=str(tmp_path), calibration=str(int8)))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["model.onnx", "model.parity.json", "model_int8.onnx", "model_int8.parity.json",
                     "model_int8.placement.json", "spec.json"]
    assert json.loads((tmp_path / "model.parity.json").read_text())["format"] == "onnx"
    assert json.loads((tmp_path / "model_int8.parity.json").read_text())["format"] == "onnx-int8"


def test_a_spec_without_layers_or_for_another_model_is_refused(files, tmp_path, capsys):
    from edgekit.calibration.spec import new_spec, save_spec

    empty = save_spec(new_spec("rsdet_atto", "uniform"), tmp_path / "empty.json")
    code, _, err = run_cli([files["plain"], "--format", "onnx-int8", "--calibration", empty, "--out",
                            tmp_path / "o"], capsys)
    assert code == 2 and "quantizes no layer" in err and not (tmp_path / "o").exists()
    foreign = new_spec("other", "uniform")
    foreign["layers"]["encoder.layer9"] = {"type": "Conv2d", "input": None, "weight": {
        "bits": 8, "signed": True, "axis": 0, "scale": [0.1], "zero_point": [0]}}
    foreign = save_spec(foreign, tmp_path / "foreign.json")
    code, _, err = run_cli([files["plain"], "--format", "onnx-int8", "--calibration", foreign, "--out",
                            tmp_path / "o"], capsys)
    assert code == 2 and "names layers this model lacks (e.g. encoder.layer9)" in err and not (tmp_path / "o").exists()


def test_no_parity_writes_only_the_model(files, tmp_path, capsys, fast_export):
    code, stdout, _ = run_cli([files["plain"], "--format", "onnx", "--out", tmp_path / "o", "--no-parity"], capsys)
    assert code == 0 and "parity: skipped" in stdout
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["model.onnx"]


def _bad_cases(files, tmp):
    corrupt = tmp / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not safetensors")
    bad_spec = tmp / "spec.json"
    bad_spec.write_text("{not json")
    full = tmp / "full_bundle"
    full.mkdir(exist_ok=True)
    (full / "x").write_text("x")
    bundle_file = tmp / "bundle.txt"
    bundle_file.write_text("x")
    ck = files["plain"]
    return {
        "missing checkpoint": ([tmp / "nope.safetensors", "--format", "onnx"], "not found"),
        "corrupt checkpoint": ([corrupt, "--format", "onnx"], "not a readable safetensors file"),
        "unknown format": ([ck, "--format", "tflite"], "--format must be onnx | onnx-fp16"),
        "unknown deform": ([ck, "--format", "onnx", "--deform", "bilinear"], "--deform must be native | decompose"),
        "score range": ([ck, "--format", "onnx", "--nms", "--score-threshold", "1.5"], "--score-threshold must be in"),
        "score text": ([ck, "--format", "onnx", "--score-threshold", "abc"], "--score-threshold: invalid float"),
        "score without nms": ([ck, "--format", "onnx", "--score-threshold", "0.5"], "applies with --nms or --bundle"),
        "iou zero": ([ck, "--format", "onnx", "--nms", "--iou-threshold", "0"], "--iou-threshold must be in"),
        "max det": ([ck, "--format", "onnx", "--nms", "--max-detections", "0"], "--max-detections must be an integer"),
        "max det text": ([ck, "--format", "onnx", "--max-detections", "2.5"], "invalid int value: '2.5'"),
        "image size": ([ck, "--format", "onnx", "--image-size", "100"], "multiple of 32"),
        "huge image size": ([ck, "--format", "onnx", "--image-size", "32000"], "between 32 and 4096"),
        "int8 no spec": ([ck, "--format", "onnx-int8"], "needs --calibration"),
        "spec with onnx": ([ck, "--format", "onnx", "--calibration", bad_spec], "--calibration applies to"),
        "corrupt spec": ([ck, "--format", "onnx-mixed", "--calibration", bad_spec], "not valid JSON"),
        "data missing": ([ck, "--format", "onnx", "--data", tmp / "nodata"], "is not a folder"),
        "bundle not empty": ([ck, "--format", "onnx", "--bundle", full], "exists and is not empty"),
        "bundle is a file": ([ck, "--format", "onnx", "--bundle", bundle_file], "is a file, not a folder"),
        "sqnr without spec": ([ck, "--format", "onnx", "--sqnr"], "--sqnr debugs quantized exports"),
        "unknown storage": ([ck, "--format", "tensorrt", "--weight-storage", "int2"], "--weight-storage must be"),
        "storage with onnx": ([ck, "--format", "onnx", "--weight-storage", "native"], "--weight-storage applies to"),
        "packed for tensorrt": ([ck, "--format", "tensorrt", "--weight-storage", "packed"],
                                "TensorRT's ONNX parser lacks"),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "corrupt checkpoint", "unknown format", "unknown deform",
                                  "score range", "score text", "score without nms", "iou zero", "max det",
                                  "max det text", "image size", "huge image size",
                                  "int8 no spec", "spec with onnx", "corrupt spec", "data missing",
                                  "bundle not empty", "bundle is a file", "sqnr without spec", "unknown storage",
                                  "storage with onnx", "packed for tensorrt"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(files, tmp_path, capsys, case):
    args, match = _bad_cases(files, tmp_path)[case]
    out = tmp_path / "out"
    code, stdout, err = run_cli([*args, "--out", out], capsys)
    assert code == 2
    assert err.startswith("edgekit export: error: ") and err.count("\n") == 1 and match in err, err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_tensorrt_without_tensorrt_is_a_clear_error(files, tmp_path, capsys):
    from edgekit.export.tensorrt import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("tensorrt is installed here")
    code, _, err = run_cli([files["plain"], "--format", "tensorrt", "--out", tmp_path / "trt"], capsys)
    assert code == 2 and "TensorRT is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "trt").exists()


@pytest.mark.slow
def test_real_fp16_export(files, tmp_path, capsys):
    code, _, err = run_cli([files["deformable"], "--format", "onnx-fp16", "--out", tmp_path / "h",
                            "--data", files["data"]], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "h" / "model_fp16.parity.json").read_text())
    assert report["precision"] == "fp16" and report["passed"] and "map" in report


@pytest.mark.slow
def test_real_decomposed_deform_export(files, tmp_path, capsys):
    code, _, err = run_cli([files["deformable"], "--format", "onnx", "--deform", "decompose", "--out", tmp_path / "d",
                            "--nms", "--score-threshold", "0.05"], capsys)
    assert code == 0, err
    graph = onnx.load(str(tmp_path / "d" / "model.onnx")).graph
    assert not any(n.op_type == "DeformConv" for n in graph.node)
    assert json.loads((tmp_path / "d" / "model.parity.json").read_text())["passed"]


def test_a_quantized_checkpoint_exports_its_own_weights_and_scales(files, fast_export, capsys, tmp_path):
    """edgekit quantize -> (QAT) -> export: no --calibration, the checkpoint's weights and spec."""
    from edgekit.calibration.quantize import (QuantConfig, calibrate_activations, export_view, quantize,
                                              save_quantized)
    from edgekit.engine.checkpoint import load_model

    model, info = load_model(files["plain"])
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=8), example_input=torch.randn(1, 3, SIZE, SIZE))
    calibrate_activations(qmodel, [torch.randn(2, 3, SIZE, SIZE)])
    with torch.no_grad():  # what QAT does: the float weights move away from the float checkpoint's
        qmodel.head.cls_out.weight.add_(torch.randn_like(qmodel.head.cls_out.weight) * 0.05)
    ckpt = save_quantized(tmp_path / "q.safetensors", qmodel, "rsdet_atto", info["kwargs"], {"image_size": SIZE})

    float_model, _, spec = export_view(ckpt)
    assert torch.equal(float_model.head.cls_out.weight, qmodel.head.cls_out.weight)
    assert {e["weight"]["bits"] for p, e in spec["layers"].items()} >= {4}

    code, _, err = run_cli([ckpt, "--format", "onnx-int8", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "onnx-mixed" in err and not (tmp_path / "bad").exists()
    code, _, err = run_cli([ckpt, "--format", "onnx-mixed", "--out", tmp_path / "mixed"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "mixed" / "model_mixed.parity.json").read_text())
    assert report["passed"] and report["precision"] == "mixed"


def test_tensorrt_refuses_sub_8_bit_activations(files, tmp_path, capsys):
    """TensorRT quantizes activations to 8 bits only: a spec with narrower grids is a
    one-line error before any work (checked ahead of whether tensorrt is installed)."""
    from edgekit.calibration.spec import new_spec, save_spec

    spec = new_spec("rsdet_atto", "ghost")
    act = {"bits": 4, "signed": False, "scale": 0.05, "zero_point": 0, "observer": "minmax"}
    spec["layers"]["backbone.downsample_layers.0.0"] = {"type": "Conv2d", "input": act, "weight": {
        "bits": 8, "signed": True, "axis": 0, "scale": [0.01] * 40, "zero_point": [0] * 40}}
    path = save_spec(spec, tmp_path / "a4.json")
    out = tmp_path / "trt"
    code, _, err = run_cli([files["plain"], "--format", "tensorrt", "--calibration", path, "--out", out], capsys)
    assert code == 2 and "4-bit activations" in err and "8 bits only" in err and err.count("\n") == 1, err
    assert not out.exists()
