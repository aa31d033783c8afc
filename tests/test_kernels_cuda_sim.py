"""Numba CUDA kernels (the ``numba-cuda`` backend) run in the CUDA simulator against the
float64 references.

The simulator must be switched on (``NUMBA_ENABLE_CUDASIM=1``) before ``numba.cuda`` is
first imported, so the kernels run in one child process per test session; this process
draws the inputs (fresh seed per run, printed on failure; ``EDGEKIT_TEST_SEED`` replays)
and compares the results. Most cases shrink the block sizes (the simulator runs every
thread as a Python thread) which also makes the tiny inputs span several blocks, several
H*W splits and several loop trips per thread; one case per layout keeps the real sizes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deform_cases import describe, fresh_seed, random_deform_case
from edgekit.errors import BackendUnavailableError
from edgekit.kernels import cuda_cpp, dispatch, numba_cuda
from edgekit.models.deform import deform_conv2d_reference
from edgekit.models.grn import grn_reference

ROOT = Path(__file__).resolve().parents[1]
SEED = fresh_seed()

# Runs in the child: numba imported only after the simulator is switched on.
RUNNER = r"""
import sys
import numpy as np
from edgekit.kernels import numba_cuda as nc, numba_cuda_kernels as k
data = dict(np.load(sys.argv[1], allow_pickle=True))
meta = data.pop("__meta__").item()
out = {}
small = dict(RED_CL_X=8, RED_CL_Y=4, RED_CF=16, NORM_THREADS=8, ELEMWISE_THREADS=32)
real = {name: getattr(k, name) for name in small}
for name, case in meta.items():
    for attr, value in (small if case["small_blocks"] else real).items():
        setattr(k, attr, value)
    nc._ROWS_PER_SPLIT_MIN = 4 if case["small_blocks"] else 64
    a = {key[len(name) + 1:]: data[key] for key in data if key.startswith(name + ":")}
    if case["op"] == "grn":
        out[name] = nc.grn_numpy(a["x"], a["gamma"], a["beta"], case["eps"], case["data_format"])
    else:
        out[name] = nc.deform_conv2d_numpy(a["input"], a["offset"], a["weight"], a.get("bias"),
                                           case["stride"], case["padding"], case["dilation"], a.get("mask"))
np.savez(sys.argv[2], **out)
"""

# (name, shape, data_format, dtype, scale, small_blocks)
GRN_CASES = [
    ("grn_cl_real_blocks", (2, 3, 4, 36), "channels_last", np.float32, 1.0, False),
    ("grn_cf_real_blocks", (1, 3, 5, 6), "channels_first", np.float32, 1.0, False),
    ("grn_cl_odd_c_splits", (3, 7, 5, 13), "channels_last", np.float32, 1.0, True),
    ("grn_cf_splits", (2, 5, 6, 7), "channels_first", np.float32, 1.0, True),
    ("grn_cl_batch1_1x1", (1, 1, 1, 9), "channels_last", np.float32, 1.0, True),
    ("grn_cl_fp16", (2, 4, 5, 12), "channels_last", np.float16, 1.0, True),
    # sum of squares of these exceeds the float16 range: only float32 accumulation survives
    ("grn_cf_fp16_large", (1, 3, 8, 8), "channels_first", np.float16, 300.0, True),
    ("grn_cl_zeros", (2, 2, 3, 5), "channels_last", np.float32, 0.0, True),
]
DEFORM_CASES = 7


def _grn_inputs(rng, shape, data_format, dtype, scale):
    c = shape[3] if data_format == "channels_last" else shape[1]
    return {"x": (rng.standard_normal(shape) * scale).astype(dtype),
            "gamma": rng.standard_normal(c).astype(np.float32),
            "beta": rng.standard_normal(c).astype(np.float32)}


def _build_cases(rng):
    arrays, meta = {}, {}
    for name, shape, fmt, dtype, scale, small in GRN_CASES:
        meta[name] = {"op": "grn", "eps": 1e-6, "data_format": fmt, "small_blocks": small}
        arrays.update({f"{name}:{k}": v for k, v in _grn_inputs(rng, shape, fmt, dtype, scale).items()})
    for i in range(DEFORM_CASES):
        dtype = np.float16 if i == DEFORM_CASES - 1 else np.float32
        case = random_deform_case(rng, max_size=6, batch=2 if i == 0 else None)
        name = f"deform_{i}"
        meta[name] = {"op": "deform", "stride": case["stride"], "padding": case["padding"],
                      "dilation": case["dilation"], "small_blocks": i % 3 != 0, "case": describe(case)}
        for key in ("input", "offset", "weight", "bias", "mask"):
            if case[key] is not None:
                arrays[f"{name}:{key}"] = case[key].numpy().astype(dtype)
    return arrays, meta


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """(inputs, meta, outputs) of every case, the kernels run once in a simulator child."""
    tmp = tmp_path_factory.mktemp("cudasim")
    arrays, meta = _build_cases(np.random.default_rng(SEED))
    np.savez(tmp / "in.npz", __meta__=np.array(meta, dtype=object), **arrays)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "in.npz"), str(tmp / "out.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"simulator run failed (seed {SEED}):\n{proc.stderr[-3000:]}"
    with np.load(tmp / "out.npz") as out:
        outputs = dict(out)
    return arrays, meta, outputs


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _t(a):
    return None if a is None else torch.from_numpy(a.astype(np.float64))


@pytest.mark.parametrize("name", [c[0] for c in GRN_CASES])
def test_grn_matches_float64_reference(sim, name):
    arrays, meta, outputs = sim
    a = {k: arrays[f"{name}:{k}"] for k in ("x", "gamma", "beta")}
    case = meta[name]
    ref = grn_reference(_t(a["x"]), _t(a["gamma"]), _t(a["beta"]), case["eps"], case["data_format"]).numpy()
    out = outputs[name]
    assert out.shape == a["x"].shape and out.dtype == a["x"].dtype
    assert np.isfinite(out).all(), f"{name}: non-finite output (seed {SEED})"
    tol = 1e-5 if a["x"].dtype == np.float32 else 1e-3  # float16 output rounding is 2**-11
    err = _rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:g} (seed {SEED})"


@pytest.mark.parametrize("index", range(DEFORM_CASES))
def test_deform_conv2d_matches_float64_reference(sim, index):
    arrays, meta, outputs = sim
    name = f"deform_{index}"
    case = meta[name]
    a = {k: arrays.get(f"{name}:{k}") for k in ("input", "offset", "weight", "bias", "mask")}
    ref = deform_conv2d_reference(_t(a["input"]), _t(a["offset"]), _t(a["weight"]), _t(a["bias"]),
                                  case["stride"], case["padding"], case["dilation"], _t(a["mask"])).numpy()
    out = outputs[name]
    assert out.shape == ref.shape and out.dtype == a["input"].dtype
    tol = 1e-5 if a["input"].dtype == np.float32 else 1e-3
    err = _rel_err(out, ref)
    assert err <= tol, f"{name} [{case['case']}]: relative error {err:.2e} > {tol:g} (seed {SEED})"


def test_grn_splits_cover_every_row_once():
    rng = np.random.default_rng(SEED)
    for _ in range(500):
        n, hw, blocks = (int(v) for v in rng.integers(1, [9, 5000, 200]))
        multiple = int(rng.choice([1, 2, 4]))
        splits, rows = numba_cuda.grn_splits(n, hw, blocks, multiple)
        assert rows % multiple == 0 and splits >= 1
        assert (splits - 1) * rows < hw <= splits * rows, (n, hw, blocks, multiple, splits, rows)


@pytest.mark.parametrize("module", [numba_cuda, cuda_cpp])
def test_backend_contract_without_gpu(module):
    assert module.DEVICES == frozenset({"cuda"})
    assert module.SUPPORTS_BACKWARD == frozenset()
    reason = module.unavailable_reason()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU behaviour cannot be observed here")
    assert isinstance(reason, str) and reason and "\n" not in reason


def test_explicit_gpu_backend_on_this_machine_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    x = torch.randn(1, 2, 2, 3)
    for name in ("numba-cuda", "cuda"):
        with pytest.raises(BackendUnavailableError, match=name):
            dispatch.resolve("grn", name, x)
    # auto never picks them for CPU tensors, nor when they are unavailable
    assert dispatch.resolve("grn", "auto", x).__module__ not in (numba_cuda.__name__, cuda_cpp.__name__)


def test_kernel_names_follow_the_dtype_and_width_scheme():
    names = set(cuda_cpp.KERNELS["grn.cu"])
    for layout in ("cl", "cf"):
        for dtype in cuda_cpp._SUFFIX.values():
            vec = cuda_cpp._VEC[next(t for t, s in cuda_cpp._SUFFIX.items() if s == dtype)]
            for v in {1, vec}:
                assert f"grn_reduce_{layout}_{dtype}_v{v}" in names
                assert f"grn_apply_{layout}_{dtype}_v{v}" in names
    assert all(f"deform_im2col_{s}" in cuda_cpp.KERNELS["deform_conv.cu"] for s in cuda_cpp._SUFFIX.values())
    assert math.prod(len(v) for v in cuda_cpp.KERNELS.values()) > 0
