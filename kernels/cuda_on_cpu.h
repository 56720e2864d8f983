// The CUDA execution model on the CPU, for running dct.cu unchanged as C++ (kernels/cuda_on_cpu.py).
//
// One OS thread per CUDA thread of a block, the blocks of a grid in turn. threadIdx and blockIdx are
// thread-local, blockDim and gridDim are fixed for a launch; __syncthreads is a std::barrier over the block's
// threads; dynamic shared memory is a buffer of exactly the launch's size, filled with NaN before every block
// (all bits set: NaN as float and as double), so a kernel that reads shared memory it did not write, or past
// its size, gives NaN or (under AddressSanitizer) an error. Static __shared__ arrays become function statics,
// shared by the threads of the running block. Enough of CUDA for dct.cu, not a general emulator.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace cinemo_cpu {
inline thread_local dim3 thread_index, block_index;
inline dim3 block_dim, grid_dim;                       // written before a launch's threads start
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local unsigned char* dynamic_shared = nullptr;
}  // namespace cinemo_cpu

#define threadIdx (cinemo_cpu::thread_index)
#define blockIdx (cinemo_cpu::block_index)
#define blockDim (cinemo_cpu::block_dim)
#define gridDim (cinemo_cpu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

// `__shared__ T a[N];` inside a function must be one array per block: a function-local static (blocks run in
// turn). `extern __shared__ T name[];` at file scope is the dynamic buffer: the build defines `name` as
// `(*CINEMO_DYNAMIC_SHARED())`, so that line declares the function below. The unused int before `static`
// turns `extern` into a harmless declaration of its own (C++ has no `extern static`).
#define CINEMO_CAT2(a, b) a##b
#define CINEMO_CAT(a, b) CINEMO_CAT2(a, b)
#define __shared__ int CINEMO_CAT(cinemo_shared_, __COUNTER__) [[maybe_unused]]; static

#ifndef CINEMO_SHARED_TYPE
#define CINEMO_SHARED_TYPE double
#endif
static inline CINEMO_SHARED_TYPE (*CINEMO_DYNAMIC_SHARED())[]
{
    return reinterpret_cast<CINEMO_SHARED_TYPE(*)[]>(cinemo_cpu::dynamic_shared);
}

inline void __syncthreads() { cinemo_cpu::block_barrier->arrive_and_wait(); }
inline double cospi(double x) { return std::cos(M_PI * x); }
using std::sqrt;
