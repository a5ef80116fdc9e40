// Glow's layers on the device: ActNorm (forward, inverse, backward and the data-dependent
// initialisation's statistics) and the LU-parametrised invertible 1x1 convolution (W and
// W^-1 composed from the factors in f64, the chain rule back to the factors in f64, and the
// log-det). The formulas are the CPU backend's (trainer/src/backend/actnorm.rs,
// trainer/src/invconv.rs); launch configurations are in cuda/KERNELS.md.
//
// Reductions are deterministic: per-channel sums are fixed-order f64 trees per (channel, chunk
// of images) block, then summed over the chunks in order; no atomics.

#include "common.cuh"

// log_det[i] += (float)(plane * sum(v[0..n])) for every image i < batch; the sum in f64 in
// index order (the CPU's order), by each thread for itself (n is a channel count).
static __device__ __forceinline__ void cf_add_plane_sum(int batch, int n, int plane,
                                                        const float* __restrict__ v,
                                                        float* __restrict__ log_det) {
    CF_GRID_STRIDE(i, batch) {
        double s = 0.0;
        for (int j = 0; j < n; ++j) s += (double)v[j];
        log_det[i] += (float)((double)plane * s);
    }
}

// The log-det of a 1x1 convolution: log_det[i] += plane * sum(log_s). EW(batch).
extern "C" __global__ void __launch_bounds__(256)
    cf_add_log_det(int batch, int n, int plane, const float* __restrict__ v,
                   float* __restrict__ log_det) {
    cf_add_plane_sum(batch, n, plane, v, log_det);
}

// ActNorm forward in place: x = x exp(logs[ch]) + bias[ch] over [batch][c][plane], and
// log_det[i] += plane * sum(logs). EW(batch * c * plane).
extern "C" __global__ void __launch_bounds__(256)
    cf_actnorm_forward(int batch, int c, int plane, const float* __restrict__ logs,
                       const float* __restrict__ bias, float* __restrict__ x,
                       float* __restrict__ log_det) {
    CF_GRID_STRIDE(e, batch * c * plane) {
        const int ch = (int)((e / (unsigned)plane) % (unsigned)c);
        x[e] = x[e] * expf(logs[ch]) + bias[ch];
    }
    cf_add_plane_sum(batch, c, plane, logs, log_det);
}

// ActNorm inverse in place: y = (y - bias[ch]) exp(-logs[ch]). EW(batch * c * plane).
extern "C" __global__ void __launch_bounds__(256)
    cf_actnorm_inverse(int batch, int c, int plane, const float* __restrict__ logs,
                       const float* __restrict__ bias, float* __restrict__ y) {
    CF_GRID_STRIDE(e, batch * c * plane) {
        const int ch = (int)((e / (unsigned)plane) % (unsigned)c);
        y[e] = (y[e] - bias[ch]) * expf(-logs[ch]);
    }
}

// Per-channel sums, pass 1. Block (256 threads) = (channel blockIdx.x, chunk blockIdx.y of
// imgs_per_chunk images). Writes part[(chunk * c + ch) * 4 + 0..4] = (hi, lo) of sum a, then
// (hi, lo) of sum b, where
//   mode 0 (statistics, ActNorm's initialisation): a = x, b = x^2;
//   mode 1 (backward, given the layer's input x and dy): a = dy * (x e), b = dy, and in
//          place dy = dy e, with e = exp(logs[ch]).
extern "C" __global__ void __launch_bounds__(256)
    cf_actnorm_sums(int batch, int c, int plane, int imgs_per_chunk, int mode,
                    const float* __restrict__ x, const float* __restrict__ logs,
                    float* __restrict__ dy, float* __restrict__ part) {
    const int ch = blockIdx.x;
    const int chunk = blockIdx.y;
    const int n0 = chunk * imgs_per_chunk;
    const int n1 = n0 + imgs_per_chunk < batch ? n0 + imgs_per_chunk : batch;
    const int total = (n1 - n0) * plane;
    const float e = mode == 1 ? expf(logs[ch]) : 1.0f;
    double a = 0.0, b = 0.0;
    for (int k = threadIdx.x; k < total; k += 256) {
        const int n = n0 + k / plane;
        const int i = k - (k / plane) * plane;
        const cf_u64 idx = ((cf_u64)n * (cf_u64)c + (cf_u64)ch) * (cf_u64)plane + (cf_u64)i;
        const float v = x[idx];
        if (mode == 0) {
            const double d = (double)v;
            a += d;
            b += d * d;
        } else {
            const float g = dy[idx];
            a += (double)g * (double)(v * e);
            b += (double)g;
            dy[idx] = g * e;
        }
    }
    a = cf_block_sum(a);
    b = cf_block_sum(b);
    if (threadIdx.x == 0) {
        float* out = part + ((cf_u64)chunk * (cf_u64)c + (cf_u64)ch) * 4;
        cf_write_hi_lo(out, a);
        cf_write_hi_lo(out + 2, b);
    }
}

// Per-channel sums, pass 2: one thread per channel adds the chunks' (a, b) in chunk order
// (f64), then
//   mode 0: mean = a / count, std = sqrt(max(b / count - mean^2, 0)),
//           out0 = logs = -ln(std + 1e-6), out1 = bias = -mean / (std + 1e-6) (overwritten);
//   mode 1: out0 = d_logs += a + g_log_det * count, out1 = d_bias += b.
// count = batch * plane (at least 1 in mode 0). EW(c).
extern "C" __global__ void __launch_bounds__(256)
    cf_actnorm_finish(int c, int nchunks, int mode, float g_log_det, int count,
                      const float* __restrict__ part, float* __restrict__ out0,
                      float* __restrict__ out1) {
    CF_GRID_STRIDE(ch, c) {
        double a = 0.0, b = 0.0;
        for (int k = 0; k < nchunks; ++k) {
            const float* p = part + ((cf_u64)k * (cf_u64)c + (cf_u64)ch) * 4;
            a += cf_read_hi_lo(p);
            b += cf_read_hi_lo(p + 2);
        }
        if (mode == 0) {
            const double n = (double)(count > 0 ? count : 1);
            const double mean = a / n;
            const double sd = sqrt(fmax(b / n - mean * mean, 0.0));
            out0[ch] = (float)(-log(sd + 1e-6));
            out1[ch] = (float)(-mean / (sd + 1e-6));
        } else {
            out0[ch] += (float)(a + (double)g_log_det * (double)count);
            out1[ch] += (float)b;
        }
    }
}

// Row index stored as a float in `perm`, or -1 when it is not an integer in [0, c) (the
// trainer validates the factors when a model is built; this only keeps a corrupt value from
// indexing out of bounds: the results become NaN instead).
static __device__ __forceinline__ int cf_perm_row(float v, int c) {
    const int r = (int)v;
    return (v >= 0.0f && v < (float)c && (float)r == v) ? r : -1;
}

// L[i][k] of the unit lower-triangular factor, for k <= i.
static __device__ __forceinline__ double cf_lu_l(const float* __restrict__ lower, int c, int i,
                                                 int k) {
    return k == i ? 1.0 : (double)lower[(cf_u64)i * (cf_u64)c + (cf_u64)k];
}

// U'[k][j] = (U + diag(sign exp(log_s)))[k][j], for j >= k.
static __device__ __forceinline__ double cf_lu_u(const float* __restrict__ sign,
                                                 const float* __restrict__ upper,
                                                 const float* __restrict__ log_s, int c, int k,
                                                 int j) {
    return j == k ? (double)sign[k] * exp((double)log_s[k])
                  : (double)upper[(cf_u64)k * (cf_u64)c + (cf_u64)j];
}

// W = P L U' (row r of W is row perm[r] of M = L U'), row-major [c][c], in f64, rounded to
// f32. EW(c * c).
extern "C" __global__ void __launch_bounds__(256)
    cf_invconv_weight(int c, const float* __restrict__ perm, const float* __restrict__ sign,
                      const float* __restrict__ lower, const float* __restrict__ upper,
                      const float* __restrict__ log_s, float* __restrict__ w) {
    CF_GRID_STRIDE(e, c * c) {
        const int r = (int)(e / (unsigned)c);
        const int j = (int)(e - (unsigned)r * (unsigned)c);
        const int i = cf_perm_row(perm[r], c);
        if (i < 0) {
            w[e] = __int_as_float(0x7fc00000);
            continue;
        }
        const int kmax = i < j ? i : j;
        double s = 0.0;
        for (int k = 0; k <= kmax; ++k) s += cf_lu_l(lower, c, i, k) * cf_lu_u(sign, upper, log_s, c, k, j);
        w[e] = (float)s;
    }
}

// W^-1 = U'^-1 L^-1 P^T, in f64, rounded to f32: column j is U'^-1 L^-1 e_perm[j], by forward
// then back substitution. One block of one thread per column (grid = c), with c doubles of
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(32)
    cf_invconv_inverse(int c, const float* __restrict__ perm, const float* __restrict__ sign,
                       const float* __restrict__ lower, const float* __restrict__ upper,
                       const float* __restrict__ log_s, float* __restrict__ w_inv) {
    CF_DYNAMIC_SHARED(double, y);
    const int j = blockIdx.x;
    if (threadIdx.x != 0) return;
    const int p = cf_perm_row(perm[j], c);
    if (p < 0) {
        for (int i = 0; i < c; ++i) w_inv[(cf_u64)i * (cf_u64)c + (cf_u64)j] = __int_as_float(0x7fc00000);
        return;
    }
    // L y = e_p (unit diagonal).
    for (int i = 0; i < c; ++i) {
        double v = i == p ? 1.0 : 0.0;
        for (int k = 0; k < i; ++k) v -= cf_lu_l(lower, c, i, k) * y[k];
        y[i] = v;
    }
    // U' x = y, in place from the last row.
    for (int i = c - 1; i >= 0; --i) {
        double v = y[i];
        for (int k = i + 1; k < c; ++k) v -= cf_lu_u(sign, upper, log_s, c, i, k) * y[k];
        y[i] = v / cf_lu_u(sign, upper, log_s, c, i, i);
    }
    for (int i = 0; i < c; ++i) w_inv[(cf_u64)i * (cf_u64)c + (cf_u64)j] = (float)y[i];
}

// The chain rule from dW back to the factors (trainer/src/invconv.rs, Core::backward), in f64:
// dM[perm[r]] = dW[r]; d_lower[i][k] = sum_{j >= k} dM[i][j] U'[k][j] (k < i);
// d_upper[k][j] = sum_{i >= k} L[i][k] dM[i][j] (j > k);
// d_log_s[k] = (sum_{i >= k} L[i][k] dM[i][k]) U'[k][k] + g_log_det * count.
// Every element of d_lower and d_upper is written (0 outside the strict triangles).
// EW(c * c) with 4 * c bytes of dynamic shared memory (the inverse permutation).
extern "C" __global__ void __launch_bounds__(256)
    cf_invconv_backward(int c, float g_log_det, int count, const float* __restrict__ perm,
                        const float* __restrict__ sign, const float* __restrict__ lower,
                        const float* __restrict__ upper, const float* __restrict__ log_s,
                        const float* __restrict__ d_w, float* __restrict__ d_lower,
                        float* __restrict__ d_upper, float* __restrict__ d_log_s) {
    CF_DYNAMIC_SHARED(int, inv);
    for (int r = threadIdx.x; r < c; r += blockDim.x) inv[r] = -1;
    __syncthreads();
    for (int r = threadIdx.x; r < c; r += blockDim.x) {
        const int i = cf_perm_row(perm[r], c);
        if (i >= 0) inv[i] = r;
    }
    __syncthreads();
    const double nan = (double)__int_as_float(0x7fc00000);
    // dM[i][j], or NaN for a row no valid perm entry maps to.
#define CF_DM(i, j) (inv[i] < 0 ? nan : (double)d_w[(cf_u64)inv[i] * (cf_u64)c + (cf_u64)(j)])
    CF_GRID_STRIDE(e, c * c) {
        const int a = (int)(e / (unsigned)c);
        const int b = (int)(e - (unsigned)a * (unsigned)c);
        double s = 0.0;
        if (b < a) {
            for (int j = b; j < c; ++j) s += CF_DM(a, j) * cf_lu_u(sign, upper, log_s, c, b, j);
            d_lower[e] = (float)s;
            d_upper[e] = 0.0f;
        } else if (b > a) {
            for (int i = a; i < c; ++i) s += cf_lu_l(lower, c, i, a) * CF_DM(i, b);
            d_upper[e] = (float)s;
            d_lower[e] = 0.0f;
        } else {
            for (int i = a; i < c; ++i) s += cf_lu_l(lower, c, i, a) * CF_DM(i, a);
            d_log_s[a] = (float)(s * cf_lu_u(sign, upper, log_s, c, a, a) +
                                 (double)g_log_det * (double)count);
            d_lower[e] = 0.0f;
            d_upper[e] = 0.0f;
        }
    }
#undef CF_DM
}
