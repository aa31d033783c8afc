// Deformable convolution (v1 and v2) forward: the deformable im2col.
//
// One thread per column element writes
//   columns[b, (c*kh + i)*kw + j, ho*Wo + wo] = mask * bilinear(input[b, c], y, x)
// with y = ho*sh - ph + i*dh + dy and x = wo*sw - pw + j*dw + dx, where (dy, dx) is
// offset[b, 2*p], offset[b, 2*p + 1] for kernel point p = (g*kh + i)*kw + j of offset
// group g = c / (C / og), and mask[b, p] (v2). This is torchvision's layout and its
// bilinear rule: zero when y <= -1, y >= H, x <= -1 or x >= W; corners outside the map
// contribute zero. kernels/cuda_cpp.py then multiplies the columns by the weight with
// torch.matmul (cuBLAS), one batched product per weight group.
//
// Consecutive threads take consecutive wo, so the offset/mask reads and column writes
// are coalesced. Arithmetic is float32; columns are stored in the input's dtype so the
// float16 GEMM can use tensor cores.
//
// NOT YET RUN ON A REAL GPU: compiled with nvcc for sm_75..sm_90, and executed on the CPU
// under host_emulation.h (tests/test_kernels_cuda_emulated.py).

#include "common.cuh"

namespace edgekit {

constexpr int kIm2colThreads = 256;

template <typename T>
__device__ __forceinline__ float pixel(const T* __restrict__ plane, int H, int W, int y, int x) {
    return (y >= 0 && y < H && x >= 0 && x < W) ? to_float(plane[y * W + x]) : 0.f;
}

template <typename T>
__device__ __forceinline__ float bilinear(const T* __restrict__ plane, int H, int W, float y, float x) {
    if (y <= -1.f || y >= H || x <= -1.f || x >= W) return 0.f;
    const int y0 = static_cast<int>(floorf(y));
    const int x0 = static_cast<int>(floorf(x));
    const float ly = y - y0, lx = x - x0;
    const float hy = 1.f - ly, hx = 1.f - lx;
    return hy * hx * pixel(plane, H, W, y0, x0) + hy * lx * pixel(plane, H, W, y0, x0 + 1) +
           ly * hx * pixel(plane, H, W, y0 + 1, x0) + ly * lx * pixel(plane, H, W, y0 + 1, x0 + 1);
}

template <typename T>
__device__ void deform_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                              const T* __restrict__ mask, T* __restrict__ columns, int use_mask,
                              int batch, int C, int H, int W, int kh, int kw, int sh, int sw,
                              int ph, int pw, int dh, int dw, int offset_groups, int Ho, int Wo) {
    const long long plane = static_cast<long long>(Ho) * Wo;
    const long long total = static_cast<long long>(batch) * C * kh * kw * plane;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    const int channels_per_group = C / offset_groups;
    const int points = offset_groups * kh * kw;
    for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < total; idx += stride) {
        const int wo = static_cast<int>(idx % Wo);
        long long rest = idx / Wo;
        const int ho = static_cast<int>(rest % Ho);
        rest /= Ho;
        const int j = static_cast<int>(rest % kw);
        rest /= kw;
        const int i = static_cast<int>(rest % kh);
        rest /= kh;
        const int c = static_cast<int>(rest % C);
        const int b = static_cast<int>(rest / C);
        const int point = ((c / channels_per_group) * kh + i) * kw + j;
        const long long pix = static_cast<long long>(ho) * Wo + wo;
        const T* off = offset + (static_cast<long long>(b) * 2 * points + 2 * point) * plane + pix;
        const float y = static_cast<float>(ho * sh - ph + i * dh) + to_float(off[0]);
        const float x = static_cast<float>(wo * sw - pw + j * dw) + to_float(off[plane]);
        float val = bilinear(input + (static_cast<long long>(b) * C + c) * H * W, H, W, y, x);
        if (use_mask) val *= to_float(mask[(static_cast<long long>(b) * points + point) * plane + pix]);
        columns[idx] = from_float<T>(val);  // idx is already the [b, c, i, j, ho, wo] column offset
    }
}

}  // namespace edgekit

#define EDGEKIT_IM2COL_ENTRY(T, TNAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(edgekit::kIm2colThreads)                               \
    deform_im2col_##TNAME(const T* input, const T* offset, const T* mask, T* columns, int use_mask,    \
                          int batch, int C, int H, int W, int kh, int kw, int sh, int sw, int ph,      \
                          int pw, int dh, int dw, int offset_groups, int Ho, int Wo) {                 \
        edgekit::deform_im2col<T>(input, offset, mask, columns, use_mask, batch, C, H, W, kh, kw, sh, \
                                  sw, ph, pw, dh, dw, offset_groups, Ho, Wo);                          \
    }

EDGEKIT_IM2COL_ENTRY(float, f32)
EDGEKIT_IM2COL_ENTRY(edgekit::half_t, f16)
