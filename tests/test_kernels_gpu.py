"""The CUDA backends (``numba-cuda``, ``cuda``) on a real GPU against the float64 references.

Skipped without a CUDA GPU, which is the case in CI and on the development machines:
there the Numba CUDA kernels run in the simulator (``test_kernels_cuda_sim.py``) and the
CUDA C++ sources are compiled by nvcc (``test_cuda_compile.py``) and executed in a CPU
emulation of the CUDA model (``test_kernels_cuda_emulated.py``). On a GPU machine
``scripts/gpu_session.sh`` runs this file together with the GPU kernel suite. Inputs are
fresh every run (seed printed on failure; ``EDGEKIT_TEST_SEED`` replays).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deform_cases import describe, float16_error_bound, fresh_seed, random_deform_case
from edgekit import ops
from edgekit.kernels import dispatch
from edgekit.models.deform import deform_conv2d_reference
from edgekit.models.grn import grn_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

SEED = fresh_seed()
# The GEMMs of both backends go through torch.matmul: TF32 (10-bit mantissa) would make the
# 1e-5 float32 bound fail for a reason that is not a kernel bug. It is off by default; pinned.
torch.backends.cuda.matmul.allow_tf32 = False
# Likewise float16 GEMMs may otherwise reduce in float16 (split-K), past float16_error_bound.
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
GPU_BACKENDS = ("numba-cuda", "cuda")
# float32: the 1e-5; float16 holds inputs and outputs to 2**-11 relative.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def _require(backend: str) -> None:
    reason = dispatch.unavailable_reason(backend)
    if reason:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error over the largest reference magnitude (as the simulator tests)."""
    diff = (out.detach().double().cpu() - ref).abs().max().item()
    return diff / max(ref.abs().max().item(), 1e-30)


def _gpu(t, dtype):
    return None if t is None else t.to(device="cuda", dtype=dtype)


def _f64(t):
    """The value the kernel really saw (after rounding to its dtype), in float64 on the CPU."""
    return None if t is None else t.detach().double().cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deform_conv2d_random_cases(backend, dtype):
    """Every option (groups, offset groups, mask, bias, stride, padding, dilation, even
    kernels, samples off the map and on its borders) against the float64 reference."""
    _require(backend)
    rng = np.random.default_rng(SEED)
    for i in range(40):
        case = random_deform_case(rng, max_size=12 if i % 4 else 24)
        t = {k: _gpu(case[k], dtype) for k in ("input", "offset", "weight", "bias", "mask")}
        out = ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], case["stride"], case["padding"],
                                case["dilation"], t["mask"], backend=backend)
        args = (*(_f64(t[k]) for k in ("input", "offset", "weight", "bias")), case["stride"], case["padding"],
                case["dilation"], _f64(t["mask"]))
        ref = deform_conv2d_reference(*args)
        assert out.device.type == "cuda" and out.dtype == dtype and out.shape == ref.shape
        assert torch.isfinite(out).all(), f"case {i} [{describe(case)}]: non-finite output (seed {SEED})"
        if dtype == torch.float32:
            err = _rel_err(out, ref)
            assert err <= 1e-5, f"case {i} [{describe(case)}]: relative error {err:.2e} > 1e-5 (seed {SEED})"
        else:  # the cuda backend rounds its columns to float16 too: a per-element bound
            excess = ((out.double().cpu() - ref).abs() / float16_error_bound(*args).clamp_min(1e-300)).max().item()
            assert excess <= 1, f"case {i} [{describe(case)}]: {excess:.2f}x the float16 bound (seed {SEED})"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deform_conv2d_detector_shape_spans_many_blocks(backend):
    """A detector-sized layer (80 channels, 32x32, batch 3) with learned-looking offsets:
    many blocks, several GEMM groups of rows, and a batch that is not a power of two."""
    _require(backend)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(3, 80, 32, 32, generator=gen, dtype=torch.float64)
    offset = 1.5 * torch.randn(3, 18, 32, 32, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 9, 32, 32, generator=gen, dtype=torch.float64)
    weight = torch.randn(80, 80, 3, 3, generator=gen, dtype=torch.float64) / 27
    bias = torch.randn(80, generator=gen, dtype=torch.float64)
    ref = deform_conv2d_reference(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
    out = ops.deform_conv2d(*(t.float().cuda() for t in (x, offset, weight, bias)), 1, 1, 1, mask.float().cuda(),
                            backend=backend)
    assert _rel_err(out, ref) <= 1e-5, f"seed {SEED}"


def _grn_shapes(rng) -> list[tuple[int, int, int, int]]:
    """Random (N, H, W, C): odd sizes, 1x1 maps, batch 1 and > 1, channel counts that do
    and do not fill a vector; plus two ConvNeXt V2 stage tensors."""
    shapes = [(int(rng.integers(1, 5)), int(rng.integers(1, 20)), int(rng.integers(1, 20)),
               int(rng.choice([1, 3, 8, 13, 40, 67, 160, 321]))) for _ in range(12)]
    return shapes + [(1, 1, 1, 9), (8, 56, 56, 40), (2, 7, 7, 640)]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grn_random_shapes(backend, dtype, data_format):
    _require(backend)
    rng = np.random.default_rng(SEED)
    gen = torch.Generator().manual_seed(SEED)
    for n, h, w, c in _grn_shapes(rng):
        shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
        scale = float(rng.choice([1.0, 1e-3, 300.0]))  # 300: sums of squares beyond float16's range
        x = (scale * torch.randn(shape, generator=gen)).to(device="cuda", dtype=dtype)
        gamma, beta = (torch.randn(c, generator=gen).to(device="cuda", dtype=dtype) for _ in range(2))
        out = ops.grn(x, gamma, beta, 1e-6, data_format, backend=backend)
        ref = grn_reference(_f64(x), _f64(gamma), _f64(beta), 1e-6, data_format)
        assert out.device.type == "cuda" and out.dtype == dtype and out.shape == x.shape
        assert torch.isfinite(out).all(), f"{shape} {dtype} x{scale}: non-finite output (seed {SEED})"
        err = _rel_err(out, ref)
        assert err <= TOLERANCE[dtype], f"{shape} {dtype} x{scale}: relative error {err:.2e} (seed {SEED})"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grn_non_contiguous_and_misaligned_inputs(backend):
    """A permuted view and a tensor starting one element into its storage (no 16-byte
    alignment: the kernels must fall back from vector loads)."""
    _require(backend)
    gen = torch.Generator().manual_seed(SEED)
    base = torch.randn(2 * 5 * 6 * 32 + 1, generator=gen).cuda()
    x = base[1:].view(2, 5, 6, 32)
    gamma, beta = torch.randn(32, generator=gen).cuda(), torch.randn(32, generator=gen).cuda()
    for inp in (x, x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)):
        out = ops.grn(inp, gamma, beta, backend=backend)
        assert _rel_err(out, grn_reference(_f64(inp), _f64(gamma), _f64(beta))) <= 1e-5, f"seed {SEED}"


def test_auto_picks_a_gpu_kernel_for_cuda_tensors():
    """``auto`` runs a CUDA backend (not the torch reference) on CUDA tensors when one can
    run, and the torch reference when a gradient is needed (the GPU kernels are forward only)."""
    available = [b for b in dispatch.AUTO_ORDER["cuda"] if b != "torch" and dispatch.unavailable_reason(b) is None]
    if not available:
        pytest.skip("neither numba-cuda nor cuda can run here")
    x = torch.randn(1, 4, 4, 8, device="cuda")
    impl = dispatch.resolve("grn", "auto", x, needs_grad=False)
    assert impl.__module__ == dispatch.BACKEND_MODULES[available[0]]
    assert dispatch.resolve("grn", "auto", x, needs_grad=True).__module__ == "edgekit.models.grn"
