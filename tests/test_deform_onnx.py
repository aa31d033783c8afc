"""The deformable-convolution reference against ONNX's DeformConv (opset 19): the ONNX
reference evaluator and ONNX Runtime's CPU kernel, on random float32 cases.

What was found about the edges (and is tested below, not skipped):
- torchvision's rule zeroes a sample at y <= -1 or y >= H; at exactly -1 and H the
  bilinear weight of the only in-map corner is 0 anyway, so the rule is continuous
  there. ONNX Runtime and the ONNX reference (GridSample with zero padding) agree with
  it on samples landing exactly on -1, 0, H-1, H, +-0.25/0.5 around them, and far off
  the map (test_samples_exactly_on_borders_agree), and so do we.
- The ONNX reference evaluator maps sampling positions onto GridSample's normalised
  grid by dividing by (H - 1) and (W - 1); on a map with H == 1 or W == 1 that is 0/0
  or x/0, and it fails (cannot convert NaN / infinity to an integer). ONNX Runtime and
  torchvision handle such maps, so 1-pixel maps are compared with ONNX Runtime only, and
  the evaluator's failure is asserted so that a fix upstream shows up here.
"""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from deform_cases import describe, fresh_seed, random_deform_case, run_case
from edgekit.models.deform import deform_conv2d_reference

OPSET = 19
INPUTS = (("X", "input"), ("W", "weight"), ("offset", "offset"), ("B", "bias"), ("mask", "mask"))


def deform_conv_model(case: dict, out_shape) -> onnx.ModelProto:
    """A one-node DeformConv graph for a case; absent bias/mask become omitted inputs."""
    names = [name if case[key] is not None else "" for name, key in INPUTS]
    while names[-1] == "":
        names.pop()
    (sh, sw), (ph, pw), (dh, dw) = case["stride"], case["padding"], case["dilation"]
    node = helper.make_node("DeformConv", names, ["Y"], kernel_shape=list(case["kernel"]), strides=[sh, sw],
                            pads=[ph, pw, ph, pw], dilations=[dh, dw], group=case["groups"],
                            offset_group=case["offset_groups"])
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(case[key].shape))
              for name, key in INPUTS if case[key] is not None]
    graph = helper.make_graph([node], "deform_conv", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(out_shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(case: dict) -> dict:
    return {name: case[key].numpy() for name, key in INPUTS if case[key] is not None}


def run_onnxruntime(model, case):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds(case))[0]


def run_onnx_reference(model, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its 0/0 on 1-pixel maps, see module doc
        return ReferenceEvaluator(model).run(None, feeds(case))[0]


def _check(runtime, case, n, seed):
    want = run_case(deform_conv2d_reference, case)
    got = runtime(deform_conv_model(case, want.shape), case)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4,
                               err_msg=f"seed {seed}, case {n}: {describe(case)}")


def test_reference_matches_onnxruntime():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for n in range(60):
        case = random_deform_case(rng, dtype=torch.float32, max_size=10)
        _check(run_onnxruntime, case, n, seed)


def test_reference_matches_onnx_reference_evaluator():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    # The evaluator loops in Python per (batch, out channel, in channel, pixel): keep cases tiny.
    for n in range(25):
        case = random_deform_case(rng, dtype=torch.float32, min_size=2, max_size=5, batch=int(rng.integers(1, 3)))
        _check(run_onnx_reference, case, n, seed)


@pytest.mark.parametrize("runtime", [run_onnxruntime, run_onnx_reference], ids=["onnxruntime", "onnx-reference"])
def test_samples_exactly_on_borders_agree(runtime):
    """Every offset puts its sample on -1, 0, H-1, H (+-0.25/0.5) or far off the map."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for n in range(6):
        case = random_deform_case(rng, dtype=torch.float32, min_size=2, max_size=5, offset_kinds=("border",),
                                  use_mask=bool(n % 2))
        _check(runtime, case, n, seed)


def test_one_pixel_maps_onnxruntime_agrees_onnx_reference_fails():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = random_deform_case(rng, dtype=torch.float32, size=(1, int(rng.integers(2, 6))), kernel=(1, 3),
                              stride=1, padding=(0, 1), dilation=1)
    _check(run_onnxruntime, case, 0, seed)
    want = run_case(deform_conv2d_reference, case)
    with pytest.raises((ValueError, OverflowError), match="NaN|infinity"):
        run_onnx_reference(deform_conv_model(case, want.shape), case)
