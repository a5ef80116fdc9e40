// Elementwise kernels: one grid-stride loop each. Launch (see cuda/KERNELS.md, "EW launch"):
// block 256, grid min(ceil(n / 256), 4096).

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) cf_fill(int n, float value, float* dst) {
    CF_GRID_STRIDE(i, n) { dst[i] = value; }
}

extern "C" __global__ void __launch_bounds__(256)
    cf_copy(int n, const float* __restrict__ src, float* __restrict__ dst) {
    CF_GRID_STRIDE(i, n) { dst[i] = src[i]; }
}

extern "C" __global__ void __launch_bounds__(256)
    cf_axpy(int n, float a, const float* __restrict__ x, float* __restrict__ y) {
    CF_GRID_STRIDE(i, n) { y[i] += a * x[i]; }
}

extern "C" __global__ void __launch_bounds__(256)
    cf_relu_backward(int n, const float* __restrict__ y, float* __restrict__ dy) {
    CF_GRID_STRIDE(i, n) {
        if (y[i] <= 0.0f) dy[i] = 0.0f;
    }
}

// Inverse of the dequantisation logit: x -> (sigmoid(x) - alpha) / (1 - 2 alpha).
extern "C" __global__ void __launch_bounds__(256) cf_logit_inverse(int n, float alpha, float* x) {
    const float span = 1.0f - 2.0f * alpha;
    CF_GRID_STRIDE(i, n) {
        float s = 1.0f / (1.0f + expf(-x[i]));
        x[i] = (s - alpha) / span;
    }
}

// Space-to-depth 2x2 (PyTorch's pixel_unshuffle(x, 2)): output channel 4c + 2dy + dx holds
// input pixel (c, 2i + dy, 2j + dx) at (i, j). (c, h, w) is the unsqueezed shape; one thread
// per element of the squeezed tensor, which is `y` forward and `x` for the inverse.
extern "C" __global__ void __launch_bounds__(256)
    cf_squeeze(int batch, int c, int h, int w, int inverse, const float* __restrict__ x,
               float* __restrict__ y) {
    const int h2 = h / 2, w2 = w / 2;
    const int plane2 = h2 * w2;
    const int img = c * h * w;
    CF_GRID_STRIDE(e, batch * img) {
        // e indexes the squeezed layout [n][4c][h2][w2].
        int n = (int)(e / (unsigned)img);
        int r = (int)(e - (unsigned)n * (unsigned)img);
        int oc = r / plane2;
        int q = r - oc * plane2;
        int i = q / w2, j = q - (q / w2) * w2;
        int ch = oc >> 2, dy = (oc >> 1) & 1, dx = oc & 1;
        unsigned u = (unsigned)n * (unsigned)img + (unsigned)((ch * h + 2 * i + dy) * w + 2 * j + dx);
        if (inverse) {
            y[u] = x[e];
        } else {
            y[e] = x[u];
        }
    }
}

// The coupling CNN's input: the kept channels (channel masks) or every channel with the
// changed pixels zeroed (checkerboards). One thread per element of `cnn_in`
// ([batch][cin_m][h][w]).
extern "C" __global__ void __launch_bounds__(256)
    cf_mask_gather(int batch, int c, int h, int w, int mask, const float* __restrict__ x,
                   float* __restrict__ cnn_in) {
    const int p = h * w;
    const int cin = cf_kept_count(mask, c);
    const int per = cin * p;
    CF_GRID_STRIDE(e, batch * per) {
        int n = (int)(e / (unsigned)per);
        int r = (int)(e - (unsigned)n * (unsigned)per);
        int j = r / p, i = r - (r / p) * p;
        if (mask < 2) {
            // Kept channel j is channel 2j + parity.
            cnn_in[e] = x[(unsigned)n * (unsigned)(c * p) + (unsigned)((2 * j + (mask & 1)) * p + i)];
        } else {
            int row = i / w, col = i - (i / w) * w;
            cnn_in[e] = cf_changes_pixel(mask, row, col) ? 0.0f : x[(unsigned)n * (unsigned)(c * p) + (unsigned)r];
        }
    }
}

// dx[kept] += d_cnn_in: the transpose of cf_mask_gather. Each dx element has at most one
// writer, so no atomics.
extern "C" __global__ void __launch_bounds__(256)
    cf_mask_scatter_add(int batch, int c, int h, int w, int mask,
                        const float* __restrict__ d_cnn_in, float* __restrict__ dx) {
    const int p = h * w;
    const int cin = cf_kept_count(mask, c);
    const int per = cin * p;
    CF_GRID_STRIDE(e, batch * per) {
        int n = (int)(e / (unsigned)per);
        int r = (int)(e - (unsigned)n * (unsigned)per);
        int j = r / p, i = r - (r / p) * p;
        if (mask < 2) {
            dx[(unsigned)n * (unsigned)(c * p) + (unsigned)((2 * j + (mask & 1)) * p + i)] += d_cnn_in[e];
        } else {
            int row = i / w, col = i - (i / w) * w;
            if (!cf_changes_pixel(mask, row, col)) dx[(unsigned)n * (unsigned)(c * p) + (unsigned)r] += d_cnn_in[e];
        }
    }
}

// Inverse affine coupling in place on the changed half: y_b = (y_b - t) exp(-s) with
// s = cf_coupling_s(mode, scale[j] or floor, s_raw), (s_raw, t) = st[n] ([2cc][h][w]). One
// thread per (n, j, i). `scale` is not read in mode 1 (Glow), `floor` not in mode 0.
extern "C" __global__ void __launch_bounds__(256)
    cf_coupling_inverse(int batch, int c, int h, int w, int mask, int mode, float floor,
                        const float* __restrict__ st, const float* __restrict__ scale,
                        float* __restrict__ y) {
    const int p = h * w;
    const int cc = cf_changed_count(mask, c);
    const int per = cc * p;
    CF_GRID_STRIDE(e, batch * per) {
        int n = (int)(e / (unsigned)per);
        int r = (int)(e - (unsigned)n * (unsigned)per);
        int j = r / p, i = r - (r / p) * p;
        int row = i / w, col = i - (i / w) * w;
        if (!cf_changes_pixel(mask, row, col)) continue;
        int ch = cf_changed_channel(mask, j);
        const float* stn = st + (cf_u64)n * (cf_u64)(2 * per);
        float ex;
        float s = cf_coupling_s(mode, mode == CF_SCALE_TANH ? scale[j] : floor, stn[r], &ex);
        float t = stn[per + r];
        cf_u64 yi = (cf_u64)n * (cf_u64)(c * p) + (cf_u64)(ch * p + i);
        // A floored Glow scale divides by e (the kernel crate's coupling::apply), else exp(-s).
        y[yi] = (mode == CF_SCALE_SIGMOID && floor > 0.0f) ? (y[yi] - t) / ex
                                                           : (y[yi] - t) * expf(-s);
    }
}

// Fused Adam step (the host precomputes step = lr / (1 - beta1^t) and bc2 = 1 - beta2^t in
// f32 like the CPU backend).
extern "C" __global__ void __launch_bounds__(256)
    cf_adam(int n, float step, float beta1, float beta2, float eps, float bc2, float grad_scale,
            float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
            float* __restrict__ v) {
    CF_GRID_STRIDE(i, n) {
        float g = grad[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] -= step * mi / (sqrtf(vi / bc2) + eps);
    }
}

// Adam on several tensors in one launch: block b reads its task, 8 u64 at tasks[8b]:
// (param, grad, m, v addresses, length n, g, G, 0), and updates elements
// i = g * 256 + t + k * G * 256 exactly as block g of cf_adam with G blocks would.
extern "C" __global__ void __launch_bounds__(256)
    cf_adam_multi(float step, float beta1, float beta2, float eps, float bc2, float grad_scale,
                  const unsigned long long* __restrict__ tasks) {
    const unsigned long long* task = tasks + 8 * (cf_u64)blockIdx.x;
    float* param = reinterpret_cast<float*>(task[0]);
    const float* grad = reinterpret_cast<const float*>(task[1]);
    float* m = reinterpret_cast<float*>(task[2]);
    float* v = reinterpret_cast<float*>(task[3]);
    const unsigned n = (unsigned)task[4], g = (unsigned)task[5], G = (unsigned)task[6];
    for (unsigned i = g * 256 + threadIdx.x; i < n; i += G * 256) {
        float gi = grad[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        param[i] -= step * mi / (sqrtf(vi / bc2) + eps);
    }
}

// The weight average (`--ema`) on several tensors in one launch: block b reads its task, 8 u64
// at tasks[8b]: (param, avg addresses, 0, 0, length n, g, G, 0), and moves the elements
// i = g * 256 + t + k * G * 256 of avg toward param: avg += weight * (param - avg).
extern "C" __global__ void __launch_bounds__(256)
    cf_ema_multi(float weight, const unsigned long long* __restrict__ tasks) {
    const unsigned long long* task = tasks + 8 * (cf_u64)blockIdx.x;
    const float* param = reinterpret_cast<const float*>(task[0]);
    float* avg = reinterpret_cast<float*>(task[1]);
    const unsigned n = (unsigned)task[4], g = (unsigned)task[5], G = (unsigned)task[6];
    for (unsigned i = g * 256 + threadIdx.x; i < n; i += G * 256) {
        avg[i] += weight * (param[i] - avg[i]);
    }
}
