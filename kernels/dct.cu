// Orthonormal DCT-II / DCT-III kernels and the fused DCTInit kernel (docs/METHOD.md, DCTInit).
//
// This file is loaded as-is by cupy.RawModule (NVRTC), so it must stay self-contained:
// no #include (NVRTC has no host headers), no host code. The CMake library compiles it through
// dct_api.cu, which #includes it and adds the host launchers.
//
// Conventions (all row-major, contiguous):
//   D_N[k, n] = s_k * cos(pi * (2n + 1) * k / (2N)),  s_0 = sqrt(1/N), s_k = sqrt(2/N)   (k, n < N)
//   DCT-II along an axis:  y = D_N x;   DCT-III (inverse): x = D_N^T y   (D_N is orthogonal).
//   This is scipy.fft.dct(..., type=2, norm="ortho") and torch_dct.dct(..., norm="ortho").

#define CINEMO_TILE 32       // output tile edge of the batched GEMM (and its K step)
#define CINEMO_ROWS 8        // blockDim = (CINEMO_TILE, CINEMO_ROWS); each thread owns TILE/ROWS outputs
#define CINEMO_INIT_THREADS 256

// ---------------------------------------------------------------------------------------------
// Basis: out[r, c] = D_N[r, c] (transpose == 0) or D_N[c, r] (transpose == 1).
// Evaluated in double with an exact integer range reduction, then rounded once to T.
__device__ __forceinline__ double dct_basis_value(long long k, long long n, long long N)
{
    const long long phase = ((2 * n + 1) * k) % (4 * N);  // cos(pi*p/(2N)) has period 4N in p
    const double scale = (k == 0) ? sqrt(1.0 / (double)N) : sqrt(2.0 / (double)N);
    return scale * cospi((double)phase / (double)(2 * N));
}

template <typename T>
__device__ void dct_basis(T* __restrict__ out, int N, int transpose)
{
    const long long total = (long long)N * N;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long r = idx / N, c = idx % N;
        out[idx] = (T)(transpose ? dct_basis_value(c, r, N) : dct_basis_value(r, c, N));
    }
}

// ---------------------------------------------------------------------------------------------
// Batched tiled GEMM: C[b] (M x N) = A[b] (M x K) * B[b] (K x N), row-major with leading
// dimensions lda/ldb/ldc and batch strides (0 = shared operand, used for the basis).
// A DCT along one axis of a contiguous (B, C, F, H, W) tensor is exactly this product with no
// transposes or copies (see cupy_dct.py / dct_api.cu for the mapping), and both operand loads are
// unit-stride along the tile's x dimension, so global loads and stores are coalesced.
// Tiles are flattened to blockIdx.x with a grid-stride loop: no gridDim.y/z limits on batch.
template <typename T>
__device__ void batched_gemm(const T* __restrict__ A, long long lda, long long strideA,
                             const T* __restrict__ B, long long ldb, long long strideB,
                             T* __restrict__ C, long long ldc, long long strideC,
                             int M, int N, int K, long long batch)
{
    __shared__ T As[CINEMO_TILE][CINEMO_TILE + 1];  // +1: no bank conflicts on the column reads
    __shared__ T Bs[CINEMO_TILE][CINEMO_TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long m_tiles = (M + CINEMO_TILE - 1) / CINEMO_TILE;
    const long long n_tiles = (N + CINEMO_TILE - 1) / CINEMO_TILE;
    const long long total = batch * m_tiles * n_tiles;

    for (long long t = blockIdx.x; t < total; t += gridDim.x) {  // uniform across the block
        const long long nt = t % n_tiles;
        const long long mt = (t / n_tiles) % m_tiles;
        const long long b = t / (n_tiles * m_tiles);
        const T* Ab = A + b * strideA;
        const T* Bb = B + b * strideB;
        T* Cb = C + b * strideC;
        const int m0 = (int)(mt * CINEMO_TILE);
        const int col = (int)(nt * CINEMO_TILE) + tx;

        T acc[CINEMO_TILE / CINEMO_ROWS];
#pragma unroll
        for (int i = 0; i < CINEMO_TILE / CINEMO_ROWS; ++i) acc[i] = (T)0;

        for (int k0 = 0; k0 < K; k0 += CINEMO_TILE) {
            for (int r = ty; r < CINEMO_TILE; r += CINEMO_ROWS) {
                const int m = m0 + r, ka = k0 + tx, kb = k0 + r;
                As[r][tx] = (m < M && ka < K) ? Ab[(long long)m * lda + ka] : (T)0;
                Bs[r][tx] = (kb < K && col < N) ? Bb[(long long)kb * ldb + col] : (T)0;
            }
            __syncthreads();
#pragma unroll 8
            for (int kk = 0; kk < CINEMO_TILE; ++kk) {
                const T bv = Bs[kk][tx];
#pragma unroll
                for (int i = 0; i < CINEMO_TILE / CINEMO_ROWS; ++i)
                    acc[i] += As[ty + i * CINEMO_ROWS][kk] * bv;  // warp-uniform row: broadcast
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < CINEMO_TILE / CINEMO_ROWS; ++i) {
            const int m = m0 + ty + i * CINEMO_ROWS;
            if (m < M && col < N) Cb[(long long)m * ldc + col] = acc[i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fused DCTInit (docs/METHOD.md, DCTInit). With the spatial box mask broadcast over temporal frequency,
//   IDCT3(DCT3(z_tau) * M + DCT3(noise) * (1 - M)) = noise + LP2(z_tau - noise),
// LP2 = per-frame orthonormal 2D DCT, keep [:kh, :kw], inverse 2D DCT = Uh Uh^T X Uw Uw^T with
// Uh = D_H[:kh, :]^T (H x kh), Uw = D_W[:kw, :]^T (W x kw). With z_tau = sqrt(a) z1 + sqrt(1-a) noise:
//   out = noise + LP2(z_scale * z + noise_scale * noise),  z_scale = sqrt(a), noise_scale = sqrt(1-a) - 1
// (or z = z_tau, z_scale = 1, noise_scale = -1). One block per frame: the noise and z frames are read
// once (z with z_frames == 1 is shared by the F frames of a (b, c) and stays in L2), out written once.
//
// Dynamic shared memory, in elements of T: Uh[H*kh] Uw[W*kw] G[H*kw] Y[kh*kw] and, if stage != 0,
// X[H*W] Z[H*W] (the frames). If stage == 0 (frame too large for shared memory) the same code reads
// the frames from global memory through generic pointers (L1/L2 cached).
extern __shared__ double cinemo_dct_smem[];  // double: 8-byte alignment for either T

template <typename T>
__device__ void dct_init(const T* __restrict__ z, int z_frames, const T* __restrict__ noise,
                         T* __restrict__ out, long long bc, int F, int H, int W, int kh, int kw,
                         T z_scale, T noise_scale, int stage)
{
    T* Uh = reinterpret_cast<T*>(cinemo_dct_smem);
    T* Uw = Uh + (long long)H * kh;
    T* G = Uw + (long long)W * kw;      // H x kw: first X*Uw, then Uh*Y
    T* Y = G + (long long)H * kw;       // kh x kw low-frequency coefficients
    T* Xs = Y + (long long)kh * kw;     // H x W (only if stage)
    T* Zs = Xs + (long long)H * W;      // H x W (only if stage)
    const int tid = threadIdx.x, nt = blockDim.x;
    const int HW = H * W;

    for (int idx = tid; idx < H * kh; idx += nt) {
        const int h = idx / kh, i = idx % kh;
        Uh[idx] = (T)dct_basis_value(i, h, H);
    }
    for (int idx = tid; idx < W * kw; idx += nt) {
        const int w = idx / kw, j = idx % kw;
        Uw[idx] = (T)dct_basis_value(j, w, W);
    }

    const long long frames = bc * F;
    for (long long fr = blockIdx.x; fr < frames; fr += gridDim.x) {  // uniform across the block
        const long long b = fr / F;
        const int f = (int)(fr % F);
        const T* xg = noise + fr * HW;
        const T* zg = z + (b * z_frames + (z_frames == 1 ? 0 : f)) * HW;
        T* og = out + fr * HW;
        const T* X = xg;
        const T* Z = zg;
        if (stage) {
            for (int idx = tid; idx < HW; idx += nt) {  // coalesced
                Xs[idx] = xg[idx];
                Zs[idx] = zg[idx];
            }
            X = Xs;
            Z = Zs;
        }
        __syncthreads();  // also orders the basis fill before first use

        // G = (z_scale Z + noise_scale X) Uw        (H x kw)
        for (int idx = tid; idx < H * kw; idx += nt) {
            const int h = idx / kw, j = idx % kw;
            T sz = (T)0, sx = (T)0;
            for (int w = 0; w < W; ++w) {
                const T u = Uw[w * kw + j];
                sz += Z[h * W + w] * u;
                sx += X[h * W + w] * u;
            }
            G[idx] = z_scale * sz + noise_scale * sx;
        }
        __syncthreads();
        // Y = Uh^T G                                 (kh x kw)
        for (int idx = tid; idx < kh * kw; idx += nt) {
            const int i = idx / kw, j = idx % kw;
            T s = (T)0;
            for (int h = 0; h < H; ++h) s += Uh[h * kh + i] * G[h * kw + j];
            Y[idx] = s;
        }
        __syncthreads();
        // G = Uh Y                                   (H x kw), G is free again after the barrier
        for (int idx = tid; idx < H * kw; idx += nt) {
            const int h = idx / kw, j = idx % kw;
            T s = (T)0;
            for (int i = 0; i < kh; ++i) s += Uh[h * kh + i] * Y[i * kw + j];
            G[idx] = s;
        }
        __syncthreads();
        // out = X + G Uw^T                           (H x W), coalesced store
        for (int idx = tid; idx < HW; idx += nt) {
            const int h = idx / W, w = idx % W;
            T s = (T)0;
            for (int j = 0; j < kw; ++j) s += G[h * kw + j] * Uw[w * kw + j];
            og[idx] = X[idx] + s;
        }
        __syncthreads();  // X/Z/G are overwritten by the next frame
    }
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, one per dtype, looked up by name from cupy.RawModule and dct_api.cu.
#define CINEMO_DCT_ENTRY_POINTS(T, SUFFIX)                                                          \
    extern "C" __global__ void dct_basis_##SUFFIX(T* out, int N, int transpose)                     \
    {                                                                                               \
        dct_basis<T>(out, N, transpose);                                                            \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(CINEMO_TILE * CINEMO_ROWS)                         \
        dct_gemm_##SUFFIX(const T* A, long long lda, long long strideA, const T* B, long long ldb,  \
                          long long strideB, T* C, long long ldc, long long strideC, int M, int N,  \
                          int K, long long batch)                                                   \
    {                                                                                               \
        batched_gemm<T>(A, lda, strideA, B, ldb, strideB, C, ldc, strideC, M, N, K, batch);        \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(CINEMO_INIT_THREADS)                               \
        dct_init_##SUFFIX(const T* z, int z_frames, const T* noise, T* out, long long bc, int F,   \
                          int H, int W, int kh, int kw, T z_scale, T noise_scale, int stage)        \
    {                                                                                               \
        dct_init<T>(z, z_frames, noise, out, bc, F, H, W, kh, kw, z_scale, noise_scale, stage);    \
    }

CINEMO_DCT_ENTRY_POINTS(float, f32)
CINEMO_DCT_ENTRY_POINTS(double, f64)
