// Per-image kernels of the flow: the affine coupling forward and backward (with the per-image
// log-det and d_scale reductions) and the dequantisation logit with its log-det. One block of
// exactly 256 threads per image (grid = batch); reductions are fixed-order f64 trees in
// shared memory, so results are deterministic and need no atomics.
//
// The coupling takes its scale function as `mode` (common.cuh): 0 RealNVP's
// s = scale[j] * tanh(s_raw), 1 Glow's exp(s) = floor + (1 - floor) sigmoid(s_raw + 2) (then
// `scale` and `d_scale_part` are not touched and may be null; `floor` is unused in mode 0).

#include "common.cuh"

// x_b = x_b exp(s) + t on the changed half of image blockIdx.x; log_det[n] += sum(s).
extern "C" __global__ void __launch_bounds__(256)
    cf_coupling_forward(int c, int h, int w, int mask, int mode, float floor,
                        const float* __restrict__ st,
                        const float* __restrict__ scale, float* __restrict__ x,
                        float* __restrict__ log_det) {
    const int n = blockIdx.x;
    const int p = h * w;
    const int cc = cf_changed_count(mask, c);
    const int per = cc * p;
    const float* stn = st + (cf_u64)n * (cf_u64)(2 * per);
    float* xn = x + (cf_u64)n * (cf_u64)(c * p);
    double acc = 0.0;
    for (int e = threadIdx.x; e < per; e += 256) {
        int j = e / p, i = e - (e / p) * p;
        int row = i / w, col = i - (i / w) * w;
        if (!cf_changes_pixel(mask, row, col)) continue;
        float ex;
        float s = cf_coupling_s(mode, mode == CF_SCALE_TANH ? scale[j] : floor, stn[e], &ex);
        float* xp = xn + cf_changed_channel(mask, j) * p + i;
        *xp = *xp * ex + stn[per + e];
        acc += (double)s;
    }
    double sum = cf_block_sum(acc);
    if (threadIdx.x == 0) log_det[n] += (float)sum;
}

// Backward of cf_coupling_forward for image blockIdx.x given the coupling's input x. With
// y = x e^s + t and log_det += s:  dL/ds = g x e^s + g_log_det, dL/dt = g,
// dL/dx_b = g e^s (kept half: identity), and
//   mode 0: dL/ds_raw = dL/ds * scale * (1 - tanh^2), dL/dscale += dL/ds * tanh;
//   mode 1: dL/ds_raw = dL/ds * cf_glow_scale_grad (1 - e^s without a floor).
// Mode 0 writes the image's per-channel dL/dscale to d_scale_part[n][j] (summed by
// cf_col_sum_add).
extern "C" __global__ void __launch_bounds__(256)
    cf_coupling_backward(int c, int h, int w, int mask, int mode, float floor, float g_log_det,
                         const float* __restrict__ x, const float* __restrict__ st,
                         const float* __restrict__ scale, float* __restrict__ dy,
                         float* __restrict__ d_st, float* __restrict__ d_scale_part) {
    const int n = blockIdx.x;
    const int p = h * w;
    const int cc = cf_changed_count(mask, c);
    const int per = cc * p;
    const float* stn = st + (cf_u64)n * (cf_u64)(2 * per);
    float* dstn = d_st + (cf_u64)n * (cf_u64)(2 * per);
    const float* xn = x + (cf_u64)n * (cf_u64)(c * p);
    float* dyn = dy + (cf_u64)n * (cf_u64)(c * p);
    if (mode == CF_SCALE_SIGMOID) {
        // No scale parameter, so no per-channel reduction: one pass over the image.
        for (int e = threadIdx.x; e < per; e += 256) {
            int j = e / p, i = e - (e / p) * p;
            int row = i / w, col = i - (i / w) * w;
            if (!cf_changes_pixel(mask, row, col)) {
                dstn[e] = 0.0f;
                dstn[per + e] = 0.0f;
                continue;
            }
            const int xi = cf_changed_channel(mask, j) * p + i;
            float ex;
            float dsdr = cf_glow_scale_grad(stn[e], floor, &ex);
            float g = dyn[xi];
            float ds = g * xn[xi] * ex + g_log_det;
            dstn[e] = ds * dsdr;
            dstn[per + e] = g;
            dyn[xi] = g * ex;
        }
        return;
    }
    for (int j = 0; j < cc; ++j) {
        const float sc = scale[j];
        const int ch = cf_changed_channel(mask, j);
        double acc = 0.0;
        for (int i = threadIdx.x; i < p; i += 256) {
            int e = j * p + i;
            int row = i / w, col = i - (i / w) * w;
            if (!cf_changes_pixel(mask, row, col)) {
                dstn[e] = 0.0f;
                dstn[per + e] = 0.0f;
                continue;
            }
            float th = tanhf(stn[e]);
            float ex = expf(sc * th);
            float g = dyn[ch * p + i];
            float ds = g * xn[ch * p + i] * ex + g_log_det;
            dstn[e] = ds * sc * (1.0f - th * th);
            dstn[per + e] = g;
            acc += (double)(ds * th);
            dyn[ch * p + i] = g * ex;
        }
        double sum = cf_block_sum(acc);
        if (threadIdx.x == 0) d_scale_part[(cf_u64)n * (cf_u64)cc + j] = (float)sum;
    }
}

// out[j] += part[0][j], then part[1][j], ... in row order, in f32 (the CPU backend's order).
extern "C" __global__ void __launch_bounds__(256)
    cf_col_sum_add(int rows, int cols, const float* __restrict__ part, float* __restrict__ out) {
    int j = blockIdx.x * 256 + threadIdx.x;
    if (j >= cols) return;
    float acc = out[j];
    for (int r = 0; r < rows; ++r) acc += part[(cf_u64)r * (cf_u64)cols + j];
    out[j] = acc;
}

// In place u -> logit(alpha + (1 - 2 alpha) u) on image blockIdx.x; its log-det
// sum(log(1 - 2 alpha) - log s - log(1 - s)) overwrites log_det[n].
extern "C" __global__ void __launch_bounds__(256)
    cf_logit_forward(int image_len, float alpha, float* __restrict__ x,
                     float* __restrict__ log_det) {
    const int n = blockIdx.x;
    const float span = 1.0f - 2.0f * alpha;
    const float log_span = logf(span);
    float* xn = x + (cf_u64)n * (cf_u64)image_len;
    double acc = 0.0;
    for (int e = threadIdx.x; e < image_len; e += 256) {
        float s = alpha + span * xn[e];
        float ls = logf(s), l1s = logf(1.0f - s);
        xn[e] = ls - l1s;
        acc += (double)(log_span - ls - l1s);
    }
    double sum = cf_block_sum(acc);
    if (threadIdx.x == 0) log_det[n] = (float)sum;
}
