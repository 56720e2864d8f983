// dct.cu's kernels as a CPU library: cinemo_cpu_launch(name, grid, block, shared bytes, args) runs one launch
// the way cudaLaunchKernel does (args: pointers to the argument values), on the model in cuda_on_cpu.h.
// Built by kernels/cuda_on_cpu.py with CINEMO_KERNEL_SOURCE naming the .cu file, which is included unchanged.
#include "cuda_on_cpu.h"

#include CINEMO_KERNEL_SOURCE

#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace cinemo_cpu {

template <typename... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>)
{
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <typename... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block, std::size_t shared_bytes, void** args)
{
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x * grid.y * grid.z == 0) return 2;  // CUDA refuses these too
    grid_dim = grid;
    block_dim = block;
    std::barrier<> barrier(threads);
    // Exactly the launch's size, so that AddressSanitizer sees a kernel that uses more.
    unsigned char* shared = new unsigned char[shared_bytes];
    auto run = [&](unsigned tid) {
        thread_index = dim3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
        block_barrier = &barrier;
        dynamic_shared = shared;
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    if (tid == 0) std::memset(shared, 0xFF, shared_bytes);  // NaN, as float and as double
                    barrier.arrive_and_wait();
                    block_index = dim3{bx, by, bz};
                    call(kernel, args, std::index_sequence_for<A...>{});
                    barrier.arrive_and_wait();  // the block is done before the next one starts
                }
    };
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (unsigned tid = 1; tid < threads; ++tid) pool.emplace_back(run, tid);
    run(0);
    for (auto& t : pool) t.join();
    delete[] shared;
    return 0;
}

}  // namespace cinemo_cpu

#define CINEMO_KERNEL(name) \
    if (std::strcmp(kernel, #name) == 0) return cinemo_cpu::launch(name, grid, block, shared_bytes, args);

extern "C" int cinemo_cpu_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                 unsigned by, unsigned bz, std::size_t shared_bytes, void** args)
{
    const dim3 grid{gx, gy, gz}, block{bx, by, bz};
    CINEMO_KERNEL(dct_basis_f32)
    CINEMO_KERNEL(dct_basis_f64)
    CINEMO_KERNEL(dct_gemm_f32)
    CINEMO_KERNEL(dct_gemm_f64)
    CINEMO_KERNEL(dct_init_f32)
    CINEMO_KERNEL(dct_init_f64)
    return 1;  // no such kernel
}
