"""Parity checks: torch vs ONNX Runtime statistics, tolerances per precision, the NMS
check, mAP difference and per-layer SQNR of quantized graphs."""

import json

import numpy as np
import onnx
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.export.end2end import append_nms
from edgekit.export.parity import (TOLERANCES, ParityError, check_end2end, check_parity, compare_arrays,
                                   layer_sqnr, map_difference, run_onnx, sqnr_db)
from edgekit.models import create_model
from export_helpers import export_raw_detector, fresh_seed

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = create_model("rsdet_atto", num_classes=3, deformable=False, grn_backend="torch").eval()
    path = export_raw_detector(model, tmp_path_factory.mktemp("parity") / "raw.onnx", SIZE)
    return model, path


def images(seed, batch=2, size=SIZE):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32))


def test_fp32_export_passes_with_statistics_from_the_outputs(exported):
    model, path = exported
    seed = fresh_seed()
    x = images(seed, batch=3)
    report = check_parity(model, path, x, "fp32")
    assert report["passed"] and list(report["outputs"]) == ["boxes", "scores"]
    got = run_onnx(path, x)
    with torch.no_grad():
        from edgekit.models.detect_post import decode_predictions
        want = decode_predictions(model(x.double().float()), model.strides)
    for name, w in zip(("boxes", "scores"), want):
        w = w.double().numpy()
        g = got[name].astype(np.float64)
        stats = report["outputs"][name]
        assert stats["max_abs_err"] == pytest.approx(np.abs(g - w).max(), rel=1e-6, abs=1e-12), f"seed {seed}"
        assert stats["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert stats["scale"] == pytest.approx(np.abs(w).max())
    json.dumps(report)  # the report is JSON-ready


def test_a_changed_model_fails_fp32_but_passes_fp16(exported):
    """A 5e-2 change of the class bias moves scores (~0.07) by ~2e-3: past fp32's bound, within fp16's."""
    model, path = exported
    x = images(fresh_seed())
    with torch.no_grad():
        model.head.cls_out.bias += 5e-2
    try:
        with pytest.raises(ParityError, match=r"parity FAILED \(fp32.*scores: max abs") as info:
            check_parity(model, path, x, "fp32")
        assert "\n" not in str(info.value)
        report = check_parity(model, path, x, "fp32", raise_on_failure=False)
        assert not report["passed"] and not report["outputs"]["scores"]["passed"]
        assert check_parity(model, path, x, "fp16")["passed"]
    finally:
        with torch.no_grad():
            model.head.cls_out.bias -= 5e-2


@pytest.mark.parametrize("precision", list(TOLERANCES))
def test_tolerance_boundary(precision):
    """An element just inside atol*max(scale, 1) + rtol*|ref| passes, just outside fails."""
    rng = np.random.default_rng(fresh_seed())
    tol = TOLERANCES[precision]
    # Scale below and above 1; enough elements that one outlier leaves the cosine high.
    want = rng.standard_normal(5000) * float(rng.choice([0.05, 10.0]))
    bound = tol["atol"] * max(np.abs(want).max(), 1.0) + tol["rtol"] * np.abs(want)
    i = int(rng.integers(0, 5000))
    for factor, verdict in ((0.99, True), (1.01, False)):
        got = want.copy()
        got[i] += factor * bound[i]
        stats = compare_arrays(want, got, tol)
        assert stats["passed"] is verdict, (precision, factor, stats)
        assert stats["max_abs_err"] == pytest.approx(factor * bound[i])


def test_cosine_bound_and_non_finite_outputs():
    tol = TOLERANCES["fp32"]
    want = np.linspace(1, 2, 100)
    assert not compare_arrays(want, -want, {**tol, "atol": 10.0, "rtol": 10.0})["passed"]  # cosine -1
    bad = want.copy()
    bad[3] = np.nan
    assert compare_arrays(want, bad, tol)["passed"] is False
    assert compare_arrays(want, want[:50], tol) == {"shape_torch": [100], "shape_onnx": [50], "passed": False}


def test_end2end_check_passes_and_catches_a_wrong_nms(exported, tmp_path):
    _, path = exported
    x = images(fresh_seed(), batch=2)
    raw = onnx.load(str(path))
    good = tmp_path / "good.onnx"
    onnx.save(append_nms(raw, score_threshold=0.05, iou_threshold=0.5, max_detections=50), str(good))
    result = check_end2end(path, good, x)
    assert result["passed"] and result["expected"] == result["got"] == result["matched"] > 0
    # A graph whose NMS keeps more boxes than its metadata says must fail the check.
    wrong = append_nms(raw, score_threshold=0.05, iou_threshold=0.95, max_detections=50)
    for p in wrong.metadata_props:
        if p.key == "edgekit.nms":
            p.value = p.value.replace('"iou_threshold": 0.95', '"iou_threshold": 0.3')
    bad = tmp_path / "bad.onnx"
    onnx.save(wrong, str(bad))
    assert not check_end2end(path, bad, x)["passed"]


def test_layer_sqnr_fp32_and_a_2bit_layer(exported, tmp_path):
    from edgekit.calibration.spec import new_spec, qrange
    from edgekit.export.qdq import quantize_onnx

    model, path = exported
    x = images(fresh_seed())
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    fp32 = layer_sqnr(model, path, x)
    assert fp32["unmapped"] == [] and set(fp32["layers"]) == set(layers)
    assert min(v["sqnr_db"] for v in fp32["layers"].values()) > 80

    target = "head.cls_tower.0.0"
    w = dict(model.named_modules())[target].weight.detach()
    scale = (w.abs().amax(dim=(1, 2, 3)) / qrange(2, True, narrow=True)[1]).tolist()
    spec = new_spec("rsdet_atto", "uniform")
    spec["layers"][target] = {"type": "Conv2d", "input": None, "weight": {
        "bits": 2, "signed": True, "axis": 0, "scale": scale, "zero_point": [0] * len(scale)}}
    qdq = quantize_onnx(path, spec, tmp_path / "qdq.onnx")
    result = layer_sqnr(model, qdq, x)["layers"]
    assert result[target]["sqnr_db"] < 20
    # Layers before the quantized one see the float graph: still bit-close.
    assert min(v["sqnr_db"] for k, v in result.items() if k.startswith(("backbone", "neck"))) > 80
    assert "cls_tower.0.0" in result[target]["onnx_tensors"][0] or result[target]["onnx_tensors"]


def test_sqnr_db_against_the_formula():
    rng = np.random.default_rng(fresh_seed())
    ref = rng.standard_normal(1000)
    noise = rng.standard_normal(1000) * 0.01
    want = 10 * np.log10((ref ** 2).sum() / (noise ** 2).sum())
    assert sqnr_db(ref, ref + noise) == pytest.approx(want)
    assert sqnr_db(ref, ref) == 200.0


def test_map_difference_matches_evaluate(tiny_data, tmp_path):
    from torch.utils.data import DataLoader

    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.data.synthetic import SYNTHETIC_CLASSES
    from edgekit.engine.evaluate import evaluate_model

    classes = list(SYNTHETIC_CLASSES)
    model = create_model("rsdet_atto", num_classes=len(classes), deformable=False, grn_backend="torch").eval()
    path = export_raw_detector(model, tmp_path / "raw128.onnx", 128)  # the tiny set's image size
    result = map_difference(model, path, tiny_data / "val", classes, 128, batch_size=3)
    assert result["num_images"] == 4
    loader = DataLoader(DetectionDataset(tiny_data / "val", classes, image_size=128), batch_size=3,
                        collate_fn=collate_detection)
    reference = evaluate_model(model, loader, classes, progress=False)
    assert result["torch"] == {"map": reference["map"], "map50": reference["map50"]}
    assert abs(result["map_drop"]) <= TOLERANCES["fp32"]["max_map_drop"]
    # An end-to-end graph is scored with its own thresholds on both sides.
    e2e = tmp_path / "e2e.onnx"
    onnx.save(append_nms(onnx.load(str(path)), score_threshold=0.02, max_detections=30), str(e2e))
    assert abs(map_difference(model, e2e, tiny_data / "val", classes, 128)["map_drop"]) <= 0.002


def test_bad_inputs_are_one_line_errors(exported, tmp_path):
    model, path = exported
    with pytest.raises(EdgekitError, match="no such ONNX file"):
        check_parity(model, tmp_path / "missing.onnx", images(0))
    with pytest.raises(EdgekitError, match="unknown parity precision 'int3'"):
        check_parity(model, path, images(0), "int3")
    with pytest.raises(EdgekitError, match="takes 1 input"):
        check_parity(model, path, [images(0), images(1)])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(EdgekitError, match="cannot load"):
        check_parity(model, corrupt, images(0))


@pytest.mark.slow
def test_export_onnx_fp16_passes_fp16(tmp_path):
    from edgekit.export.to_onnx import export_onnx

    model = create_model("rsdet_atto", num_classes=2).eval()
    path = export_onnx(model, tmp_path / "fp16.onnx", image_size=SIZE, precision="fp16")
    x = images(fresh_seed())
    report = check_parity(model, path, x, "fp16")
    # Half-precision rounding is visible (float32 alone stays near 1e-6 relative on boxes).
    assert report["passed"] and report["outputs"]["boxes"]["max_rel_err"] > 2e-5, report["outputs"]


def test_fake_quant_parity_passes_a_qdq_graph_and_catches_a_wrong_zero_point(exported, tmp_path):
    """The QDQ graph of a PTQ spec matches the spec's torch fake-quant model tightly. A graph
    whose first activation DequantizeLinear has its zero point off by 2^(bits-1) (a signed
    grid written as unsigned without the shift, the mistake the UINT8 rewrite can make)
    fails it, while the float comparison's loose bounds let that graph through. (A wrong
    zero point shared by a Q/DQ pair only moves the clipping range; ConvNeXt's norms absorb
    small constant offsets, so a shift of a few steps is below any safe bound.)"""
    from onnx import numpy_helper

    from edgekit.calibration.ptq import calibrate
    from edgekit.export.parity import check_fake_quant
    from edgekit.export.qdq import quantize_onnx

    model, path = exported
    seed = fresh_seed()
    spec = calibrate(model, [images(seed + i) for i in range(2)], progress=False)
    x = images(seed + 2)
    good = quantize_onnx(path, spec, tmp_path / "good.onnx", model=model)
    report = check_fake_quant(model, good, x, spec, "int8")
    assert report["passed"] and report["precision"] == "int8" and "float_model" in report
    assert report["tolerance"] == {**TOLERANCES["fake-quant"], "max_map_drop": TOLERANCES["int8"]["max_map_drop"]}

    proto = onnx.load(str(good))
    producers = {o: n for n in proto.graph.node for o in n.output}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in producers
              and producers[n.input[0]].op_type == "QuantizeLinear")  # the image's quantizer: first in graph order
    zero = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == dq.input[2]))
    half = 2 ** (8 * zero.dtype.itemsize - 1)
    wrong = numpy_helper.from_array(((zero.astype(np.int64) + half) % (2 * half)).astype(zero.dtype), "wrong_zero")
    proto.graph.initializer.append(wrong)
    dq.input[2] = "wrong_zero"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    report = check_fake_quant(model, tmp_path / "bad.onnx", x, spec, "int8", raise_on_failure=False)
    print({k: (o["max_abs_err"], o["cosine"]) for k, o in report["outputs"].items()})
    assert report["float_model"]["passed"] and not report["passed"]
    with pytest.raises(ParityError, match="FAILED .*fake-quant"):
        check_fake_quant(model, tmp_path / "bad.onnx", x, spec, "int8")
