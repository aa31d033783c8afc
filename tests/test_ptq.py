"""PTQ calibration, the quant spec file and the torch fake-quant simulation."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.calibration.ptq import apply_fake_quant, calibrate
from edgekit.calibration.spec import (FORMAT, fake_quantize, load_spec, new_spec, qrange, save_spec,
                                      validate_spec)
from edgekit.errors import EdgekitError
from edgekit.models.deform import DeformConv2dPack


class TinyNet(nn.Module):
    """Conv (signed input) -> ReLU -> grouped conv (unsigned input) -> DCNv2 -> pooled Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dcn = DeformConv2dPack(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(self.dcn(x).mean((2, 3)))


@pytest.fixture
def net(fresh_torch_seed):
    model = TinyNet().eval()
    nn.init.normal_(model.dcn.conv_offset.weight, std=0.05)  # non-trivial offsets and mask
    return model


def layer_inputs(model, batches, paths):
    """Every input each layer saw, recorded by plain hooks (independent of the observers)."""
    seen = {p: [] for p in paths}
    modules = dict(model.named_modules())
    hooks = [modules[p].register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0].detach().clone()))
             for p in paths]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {p: torch.cat([t.flatten() for t in v]) for p, v in seen.items()}


def test_minmax_calibration_matches_the_observed_ranges(net):
    batches = [torch.randn(2, 3, 12, 12) * 3 for _ in range(3)]
    spec = calibrate(net, batches, progress=False, model_name="tiny")
    assert validate_spec(spec) is spec and spec["source"] == "ptq" and spec["model"] == "tiny"
    assert spec["calibration"]["batches"] == 3 and spec["calibration"]["observer"] == "minmax"
    assert set(spec["layers"]) == {"conv1", "conv2", "dcn", "fc"}  # dcn.conv_offset stays float
    assert spec["layers"]["dcn"]["type"] == "DeformConv2d" and spec["layers"]["fc"]["type"] == "Linear"
    inputs = layer_inputs(net, batches, spec["layers"])
    for path, layer in spec["layers"].items():
        x, a = inputs[path].double(), layer["input"]
        assert a["signed"] == bool(x.min() < 0)
        assert not spec["layers"]["conv2"]["input"]["signed"]  # post-ReLU
        qmin, qmax = qrange(8, a["signed"])
        lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        assert a["scale"] == pytest.approx((hi - lo) / (qmax - qmin), rel=1e-6)
        assert (qmin - a["zero_point"]) * a["scale"] == pytest.approx(lo, abs=a["scale"] / 2 + 1e-9)
        w = dict(net.named_modules())[path].weight.detach().double()
        amax = w.flatten(1).abs().amax(1)
        np.testing.assert_allclose(layer["weight"]["scale"], (amax / 127).numpy(), rtol=1e-6)
        assert layer["weight"]["zero_point"] == [0] * w.shape[0] and layer["weight"]["axis"] == 0


def test_per_tensor_weights_repeat_one_scale_and_low_bits_use_their_grid(net):
    spec = calibrate(net, [torch.randn(1, 3, 8, 8)], per_channel=False, weight_bits=4, act_bits=6, progress=False)
    for path, layer in spec["layers"].items():
        w = dict(net.named_modules())[path].weight.detach()
        assert layer["weight"]["scale"] == pytest.approx([w.abs().max().item() / 7] * w.shape[0], rel=1e-6)
        assert layer["input"]["bits"] == 6 and layer["weight"]["bits"] == 4


@pytest.mark.parametrize("observer", ["percentile", "entropy", "mse"])
def test_histogram_observers_clip_inside_the_minmax_range(net, observer):
    batches = [torch.randn(2, 3, 12, 12) for _ in range(2)]
    minmax = calibrate(net, batches, progress=False, layers=["conv1"])
    other = calibrate(net, batches, observer=observer, progress=False, layers=["conv1"])
    a, b = minmax["layers"]["conv1"]["input"], other["layers"]["conv1"]["input"]
    assert b["observer"] == observer and b["scale"] <= a["scale"] * (1 + 1e-6)


def test_fake_quant_model_equals_an_independent_float64_computation(net):
    spec = calibrate(net, [torch.randn(2, 3, 10, 10) for _ in range(2)], progress=False,
                     conv_outputs=False)  # the hand computation below models inputs and weights
    qnet = apply_fake_quant(net, spec)
    x = torch.randn(2, 3, 10, 10)
    L = spec["layers"]

    def fq_in(t, path):
        a = L[path]["input"]
        qmin, qmax = qrange(a["bits"], a["signed"])
        return (torch.clamp(torch.round(t / a["scale"]) + a["zero_point"], qmin, qmax) - a["zero_point"]) * a["scale"]

    def fq_w(path):
        w, s = dict(net.named_modules())[path].weight.detach(), torch.tensor(L[path]["weight"]["scale"])
        s = s.view(-1, *[1] * (w.ndim - 1))
        return torch.clamp(torch.round(w / s), -127, 127) * s

    with torch.no_grad():
        h = F.relu(F.conv2d(fq_in(x, "conv1"), fq_w("conv1"), net.conv1.bias, padding=1))
        h = F.relu(F.conv2d(fq_in(h, "conv2"), fq_w("conv2"), net.conv2.bias, padding=1, groups=2))
        o1, o2, m = torch.chunk(net.dcn.conv_offset(h), 3, dim=1)  # offsets from the FLOAT input
        from edgekit.models.deform import deform_conv2d_reference
        d = deform_conv2d_reference(fq_in(h, "dcn").double(), torch.cat((o1, o2), 1).double(), fq_w("dcn").double(),
                                    net.dcn.bias.double(), padding=(1, 1), mask=torch.sigmoid(m).double())
        expected = F.linear(fq_in(d.float().mean((2, 3)), "fc"), fq_w("fc"), net.fc.bias)
        got = qnet(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, net(x))  # the simulation changes something
    assert type(net.dcn) is DeformConv2dPack  # the original model is untouched


def test_fake_quantize_per_channel_matches_torch_builtin():
    x = torch.randn(4, 6, 5)
    scale = torch.rand(6) + 0.01
    zp = torch.randint(-10, 10, (6,))
    ours = fake_quantize(x, scale, zp, 8, True, axis=1)
    builtin = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), 1, -128, 127)
    torch.testing.assert_close(ours, builtin)


def test_calibration_errors_are_clear(net):
    with pytest.raises(EdgekitError, match="no batches"):
        calibrate(net, [], progress=False)
    with pytest.raises(EdgekitError, match="act_bits"):
        calibrate(net, [torch.randn(1, 3, 8, 8)], act_bits=9, progress=False)
    with pytest.raises(EdgekitError, match="not Conv2d/Linear"):
        calibrate(net, [torch.randn(1, 3, 8, 8)], layers=["nope"], progress=False)
    assert "dcn.conv_offset" in calibrate(net, [torch.randn(1, 3, 8, 8)], exclude=(), progress=False)["layers"]
    net.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(EdgekitError, match="'unused' was never called"):
        calibrate(net, [torch.randn(1, 3, 8, 8)], progress=False)


def spec_for(model, bits=8) -> dict:
    spec = new_spec("tiny", "uniform")
    spec["layers"]["conv1"] = {"type": "Conv2d", "weight": {"bits": bits, "signed": True, "axis": 0,
                                                           "scale": [0.01] * 8, "zero_point": [0] * 8},
                               "input": {"bits": 8, "signed": True, "scale": 0.02, "zero_point": -3,
                                         "observer": "minmax"}}
    return spec


def test_spec_roundtrip_and_atomic_save(tmp_path, net):
    spec = calibrate(net, [torch.randn(1, 3, 8, 8)], progress=False)
    path = save_spec(spec, tmp_path / "sub" / "spec.json")
    assert load_spec(path) == json.loads(json.dumps(spec))
    assert [p.name for p in path.parent.iterdir()] == ["spec.json"]  # no temporary left behind


@pytest.mark.parametrize("field, value, message", [
    (("format",), "other/1", "format"),
    (("source",), "magic", "source"),
    (("layers", "conv1", "type"), "Conv3d", "layer 'conv1': type"),
    (("layers", "conv1", "weight", "bits"), 9, "layer 'conv1' weight: bits"),
    (("layers", "conv1", "weight", "signed"), False, "signed must be true"),
    (("layers", "conv1", "weight", "scale"), [0.1] * 7, "equal length"),
    (("layers", "conv1", "weight", "zero_point"), [0] * 7 + [200], "zero_point"),
    (("layers", "conv1", "input", "scale"), -1.0, "layer 'conv1' input: scale"),
    (("layers", "conv1", "input", "zero_point"), 128, "input: zero_point"),
    (("layers", "conv1", "input", "observer"), "kl", "observer"),
])
def test_validation_names_the_bad_layer_and_field(net, field, value, message):
    spec = spec_for(net)
    target = spec
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    with pytest.raises(EdgekitError, match=message) as info:
        validate_spec(spec)
    assert "\n" not in str(info.value)


def test_missing_and_corrupt_spec_files(tmp_path, net):
    with pytest.raises(EdgekitError, match="not found"):
        load_spec(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": ')
    with pytest.raises(EdgekitError, match="not valid JSON"):
        load_spec(bad)
    spec = spec_for(net)
    spec["layers"]["conv9"] = spec["layers"].pop("conv1")
    with pytest.raises(EdgekitError, match="conv9"):
        apply_fake_quant(net, spec)
    assert FORMAT == "edgekit.quant-spec/1"


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    """A fresh rsdet_atto checkpoint (calibration needs no training), 128 px like tiny_data."""
    from edgekit.data.synthetic import SYNTHETIC_CLASSES
    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.models import create_model

    kwargs = {"num_classes": len(SYNTHETIC_CLASSES), "class_names": list(SYNTHETIC_CLASSES)}
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return save_checkpoint(path, create_model("rsdet_atto", **kwargs), "rsdet_atto", kwargs, {"image_size": 128})


def test_calibrate_command_writes_a_valid_spec(capsys, untrained_checkpoint, tiny_data, tmp_path):
    from edgekit.cli import main

    out = tmp_path / "spec.json"
    code = main(["calibrate", str(untrained_checkpoint), "--data", str(tiny_data / "val"), "--batches", "1",
                 "--batch-size", "2", "--observer", "percentile", "--act-bits", "7", "--out", str(out), "--quiet"])
    assert code == 0 and "calibrated" in capsys.readouterr().out
    spec = load_spec(out)
    assert spec["model"] == "rsdet_atto" and spec["layers"]
    assert all(layer["input"]["observer"] == "percentile" and layer["input"]["bits"] == 7
               for layer in spec["layers"].values())
    assert not any(path.endswith("conv_offset") for path in spec["layers"])


@pytest.mark.parametrize("args, needle", [
    (["--observer", "kl"], "--observer"),
    (["--batches", "0"], "--batches"),
    (["--weight-bits", "1"], "--weight-bits"),
])
def test_calibrate_command_errors_are_one_line(capsys, untrained_checkpoint, tiny_data, tmp_path, args, needle):
    from edgekit.cli import main

    code = main(["calibrate", str(untrained_checkpoint), "--data", str(tiny_data / "val"), "--out",
                 str(tmp_path / "s.json"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1 and not (tmp_path / "s.json").exists()


def test_calibrate_out_pointing_at_a_folder_is_one_line_and_leaves_no_temp(capsys, untrained_checkpoint, tiny_data,
                                                                             tmp_path):
    from edgekit.cli import main

    folder = tmp_path / "specs"
    folder.mkdir()
    code = main(["calibrate", str(untrained_checkpoint), "--data", str(tiny_data / "val"), "--batches", "1",
                 "--batch-size", "1", "--out", str(folder), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is a folder; pass a file path" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())  # no temporary left anywhere


def test_atomic_target_removes_its_temporary_when_the_write_fails(tmp_path):
    from edgekit.fileio import atomic_target, write_bytes_atomic

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_target(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not list(tmp_path.iterdir())
    data = np.random.default_rng().bytes(64)
    assert write_bytes_atomic(tmp_path / "a.bin", data).read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_conv_output_grids_are_observed_through_the_fake_quantized_model(net):
    """calibrate_conv_outputs adds a grid to each Conv2d without one, from the outputs the
    spec's own QDQ model produces (recorded here by plain hooks on apply_fake_quant)."""
    from edgekit.calibration.ptq import calibrate_conv_outputs

    batches = [torch.randn(2, 3, 12, 12) * 3 for _ in range(2)]
    spec = calibrate(net, batches, weight_bits=4, act_bits=4, progress=False, conv_outputs=False)
    assert not any("output" in layer for layer in spec["layers"].values())
    out = calibrate_conv_outputs(net, spec, batches, observer="minmax", bits=8)
    assert not any("output" in layer for layer in spec["layers"].values())  # the input spec is untouched
    assert {p for p, layer in out["layers"].items() if "output" in layer} == {"conv1", "conv2", "fc"}
    qmodel = apply_fake_quant(net, spec)
    seen = {}
    modules = dict(qmodel.named_modules())
    hooks = [modules[p].register_forward_hook(lambda m, a, o, p=p: seen.setdefault(p, []).append(o.detach().clone()))
             for p in ("conv1", "conv2", "fc")]
    with torch.no_grad():
        for b in batches:
            qmodel(b)
    for h in hooks:
        h.remove()
    for path in ("conv1", "conv2", "fc"):
        y, a = torch.cat([t.flatten() for t in seen[path]]).double(), out["layers"][path]["output"]
        qmin, qmax = qrange(8, a["signed"])
        lo, hi = min(y.min().item(), 0.0), max(y.max().item(), 0.0)
        assert a["bits"] == 8 and a["signed"] == bool(y.min() < 0)
        assert a["scale"] == pytest.approx((hi - lo) / (qmax - qmin), rel=1e-6)
    assert validate_spec(out) is out
    with pytest.raises(EdgekitError, match="got no batches"):
        calibrate_conv_outputs(net, spec, [])


def test_observed_input_grids_are_the_ones_calibrate_writes(net):
    """observe_input_grids replaces a spec's input grids (e.g. a bit search's) with what PTQ's
    own calibration observes on the float model, at each grid's width; weights stay."""
    from edgekit.calibration.ptq import observe_input_grids

    batches = [torch.randn(2, 3, 12, 12) * 3 for _ in range(3)]
    reference = calibrate(net, batches, observer="percentile", act_bits=8, progress=False, conv_outputs=False)
    narrow = calibrate(net, batches, observer="percentile", act_bits=5, progress=False, conv_outputs=False)
    searched = json.loads(json.dumps(reference))
    for layer in searched["layers"].values():  # wider grids, as brevitas's calibration gave
        layer["input"]["scale"] *= 1.5
    searched["layers"]["conv2"]["input"]["bits"] = 5
    out = observe_input_grids(net, searched, batches)
    for path, layer in out["layers"].items():
        expected = (narrow if path == "conv2" else reference)["layers"][path]["input"]
        assert layer["input"] == pytest.approx(expected)
        assert layer["weight"] == searched["layers"][path]["weight"]
    assert searched["layers"]["conv1"]["input"]["scale"] == pytest.approx(
        1.5 * reference["layers"]["conv1"]["input"]["scale"])  # the given spec is untouched
    with pytest.raises(EdgekitError, match="got no batches"):
        observe_input_grids(net, searched, [])
