// Global Response Normalization (ConvNeXt V2) forward, float32 and float16 storage.
//
//   Gx[n,c] = sqrt(sum_hw x[n,hw,c]^2)        (float32 accumulation)
//   Nx[n,c] = Gx[n,c] / (mean_c Gx[n,c] + eps)
//   out     = gamma[c] * (x * Nx[n,c]) + beta[c] + x
//
// Three launches: grn_reduce_* writes per-split partial sums of squares
// partial[s, n, c] (splitting H*W keeps a batch-1 call busy and the sum deterministic),
// grn_norm turns them into Nx, grn_apply_* writes the output. gamma, beta, partial and
// Nx are float32 whatever the storage type. Entry points are extern "C" with the
// dtype (f32/f16) and vector width (v4/v2/v1) in the name; kernels/cuda_cpp.py picks
// the vector form when the channel count (channels_last) or H*W (channels_first) is a
// multiple of the width and the pointers are aligned.
//
// NOT YET RUN ON A REAL GPU: compiled with nvcc for sm_75..sm_90, and executed on the CPU
// under host_emulation.h (tests/test_kernels_cuda_emulated.py).

#include "common.cuh"

namespace edgekit {

constexpr int kThreads = 256;               // every GRN kernel uses 256-thread blocks
constexpr int kWarps = kThreads / 32;
constexpr int kLanesC = 8;                  // channels_last: lanes along C per warp
constexpr int kRowsPerWarp = 32 / kLanesC;  // lanes along H*W per warp
constexpr int kRows = kWarps * kRowsPerWarp;

// channels_last x[N, HW, C]; grid (ceil(C / (kLanesC*VEC)), N, splits).
// Lanes 0..7 of a warp read VEC consecutive channels each (a coalesced 8*VEC run of C),
// lanes 8..31 the next three rows; shuffles fold the rows, shared memory the warps.
template <typename T, int VEC>
__device__ void grn_reduce_cl(const T* __restrict__ x, float* __restrict__ partial,
                              int N, int HW, int C, int rows_per_split) {
    __shared__ float tile[kWarps][kLanesC * VEC];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int lane_c = lane % kLanesC;
    const int row = warp * kRowsPerWarp + lane / kLanesC;
    const int c0 = blockIdx.x * (kLanesC * VEC);
    const int c = c0 + lane_c * VEC;
    const int n = blockIdx.y;
    const int s = blockIdx.z;
    const int start = s * rows_per_split;
    const int stop = min(start + rows_per_split, HW);

    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    if (c < C) {  // VEC > 1 only when C % VEC == 0, so the whole pack is in range
        const T* base = x + (static_cast<long long>(n) * HW) * C + c;
        for (int hw = start + row; hw < stop; hw += kRows) {
            const Pack<T, VEC> p = load_pack<T, VEC>(base + static_cast<long long>(hw) * C);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
                const float f = to_float(p.v[v]);
                acc[v] = fmaf(f, f, acc[v]);
            }
        }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
#pragma unroll
        for (int offset = kLanesC; offset < 32; offset <<= 1)
            acc[v] += __shfl_xor_sync(0xffffffffu, acc[v], offset);
    }
    if (lane < kLanesC) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) tile[warp][lane * VEC + v] = acc[v];
    }
    __syncthreads();
    if (threadIdx.x < kLanesC * VEC && c0 + threadIdx.x < C) {
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) total += tile[w][threadIdx.x];
        partial[(static_cast<long long>(s) * N + n) * C + c0 + threadIdx.x] = total;
    }
}

// channels_first x[N, C, HW]; grid (C, N, splits); rows_per_split is a multiple of VEC.
template <typename T, int VEC>
__device__ void grn_reduce_cf(const T* __restrict__ x, float* __restrict__ partial,
                              int N, int HW, int C, int rows_per_split) {
    __shared__ float scratch[kWarps];
    const int c = blockIdx.x;
    const int n = blockIdx.y;
    const int s = blockIdx.z;
    const int start = s * rows_per_split;
    const int stop = min(start + rows_per_split, HW);
    const T* plane = x + (static_cast<long long>(n) * C + c) * HW;
    float acc = 0.f;
    for (int i = start + threadIdx.x * VEC; i < stop; i += kThreads * VEC) {
        const Pack<T, VEC> p = load_pack<T, VEC>(plane + i);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const float f = to_float(p.v[v]);
            acc = fmaf(f, f, acc);
        }
    }
    const float total = block_sum<kThreads>(acc, scratch);
    if (threadIdx.x == 0) partial[(static_cast<long long>(s) * N + n) * C + c] = total;
}

// channels_last: flat NHWC index, VEC consecutive channels per thread (C % VEC == 0).
// channels_first: flat NCHW index, VEC consecutive pixels per thread (HW % VEC == 0).
template <typename T, int VEC, bool CHANNELS_LAST>
__device__ void grn_apply(const T* __restrict__ x, const float* __restrict__ nx,
                          const float* __restrict__ gamma, const float* __restrict__ beta,
                          T* __restrict__ out, int N, int HW, int C) {
    const long long total = static_cast<long long>(N) * HW * C / VEC;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total; i += stride) {
        const long long e = i * VEC;
        const long long n = e / (static_cast<long long>(HW) * C);
        const Pack<T, VEC> p = load_pack<T, VEC>(x + e);
        Pack<T, VEC> q;
        if (CHANNELS_LAST) {
            const int c = static_cast<int>(e % C);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
                const float f = to_float(p.v[v]);
                q.v[v] = from_float<T>(fmaf(gamma[c + v], f * nx[n * C + c + v], beta[c + v] + f));
            }
        } else {
            const int c = static_cast<int>((e / HW) % C);
            const float scale = nx[n * C + c], g = gamma[c], b = beta[c];
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
                const float f = to_float(p.v[v]);
                q.v[v] = from_float<T>(fmaf(g, f * scale, b + f));
            }
        }
        store_pack<T, VEC>(out + e, q);
    }
}

}  // namespace edgekit

using edgekit::half_t;

// partial [splits, N, C] -> nx [N, C]; one 256-thread block per sample.
extern "C" __global__ void __launch_bounds__(edgekit::kThreads)
grn_norm(const float* __restrict__ partial, float* __restrict__ nx, int N, int C, int splits, float eps) {
    __shared__ float scratch[edgekit::kWarps];
    const int n = blockIdx.x;
    float acc = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sq = 0.f;
        for (int s = 0; s < splits; ++s) sq += partial[(static_cast<long long>(s) * N + n) * C + c];
        const float g = sqrtf(sq);
        nx[static_cast<long long>(n) * C + c] = g;
        acc += g;
    }
    const float denom = edgekit::block_sum<edgekit::kThreads>(acc, scratch) / C + eps;
    for (int c = threadIdx.x; c < C; c += blockDim.x) nx[static_cast<long long>(n) * C + c] /= denom;
}

#define EDGEKIT_GRN_ENTRIES(T, TNAME, VEC)                                                        \
    extern "C" __global__ void __launch_bounds__(edgekit::kThreads)                               \
    grn_reduce_cl_##TNAME##_v##VEC(const T* x, float* partial, int N, int HW, int C, int rows) {  \
        edgekit::grn_reduce_cl<T, VEC>(x, partial, N, HW, C, rows);                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(edgekit::kThreads)                               \
    grn_reduce_cf_##TNAME##_v##VEC(const T* x, float* partial, int N, int HW, int C, int rows) {  \
        edgekit::grn_reduce_cf<T, VEC>(x, partial, N, HW, C, rows);                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(edgekit::kThreads)                               \
    grn_apply_cl_##TNAME##_v##VEC(const T* x, const float* nx, const float* gamma,                \
                                  const float* beta, T* out, int N, int HW, int C) {              \
        edgekit::grn_apply<T, VEC, true>(x, nx, gamma, beta, out, N, HW, C);                      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(edgekit::kThreads)                               \
    grn_apply_cf_##TNAME##_v##VEC(const T* x, const float* nx, const float* gamma,                \
                                  const float* beta, T* out, int N, int HW, int C) {              \
        edgekit::grn_apply<T, VEC, false>(x, nx, gamma, beta, out, N, HW, C);                     \
    }

EDGEKIT_GRN_ENTRIES(float, f32, 4)
EDGEKIT_GRN_ENTRIES(float, f32, 1)
EDGEKIT_GRN_ENTRIES(half_t, f16, 2)
EDGEKIT_GRN_ENTRIES(half_t, f16, 1)
