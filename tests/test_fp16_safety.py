"""FP16 safety: overflowing activations, GRN's float16 L2 reduction, a container's own
overflow, and a benign model that pins nothing; expectations come from float64 references."""

import json

import pytest
import torch
import torch.nn as nn

from edgekit.calibration.fp16_safety import FP16_MAX, check_fp16_safety, grn_float16
from edgekit.errors import EdgekitError
from edgekit.models.grn import GRN, grn_reference


def random_grn(channels: int, data_format: str = "channels_last") -> GRN:
    grn = GRN(channels, data_format=data_format)
    with torch.no_grad():
        grn.gamma.normal_(0.0, 0.5)
        grn.beta.normal_(0.0, 0.5)
    return grn


def test_activation_beyond_float16_range_is_found(fresh_torch_seed):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    x = torch.randn(4, 8)
    with torch.no_grad():
        hidden = torch.relu(x.double() @ model[0].weight.double().T + model[0].bias.double())
        model[2].bias.zero_()
        model[2].weight.mul_(2 * FP16_MAX / float((hidden @ model[2].weight.double().T).abs().max()))
        peak = float((hidden @ model[2].weight.double().T).abs().max())
    assert peak > FP16_MAX > float(hidden.abs().max())
    report = check_fp16_safety(model, [x])
    entry = report.layers["2"]
    assert entry["overflow"] and entry["pin_fp32"] and "float16 maximum" in entry["why"]
    assert entry["max_abs"] == pytest.approx(peak, rel=1e-5)
    assert "2" in report.pin_fp32
    assert not report.layers["0"]["pin_fp32"] and not report.layers["1"]["pin_fp32"]
    assert "upstream" in report.layers["3"]["why"]  # its input cannot be float16, not its own fault


def test_grn_whose_l2_reduction_overflows_in_float16_is_found(fresh_torch_seed):
    grn = random_grn(16)
    x = torch.randn(2, 8, 8, 16).clamp(-4, 4) * 60  # |x| < 256 (x*x fits float16), sums over 64 pixels do not
    sum_sq = x.double().pow(2).sum(dim=(1, 2))
    with torch.no_grad():
        out = grn_reference(x.double(), grn.gamma.double(), grn.beta.double())
    assert float(x.abs().max()) < 255.9 and float(sum_sq.max()) > FP16_MAX and float(out.abs().max()) < FP16_MAX
    report = check_fp16_safety(nn.Sequential(grn), [x])
    entry = report.layers["0"]
    assert entry["pin_fp32"] and entry["overflow"] and entry["fp16_rel_err"] is None
    assert "overflows inside" in entry["why"]
    assert entry["max_abs"] == pytest.approx(float(out.abs().max()), rel=1e-5)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_grn_float16_matches_float64_reference_on_small_inputs(fresh_torch_seed, data_format):
    grn = random_grn(12, data_format)
    x = torch.randn(2, 12, 6, 6) if data_format == "channels_first" else torch.randn(2, 6, 6, 12)
    with torch.no_grad():
        ours = grn_float16(grn, x.half())
    assert ours.dtype == torch.float16
    with torch.no_grad():
        ref = grn_reference(x.half().double(), grn.gamma.double(), grn.beta.double(), data_format=data_format)
    rel = float((ours.double() - ref).norm() / ref.norm())
    assert 0 < rel < 4e-3  # a few float16 roundings, not an exact float32 computation
    report = check_fp16_safety(nn.Sequential(grn), [x])
    assert report.pin_fp32 == [] and 0 < report.layers["0"]["fp16_rel_err"] < 1e-2


class ScaledResidual(nn.Module):
    """A block whose own residual sum leaves the float16 range though its layer does not."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return x * 4e4 + self.linear(x)


def test_container_reported_only_for_its_own_overflow(fresh_torch_seed):
    model = nn.Sequential(ScaledResidual(), nn.Linear(8, 2))
    x = torch.randn(16, 8) + 3.0  # |x| >= 1.7 somewhere: 4e4 * x leaves the range
    with torch.no_grad():
        expected = float((x.double() * 4e4 + model[0].linear(x).double()).abs().max())
    assert expected > FP16_MAX
    report = check_fp16_safety(model, [x])
    assert report.layers["0"]["pin_fp32"] and "own ops" in report.layers["0"]["why"]
    assert report.layers["0"]["max_abs"] == pytest.approx(expected, rel=1e-5)
    assert not report.layers["0.linear"]["pin_fp32"]
    assert "" not in report.layers  # the outer Sequential only passes the overflow on


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.act = nn.GELU()
        self.grn = random_grn(16)
        self.head = nn.Linear(16, 5)
        self.unused = nn.Linear(5, 5)

    def forward(self, x):
        x = self.dw(self.stem(x)).permute(0, 2, 3, 1)
        x = self.grn(self.act(self.norm(x)))
        return self.head(x.mean(dim=(1, 2)))


def test_benign_model_pins_nothing(fresh_torch_seed, tmp_path):
    model = SmallNet()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    report = check_fp16_safety(model, batches)
    assert report.pin_fp32 == [] and report.batches == 2
    computing = ["stem", "dw", "norm", "act", "grn", "head"]
    for path in computing:
        entry = report.layers[path]
        assert not entry["overflow"] and entry["why"] == ""
        assert 0 <= entry["fp16_rel_err"] < 1e-2, (path, entry)
    assert report.layers["unused"]["why"] == "not called on these batches"
    with torch.no_grad():
        stem_peak = max(float(torch.nn.functional.conv2d(b.double(), model.stem.weight.double(),
                                                         model.stem.bias.double(), padding=1).abs().max())
                        for b in batches)
    assert report.layers["stem"]["max_abs"] == pytest.approx(stem_peak, rel=1e-5)
    saved = json.loads(report.save(tmp_path / "fp16.json").read_text())
    assert saved["pin_fp32"] == [] and set(saved["layers"]) == set(report.layers)


def test_tolerance_pins_layers_that_lose_accuracy(fresh_torch_seed):
    model = SmallNet()
    report = check_fp16_safety(model, [torch.randn(2, 3, 16, 16)], rel_tol=1e-9)
    assert set(report.pin_fp32) >= {"stem", "dw", "head"}
    assert "tolerance" in report.layers["stem"]["why"] and not report.layers["stem"]["overflow"]


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(EdgekitError, match="rel_tol"):
        check_fp16_safety(model, [torch.randn(1, 2)], rel_tol=0)
    with pytest.raises(EdgekitError, match="no calibration batches"):
        check_fp16_safety(model, [])


def test_model_is_left_as_it_was(fresh_torch_seed):
    model = SmallNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_fp16_safety(model, [torch.randn(1, 3, 8, 8)])
    assert model.training
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_random_init_convnextv2_atto_pins_nothing(fresh_torch_seed):
    from edgekit.models import create_model

    report = check_fp16_safety(create_model("convnextv2_atto").eval(), [torch.randn(2, 3, 64, 64)])
    assert report.pin_fp32 == []
    assert all(e["fp16_rel_err"] is not None for e in report.layers.values() if e["why"] == "")
