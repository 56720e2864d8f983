// dct_test: libcinemo_dct vs a host double-precision reference (direct O(N^2) DCT, DCTInit of docs/METHOD.md; DCTInit
// through full 3D transforms). Exit 0 = pass, 1 = fail, 77 = no CUDA device (ctest: skipped).
#include "dct_api.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using Shape = std::vector<long long>;  // (B, C, F, H, W)

long long numel(const Shape& s) { long long n = 1; for (long long d : s) n *= d; return n; }

// Host reference: orthonormal DCT-II / DCT-III along `axis`, in double.
std::vector<double> host_dct(const std::vector<double>& x, const Shape& s, int axis, bool inverse)
{
    long long outer = 1, inner = 1;
    for (int d = 0; d < axis; ++d) outer *= s[d];
    for (int d = axis + 1; d < 5; ++d) inner *= s[d];
    const long long n = s[axis];
    std::vector<double> basis(n * n), y(x.size());
    for (long long k = 0; k < n; ++k)
        for (long long i = 0; i < n; ++i)
            basis[k * n + i] = std::sqrt((k ? 2.0 : 1.0) / n) * std::cos(M_PI * (2 * i + 1) * k / (2.0 * n));
    for (long long o = 0; o < outer; ++o)
        for (long long k = 0; k < n; ++k)
            for (long long in = 0; in < inner; ++in) {
                double acc = 0;
                for (long long i = 0; i < n; ++i)
                    acc += (inverse ? basis[i * n + k] : basis[k * n + i]) * x[(o * n + i) * inner + in];
                y[(o * n + k) * inner + in] = acc;
            }
    return y;
}

// The DCTInit definition (docs/METHOD.md): idct3(dct3(z_tau) * M + dct3(noise) * (1 - M)), M the spatial box over all f.
std::vector<double> host_dct_init(const std::vector<double>& z_tau, const std::vector<double>& noise,
                                  const Shape& s, int kh, int kw)
{
    auto dct3 = [&](std::vector<double> v, bool inverse) {
        for (int axis = 2; axis < 5; ++axis) v = host_dct(v, s, axis, inverse);
        return v;
    };
    std::vector<double> a = dct3(z_tau, false), b = dct3(noise, false);
    const long long h = s[3], w = s[4];
    for (long long i = 0; i < (long long)a.size(); ++i) {
        const long long hw = i % (h * w);
        if (hw / w < kh && hw % w < kw) b[i] = a[i];
    }
    return dct3(b, true);
}

double rel_l2(const std::vector<double>& got, const std::vector<double>& ref)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1e-300));
}

#define CHECK_CUDA(call)                                                                  \
    do {                                                                                  \
        const int rc_ = (int)(call);                                                      \
        if (rc_ != 0) {                                                                   \
            std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,     \
                         cudaGetErrorString((cudaError_t)rc_));                           \
            std::exit(1);                                                                 \
        }                                                                                 \
    } while (0)

template <typename T> struct Api;
template <> struct Api<float> {
    static constexpr auto dct = cinemo_dct_f32;
    static constexpr auto init = cinemo_dct_init_f32;
    static constexpr double tol = 1e-6;   // relative L2, fp32 accumulation
    static constexpr const char* name = "f32";
};
template <> struct Api<double> {
    static constexpr auto dct = cinemo_dct_f64;
    static constexpr auto init = cinemo_dct_init_f64;
    static constexpr double tol = 1e-12;
    static constexpr const char* name = "f64";
};

struct Device {
    template <typename T> static T* upload(const std::vector<double>& h)
    {
        std::vector<T> t(h.begin(), h.end());
        T* d = nullptr;
        CHECK_CUDA(cudaMalloc(&d, sizeof(T) * (t.size() ? t.size() : 1)));
        CHECK_CUDA(cudaMemcpy(d, t.data(), sizeof(T) * t.size(), cudaMemcpyHostToDevice));
        return d;
    }
    template <typename T> static std::vector<double> download(const T* d, size_t n)
    {
        std::vector<T> t(n);
        CHECK_CUDA(cudaMemcpy(t.data(), d, sizeof(T) * n, cudaMemcpyDeviceToHost));
        return std::vector<double>(t.begin(), t.end());
    }
};

std::vector<double> randn(size_t n, std::mt19937_64& rng)
{
    std::normal_distribution<double> dist;
    std::vector<double> v(n);
    for (double& x : v) x = dist(rng);
    return v;
}

template <typename T>
int run_shape(const Shape& s, std::mt19937_64& rng)
{
    int failures = 0;
    const long long n = numel(s);
    // Quantise the input to T first so the reference sees exactly what the kernel sees.
    std::vector<double> x = randn(n, rng);
    for (double& v : x) v = (double)(T)v;
    T* dx = Device::upload<T>(x);
    T* dy = Device::upload<T>(std::vector<double>(n, 0.0));
    for (int axis = 2; axis < 5; ++axis)
        for (int inverse = 0; inverse < 2; ++inverse) {
            CHECK_CUDA(Api<T>::dct(dx, dy, s.data(), axis, inverse, 0));
            CHECK_CUDA(cudaDeviceSynchronize());
            const double err = rel_l2(Device::download(dy, n), host_dct(x, s, axis, inverse));
            const bool ok = err < Api<T>::tol;
            failures += !ok;
            std::printf("%s dct %lldx%lldx%lldx%lldx%lld axis %d %s: rel L2 %.3g %s\n", Api<T>::name, s[0], s[1],
                        s[2], s[3], s[4], axis, inverse ? "inverse" : "forward", err, ok ? "ok" : "FAIL");
        }

    // DCTInit from z1 (one frame, a_975) and from a per-frame z_tau.
    const int kh = (int)(s[3] * 0.23), kw = (int)(s[4] * 0.23);
    for (int per_frame = 0; per_frame < 2; ++per_frame) {
        const double a = per_frame ? 1.0 : 6.5173e-5;
        const double z_scale = std::sqrt(a), noise_scale = -a / (1.0 + std::sqrt(1.0 - a));
        const long long z_frames = per_frame ? s[2] : 1;
        const long long frame = s[3] * s[4];
        std::vector<double> z = randn(s[0] * s[1] * z_frames * frame, rng);
        for (double& v : z) v = (double)(T)v;
        std::vector<double> z_tau(n);
        for (long long i = 0; i < n; ++i) {
            const long long bc = i / (s[2] * frame), f = (i / frame) % s[2];
            z_tau[i] = z_scale * z[(bc * z_frames + (per_frame ? f : 0)) * frame + i % frame] + std::sqrt(1.0 - a) * x[i];
        }
        T* dz = Device::upload<T>(z);
        CHECK_CUDA(Api<T>::init(dz, (int)z_frames, dx, dy, s.data(), kh, kw, z_scale, noise_scale, 0));
        CHECK_CUDA(cudaDeviceSynchronize());
        const double err = rel_l2(Device::download(dy, n), host_dct_init(z_tau, x, s, kh, kw));
        const bool ok = err < Api<T>::tol;
        failures += !ok;
        std::printf("%s dct_init %lldx%lldx%lldx%lldx%lld %s mask %dx%d: rel L2 %.3g %s\n", Api<T>::name, s[0], s[1],
                    s[2], s[3], s[4], per_frame ? "z_tau" : "z1", kh, kw, err, ok ? "ok" : "FAIL");
        CHECK_CUDA(cudaFree(dz));
    }
    CHECK_CUDA(cudaFree(dx));
    CHECK_CUDA(cudaFree(dy));
    return failures;
}

}  // namespace

int main()
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        std::printf("dct_test: no CUDA device found; skipping (exit 77). Run on a GPU machine: ctest --test-dir build/cuda\n");
        return 77;
    }
    const std::vector<Shape> shapes = {{1, 4, 15, 40, 64}, {2, 3, 5, 7, 9}, {1, 1, 1, 1, 1}, {1, 2, 3, 33, 65},
                                       {1, 1, 2, 64, 31}, {1, 1, 1, 128, 96}};
    std::mt19937_64 rng(20240601);
    int failures = 0;
    for (const Shape& s : shapes) {
        failures += run_shape<float>(s, rng);
        failures += run_shape<double>(s, rng);
    }
    std::printf("dct_test: %d failure(s)\n", failures);
    return failures ? 1 : 0;
}
