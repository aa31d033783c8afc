"""Profiler: MACs by hand for known layers, a ConvNeXt V2 atto total against torch's own
FLOP counter, BOPs and packed sizes from every kind of bit table."""

import json
import math

import pytest
import torch
import torch.nn as nn

from edgekit.calibration.profiler import profile_model
from edgekit.errors import EdgekitError
from edgekit.models import DeformConv2d, DeformConv2dPack


class Known(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)        # 16x16 -> 8x8
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
        self.dcn = DeformConv2dPack(8, 12, 3, padding=1, groups=2, modulated=True)
        self.plain = DeformConv2d(12, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.dcn(self.dw(self.stem(x)))
        off = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        x = self.plain(x, off)                                   # DCNv1: no mask
        return self.fc(x.permute(0, 2, 3, 1))                    # Linear on NHWC


def test_macs_by_hand_and_bops_and_packed_bytes():
    model = Known()
    bits = {"stem": 8, "dw": [3, 5], "dcn": 4, "fc": (2, 6)}
    report = profile_model(model, 16, bits)
    rows = {layer.path: layer for layer in report.layers}
    px = 8 * 8
    assert rows["stem"].macs == px * 8 * 3 * 9
    assert rows["dw"].macs == px * 8 * 1 * 25
    assert rows["dcn.conv_offset"].macs == px * 27 * 8 * 9
    assert rows["dcn"].macs == px * 12 * 4 * 9
    assert rows["dcn"].sampling_macs == 8 * 9 * px * 5           # bilinear 4 + mask 1 per sample
    assert rows["plain"].macs == px * 4 * 12 and rows["plain"].sampling_macs == 12 * px * 4
    assert rows["fc"].macs == px * 10 * 4
    assert (rows["dw"].weight_bits, rows["dw"].act_bits) == (3, 5)
    assert rows["dcn.conv_offset"].weight_bits == 32              # not in the table: float
    assert rows["fc"].bops == rows["fc"].macs * 2 * 6
    assert rows["dw"].weight_bytes == math.ceil(8 * 25 * 3 / 8)
    totals = report.totals
    assert totals["bops"] == sum(r.macs * r.weight_bits * r.act_bits for r in rows.values())
    others = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("weight"))  # biases

    assert totals["size_bytes"] == sum(r.weight_bytes for r in rows.values()) + 4 * others
    data = json.loads(report.to_json())
    assert data["totals"]["macs"] == totals["macs"] and len(data["layers"]) == 6
    table = report.to_table()
    assert "dcn.conv_offset" in table and "GBOPs" in table


def test_convnextv2_atto_total_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from edgekit.models import create_model

    model = create_model("convnextv2_atto").eval()
    size = 64 + 32 * int(torch.randint(0, 3, ()))
    report = profile_model(model, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert report.totals["macs"] == counter.get_total_flops() // 2
    assert report.totals["params"] == sum(p.numel() for p in model.parameters())
    assert report.totals["size_bytes"] == 4 * report.totals["params"]     # all float


def test_shared_head_counts_every_call_and_spec_bits(tmp_path):
    from edgekit.models import create_model

    model = create_model("rsdet_atto", num_classes=3)
    report = profile_model(model, 64)
    rows = {layer.path: layer for layer in report.layers}
    # cls_out runs on the 8x8, 4x4 and 2x2 maps of a 64x64 image.
    assert rows["head.cls_out"].macs == (64 + 16 + 4) * rows["head.cls_out"].params
    spec = {"format": "edgekit.quant-spec/1", "model": None, "source": "uniform",
            "layers": {"head.cls_out": {"type": "Conv2d", "weight": {"bits": 4, "signed": True, "axis": 0,
                                                                      "scale": [0.1] * 3, "zero_point": [0] * 3},
                                        "input": None}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    rows = {layer.path: layer for layer in profile_model(model, 64, str(path)).layers}
    assert (rows["head.cls_out"].weight_bits, rows["head.cls_out"].act_bits) == (4, 32)
    with pytest.raises(EdgekitError, match="do not run in the model"):
        profile_model(model, 64, {"nope.conv": 4})
    with pytest.raises(EdgekitError, match="image size"):
        profile_model(model, 0)


@pytest.mark.parametrize("damage, needle", [
    (lambda layer: layer.pop("weight"), "'weight' must be an object"),
    (lambda layer: layer["weight"].update(bits=12), "weight: bits"),
    (lambda layer: layer.update(input={"bits": 8}), "input: signed"),
])
def test_profile_command_with_a_broken_spec_is_one_line(tmp_path, capsys, damage, needle):
    from edgekit.cli import main

    layer = {"type": "Conv2d", "weight": {"bits": 4, "signed": True, "axis": 0, "scale": [0.1] * 8,
                                          "zero_point": [0] * 8}, "input": None}
    damage(layer)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"format": "edgekit.quant-spec/1", "model": None, "source": "uniform",
                                "layers": {"stem.0": layer}}))
    code = main(["profile", "convnextv2_atto", "--image-size", "32", "--spec", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and str(path) in err and "'stem.0'" in err and len(err.splitlines()) == 1
