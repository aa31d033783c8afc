"""Roofline predictor and device table: layer counts against torch's flop counter, bytes at
bit widths, the max(compute, memory) + launch rule on a made-up device, and the table's
rule that every figure is cited or unknown."""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from edgekit.benchmarks import devices as D
from edgekit.benchmarks.roofline import LayerCost, predict, predict_all, profile_layers
from edgekit.errors import EdgekitError
from edgekit.models.deform import DeformConv2dPack


def random_net(g: torch.Generator):
    def r(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))
    groups = r(1, 3)
    c1 = 2 * groups * r(1, 4)
    net = nn.Sequential(nn.Conv2d(3, c1, r(1, 4), stride=r(1, 3), padding=1), nn.ReLU(),
                        nn.Conv2d(c1, c1, 3, padding=1, groups=groups, bias=False), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(4 * c1, r(1, 9)))
    return net, torch.randn(r(1, 3), 3, r(8, 20), r(8, 20), generator=g)


def test_conv_and_linear_flops_match_torch_flop_counter(fresh_torch_seed):
    g = torch.Generator().manual_seed(fresh_torch_seed)
    net, x = random_net(g)
    costs = profile_layers(net, x)
    with FlopCounterMode(display=False) as counter:
        net(x)
    ours = sum(c.flops for c in costs if c.type in ("Conv2d", "Linear"))
    assert ours == counter.get_total_flops()
    assert sum(c.macs for c in costs) * 2 == ours
    # element counts: weights owned by each layer, inputs and outputs of the real forward
    conv1 = next(c for c in costs if c.name == "0")
    assert conv1.weight_numel == sum(p.numel() for p in net[0].parameters())
    assert conv1.in_numel == x.numel() and conv1.out_numel == net[0](x).numel()


def test_deformable_conv_counts_gemm_and_sampling():
    layer = DeformConv2dPack(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 7, 9)
    costs = {c.name: c for c in profile_layers(nn.Sequential(layer), x)}
    dcn, offset_conv = costs["0"], costs["0.conv_offset"]
    gemm_macs = 2 * 6 * 7 * 9 * 4 * 9  # N * Cout * H * W * Cin * k*k
    assert dcn.type == "DeformConv2dPack" and dcn.macs == gemm_macs
    # the profiler's count: 4 multiply-adds (+1 for the mask) per sampled value, 2 FLOPs each
    assert dcn.flops == 2 * gemm_macs + 2 * (4 + 1) * 2 * 7 * 9 * 9 * 4
    from edgekit.calibration.profiler import measure_layers

    one = measure_layers(nn.Sequential(layer), (7, 9), in_channels=4)  # the single source, at batch 1
    assert dcn.macs == 2 * one["0"][2] and dcn.flops == 2 * 2 * (one["0"][2] + one["0"][3])
    assert offset_conv.macs == 2 * 27 * 7 * 9 * 4 * 9
    assert dcn.weight_numel == layer.weight.numel() + layer.bias.numel()  # its own, not conv_offset's


def test_bytes_follow_bit_widths():
    c = LayerCost("l", "Conv2d", macs=10, flops=20, weight_numel=1000, in_numel=300, out_numel=500)
    assert c.bytes_moved("fp32") == 4 * (1000 + 300 + 500)
    assert c.bytes_moved("fp16") == 2 * (1000 + 300 + 500)
    q = LayerCost("l", "Conv2d", 10, 20, 1000, 300, 500, w_bits=4, a_bits=8)
    assert q.bytes_moved("fp32") == 1000 * 0.5 + 300 + 500 * 4
    assert q.bops() == 10 * 4 * 8 and c.bops() == 10 * 32 * 32


def test_spec_bits_reach_the_profile():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    spec = {"layers": {"0": {"type": "Conv2d", "weight": {"bits": 4}, "input": {"bits": 6}}}}
    c = profile_layers(net, torch.randn(1, 3, 8, 8), spec)
    assert (c[0].w_bits, c[0].a_bits) == (4, 6) and (c[1].w_bits, c[1].a_bits) == (None, None)


def made_up_device(**kw):
    base = dict(key="toy", name="toy", kind="gpu", fp32_tflops=1e-6, fp16_tflops=None, int8_tops=4e-6,
                bandwidth_gbs=1.0, launch_us=2.0)
    return D.Device(**{**base, **kw})


def test_roofline_rule_on_a_made_up_device():
    dev = made_up_device()  # 1 MFLOP/s, 4 MOP/s int8, 1 GB/s, 2 us per layer
    compute = LayerCost("c", "Conv2d", 500, 1000, 1, 1, 1)             # 1 ms of compute, 12 ns of memory
    memory = LayerCost("m", "GELU", 0, 1, 0, 250_000, 250_000)          # 2 ms of memory, 1 us of compute
    quant = LayerCost("q", "Conv2d", 500, 1000, 1, 1, 1, w_bits=8, a_bits=8)
    r = predict([compute, memory, quant], dev, "fp32")
    assert r["label"] == "predicted"
    t = {l["name"]: l for l in r["layers"]}
    assert t["c"]["bound"] == "compute" and t["c"]["time_us"] == pytest.approx(1000 + 2)
    assert t["m"]["bound"] == "memory" and t["m"]["time_us"] == pytest.approx(2000 + 2)
    assert t["q"]["precision"] == "int8" and t["q"]["time_us"] == pytest.approx(250 + 2)
    assert r["total_ms"] == pytest.approx((1002 + 2002 + 252) / 1e3)
    with pytest.raises(EdgekitError, match="fp16"):
        predict([compute], dev, "fp16")
    with pytest.raises(EdgekitError, match="bandwidth"):
        predict([compute], made_up_device(bandwidth_gbs=None), "fp32")
    rows = predict_all([compute], [dev], ("fp32", "fp16"))
    assert rows[0]["total_ms"] is not None and rows[1]["total_ms"] is None and "fp16" in rows[1]["reason"]


def test_every_device_figure_is_cited_or_unknown():
    assert {"orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "xavier-nx", "rtx-4090", "a100-sxm-80gb",
            "h100-sxm"} <= set(D.DEVICES)
    for d in D.DEVICES.values():
        assert d.sources and all(s.url.startswith("http") and s.document for s in d.sources), d.key
        for v in (d.fp32_tflops, d.fp16_tflops, d.int8_tops, d.bandwidth_gbs):
            assert v is None or (math.isfinite(v) and v > 0), d.key
        assert d.launch_us > 0
    with pytest.raises(EdgekitError):
        D.get_device("no-such-board")
    table = D.device_table_markdown(D.DEVICES.values())
    assert table.count("\n") == len(D.DEVICES) + 1 and "?" in table  # unknown figures shown, not invented


def test_ci_cpu_profile_is_derived_from_this_machine():
    d = D.ci_cpu(threads=2, measure=False)
    ghz = D.cpu_clock_ghz()
    if ghz and D.cpu_has_avx2_fma():
        assert d.fp32_tflops == pytest.approx(2 * ghz * 32 / 1e3)
    else:
        assert d.fp32_tflops is None
    assert d.bandwidth_gbs is None and d.int8_tops is None
    assert D.copy_bandwidth_gbs(megabytes=8, repeats=2) > 0


def test_measured_layer_times_are_exclusive_of_children(monkeypatch):
    """A fake clock that only the layers advance: exact times, immune to machine load."""
    import time

    from edgekit.benchmarks.roofline import measure_layers
    from edgekit.models.deform import DeformConv2d

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    class Tick(nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            now[0] += self.seconds
            return x

    class Outer(DeformConv2d):  # a hooked non-leaf, like DeformConv2dPack around its offset conv
        def __init__(self):
            super().__init__(1, 1, 1)
            self.slow = Tick(0.05)

        def forward(self, x):
            now[0] += 0.005
            return self.slow(x)

    t = measure_layers(nn.Sequential(Outer(), Tick(0.01)), torch.zeros(1, 1, 2, 2), repeats=1)
    assert set(t) == {"0", "0.slow", "1"}
    assert t["0.slow"] == pytest.approx(50_000) and t["1"] == pytest.approx(10_000)
    assert t["0"] == pytest.approx(5_000)  # its own 5 ms, not its child's 50 ms


def test_validation_report_groups_by_layer_type():
    from edgekit.benchmarks.roofline import validate_on_cpu, validation_markdown

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 1))
    dev = made_up_device(kind="cpu", fp32_tflops=1e-3, bandwidth_gbs=10.0)
    v = validate_on_cpu(net, torch.randn(1, 3, 16, 16), measured_ms=1.0, device=dev, repeats=2)
    assert v["by_layer_type"]["Conv2d"]["layers"] == 2 and v["by_layer_type"]["GELU"]["layers"] == 1
    total = sum(t["predicted_ms"] for t in v["by_layer_type"].values())
    assert total == pytest.approx(v["predicted"]["total_ms"])
    assert v["measured_over_predicted"] == pytest.approx(1.0 / v["predicted"]["total_ms"])
    md = validation_markdown(v, {"cpu": "x", "cores": 2})
    assert "| Conv2d | 2 |" in md and "Predicted" in md
    # The attained ceiling (here made up: half the peak) slows compute-bound layers only.
    half = validate_on_cpu(net, torch.randn(1, 3, 16, 16), measured_ms=1.0, device=dev, repeats=2,
                           gemm_tflops=0.5e-3)
    att = half["predicted_attained"]
    assert att["gemm_tflops"] == 0.5e-3 and "attained compute ceiling" in validation_markdown(half, {})
    slower = sum(t["predicted_attained_ms"] for t in half["by_layer_type"].values())
    assert slower == pytest.approx(att["total_ms"]) and v["predicted"]["total_ms"] < att["total_ms"]
    assert att["total_ms"] <= 2 * v["predicted"]["total_ms"] + 1e-9


def test_gemm_rate_is_measured_and_plausible():
    rate = D.gemm_tflops(n=256, repeats=2)
    assert 1e-4 < rate < 100  # TFLOP/s: any CPU or GPU host runs a 256^3 matmul in between


def test_cuda_names_match_table_entries():
    assert D.match_gpu("NVIDIA H100 80GB HBM3").key == "h100-sxm"
    assert D.match_gpu("NVIDIA GeForce RTX 4090").key == "rtx-4090"
    assert D.match_gpu("NVIDIA A100-SXM4-80GB").key == "a100-sxm-80gb"
    assert D.match_gpu("Tesla T4") is None
