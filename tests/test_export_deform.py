"""Deformable convolution through export: both torch-side implementations against the
float64 reference, and both ONNX graphs (native DeformConv, decomposed GridSample + Conv)
in ONNX Runtime against it, on random cases (groups, offset groups, stride, dilation,
mask, samples on and off the borders) at batch 1 and 3 from one dynamic-batch file.

One graph holds a whole bank of random layers, so each mode costs one export.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx.reference import ReferenceEvaluator

from deform_cases import describe, fresh_seed, random_deform_case, run_case
from edgekit.export import onnx_checks
from edgekit.export.deform_export import (deform_conv2d_decomposed, deform_conv2d_native, export_backends,
                                          export_implementation)
from edgekit.export.to_onnx import torch_to_onnx
from edgekit.models.deform import DeformConv2d, DeformConv2dPack, deform_conv2d_reference

CASES = 5
BATCH = 3


@pytest.mark.parametrize("impl", [deform_conv2d_decomposed, deform_conv2d_native], ids=["decompose", "native"])
def test_torch_side_matches_float64_reference(impl):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for n in range(30):
        case = random_deform_case(rng, dtype=torch.float64)
        want = run_case(deform_conv2d_reference, case)
        got = run_case(impl, case)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"seed {seed}, case {n}: {describe(case)}\n{m}")


def test_half_inputs_are_computed_in_float32():
    """Like the reference: float16 in and out, float32 sampling (same values as the reference)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = random_deform_case(rng, dtype=torch.float16, groups=1, offset_groups=1)
    want = run_case(deform_conv2d_reference, case)
    for impl in (deform_conv2d_decomposed, deform_conv2d_native):
        got = run_case(impl, case)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3, msg=f"seed {seed}")


class DeformBank(nn.Module):
    """One DeformConv2d per case; forward(x0, offset0[, mask0], x1, ...) -> one output per case."""

    def __init__(self, cases):
        super().__init__()
        self.layers = nn.ModuleList()
        self.masked = []
        for c in cases:
            w = c["weight"]
            layer = DeformConv2d(c["input"].shape[1], w.shape[0], tuple(w.shape[2:]), c["stride"], c["padding"],
                                 c["dilation"], groups=c["groups"], offset_groups=c["offset_groups"],
                                 bias=c["bias"] is not None)
            layer.weight.data = w.float()
            if c["bias"] is not None:
                layer.bias.data = c["bias"].float()
            self.layers.append(layer)
            self.masked.append(c["mask"] is not None)

    def forward(self, *inputs):
        it, outs = iter(inputs), []
        for layer, masked in zip(self.layers, self.masked):
            x, offset = next(it), next(it)
            outs.append(layer(x, offset, next(it) if masked else None))
        return tuple(outs)


def _inputs(cases, batch=None):
    """Graph inputs (names, float32 tensors), optionally only the first ``batch`` images."""
    names, values = [], []
    for n, c in enumerate(cases):
        for key in ("input", "offset", "mask"):
            if c[key] is not None:
                names.append(f"{key}{n}")
                values.append(c[key][:batch].float())
    return names, values


@pytest.fixture(scope="module", params=["native", "decompose"])
def exported_bank(request):
    """(mode, cases, ONNX model, seed): a bank of random float64 cases exported in one graph."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    cases = [random_deform_case(rng, batch=BATCH, dtype=torch.float64, max_size=8) for _ in range(CASES)]
    names, example = _inputs(cases, batch=2)
    model = torch_to_onnx(DeformBank(cases).eval(), tuple(example), input_names=names,
                          output_names=[f"y{n}" for n in range(CASES)], deform=request.param)
    onnx_checks.check(model)
    return request.param, cases, model, seed


def test_graph_has_the_expected_ops(exported_bank):
    mode, cases, model, _ = exported_bank
    ops = onnx_checks.op_types(model)
    if mode == "native":
        assert ops["DeformConv"] == CASES
        assert ops["GridSample"] == 0
    else:
        assert ops["DeformConv"] == 0
        assert ops["GridSample"] == CASES and ops["Conv"] == CASES
    assert set(onnx_checks.batch_dims(model).values()) == {"batch"}


@pytest.mark.parametrize("batch", [1, BATCH])
def test_onnxruntime_matches_float64_reference(exported_bank, batch):
    mode, cases, model, seed = exported_bank
    names, values = _inputs(cases, batch=batch)
    got = onnx_checks.session(model).run(None, {k: v.numpy() for k, v in zip(names, values)})
    for n, (c, y) in enumerate(zip(cases, got)):
        sub = {k: (v[:batch] if k in ("input", "offset", "mask") and v is not None else v) for k, v in c.items()}
        want = run_case(deform_conv2d_reference, sub).numpy()
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{mode}, seed {seed}, case {n}: {describe(sub)}")


def test_decomposed_graph_in_onnx_reference_evaluator():
    """The decomposed graph is standard ONNX: the reference evaluator agrees on one tiny case.

    Exported at opset 20: onnx 1.23's evaluator implements GridSample-20 only (mode
    "linear") and rejects GridSample-16's "bilinear"; it also cannot take 1-pixel maps
    (see test_deform_onnx.py), so the map is at least 2x2.
    """
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = random_deform_case(rng, batch=2, dtype=torch.float64, min_size=2, max_size=5, groups=2,
                              offset_groups=2, use_mask=True)
    names, values = _inputs([case])
    model = torch_to_onnx(DeformBank([case]).eval(), tuple(values), input_names=names, output_names=["y0"],
                          deform="decompose", opset=20)
    assert onnx_checks.op_types(model)["DeformConv"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = ReferenceEvaluator(model).run(None, {k: v.numpy() for k, v in zip(names, values)})[0]
    want = run_case(deform_conv2d_reference, case).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}: {describe(case)}")


def test_pack_layer_with_learned_offsets_decomposed(fresh_torch_seed):
    """DeformConv2dPack (offsets and mask predicted inside the graph), as in RSDet's head;
    decomposed (the native op in RSDet is covered by test_export_onnx)."""
    layer = DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2).eval()
    nn.init.normal_(layer.conv_offset.weight, std=0.5)  # zero-initialised: make the offsets real
    x = torch.randn(3, 4, 9, 7)
    with torch.no_grad():  # float64 reference, offsets and mask computed as mmcv's layout says
        out = nn.functional.conv2d(x.double(), layer.conv_offset.weight.double(), layer.conv_offset.bias.double(),
                                   padding=1)
        o1, o2, m = torch.chunk(out, 3, dim=1)
        want = deform_conv2d_reference(x.double(), torch.cat((o1, o2), 1), layer.weight.double(),
                                       layer.bias.double(), padding=1, mask=torch.sigmoid(m)).numpy()
    assert float(o1.abs().max()) > 1.0  # the offsets move samples by more than a pixel
    model = torch_to_onnx(layer, (x[:2],), input_names=["x"], output_names=["y"], deform="decompose")
    got = onnx_checks.session(model).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"seed {fresh_torch_seed}")


def test_export_implementation_rejects_unknown_mode():
    with pytest.raises(ValueError, match="deform must be one of"):
        export_implementation("deform_conv2d", "fast")


def test_export_backends_nest_and_restore(fresh_torch_seed):
    from edgekit.kernels import dispatch

    original = dispatch.resolve
    x = torch.randn(1, 2, 5, 5)
    with export_backends("native"):
        assert dispatch.resolve("deform_conv2d", "numba", x) is deform_conv2d_native
        with export_backends("decompose"):  # same thread: no deadlock, inner mode wins
            assert dispatch.resolve("deform_conv2d", "auto", x) is deform_conv2d_decomposed
        assert dispatch.resolve("deform_conv2d", "auto", x) is deform_conv2d_native
    assert dispatch.resolve is original
