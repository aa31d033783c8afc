"""FP16 safety wired into the FP16 export: a layer whose activations overflow float16 is found
on calibration batches, kept float32 in the graph (its initializers stay float32 in the
ONNX), and the FP16 model then matches the float32 one where the unpinned graph overflows."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgekit.calibration.fp16_safety import FP32_MARK, check_fp16_safety, pinned_fp32


class Overflowing(nn.Module):
    """conv -> a conv whose outputs reach ~1e5 (past float16's 65504) -> a conv scaling them
    back down: only ``up`` makes values float16 cannot hold."""

    def __init__(self, gain: float):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.up.weight *= gain
            self.down.weight /= gain

    def forward(self, x):
        return self.down(self.up(self.stem(x))).mean(dim=(2, 3))


def make_model(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = Overflowing(gain=float(rng.uniform(3e5, 6e5))).eval()
    return model, [torch.randn(2, 3, 32, 32) for _ in range(2)]


def test_the_overflowing_layer_is_pinned_and_the_fp16_copy_then_matches_fp32(rng):
    from edgekit.export.to_onnx import to_precision

    model, batches = make_model(rng)
    report = check_fp16_safety(model, batches)
    assert {"up", "down"} <= set(report.pin_fp32) and "stem" not in report.pin_fp32  # down reads up's overflow
    x = batches[0]
    with torch.no_grad():
        reference = model(x)
        plain = to_precision(model, "fp16")(x)
        with pinned_fp32(model, report.pin_fp32):
            pinned_net = to_precision(model, "fp16")
        pinned = pinned_net(x)
    assert not torch.isfinite(plain).all()  # without the pin the float16 graph overflows
    assert torch.isfinite(pinned).all()
    assert torch.allclose(pinned, reference, rtol=2e-2, atol=2e-2 * float(reference.abs().max()))
    inner = pinned_net.net
    assert inner.up.weight.dtype == torch.float32 and inner.stem.weight.dtype == torch.float16
    assert not any(hasattr(m, FP32_MARK) for m in model.modules())  # the marks are gone after the block


def test_pins_naming_missing_layers_are_one_line():
    from conftest import one_line_error

    model = Overflowing(1.0)
    assert "lacks" in one_line_error(lambda: pinned_fp32(model, ["nope"]).__enter__())


@pytest.mark.slow
def test_the_onnx_fp16_graph_keeps_the_pinned_initializers_float32_and_holds_parity(tmp_path, rng):
    import onnx
    import onnxruntime as ort

    from edgekit.export.to_onnx import export_onnx

    model, batches = make_model(rng)
    report = check_fp16_safety(model, batches)
    with pinned_fp32(model, report.pin_fp32):
        path = export_onnx(model, tmp_path / "pinned.onnx", image_size=32, precision="fp16", form="training",
                           simplify=False)
    plain = export_onnx(model, tmp_path / "plain.onnx", image_size=32, precision="fp16", form="training",
                        simplify=False)
    types = {init.name: init.data_type for init in onnx.load(str(path)).graph.initializer}
    for name in ("up.weight", "up.bias", "down.weight"):  # pinned: float32 initializers under their own names
        assert types[name] == onnx.TensorProto.FLOAT, name
    assert types["stem.weight"] == onnx.TensorProto.FLOAT16 and types["stem.bias"] == onnx.TensorProto.FLOAT16
    x = batches[1]
    reference = model(x).detach().numpy()

    def run(onnx_path):
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": x.numpy()})[0]

    pinned = run(path)
    assert np.isfinite(pinned).all() and not np.isfinite(run(plain)).all()
    np.testing.assert_allclose(pinned, reference, rtol=2e-2, atol=2e-2 * float(np.abs(reference).max()))


@pytest.mark.slow
def test_the_export_stage_pins_what_the_check_finds_and_records_it(tmp_path, rng, monkeypatch):
    """Through ``export --format onnx-fp16``: the check's pins (here one chosen at random,
    the check itself stubbed) come out as float32 initializers, named in the metadata."""
    import onnx

    from edgekit.calibration import fp16_safety
    from edgekit.data.synthetic import SYNTHETIC_CLASSES
    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.export.pipeline import ExportConfig, export
    from edgekit.export.to_onnx import read_metadata
    from edgekit.models import create_model

    kwargs = {"num_classes": len(SYNTHETIC_CLASSES), "class_names": list(SYNTHETIC_CLASSES), "deformable": False}
    model = create_model("rsdet_atto", **kwargs)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", model, "rsdet_atto", kwargs, {"image_size": 64})
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and p.startswith("head.")]
    chosen = convs[int(rng.integers(len(convs)))]
    real = fp16_safety.export_pins

    def stub(model, image_size, data=None, rel_tol=1e-2):
        report = real(model, image_size, data, rel_tol)
        report.pin_fp32 = [chosen]
        report.layers[chosen]["why"] = "chosen by the test"
        return report

    monkeypatch.setattr(fp16_safety, "export_pins", stub)
    result = export(checkpoint, ExportConfig(format="onnx-fp16", out=str(tmp_path / "out")))
    assert result.parity["passed"]
    proto = onnx.load(str(result.target))
    types = {init.name: init.data_type for init in proto.graph.initializer}
    assert types[f"{chosen}.weight"] == onnx.TensorProto.FLOAT
    others = [f"{p}.weight" for p in convs if p != chosen and f"{p}.weight" in types]
    assert others and all(types[name] == onnx.TensorProto.FLOAT16 for name in others)
    assert read_metadata(result.target)["fp16_safety"]["pin_fp32"] == [chosen]
