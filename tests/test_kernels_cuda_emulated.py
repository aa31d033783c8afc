"""The CUDA C++ kernels (``backend="cuda"``) executed on the CPU against float64 references.

``edgekit.kernels.cuda_emulation`` builds ``kernels/cuda/*.cu`` with g++ and an emulation
of the CUDA execution model (threads, blocks, shared memory, barriers, warp shuffles) and
launches them from the backend's own host code. The cases run in one child process with
AddressSanitizer preloaded, so any read or write outside a tensor aborts the run, and
with every fresh allocation filled with 0xff bytes (NaN in float32 and float16), so an
output element no kernel wrote shows up as NaN. Inputs are fresh every run (seed printed
on failure; ``EDGEKIT_TEST_SEED`` replays). This is the kernels' code on a CPU, not on a
GPU: it cannot show speed, coalescing or races between concurrent blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deform_cases import describe, float16_error_bound, fresh_seed, random_deform_case
from edgekit.kernels import cuda_cpp, cuda_emulation
from edgekit.models.deform import deform_conv2d_reference
from edgekit.models.grn import grn_reference

ROOT = Path(__file__).resolve().parents[1]
SEED = fresh_seed()
REASON = cuda_emulation.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CUDA host emulation unavailable: {REASON}")

# Runs in the child (ASan preloaded): every case through the emulated backend.
RUNNER = r"""
import sys
import numpy as np
import torch
from edgekit.kernels import cuda_emulation as ce, numba_cuda

class Recording(ce.EmulatedLauncher):
    launched = set()
    def __call__(self, name, grid, args):
        super().__call__(name, grid, args)
        Recording.launched.add(name)

def misaligned(t):
    # A contiguous copy one element past an aligned start: the kernels must take the scalar path.
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out

data = dict(np.load(sys.argv[1], allow_pickle=True))
meta = data.pop("__meta__").item()
budget = numba_cuda.COLUMNS_BUDGET
out = {"__poison__": torch.empty(1000).numpy()}
for name, case in meta.items():
    a = {k[len(name) + 1:]: torch.from_numpy(data[k]) for k in data if k.startswith(name + ":")}
    if case["op"] == "grn":
        x = misaligned(a["x"]) if case["misaligned"] else a["x"]
        y = ce.grn(x, a["gamma"], a["beta"], case["eps"], case["data_format"], launcher=Recording)
    else:
        numba_cuda.COLUMNS_BUDGET = case["columns_budget"] or budget
        y = ce.deform_conv2d(a["input"], a["offset"], a["weight"], a.get("bias"), case["stride"],
                             case["padding"], case["dilation"], a.get("mask"), launcher=Recording)
    out[name] = y.numpy()
out["__launched__"] = np.array(sorted(Recording.launched))
np.savez(sys.argv[2], **out)
"""

# (name, shape, data_format, dtype, scale, misaligned): vector and scalar paths, H*W
# splits (H*W >= 128), channels not a multiple of the vector width, one pixel, zeros,
# float16 whose sum of squares overflows float16 (float32 accumulation only survives).
GRN_CASES = [
    ("cl_f32_v4_splits", (2, 16, 12, 24), "channels_last", np.float32, 1.0, False),
    ("cl_f32_v1_odd_c", (3, 7, 5, 13), "channels_last", np.float32, 1.0, False),
    ("cl_f32_v1_misaligned", (1, 9, 17, 8), "channels_last", np.float32, 1.0, True),
    ("cl_f32_one_pixel", (1, 1, 1, 40), "channels_last", np.float32, 1.0, False),
    ("cl_f32_zeros", (2, 3, 3, 8), "channels_last", np.float32, 0.0, False),
    ("cl_f32_wide_c", (1, 4, 3, 320), "channels_last", np.float32, 1.0, False),
    ("cf_f32_v4_splits", (2, 6, 16, 20), "channels_first", np.float32, 1.0, False),
    ("cf_f32_v1_odd_hw", (2, 5, 7, 9), "channels_first", np.float32, 1.0, False),
    ("cf_f32_v1_misaligned", (1, 3, 8, 8), "channels_first", np.float32, 1.0, True),
    ("cl_f16_v2", (2, 8, 9, 12), "channels_last", np.float16, 1.0, False),
    ("cl_f16_v1_odd_c", (1, 5, 6, 7), "channels_last", np.float16, 1.0, False),
    ("cl_f16_large", (1, 16, 16, 6), "channels_last", np.float16, 300.0, False),
    ("cf_f16_v2_splits", (1, 4, 12, 12), "channels_first", np.float16, 1.0, False),
    ("cf_f16_v1_misaligned", (2, 3, 5, 5), "channels_first", np.float16, 300.0, True),
]
DEFORM_CASES = 24  # random cases; every third float16, every fourth with batches in chunks


def _build_cases(rng):
    arrays, meta = {}, {}
    for name, shape, fmt, dtype, scale, misaligned in GRN_CASES:
        c = shape[3] if fmt == "channels_last" else shape[1]
        meta[name] = {"op": "grn", "eps": 1e-6, "data_format": fmt, "misaligned": misaligned}
        arrays[f"{name}:x"] = (rng.standard_normal(shape) * scale).astype(dtype)
        arrays[f"{name}:gamma"] = rng.standard_normal(c).astype(np.float32)
        arrays[f"{name}:beta"] = rng.standard_normal(c).astype(np.float32)
    for i in range(DEFORM_CASES):
        dtype = np.float16 if i % 3 == 2 else np.float32
        case = random_deform_case(rng, max_size=7, batch=3 if i % 4 == 0 else None)
        name = f"deform_{i}"
        # A budget of one sample's columns (or less) makes the backend loop over batch chunks.
        meta[name] = {"op": "deform", "stride": case["stride"], "padding": case["padding"],
                      "dilation": case["dilation"], "columns_budget": 1 if i % 4 == 0 else None,
                      "case": describe(case)}
        for key in ("input", "offset", "weight", "bias", "mask"):
            if case[key] is not None:
                arrays[f"{name}:{key}"] = case[key].numpy().astype(dtype)
    return arrays, meta


def _asan_env() -> dict:
    """The child's environment: ASan preloaded, fresh allocations filled with NaN bytes."""
    cxx = cuda_emulation.compiler()
    runtime = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(runtime).is_file():
        pytest.skip(f"{cxx} has no AddressSanitizer runtime (libasan.so)")
    return dict(os.environ, PYTHONPATH=str(ROOT), LD_PRELOAD=runtime, EDGEKIT_EMULATION_SANITIZE="address",
                ASAN_OPTIONS="detect_leaks=0:malloc_fill_byte=255:max_malloc_fill_size=1073741824")


def _run_child(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *argv], env=_asan_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """(inputs, meta, outputs) of every case, run once in the sanitized child."""
    tmp = tmp_path_factory.mktemp("cudaemu")
    arrays, meta = _build_cases(np.random.default_rng(SEED))
    np.savez(tmp / "in.npz", __meta__=np.array(meta, dtype=object), **arrays)
    proc = _run_child(RUNNER, str(tmp / "in.npz"), str(tmp / "out.npz"))
    assert proc.returncode == 0, f"emulated run failed (seed {SEED}):\n{proc.stderr[-4000:]}"
    with np.load(tmp / "out.npz") as out:
        outputs = dict(out)
    return arrays, meta, outputs


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _t(a):
    return None if a is None else torch.from_numpy(a.astype(np.float64))


def _tolerance(dtype) -> float:
    """GRN: float32 to the issue's 1e-5; float16 rounds the output once, to 2**-11 relative."""
    return 1e-5 if dtype == np.float32 else 1e-3


def test_fresh_allocations_in_the_child_are_nan(emulated):
    # What makes an unwritten output element visible: without it the checks below could pass on stale memory.
    assert np.isnan(emulated[2]["__poison__"]).all()


@pytest.mark.parametrize("name", [c[0] for c in GRN_CASES])
def test_grn_matches_float64_reference(emulated, name):
    arrays, meta, outputs = emulated
    x, case = arrays[f"{name}:x"], meta[name]
    ref = grn_reference(_t(x), _t(arrays[f"{name}:gamma"]), _t(arrays[f"{name}:beta"]), case["eps"],
                        case["data_format"]).numpy()
    out = outputs[name]
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.isfinite(out).all(), f"{name}: unwritten or non-finite output (seed {SEED})"
    err = _rel_err(out, ref)
    assert err <= _tolerance(x.dtype), f"{name}: relative error {err:.2e} (seed {SEED})"


@pytest.mark.parametrize("index", range(DEFORM_CASES))
def test_deform_conv2d_matches_float64_reference(emulated, index):
    arrays, meta, outputs = emulated
    name = f"deform_{index}"
    case = meta[name]
    a = {k: _t(arrays.get(f"{name}:{k}")) for k in ("input", "offset", "weight", "bias", "mask")}
    args = (a["input"], a["offset"], a["weight"], a["bias"], case["stride"], case["padding"], case["dilation"],
            a["mask"])
    ref = deform_conv2d_reference(*args).numpy()
    out, dtype = outputs[name], arrays[f"{name}:input"].dtype
    assert out.shape == ref.shape and out.dtype == dtype
    assert np.isfinite(out).all(), f"{name} [{case['case']}]: unwritten or non-finite output (seed {SEED})"
    if dtype == np.float32:
        err = _rel_err(out, ref)
        assert err <= 1e-5, f"{name} [{case['case']}]: relative error {err:.2e} > 1e-5 (seed {SEED})"
    else:  # columns, product and bias sum each rounded to float16
        excess = np.abs(out.astype(np.float64) - ref) / float16_error_bound(*args).numpy().clip(min=1e-300)
        assert excess.max() <= 1, f"{name} [{case['case']}]: {excess.max():.2f}x the float16 bound (seed {SEED})"


def test_every_entry_point_ran(emulated):
    launched = set(emulated[2]["__launched__"].tolist())
    expected = {name for names in cuda_cpp.KERNELS.values() for name in names}
    assert launched == expected, f"never launched: {sorted(expected - launched)}"


def test_an_out_of_bounds_write_is_caught():
    # The sanitizer is live in the child: an im2col into columns 5 elements too short aborts.
    code = """
import torch
from edgekit.kernels import cuda_emulation as ce
from edgekit.kernels.cuda_cpp import _i32
x, off = torch.randn(1, 2, 4, 4), torch.zeros(1, 18, 4, 4)
cols = torch.empty(2 * 9 * 16 - 5)
ce.EmulatedLauncher("deform_conv.cu", x.device)(
    "deform_im2col_f32", (2,), (x, off, off, cols) + _i32(0, 1, 2, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 4))
"""
    proc = _run_child(code)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]


def test_barriers_and_shuffles_follow_the_cuda_model():
    # In-process, without the child: grn_norm's block-wide sum (warp shuffles, then shared
    # memory, common.cuh's block_sum) over 3 blocks of 256 threads, 1000 channels each, so
    # every thread loops several times and divides its channels by its own block's total.
    launcher = cuda_emulation.EmulatedLauncher("grn.cu", torch.device("cpu"))
    partial = torch.randn(2, 3, 1000).abs()
    nx = torch.full((3, 1000), float("nan"))
    launcher("grn_norm", (3,), (partial, nx) + cuda_cpp._i32(3, 1000, 2) + (np.float32(1e-6),))
    gx = partial.double().sum(0).sqrt()
    expected = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(nx.double(), expected, rtol=1e-5, atol=0)
    assert launcher.launches == [("grn_norm", (3, 1, 1))]


def test_bad_arguments_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="on the CPU"):
        cuda_emulation.EmulatedLauncher("grn.cu", torch.device("cuda", 0))
    launcher = cuda_emulation.EmulatedLauncher("grn.cu", torch.device("cpu"))
    with pytest.raises(TypeError, match="unsupported kernel argument"):
        launcher("grn_norm", (1,), (torch.zeros(1), torch.zeros(1), 1, 1, 1, 1e-6))
    with pytest.raises(RuntimeError, match="refused grid"):
        launcher("grn_norm", (0,), (torch.zeros(1), torch.zeros(1)) + cuda_cpp._i32(1, 1, 1) + (np.float32(0),))
    monkeypatch.setenv("EDGEKIT_EMULATION_SANITIZE", "thread")
    with pytest.raises(RuntimeError, match="EDGEKIT_EMULATION_SANITIZE"):
        cuda_emulation.flags()
