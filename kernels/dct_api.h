// C API of libcinemo_dct (host launchers for the kernels in dct.cu). All pointers are device
// pointers to contiguous (B, C, F, H, W) arrays; shape = {B, C, F, H, W}; work is queued on `stream`.
// Return 0 on success, else a cudaError_t value (or cudaErrorInvalidValue for bad arguments).
#pragma once
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// Orthonormal DCT-II (inverse = 0) or DCT-III (inverse = 1) along axis 2, 3 or 4; out != x.
int cinemo_dct_f32(const float* x, float* out, const long long shape[5], int axis, int inverse,
                   cudaStream_t stream);
int cinemo_dct_f64(const double* x, double* out, const long long shape[5], int axis, int inverse,
                   cudaStream_t stream);

// DCTInit (docs/METHOD.md, DCTInit): out = noise + LP2(z_scale * z + noise_scale * noise), z (B, C, z_frames, H, W)
// with z_frames 1 or F. For z1: z_scale = sqrt(a), noise_scale = sqrt(1 - a) - 1; for z_tau: 1, -1.
int cinemo_dct_init_f32(const float* z, int z_frames, const float* noise, float* out,
                        const long long shape[5], int kh, int kw, double z_scale, double noise_scale,
                        cudaStream_t stream);
int cinemo_dct_init_f64(const double* z, int z_frames, const double* noise, double* out,
                        const long long shape[5], int kh, int kw, double z_scale, double noise_scale,
                        cudaStream_t stream);

#ifdef __cplusplus
}
#endif
