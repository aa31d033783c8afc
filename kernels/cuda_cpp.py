"""The ``cuda`` backend: GRN and deformable-convolution forward as CUDA C++ kernels.

The sources in ``kernels/cuda/*.cu`` are compiled at run time by NVRTC through CuPy's
``RawModule`` (once per file and device, cached by CuPy on disk), so a wheel needs no
build step and a Jetson compiles for its own architecture. Torch tensors reach the
kernels zero-copy through DLPack and the kernels run on torch's current stream, so they
order with the surrounding torch work without a synchronisation. The deformable-conv
GEMM is ``torch.matmul`` (cuBLAS) on the im2col columns. Forward only: ``auto`` falls
back to the torch reference when a gradient is needed. float32 and float16 run in the
kernels; other dtypes are handed to the torch reference.

Importing this module never needs CuPy or a GPU; :func:`unavailable_reason` says why
the backend cannot run. NOT YET RUN ON A REAL GPU: on the CPU-only CI machine the kernels
are compiled by nvcc (``scripts/check_cuda_build.py``) and executed, through this module's
host code, in a CPU emulation of the CUDA model (:mod:`edgekit.kernels.cuda_emulation`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from edgekit.kernels.numba_cuda import batch_chunk, check_affine, grn_layout, grn_splits
from edgekit.models.deform import deform_geometry

DEVICES = frozenset({"cuda"})
SUPPORTS_BACKWARD = frozenset()
CUDA_DIR = Path(__file__).with_name("cuda")
NVRTC_OPTIONS = ("--std=c++14", f"-I{CUDA_DIR}")
_SUFFIX = {torch.float32: "f32", torch.float16: "f16"}
_VEC = {torch.float32: 4, torch.float16: 2}  # float4 / half2-sized loads
THREADS = 256  # block size every kernel is written for (__launch_bounds__)
LANES_C = 8  # channels_last reduction: lanes along C per warp (grn.cu kLanesC)


def _grn_names() -> tuple[str, ...]:
    return ("grn_norm",) + tuple(
        f"grn_{kind}_{layout}_{dtype}_v{vec}"
        for kind in ("reduce", "apply") for layout in ("cl", "cf")
        for dtype, vec in (("f32", 4), ("f32", 1), ("f16", 2), ("f16", 1)))


# extern "C" entry points each source must define (checked by scripts/check_cuda_build.py).
KERNELS = {
    "grn.cu": _grn_names(),
    "deform_conv.cu": ("deform_im2col_f32", "deform_im2col_f16"),
}


def unavailable_reason() -> str | None:
    """None when CuPy can launch kernels on a CUDA GPU here, else a one-line reason."""
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install 'edgekit[gpu]' or cupy-cuda12x)"
    except Exception as exc:  # a broken CUDA install can fail at import time
        return f"cupy failed to import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA GPU visible to cupy"
    except Exception as exc:
        return f"cupy cannot reach the CUDA driver ({type(exc).__name__}: {exc})"
    return None


@lru_cache(maxsize=None)
def _module(filename: str, device_index: int):
    import cupy
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=(CUDA_DIR / filename).read_text(), options=NVRTC_OPTIONS)
        module.compile()
    return module


class _Launcher:
    """Launches kernels of one source file on torch's current stream of ``device``."""

    def __init__(self, filename: str, device: torch.device):
        import cupy
        self._cupy = cupy
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.module = _module(filename, self.index)
        self.stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, self.index)

    def __call__(self, name: str, grid, args) -> None:
        with self._cupy.cuda.Device(self.index), self.stream:
            # DLPack inside the stream context: torch then sees the consumer is its own stream.
            converted = tuple(self._cupy.from_dlpack(a) if isinstance(a, torch.Tensor) else a for a in args)
            self.module.get_function(name)(tuple(grid), (THREADS,), converted)


def _i32(*values) -> tuple:
    return tuple(np.int32(v) for v in values)


def _vec_width(dtype: torch.dtype, extent: int, *tensors: torch.Tensor) -> int:
    """The vector width when ``extent`` and every pointer allow aligned packs, else 1."""
    vec = _VEC[dtype]
    nbytes = vec * torch.empty((), dtype=dtype).element_size()
    ok = extent % vec == 0 and all(t.data_ptr() % nbytes == 0 for t in tensors)
    return vec if ok else 1


def _grid_1d(items: int) -> tuple[int]:
    return (max(1, min(math.ceil(items / THREADS), 1 << 20)),)  # kernels grid-stride beyond


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
        data_format: str, launcher=None) -> torch.Tensor:
    """Backend entry point (forward only) on CUDA tensors. ``launcher(filename, device)``
    makes the kernel launcher: CuPy on the tensor's GPU by default;
    :mod:`edgekit.kernels.cuda_emulation` passes its CPU emulation."""
    if x.dtype not in _SUFFIX:
        from edgekit.kernels import reference
        return reference.grn(x, gamma, beta, eps, data_format)
    n, c, hw, channels_last = grn_layout(x.shape, data_format)
    check_affine(gamma.numel(), beta.numel(), c)
    if x.numel() == 0:
        return torch.empty_like(x)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    launch = (launcher or _Launcher)("grn.cu", x.device)
    vec = _vec_width(x.dtype, c if channels_last else hw, xc, out)
    layout = "cl" if channels_last else "cf"
    suffix = f"{_SUFFIX[x.dtype]}_v{vec}"
    channel_blocks = math.ceil(c / (LANES_C * vec)) if channels_last else c
    splits, rows = grn_splits(n, hw, channel_blocks, multiple=1 if channels_last else vec)
    partial = torch.empty((splits, n, c), dtype=torch.float32, device=x.device)
    nx = torch.empty((n, c), dtype=torch.float32, device=x.device)
    g = gamma.reshape(-1).float().contiguous()
    b = beta.reshape(-1).float().contiguous()
    launch(f"grn_reduce_{layout}_{suffix}", (channel_blocks, n, splits), (xc, partial) + _i32(n, hw, c, rows))
    launch("grn_norm", (n,), (partial, nx) + _i32(n, c, splits) + (np.float32(eps),))
    launch(f"grn_apply_{layout}_{suffix}", _grid_1d(x.numel() // vec), (xc, nx, g, b, out) + _i32(n, hw, c))
    return out


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, stride, padding, dilation,
                  mask: torch.Tensor | None, launcher=None) -> torch.Tensor:
    """Backend entry point (forward only) on CUDA tensors; ``launcher`` as for :func:`grn`."""
    if input.dtype not in _SUFFIX:
        from edgekit.kernels import reference
        return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    g = deform_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    b, c, h, w, out_c, kh, kw = g.batch, g.in_channels, g.height, g.width, g.out_channels, g.kernel_h, g.kernel_w
    out_h, out_w, groups, offset_groups = g.out_h, g.out_w, g.groups, g.offset_groups
    k = (c // groups) * kh * kw
    dtype = input.dtype
    out = torch.empty((b, out_c, out_h, out_w), dtype=dtype, device=input.device)
    if b == 0:
        return out
    img = input.contiguous()
    off = offset.to(dtype).contiguous()
    msk = None if mask is None else mask.to(dtype).contiguous()
    wmat = weight.to(dtype).reshape(1, groups, out_c // groups, k)
    chunk = batch_chunk(b, c * kh * kw * out_h * out_w)
    columns = torch.empty((chunk, c * kh * kw, out_h * out_w), dtype=dtype, device=input.device)
    launch = (launcher or _Launcher)("deform_conv.cu", input.device)
    name = f"deform_im2col_{_SUFFIX[dtype]}"
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        cols = columns[: stop - start]
        launch(name, _grid_1d(cols.numel()),
               (img[start:stop], off[start:stop], off if msk is None else msk[start:stop], cols)
               + _i32(msk is not None, stop - start, c, h, w, kh, kw, *stride, *padding, *dilation,
                      offset_groups, out_h, out_w))
        torch.matmul(wmat, cols.view(stop - start, groups, k, out_h * out_w),
                     out=out[start:stop].view(stop - start, groups, out_c // groups, out_h * out_w))
    if bias is not None:
        out += bias.to(dtype).view(1, -1, 1, 1)
    return out
