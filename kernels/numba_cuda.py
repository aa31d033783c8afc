"""The ``numba-cuda`` backend: GRN and deformable-convolution forward with Numba CUDA.

The kernels live in :mod:`edgekit.kernels.numba_cuda_kernels`. GRN is three launches
(per-split sums of squares, per-sample normalisation, element-wise apply); deformable
convolution is a deformable im2col into a float32 columns buffer followed by one
batched ``torch.matmul`` per chunk (cuBLAS), the same split as the CUDA C++ backend.
Forward only: ``auto`` falls back to the torch reference when a gradient is needed.

The ``launch_*`` functions take Numba device arrays and run unchanged under the CUDA
simulator; :func:`grn_numpy` and :func:`deform_conv2d_numpy` wrap them for numpy input,
which is how the tests run the kernels on a machine without a GPU.

NOT YET RUN ON A REAL GPU: only the CUDA simulator has executed these kernels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edgekit.models.deform import deform_geometry

DEVICES = frozenset({"cuda"})
SUPPORTS_BACKWARD = frozenset()
KERNEL_DTYPES = (torch.float32, torch.float16)  # other dtypes go to the torch reference
COLUMNS_BUDGET = 1 << 26  # float32 elements of im2col buffer per chunk (256 MiB)
_ROWS_PER_SPLIT_MIN = 64  # H*W rows one reduction block walks before splitting further
_TARGET_BLOCKS = 256  # enough reduction blocks to fill a large GPU


def unavailable_reason() -> str | None:
    """None when Numba can launch CUDA kernels here, else a one-line reason."""
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba is a core dependency
        return f"numba is not installed ({exc})"
    if getattr(cuda, "implementation", "") != "NVIDIA" and not _is_simulator(cuda):
        return "numba-cuda is not installed (pip install 'edgekit[gpu]')"
    if _is_simulator(cuda):
        return "NUMBA_ENABLE_CUDASIM=1 is set: the CUDA simulator cannot run torch CUDA tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        if not cuda.is_available():
            return "numba cannot use the CUDA driver (no driver or no GPU)"
    except Exception as exc:  # driver probing raises on broken installs
        return f"numba cannot use the CUDA driver ({type(exc).__name__}: {exc})"
    return None


def _is_simulator(cuda) -> bool:
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def _kernels():
    from edgekit.kernels import numba_cuda_kernels
    return numba_cuda_kernels


# ---------------------------------------------------------------------------- GRN


def grn_splits(n: int, hw: int, channel_blocks: int, multiple: int = 1) -> tuple[int, int]:
    """(splits, rows_per_split) of H*W so that small batches still fill the GPU.

    Splitting into partial sums (reduced by a second kernel) rather than atomics keeps
    the result deterministic; ``rows_per_split`` is a multiple of ``multiple``.
    """
    want = max(1, _TARGET_BLOCKS // max(1, n * channel_blocks))
    splits = max(1, min(want, math.ceil(hw / _ROWS_PER_SPLIT_MIN)))
    rows = math.ceil(math.ceil(max(hw, 1) / splits) / multiple) * multiple
    return math.ceil(max(hw, 1) / rows), rows


def launch_grn(x3, gamma, beta, eps: float, channels_last: bool, partial, nx, out2,
               stream=0) -> None:
    """Run GRN on device arrays.

    ``x3`` is [N, H*W, C] (channels_last) or [N, C, H*W]; ``out2`` is ``x3`` viewed as
    [N, -1]; ``partial`` is float32 [splits, N, C] and ``nx`` float32 [N, C] scratch,
    with splits from :func:`grn_splits`.
    """
    k = _kernels()
    n = x3.shape[0]
    splits = partial.shape[0]
    if channels_last:
        hw, c = x3.shape[1], x3.shape[2]
        rows = math.ceil(hw / splits)
        grid = (math.ceil(c / k.RED_CL_X), n, splits)
        k.grn_reduce_cl[grid, (k.RED_CL_X, k.RED_CL_Y), stream](x3, partial, rows)
    else:
        c, hw = x3.shape[1], x3.shape[2]
        rows = math.ceil(hw / splits)
        k.grn_reduce_cf[(c, n, splits), k.RED_CF, stream](x3, partial, rows)
    k.grn_norm[n, k.NORM_THREADS, stream](partial, nx, np.float32(eps))
    x2 = x3.reshape(n, -1)
    apply = k.grn_apply_cl if channels_last else k.grn_apply_cf
    total = x2.shape[0] * x2.shape[1]
    apply[math.ceil(total / k.ELEMWISE_THREADS), k.ELEMWISE_THREADS, stream](x2, nx, gamma, beta, out2)


def grn_layout(shape, data_format: str) -> tuple[int, int, int, bool]:
    """(N, C, H*W, channels_last) of a 4-D GRN input."""
    if len(shape) != 4:
        raise ValueError(f"grn: expected a 4-D input, got shape {tuple(shape)}")
    channels_last = data_format == "channels_last"
    if channels_last:
        n, h, w, c = shape
    else:
        n, c, h, w = shape
    return n, c, h * w, channels_last


def check_affine(gamma_numel: int, beta_numel: int, c: int) -> None:
    """gamma and beta must each hold C values (any shape)."""
    if gamma_numel != c or beta_numel != c:
        raise ValueError(f"grn: gamma and beta need {c} elements, got {gamma_numel} and {beta_numel}")


def grn_numpy(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-6,
              data_format: str = "channels_last") -> np.ndarray:
    """GRN of a numpy array through the kernels (for the simulator and debugging)."""
    from numba import cuda
    n, c, hw, channels_last = grn_layout(x.shape, data_format)
    check_affine(gamma.size, beta.size, c)
    x3 = np.ascontiguousarray(x).reshape((n, hw, c) if channels_last else (n, c, hw))
    splits, _ = grn_splits(n, hw, math.ceil(c / _kernels().RED_CL_X) if channels_last else c)
    d_x = cuda.to_device(x3)
    d_out = cuda.device_array((n, x3[0].size), dtype=x.dtype)
    partial = cuda.device_array((splits, n, c), dtype=np.float32)
    nx = cuda.device_array((n, c), dtype=np.float32)
    launch_grn(d_x, cuda.to_device(np.ascontiguousarray(gamma.reshape(-1), dtype=np.float32)),
               cuda.to_device(np.ascontiguousarray(beta.reshape(-1), dtype=np.float32)), eps, channels_last,
               partial, nx, d_out)
    return d_out.copy_to_host().reshape(x.shape)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
        data_format: str) -> torch.Tensor:
    """Backend entry point (forward only) on CUDA tensors."""
    if x.dtype not in KERNEL_DTYPES:
        from edgekit.kernels import reference
        return reference.grn(x, gamma, beta, eps, data_format)
    n, c, hw, channels_last = grn_layout(x.shape, data_format)
    check_affine(gamma.numel(), beta.numel(), c)
    if x.numel() == 0:
        return torch.empty_like(x)
    x3 = x.contiguous().view((n, hw, c) if channels_last else (n, c, hw))
    out = torch.empty_like(x3)
    splits, _ = grn_splits(n, hw, math.ceil(c / _kernels().RED_CL_X) if channels_last else c)
    partial = torch.empty((splits, n, c), dtype=torch.float32, device=x.device)
    nx = torch.empty((n, c), dtype=torch.float32, device=x.device)
    with _on_torch_stream(x.device) as (arr, stream):
        launch_grn(arr(x3), arr(gamma.reshape(-1).float().contiguous()),
                   arr(beta.reshape(-1).float().contiguous()), eps, channels_last,
                   arr(partial), arr(nx), arr(out.view(n, -1)), stream)
    return out.view(x.shape)


# ------------------------------------------------------------ deformable convolution


def batch_chunk(batch: int, column_elems_per_sample: int) -> int:
    """Samples per im2col chunk so the columns buffer stays within COLUMNS_BUDGET."""
    return max(1, min(batch, COLUMNS_BUDGET // max(1, column_elems_per_sample)))


def launch_deform_im2col(img, offset, mask, kernel_size, stride, padding, dilation,
                         offset_groups: int, columns, stream=0) -> None:
    """Fill ``columns`` [B, C*kh*kw, Ho*Wo] (float32) from device arrays; mask may be None."""
    k = _kernels()
    kh, kw = kernel_size
    total = columns.shape[0] * columns.shape[1] * columns.shape[2]
    use_mask = mask is not None
    mask_arg = mask if use_mask else offset  # never read; a typed placeholder
    blocks = math.ceil(total / k.ELEMWISE_THREADS)
    k.deform_im2col[blocks, k.ELEMWISE_THREADS, stream](
        img, offset, mask_arg, use_mask, kh, kw, stride[0], stride[1], padding[0], padding[1],
        dilation[0], dilation[1], offset_groups, columns)


def _gemm_shapes(weight_shape, groups: int):
    out_c, c_per_group, kh, kw = weight_shape
    return out_c // groups, c_per_group * kh * kw


def deform_conv2d_numpy(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1), mask=None) -> np.ndarray:
    """Deformable convolution of numpy arrays: kernel im2col, float32 numpy GEMM."""
    from numba import cuda
    g = deform_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    b, c, kh, kw, out_h, out_w = g.batch, g.in_channels, g.kernel_h, g.kernel_w, g.out_h, g.out_w
    groups, offset_groups = g.groups, g.offset_groups
    columns = cuda.device_array((b, c * kh * kw, out_h * out_w), dtype=np.float32)
    launch_deform_im2col(cuda.to_device(np.ascontiguousarray(input)), cuda.to_device(np.ascontiguousarray(offset)),
                         None if mask is None else cuda.to_device(np.ascontiguousarray(mask)),
                         (kh, kw), stride, padding, dilation, offset_groups, columns)
    cols = columns.copy_to_host()
    out_per_group, k = _gemm_shapes(weight.shape, groups)
    w = weight.astype(np.float32).reshape(1, groups, out_per_group, k)
    out = np.matmul(w, cols.reshape(b, groups, k, out_h * out_w)).reshape(b, -1, out_h, out_w)
    if bias is not None:
        out += bias.astype(np.float32).reshape(1, -1, 1, 1)
    return out.astype(input.dtype)


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, stride, padding, dilation,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """Backend entry point (forward only) on CUDA tensors."""
    if input.dtype not in KERNEL_DTYPES:
        from edgekit.kernels import reference
        return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    g = deform_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    b, c, kh, kw, out_h, out_w = g.batch, g.in_channels, g.kernel_h, g.kernel_w, g.out_h, g.out_w
    groups, offset_groups = g.groups, g.offset_groups
    out_per_group, k = _gemm_shapes(weight.shape, groups)
    img = input.contiguous()
    off = offset.to(input.dtype).contiguous()
    msk = None if mask is None else mask.to(input.dtype).contiguous()
    w = weight.float().reshape(1, groups, out_per_group, k)
    out = torch.empty((b, weight.shape[0], out_h, out_w), dtype=torch.float32, device=input.device)
    if b == 0:
        return out.to(input.dtype)
    chunk = batch_chunk(b, c * kh * kw * out_h * out_w)
    columns = torch.empty((chunk, c * kh * kw, out_h * out_w), dtype=torch.float32, device=input.device)
    with _on_torch_stream(input.device) as (arr, stream):
        for start in range(0, b, chunk):
            stop = min(b, start + chunk)
            cols = columns[: stop - start]
            launch_deform_im2col(arr(img[start:stop]), arr(off[start:stop]),
                                 None if msk is None else arr(msk[start:stop]),
                                 (kh, kw), stride, padding, dilation, offset_groups, arr(cols), stream)
            torch.matmul(w, cols.view(stop - start, groups, k, out_h * out_w),
                         out=out[start:stop].view(stop - start, groups, out_per_group, out_h * out_w))
    if bias is not None:
        out += bias.float().view(1, -1, 1, 1)
    return out.to(input.dtype)


class _on_torch_stream:
    """Context giving (tensor -> Numba array, Numba stream) bound to torch's current stream.

    Kernels go on torch's stream so they order with the surrounding torch work without
    a device-wide synchronisation; arrays are wrapped without a stream sync for the same reason.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        from numba import cuda
        self._ctx = cuda.gpus[self.device.index if self.device.index is not None else torch.cuda.current_device()]
        self._ctx.__enter__()
        stream = cuda.external_stream(torch.cuda.current_stream(self.device).cuda_stream)

        def arr(t: torch.Tensor):
            return cuda.as_cuda_array(t, sync=False)

        return arr, stream

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
