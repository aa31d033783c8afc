// Shared helpers for the edgekit CUDA kernels.
//
// Self-contained on purpose (no cuda_fp16.h, no <cstdint>): NVRTC compiles these files
// at run time through CuPy, and on a machine with only the driver and a pip-installed
// NVRTC there may be no CUDA toolkit headers to include. Half precision is therefore a
// 16-bit storage type converted with the PTX cvt instructions; all arithmetic is float32.
#pragma once

#ifdef EDGEKIT_HOST_EMULATION
#include "host_emulation.h"
#endif

namespace edgekit {

// IEEE binary16 storage; layout-compatible with torch.float16 / __half.
struct __align__(2) half_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }

#ifdef EDGEKIT_HOST_EMULATION  // host_emulation.h: no PTX on the CPU; the same RNE conversions
__device__ __forceinline__ float to_float(half_t v) {
    _Float16 h;
    std::memcpy(&h, &v.bits, sizeof h);
    return static_cast<float>(h);
}
#else
__device__ __forceinline__ float to_float(half_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
#endif

template <typename T> __device__ __forceinline__ T from_float(float v);

template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

template <> __device__ __forceinline__ half_t from_float<half_t>(float v) {
    half_t h;
#ifdef EDGEKIT_HOST_EMULATION
    const _Float16 r = static_cast<_Float16>(v);
    std::memcpy(&h.bits, &r, sizeof r);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#endif
    return h;
}

// VEC consecutive elements moved as one aligned transaction (float4 for 4 floats,
// a 32-bit half2-sized word for 2 halves). The caller guarantees the alignment.
template <typename T, int VEC>
struct __align__(sizeof(T) * VEC) Pack {
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& pack) {
    *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of one float per thread over a block of BLOCK threads (a multiple of 32); every
// thread gets the total. `scratch` holds BLOCK / 32 floats of shared memory.
template <int BLOCK>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < BLOCK / 32; ++w) total += scratch[w];
    __syncthreads();  // scratch may be reused right after
    return total;
}

}  // namespace edgekit
