// Host launchers of libcinemo_dct: the same launch plans as kernels/cupy_dct.py (gemm_plan, init_plan).
#include "dct_api.h"

#include <algorithm>

#include "dct.cu"  // the kernels, shared verbatim with cupy.RawModule

namespace {

constexpr long long kMaxGrid = 1LL << 20;
constexpr size_t kDefaultSmem = 48 * 1024;

template <typename T> struct Kernels;
template <> struct Kernels<float> {
    static constexpr auto basis = dct_basis_f32;
    static constexpr auto gemm = dct_gemm_f32;
    static constexpr auto init = dct_init_f32;
};
template <> struct Kernels<double> {
    static constexpr auto basis = dct_basis_f64;
    static constexpr auto gemm = dct_gemm_f64;
    static constexpr auto init = dct_init_f64;
};

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

template <typename T>
int dct_impl(const T* x, T* out, const long long* shape, int axis, int inverse, cudaStream_t stream)
{
    if (axis < 0) axis += 5;
    if (axis < 2 || axis > 4 || x == out) return cudaErrorInvalidValue;
    long long outer = 1, inner = 1, total = 1;
    for (int d = 0; d < 5; ++d) {
        if (shape[d] < 0) return cudaErrorInvalidValue;
        total *= shape[d];
        if (d < axis) outer *= shape[d];
        if (d > axis) inner *= shape[d];
    }
    const long long n = shape[axis];
    if (total == 0) return 0;
    if (n > (1LL << 20)) return cudaErrorInvalidValue;

    // Basis D_N or D_N^T (per-call scratch; the Python launcher caches it per (N, dtype)).
    const bool basis_is_a = inner > 1;
    const int transpose = basis_is_a ? inverse : !inverse;
    T* basis = nullptr;
    cudaError_t err = cudaMallocAsync(&basis, sizeof(T) * n * n, stream);
    if (err != cudaSuccess) return err;
    Kernels<T>::basis<<<(unsigned)std::min<long long>(ceil_div(n * n, 256), kMaxGrid), 256, 0, stream>>>(
        basis, (int)n, transpose);

    long long lda, sa, ldb, sb, ldc, sc, batch;
    int m, nn, k;
    const T *a, *b;
    if (basis_is_a) {  // out[o] (n x inner) = basis (n x n) @ x[o]
        a = basis; lda = n; sa = 0;
        b = x; ldb = inner; sb = n * inner;
        ldc = inner; sc = n * inner;
        m = (int)n; nn = (int)inner; k = (int)n; batch = outer;
    } else {           // out (outer x n) = x (outer x n) @ basis
        a = x; lda = n; sa = 0;
        b = basis; ldb = n; sb = 0;
        ldc = n; sc = 0;
        m = (int)outer; nn = (int)n; k = (int)n; batch = 1;
    }
    const long long tiles = batch * ceil_div(m, CINEMO_TILE) * ceil_div(nn, CINEMO_TILE);
    Kernels<T>::gemm<<<(unsigned)std::min(tiles, kMaxGrid), dim3(CINEMO_TILE, CINEMO_ROWS), 0, stream>>>(
        a, lda, sa, b, ldb, sb, out, ldc, sc, m, nn, k, batch);
    err = cudaGetLastError();
    const cudaError_t free_err = cudaFreeAsync(basis, stream);
    return err != cudaSuccess ? err : free_err;
}

template <typename T>
int init_impl(const T* z, int z_frames, const T* noise, T* out, const long long* shape, int kh, int kw,
              double z_scale, double noise_scale, cudaStream_t stream)
{
    const long long bc = shape[0] * shape[1];
    const long long f = shape[2], h = shape[3], w = shape[4];
    if (kh < 0 || kh > h || kw < 0 || kw > w || !(z_frames == 1 || z_frames == f)) return cudaErrorInvalidValue;
    if (bc * f * h * w == 0) return 0;
    const size_t base = sizeof(T) * (h * kh + w * kw + h * kw + (long long)kh * kw);
    const size_t staged = base + sizeof(T) * 2 * h * w;
    int device = 0, limit = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    const int stage = staged <= (size_t)limit;
    const size_t smem = stage ? staged : base;
    if (smem > (size_t)limit) return cudaErrorInvalidValue;
    if (smem > kDefaultSmem) {
        err = cudaFuncSetAttribute(Kernels<T>::init, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return err;
    }
    Kernels<T>::init<<<(unsigned)std::min(bc * f, kMaxGrid), CINEMO_INIT_THREADS, smem, stream>>>(
        z, z_frames, noise, out, bc, (int)f, (int)h, (int)w, kh, kw, (T)z_scale, (T)noise_scale, stage);
    return cudaGetLastError();
}

}  // namespace

extern "C" {
int cinemo_dct_f32(const float* x, float* out, const long long shape[5], int axis, int inverse, cudaStream_t s)
{
    return dct_impl(x, out, shape, axis, inverse, s);
}
int cinemo_dct_f64(const double* x, double* out, const long long shape[5], int axis, int inverse, cudaStream_t s)
{
    return dct_impl(x, out, shape, axis, inverse, s);
}
int cinemo_dct_init_f32(const float* z, int z_frames, const float* noise, float* out, const long long shape[5],
                        int kh, int kw, double z_scale, double noise_scale, cudaStream_t s)
{
    return init_impl(z, z_frames, noise, out, shape, kh, kw, z_scale, noise_scale, s);
}
int cinemo_dct_init_f64(const double* z, int z_frames, const double* noise, double* out, const long long shape[5],
                        int kh, int kw, double z_scale, double noise_scale, cudaStream_t s)
{
    return init_impl(z, z_frames, noise, out, shape, kh, kw, z_scale, noise_scale, s);
}
}
