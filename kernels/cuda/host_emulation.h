// The CUDA execution model on the CPU, so that the .cu sources run (slowly) without a GPU.
//
// Why: CI and the development machines have no GPU, so without this the CUDA C++ kernels
// would only ever be compiled. kernels/cuda_emulation.py builds each .cu with g++ and this
// header (EDGEKIT_HOST_EMULATION defined) and launches the same extern "C" entry points
// from the same host code as the CuPy path, so indexing, vector widths, H*W splits,
// shared memory, barriers and warp shuffles are all exercised against the references.
//
// Model: one launch runs its blocks one after another; each block's threads are real OS
// threads (blockDim.x of them, reused for every block of the launch). __syncthreads() is
// a barrier over the block; __shfl_xor_sync exchanges through a per-warp slot array
// between two barriers over the warp (full-warp masks only, as the kernels use). An
// implicit barrier ends each block, so __shared__ storage (a static per kernel
// instantiation here) is never reused while a thread still reads it. Being static, it
// starts zeroed and keeps the previous block's values, where CUDA's is undefined: a read
// before a write is not caught.
//
// What it cannot show: timing, occupancy, register pressure, memory coalescing, races
// that need two blocks in flight at once, and the PTX half conversions (replaced here by
// _Float16, the same round-to-nearest-even conversion). Only the 1-D blocks the kernels
// use are supported.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
    unsigned x, y, z;
};
using dim3 = uint3;

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern uint3 blockDim;
extern uint3 gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace edgekit_emulation {

constexpr int kWarp = 32;

struct Block {
    std::barrier<> block;                        // __syncthreads and the end of each block
    std::vector<std::unique_ptr<std::barrier<>>> warps;  // one per warp, for shuffles
    std::vector<unsigned long long> slots;                 // kWarp 8-byte slots per warp

    explicit Block(unsigned threads) : block(threads), slots(threads, 0) {
        for (unsigned w = 0; w < threads / kWarp; ++w) warps.push_back(std::make_unique<std::barrier<>>(kWarp));
    }
};

extern Block* current;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "edgekit CUDA host emulation: %s\n", what);
    std::abort();
}

}  // namespace edgekit_emulation

inline void __syncthreads() { edgekit_emulation::current->block.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register-sized value");
    using namespace edgekit_emulation;
    if (mask != 0xffffffffu || width != kWarp) fail("only full-warp shuffles are emulated");
    const unsigned lane = threadIdx.x % kWarp;
    const unsigned warp = threadIdx.x / kWarp;
    unsigned long long* slots = current->slots.data() + warp * kWarp;
    std::memcpy(&slots[lane], &value, sizeof(T));
    current->warps[warp]->arrive_and_wait();
    T other;
    std::memcpy(&other, &slots[lane ^ (lane_mask & (kWarp - 1))], sizeof(T));
    current->warps[warp]->arrive_and_wait();  // every lane has read before the slots are reused
    return other;
}

namespace edgekit_emulation {

// One launch at a time: gridDim, blockDim and current are process-wide.
inline std::mutex& launch_mutex() {
    static std::mutex mutex;
    return mutex;
}

// Runs body() as every thread of every block of the grid; returns 0, or 1 on a bad shape.
template <typename Body>
int run_grid(uint3 grid, unsigned threads, Body body) {
    if (threads == 0 || threads % kWarp != 0 || threads > 1024) return 1;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return 1;
    std::lock_guard<std::mutex> lock(launch_mutex());
    gridDim = grid;
    blockDim = uint3{threads, 1, 1};
    Block block(threads);
    current = &block;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        // A thread that cannot start would leave the others waiting at a barrier forever.
        try {
            pool.emplace_back([&, t] {
                threadIdx = uint3{t, 0, 0};
                for (unsigned z = 0; z < grid.z; ++z)
                    for (unsigned y = 0; y < grid.y; ++y)
                        for (unsigned x = 0; x < grid.x; ++x) {
                            blockIdx = uint3{x, y, z};
                            body();
                            block.block.arrive_and_wait();
                        }
            });
        } catch (const std::system_error&) {
            fail("could not start a thread for every CUDA thread of the block");
        }
    }
    for (auto& th : pool) th.join();
    current = nullptr;
    return 0;
}

template <typename... Args, std::size_t... I>
void call(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(args[I])...);
}

// The cuLaunchKernel convention: args[i] points at the value of the kernel's i-th parameter.
template <typename... Args>
int launch(void (*kernel)(Args...), uint3 grid, unsigned threads, void** args) {
    return run_grid(grid, threads, [&] { call(kernel, args, std::index_sequence_for<Args...>{}); });
}

}  // namespace edgekit_emulation

// Defines the launcher `emulate_<name>` of one extern "C" entry point, and the state the
// header declares (once per shared library: put EDGEKIT_EMULATION_STATE in one file).
#define EDGEKIT_EMULATION_STATE                              \
    thread_local uint3 threadIdx;                            \
    thread_local uint3 blockIdx;                             \
    uint3 blockDim;                                          \
    uint3 gridDim;                                           \
    edgekit_emulation::Block* edgekit_emulation::current = nullptr;

#define EDGEKIT_EMULATE(name)                                                                         \
    extern "C" int emulate_##name(unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) { \
        return edgekit_emulation::launch(&name, uint3{gx, gy, gz}, threads, args);                    \
    }
