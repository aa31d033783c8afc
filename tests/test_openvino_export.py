"""OpenVINO IR export: the DeformConv mapping against the torchvision-semantics reference,
``edgekit export --format openvino*`` (files, parity report, IR contents), and the one-line
errors (OpenVINO missing, an op it cannot convert, options that do not apply).

The default run uses the TorchScript stand-in exporter (tests/conftest.py ``fast_export``);
the slow test runs the real exporter with the native DeformConv behind the same command.
"""

import json
import sys

import numpy as np
import pytest
import torch

from edgekit.export.openvino import no_telemetry  # noqa: E402

with no_telemetry():
    ov = pytest.importorskip("openvino")

from deform_cases import describe, fresh_seed, random_deform_case, run_case  # noqa: E402
from test_deform_onnx import deform_conv_model, feeds  # noqa: E402
from test_export_cli import files, leftovers, run_cli  # noqa: E402,F401  (files: the module fixture)

from edgekit.export import openvino as ov_export  # noqa: E402
from edgekit.models.deform import deform_conv2d_reference  # noqa: E402


def run_openvino(case, tmp_path):
    want = run_case(deform_conv2d_reference, case)
    import onnx

    path = tmp_path / "dc.onnx"
    onnx.save(deform_conv_model(case, want.shape), str(path))
    compiled = ov_export.compile_model(ov_export.read_onnx(path))
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    got = request.infer({n: feeds(case)[n] for n in names})[compiled.outputs[0]]
    return np.asarray(got), want.numpy()


def test_deform_conv_extension_matches_the_reference(tmp_path):
    """Random geometry (groups, offset groups, stride, padding, dilation, even kernels, with
    and without bias and mask) and offsets that land on and beyond the borders."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for n in range(25):
        case = random_deform_case(rng, dtype=torch.float32, min_size=2, max_size=9)
        got, want = run_openvino(case, tmp_path)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}, case {n}: {describe(case)}")


def test_border_mode_matters_and_the_other_mode_fails(tmp_path, monkeypatch):
    """Samples within one pixel outside the map: torchvision blends them with zero, which is
    ``bilinear_interpolation_pad=True``; the other mode drops them and differs."""
    monkeypatch.setattr(ov_export, "BILINEAR_PAD", False)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(4):
        case = random_deform_case(rng, dtype=torch.float32, min_size=3, max_size=6, offset_kinds=("border",),
                                  use_mask=False)
        got, want = run_openvino(case, tmp_path)
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)))
    assert worst > 1e-2, f"seed {seed}: the two border modes agreed ({worst})"


def test_an_op_openvino_cannot_convert_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from conftest import one_line_error

    node = helper.make_node("FancyWarp", ["X"], ["Y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid(
        "com.example", 1)]), str(path))
    message = one_line_error(ov_export.convert, path, tmp_path / "odd.xml")
    assert "FancyWarp" in message and "cannot convert" in message, message
    assert not (tmp_path / "odd.xml").exists()


def test_openvino_missing_is_one_line_naming_the_extra(files, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    code, _, err = run_cli([files["plain"], "--format", "openvino", "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install 'edgekit[openvino]'" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, match", [
    (["--format", "openvino", "--nms"], "--nms applies to the ONNX formats"),
    (["--format", "openvino-fp16", "--bundle", "b"], "--bundle applies to the ONNX formats"),
    (["--format", "openvino-int8"], "needs --calibration"),
    (["--format", "openvino-int8", "--weight-storage", "packed"], "needs BitShift"),
    (["--format", "openvino", "--weight-storage", "native"], "--weight-storage applies to"),
])
def test_options_that_do_not_apply(files, tmp_path, capsys, args, match):  # noqa: F811
    out = tmp_path / "out"
    code, _, err = run_cli([files["plain"], *args, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and match in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def _ir_ops(xml):
    return {op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ops()}


def export_ir(files, out, fmt, capsys, *extra):  # noqa: F811
    stem = fmt.replace("-", "_")
    code, stdout, err = run_cli([files["plain"], "--format", fmt, "--out", out, *extra], capsys)
    assert code == 0, err
    size = sum((out / f"{stem}.{ext}").stat().st_size for ext in ("xml", "bin")) / 1e6
    assert stdout.startswith(f"exported {fmt} -> {out / (stem + '.xml')} ({size:.1f} MB, 3 files)"), stdout
    report = json.loads((out / f"{stem}.parity.json").read_text())
    assert report["passed"] and report["format"] == fmt
    return report


def test_fp32_ir(files, tmp_path, capsys, fast_export):  # noqa: F811
    out = tmp_path / "out"
    assert export_ir(files, out, "openvino", capsys)["precision"] == "fp32"
    assert sorted(p.name for p in out.iterdir()) == ["openvino.bin", "openvino.parity.json", "openvino.xml"]
    assert ov_export.ir_precision(out / "openvino.xml") == "fp32" and leftovers(tmp_path) == []


@pytest.mark.slow
def test_fp16_and_int8_ir(files, tmp_path, capsys, fast_export):  # noqa: F811
    """fp16 weights; int8 from a calibrated spec (a calibration and three exports: ~60 s)."""
    from edgekit.api import CalibrateConfig, calibrate_checkpoint

    out = tmp_path / "out"
    assert export_ir(files, out, "openvino", capsys)["precision"] == "fp32"
    assert export_ir(files, out, "openvino-fp16", capsys)["precision"] == "fp16"
    fp32_bin, fp16_bin = (out / "openvino.bin").stat().st_size, (out / "openvino_fp16.bin").stat().st_size
    assert 0.45 < fp16_bin / fp32_bin < 0.55  # float16 weights
    spec = tmp_path / "spec.json"
    # 7-bit weights: int8 kernels of CPUs without VNNI saturate with 8 (see export/openvino.py)
    calibrate_checkpoint(files["plain"], files["data"], CalibrateConfig(batches=1, batch_size=2, progress=False,
                                                                        weight_bits=7), out=spec)
    code, _, err = run_cli([files["plain"], "--format", "openvino-int8", "--calibration", spec, "--out", out],
                                capsys)
    assert code == 0, err
    report = json.loads((out / "openvino_int8.parity.json").read_text())
    assert report["passed"] and report["precision"] == "int8" and "fake-quant" in report["reference"], report
    assert "FakeQuantize" in _ir_ops(out / "openvino_int8.xml")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.{e}" for s in ("openvino", "openvino_fp16", "openvino_int8") for e in ("xml", "bin", "parity.json")]
        + ["openvino_int8.placement.json"])
    placement = json.loads((out / "openvino_int8.placement.json").read_text())
    layers = json.loads(spec.read_text())["layers"]
    assert placement["runtime"].startswith("openvino") and placement["summary"]["integer_compute_nodes"] > 0
    assert set(placement["integer"]) <= set(layers), placement["integer"]  # named by module path
    assert all(e["kernel"].endswith(("(u8)", "(i8)")) for e in placement["integer"].values())
    assert all("why" in e for e in placement["float_compute"].values())
    assert ov_export.ir_precision(out / "openvino_int8.xml") == "int8"
    assert (out / "openvino_int8.bin").stat().st_size < 0.4 * fp32_bin
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_real_export_with_native_deform_conv(files, tmp_path, capsys):  # noqa: F811
    """The real exporter's ONNX DeformConv becomes OpenVINO's DeformableConvolution (~30 s)."""
    code, _, err = run_cli([files["deformable"], "--format", "openvino", "--out", tmp_path], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "openvino.parity.json").read_text())["passed"]
    assert "DeformableConvolution" in _ir_ops(tmp_path / "openvino.xml")
