"""quantize(): which layers change and how many bits they get, the fake-quantized maths
against an independent QuantizeLinear/DequantizeLinear reference, QAT gradients, the
quant spec, and rebuilding from checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.calibration.quantize import (QuantConfig, calibrate_activations, load_float_weights, load_quantized,
                                          quant_spec_from_model, quantizable_layer_types, quantizable_layers, quantize,
                                          quantized_layer_types, save_quantized)
from edgekit.calibration.spec import fake_quantize, validate_spec
from edgekit.errors import EdgekitError
from edgekit.models import GRN, DeformConv2dPack, deform_conv2d_reference
from edgekit.models.layers import LayerNorm


class Toy(nn.Module):
    """stem conv -> LayerNorm -> Linear (NHWC) -> GELU -> GRN -> Linear -> DCNv2 (+ residual) -> head conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = LayerNorm(8)
        self.fc1, self.grn, self.fc2 = nn.Linear(8, 16), GRN(16, backend="torch"), nn.Linear(16, 8)
        self.dcn = DeformConv2dPack(8, 8, 3, padding=1, backend="torch")
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(self.grn(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))).permute(0, 3, 1, 2)
        return self.head(self.dcn(y) + x)


def toy():
    model = Toy()
    with torch.no_grad():  # non-zero offsets, so the DCN really deforms
        model.dcn.conv_offset.weight.normal_(0, 0.05)
        model.grn.gamma.normal_(0, 0.5)
    return model


def test_layers_replaced_paths_kept_and_higher_precision_parts_float(fresh_torch_seed):
    float_model = toy()
    q = quantize(toy(), QuantConfig(weight_bits=4, act_bits=6))
    qtypes = quantized_layer_types()
    assert {p for p, m in q.named_modules() if isinstance(m, qtypes)} == {"stem", "fc1", "fc2", "dcn", "head"}
    assert type(q.dcn.conv_offset) is nn.Conv2d and type(q.grn) is GRN and type(q.norm) is LayerNorm
    assert [p for p, _ in q.named_modules() if "_quant" not in p] == [p for p, _ in float_model.named_modules()]
    load_float_weights(q, float_model.state_dict())
    assert torch.equal(q.fc1.weight, float_model.fc1.weight)
    bits = {p: (int(m.weight_quant.bit_width()), int(m.input_quant.bit_width()))
            for p, m in q.named_modules() if isinstance(m, qtypes)}
    assert bits == {"stem": (8, 8), "fc1": (4, 6), "fc2": (4, 6), "dcn": (4, 6), "head": (8, 8)}  # first/last at 8
    q2 = quantize(toy(), QuantConfig(weight_bits={"fc1": 3}, act_bits=5, default_bits=7, first_layer_bits=None,
                                     last_layer_bits=None, quantize_offset_branch=True, skip=("head",)))
    assert isinstance(q2.dcn.conv_offset, qtypes) and type(q2.head) is nn.Conv2d
    assert int(q2.fc1.weight_quant.bit_width()) == 3 and int(q2.stem.weight_quant.bit_width()) == 7
    with pytest.raises(EdgekitError, match="unexpected"):
        load_float_weights(q, {**float_model.state_dict(), "extra.weight": torch.zeros(1)})
    with pytest.raises(EdgekitError, match="already quantized"):
        quantize(q)


def test_tied_activation_bits_follow_the_producing_layer():
    q = quantize(toy(), QuantConfig(weight_bits={"fc1": 3, "fc2": 5, "dcn": 2}, act_bits="tied",
                                    first_layer_bits=8, last_layer_bits=None))
    act = q.quant_config.act_bits
    # fc1 <- stem (through LayerNorm); fc2 <- fc1 (through GELU, GRN); dcn <- fc2;
    # head <- dcn + stem (residual): the wider of the two.
    assert act["stem"] == 8 and act["fc1"] == 8 and act["fc2"] == 3 and act["dcn"] == 5 and act["head"] == 8
    assert q.quant_config.weight_bits["head"] == 8  # default_bits, not in the dict
    q = quantize(toy(), QuantConfig(weight_bits={"stem": 6, "dcn": 2}, act_bits="tied", first_layer_bits=None,
                                    last_layer_bits=None, default_bits=4))
    assert q.quant_config.act_bits["head"] == 6 and q.quant_config.act_bits["stem"] == 6  # input: own bits


def test_fake_quant_matches_an_independent_qdq_reference(fresh_torch_seed):
    q = quantize(toy(), QuantConfig(weight_bits=3, act_bits=5, first_layer_bits=None, last_layer_bits=None))
    x = torch.randn(2, 3, 10, 12)
    with pytest.raises(EdgekitError, match="calibrate_activations"):
        quant_spec_from_model(q)
    calibrate_activations(q, [x, torch.randn(2, 3, 10, 12)])
    spec = validate_spec(quant_spec_from_model(q, "toy", source="uniform", observer="percentile"))
    assert spec["layers"]["dcn"]["type"] == "DeformConv2d" and spec["layers"]["fc1"]["type"] == "Linear"
    assert "dcn.conv_offset" not in spec["layers"]
    q.eval()

    def qdq_input(t, entry):
        a = entry["input"]
        return fake_quantize(t, a["scale"], a["zero_point"], a["bits"], a["signed"])

    def qdq_weight(w, entry):
        e = entry["weight"]
        return fake_quantize(w, e["scale"], e["zero_point"], e["bits"], True, axis=0, narrow=True)

    with torch.no_grad():
        layers = spec["layers"]
        h = F.conv2d(qdq_input(x, layers["stem"]), qdq_weight(q.stem.weight, layers["stem"]), q.stem.bias, padding=1)
        torch.testing.assert_close(q.stem(x), h, rtol=1e-5, atol=1e-5)
        t = q.norm(h.permute(0, 2, 3, 1))
        ref = F.linear(qdq_input(t, layers["fc1"]), qdq_weight(q.fc1.weight, layers["fc1"]), q.fc1.bias)
        torch.testing.assert_close(q.fc1(t), ref, rtol=1e-5, atol=1e-5)
        offset = q.dcn.conv_offset(h)  # the offset branch sees the float input
        o1, o2, m = offset.chunk(3, dim=1)
        ref = deform_conv2d_reference(qdq_input(h, layers["dcn"]), torch.cat((o1, o2), 1),
                                      qdq_weight(q.dcn.weight, layers["dcn"]), q.dcn.bias, padding=(1, 1),
                                      mask=torch.sigmoid(m))
        torch.testing.assert_close(q.dcn(h), ref, rtol=1e-5, atol=1e-5)
        w = spec["layers"]["fc2"]["weight"]
        assert len(w["scale"]) == 8 and w["bits"] == 3 and w["zero_point"] == [0] * 8
        assert spec["layers"]["fc2"]["input"]["bits"] == 5


def test_qat_trains_weights_and_scales(fresh_torch_seed):
    q = quantize(toy(), QuantConfig(weight_bits=4, act_bits=4))
    x = torch.randn(4, 3, 8, 8)
    calibrate_activations(q, [x])
    q.train()
    scales = {n: p for n, p in q.named_parameters() if "scaling_impl.value" in n}
    assert any(n.startswith("dcn.weight_quant") for n in scales)
    assert any(n.startswith("fc1.input_quant") for n in scales)
    before = {n: p.detach().clone() for n, p in scales.items()}
    opt = torch.optim.SGD(q.parameters(), lr=1e-2)
    loss = q(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in q.parameters())
    assert all(scales[n].grad.abs().sum() > 0 for n in ("fc1.input_quant.fused_activation_quant_proxy.tensor_quant."
                                                         "scaling_impl.value", "fc2.weight_quant.tensor_quant."
                                                         "scaling_impl.value"))
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in scales.items())


def test_config_json_and_errors(tmp_path):
    config = QuantConfig(weight_bits={"a.b": 3}, act_bits="tied", skip=("x.*",))
    assert QuantConfig.load(config.save(tmp_path / "q.json")) == config
    for bad in (dict(weight_bits=9), dict(act_bits="loose"), dict(weight_bits={"a": 1}), dict(first_layer_bits=True)):
        with pytest.raises(EdgekitError, match="quant config"):
            QuantConfig(**bad)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "edgekit.quant-config/1", "bitz": 4}))
    with pytest.raises(EdgekitError, match="unknown keys"):
        QuantConfig.load(tmp_path / "bad.json")
    with pytest.raises(EdgekitError, match="does not have"):
        quantize(toy(), QuantConfig(weight_bits={"nope": 4}))


def test_save_and_load_round_trip_keeps_learned_scales(tmp_path, fresh_torch_seed):
    from edgekit.models import register_model

    register_model("test_quantize_toy")(toy)
    q = quantize(toy(), QuantConfig(weight_bits=3, act_bits="tied"))
    x = torch.randn(2, 3, 8, 8)
    calibrate_activations(q, [x])
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    q(x).pow(2).mean().backward()
    opt.step()  # scales move away from their statistics-based start
    q.eval()
    path = save_quantized(tmp_path / "q.safetensors", q, "test_quantize_toy", {})
    again, info = load_quantized(path)
    assert info["model"] == "test_quantize_toy" and again.quant_config == q.quant_config
    with torch.no_grad():
        torch.testing.assert_close(again(x), q(x), rtol=0, atol=0)
    assert quant_spec_from_model(again) == quant_spec_from_model(q)


def run_cli(capsys, *argv):
    from edgekit.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_command_on_the_detector_and_reload(capsys, tmp_path, fresh_torch_seed):
    """edgekit quantize (budgeted, tied activations) writes a consistent set of artefacts."""
    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.models import create_model

    kwargs = {"num_classes": 5}
    float_model = create_model("rsdet_atto", **kwargs)
    ckpt = save_checkpoint(tmp_path / "f.safetensors", float_model, "rsdet_atto", kwargs, {"image_size": 64})
    out = tmp_path / "q"
    code, text, err = run_cli(capsys, "quantize", str(ckpt), "--method", "budget", "--budget-mb", "1.6",
                              "--act-bits-mode", "fixed", "--act-bits", "6", "--calib-batches", "1", "--out", str(out),
                              "--quiet")
    assert code == 0, err
    assert "bit search took" in text
    record = json.loads((out / "search.json").read_text())
    assert record["totals"]["size_bytes"] <= 1.6e6 and record["search"]["seconds"] > 0
    spec = validate_spec(json.loads((out / "quant_spec.json").read_text()))
    assert spec["source"] == "budget" and spec["layers"]["head.cls_tower.1.conv"]["type"] == "DeformConv2d"
    assert spec["layers"]["backbone.downsample_layers.0.0"]["weight"]["bits"] == 8       # first layer policy
    # Every conv and linear (a 1x1 conv in the deploy form) gets an 8-bit output grid
    # (ONNX Runtime's integer convs need it); the deformable layers none.
    assert {p for p, e in spec["layers"].items() if e.get("output")} == \
        {p for p, e in spec["layers"].items() if e["type"] in ("Conv2d", "Linear")}
    assert {e["output"]["bits"] for e in spec["layers"].values() if e.get("output")} == {8}
    # ... and the quantized checkpoint carries them to export (edgekit export without --calibration).
    from edgekit.calibration.quantize import export_view

    _, _, own = export_view(out / "quantized.safetensors")
    for key in ("input", "output"):  # input grids too: without QAT they are edgekit's observer's, not brevitas's
        assert {p: e.get(key) for p, e in own["layers"].items()} == {p: e.get(key) for p, e in spec["layers"].items()}
    assert {e["input"]["bits"] for p, e in spec["layers"].items() if not p.startswith(("head.c", "head.box",
                                                                                        "backbone.down"))} == {6}
    assert json.loads((out / "profile.json").read_text())["totals"] == record["totals"]
    config = QuantConfig.load(out / "qconfig.json")
    assert config.resolved and config.weight_bits["head.cls_out"] == 8
    qmodel, info = load_quantized(out / "quantized.safetensors")
    assert info["image_size"] == 64 and qmodel.quant_config == config
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.isfinite(t).all() for level in qmodel(x) for t in level)
    # A float checkpoint plus the config JSON rebuilds the same quantized layers.
    rebuilt, _ = load_quantized(ckpt, out / "qconfig.json")
    assert rebuilt.quant_config == config
    assert torch.equal(rebuilt.backbone.stages[0][0].pwconv1.weight, float_model.backbone.stages[0][0].pwconv1.weight)
    with pytest.raises(EdgekitError, match="float checkpoint"):
        load_quantized(ckpt)
    code, text, _ = run_cli(capsys, "profile", str(out / "quantized.safetensors"), "--json", str(tmp_path / "p.json"))
    assert code == 0 and "GBOPs" in text
    assert json.loads((tmp_path / "p.json").read_text())["totals"]["bops"] == record["totals"]["bops"]


@pytest.mark.slow
def test_sensitivity_method_on_a_classifier(capsys, tmp_path):
    """Classifier path: Fisher sensitivities on its own predictions, a size budget."""
    out = tmp_path / "s"
    code, text, err = run_cli(capsys, "quantize", "convnextv2_atto", "--method", "sensitivity", "--sens-method",
                              "fisher", "--budget-mb", "3.5", "--image-size", "32", "--calib-batches", "1",
                              "--sens-batches", "1", "--out", str(out), "--quiet")
    assert code == 0, err
    record = json.loads((out / "search.json").read_text())
    sens = record["search"]["sensitivity"]
    assert set(sens) == set(record["search"]["weight_bits"]) | set(record["search"]["fixed_bits"])
    assert all(v >= 0 for v in sens.values()) and sum(v > 0 for v in sens.values()) > len(sens) // 2
    assert record["totals"]["size_bytes"] <= 3.5e6
    assert set(record["search"]["fixed_bits"]) == {"downsample_layers.0.0", "head"}


@pytest.mark.slow
def test_quantize_command_with_qat(capsys, tiny_run, tiny_data, tmp_path):
    """--qat-epochs hands the quantized model to calibration.qat and exports its trained scales."""
    result, _ = tiny_run
    out = tmp_path / "qat"
    code, _, err = run_cli(capsys, "quantize", str(result.checkpoint), "--method", "uniform", "--weight-bits", "4",
                           "--calib-batches", "1", "--qat-epochs", "1", "--qat-data", str(tiny_data),
                           "--out", str(out), "--quiet")
    assert code == 0, err
    record = json.loads((out / "search.json").read_text())
    assert record["qat"]["history"] and (out / "qat" / "qat.json").is_file()
    spec = validate_spec(json.loads((out / "quant_spec.json").read_text()))
    assert spec["source"] == "qat" and spec["layers"]["backbone.stages.0.0.pwconv1"]["weight"]["bits"] == 4
    qmodel, _ = load_quantized(out / "quantized.safetensors")
    assert quant_spec_from_model(qmodel, spec["model"], source="qat") == spec


def assert_one_line_error(code, err, needle):
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("argv, needle", [
    (["quantize", "rsdet_atto", "--method", "budget", "--out", "X"], "needs exactly one of --budget-bops"),
    (["quantize", "rsdet_atto", "--method", "ghost", "--budget-mb", "1", "--out", "X"],
     "--budget-mb applies to --method budget | sensitivity, not --method ghost"),
    (["quantize", "rsdet_atto", "--method", "ghost", "--bit-widths", "1,4", "--out", "X"],
     "--bit-widths must be bit widths in [2, 8], got [1, 4]"),
    (["quantize", "rsdet_atto", "--method", "ghost", "--bit-widths", "a", "--out", "X"], "must be a comma list of integers"),
    (["quantize", "rsdet_atto", "--method", "ghost", "--weight-bits", "4", "--out", "X"],
     "--weight-bits applies to --method uniform, not --method ghost"),
    (["quantize", "rsdet_atto", "--method", "uniform", "--threshold", "0.1", "--out", "X"],
     "--threshold applies to --method ghost"),
    (["quantize", "rsdet_atto", "--method", "uniform", "--bit-widths", "2,4", "--out", "X"], "--bit-widths applies to"),
    (["quantize", "rsdet_atto", "--method", "ghost", "--sens-probes", "2", "--out", "X"],
     "--sens-probes applies to --method sensitivity"),
    (["quantize", "rsdet_atto", "--method", "ghost", "--act-bits-mode", "tied", "--act-bits", "6", "--out", "X"],
     "--act-bits applies to --act-bits-mode fixed"),
    (["quantize", "rsdet_atto", "--method", "uniform", "--qat-epochs", "2", "--out", "X"], "needs --qat-data"),
    (["quantize", "rsdet_atto", "--method", "uniform", "--qat-data", "d", "--out", "X"], "apply only with --qat-epochs"),
    (["quantize", "rsdet_atto", "--method", "sensitivity", "--budget-mb", "2", "--sens-confidence", "-1", "--out",
      "X"], "--sens-confidence must be >= 0"),
    (["quantize", "missing.safetensors", "--method", "uniform", "--out", "X"], "not found"),
    (["quantize", "no_such_model", "--method", "uniform", "--out", "X"], "neither a checkpoint file nor a model name"),
    (["quantize", "rsdet_atto", "--method", "budget", "--budget-bops", "0.001", "--image-size", "64", "--out", "X"],
     "smallest achievable is"),
    (["profile", "rsdet_atto", "--spec", "nope.json"], "not found"),
    (["profile", "rsdet_atto", "--image-size", "8"], "--image-size must be a multiple of 32"),
    (["calibrate", "rsdet_atto", "--data", "X", "--observer", "bogus"], "--observer must be minmax"),
])
def test_cli_bad_input_is_one_line(capsys, tmp_path, argv, needle):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


def test_quantizable_layers_the_one_selection_for_ptq_and_quantize(fresh_torch_seed):
    model = nn.Sequential(toy(), nn.Conv2d(2, 2, 1))
    model.conv_offset = nn.Conv2d(2, 2, 1)  # named like an offset branch but not one: still quantized
    expected = {"0.stem": "Conv2d", "0.fc1": "Linear", "0.fc2": "Linear", "0.dcn": "DeformConv2d",
                "0.head": "Conv2d", "1": "Conv2d", "conv_offset": "Conv2d"}
    assert quantizable_layer_types(model) == expected
    layers = quantizable_layers(model)
    assert list(layers) == list(expected) and layers["0.dcn"] is model[0].dcn
    with_offsets = quantizable_layer_types(model, QuantConfig(quantize_offset_branch=True))
    assert with_offsets == {**expected, "0.dcn.conv_offset": "Conv2d"}
    # PTQ's selection: its exclude patterns are skip patterns over every layer, offsets included
    assert quantizable_layer_types(model, QuantConfig(skip=("*conv_offset",), quantize_offset_branch=True)) == \
        {p: k for p, k in expected.items() if p != "conv_offset"}
    assert quantizable_layer_types(model, QuantConfig(skip=("0.*",))) == {"1": "Conv2d", "conv_offset": "Conv2d"}
    assert quantizable_layer_types(model, layers=["1", "0.dcn.conv_offset"]) == {"1": "Conv2d",
                                                                                 "0.dcn.conv_offset": "Conv2d"}
    with pytest.raises(EdgekitError, match="0.norm are not Conv2d/Linear/DeformConv2d"):
        quantizable_layers(model, layers=["0.norm"])


def test_the_cluster_method_picks_bits_from_the_weights_cluster_count(fresh_torch_seed):
    """quantize_model with method cluster: a layer whose weights sit on 4 well-separated
    values gets 2 bits, one on 12 values gets 4 bits (ceil(log2 12)); no threshold is set."""
    from edgekit.calibration.pipeline import QuantizeRecipe, quantize_model

    model = toy().eval()
    rng = np.random.default_rng(fresh_torch_seed)
    with torch.no_grad():
        for layer, k in (("fc1", 4), ("dcn", 12)):
            w = getattr(model, layer).weight
            centres = np.arange(k) * 1.0
            values = rng.choice(centres, size=w.numel()) + rng.normal(0, 0.01, w.numel())
            w.copy_(torch.tensor(values, dtype=w.dtype).reshape(w.shape))
    recipe = QuantizeRecipe(method="cluster", calib_batches=1, progress=False)
    result = quantize_model(model, recipe, lambda n: [(torch.randn(2, 3, 32, 32), None)] * n, model_name="toy",
                            image_size=32)
    assert result.search.method == "cluster" and result.search.metric == "silhouette"
    assert result.search.clusters["fc1"] == 4 and result.search.weight_bits["fc1"] == 2
    assert result.search.clusters["dcn"] == 12 and result.search.weight_bits["dcn"] == 4
    assert result.spec["source"] == "cluster"
    with pytest.raises(EdgekitError, match="--cluster-index applies to --method cluster"):
        QuantizeRecipe(method="ghost", cluster_index="silhouette")
    with pytest.raises(EdgekitError, match="--metric applies to --method ghost | budget | sensitivity"):
        QuantizeRecipe(method="cluster", metric="kmeans")
