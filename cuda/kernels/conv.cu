// Direct "same" convolutions (stride 1, zero padding k/2, odd k <= 15, weights
// [cout][cin][k][k], cross-correlation like PyTorch), tiled in shared memory. Launch
// configurations and the choice of TCO / cic / cit / chunking are in cuda/KERNELS.md.
//
// Forward and backward-data share one body: backward-data is the "same" convolution of dy with
// the spatially flipped, channel-transposed kernel (exact for stride 1 and symmetric padding),
// which is read from the forward weights on the fly while staging them in shared memory.
//
// The weight gradient is a deterministic two-pass reduction: pass 1 writes one partial per
// (chunk of images, weight) with no atomics, pass 2 sums the chunks in a fixed order.

#include "common.cuh"

// Output tile: 16 x 16 pixels.
#define CF_TILE 16

// One block computes a 16x16 output tile of TCO output channels of one image. Threads are
// (16, 8): thread (tx, ty) owns column tx of rows ty and ty + 8, for all TCO channels
// (2 * TCO accumulators). Per step, `cic` input channels of the (16 + k - 1)^2 input patch and
// their weights, laid out [ci][tap][TCO] so that one float4 load gives four output channels,
// are staged in shared memory.
//
// FLIP = false: forward, in = x (ci_n = cin), out = y (co_n = cout), optional bias and ReLU.
// FLIP = true: backward-data, in = dy (ci_n = cout), out = dx (co_n = cin), no bias/ReLU;
// weight(o, i, tap) = wt[i][o][k*k - 1 - tap].
template <int TCO, bool FLIP>
static __device__ __forceinline__ void cf_conv_tile(int cin, int cout, int h, int w, int k, int cic,
                                                    const float* __restrict__ in,
                                                    const float* __restrict__ wt,
                                                    const float* __restrict__ bias, int relu,
                                                    float* __restrict__ out) {
    CF_DYNAMIC_SHARED(float, smem);
    const int ci_n = FLIP ? cout : cin;
    const int co_n = FLIP ? cin : cout;
    const int kk = k * k;
    const int pad = k / 2;
    const int ts = CF_TILE + k - 1;  // even for odd k, so every region below is 16B aligned
    const int tiles_x = (w + CF_TILE - 1) / CF_TILE;
    const int x0 = (int)(blockIdx.x % (unsigned)tiles_x) * CF_TILE;
    const int y0 = (int)(blockIdx.x / (unsigned)tiles_x) * CF_TILE;
    const int co0 = blockIdx.y * TCO;
    const int n = blockIdx.z;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * 16 + tx;
    const int nthreads = 16 * 8;

    float* s_in = smem;                   // [cic][ts][ts]
    float* s_w = smem + cic * ts * ts;    // [cic][kk][TCO]

    float acc0[TCO], acc1[TCO];
#pragma unroll
    for (int o = 0; o < TCO; ++o) {
        acc0[o] = 0.0f;
        acc1[o] = 0.0f;
    }

    const float* in_n = in + (cf_u64)n * (cf_u64)ci_n * (cf_u64)(h * w);
    for (int ci0 = 0; ci0 < ci_n; ci0 += cic) {
        const int nci = ci_n - ci0 < cic ? ci_n - ci0 : cic;
        // Stage the zero-padded input patch (coalesced along rows).
        for (int idx = tid; idx < nci * ts * ts; idx += nthreads) {
            int ci = idx / (ts * ts);
            int r = idx - ci * ts * ts;
            int yy = r / ts, xx = r - (r / ts) * ts;
            int gy = y0 - pad + yy, gx = x0 - pad + xx;
            float v = 0.0f;
            if (gy >= 0 && gy < h && gx >= 0 && gx < w) {
                v = in_n[(cf_u64)(ci0 + ci) * (cf_u64)(h * w) + (cf_u64)(gy * w + gx)];
            }
            s_in[idx] = v;
        }
        // Stage the weights as [ci][tap][o] (zero for channels past co_n).
        for (int idx = tid; idx < nci * kk * TCO; idx += nthreads) {
            int o = idx % TCO;
            int rest = idx / TCO;
            int ci = rest / kk, tap = rest - (rest / kk) * kk;
            int co = co0 + o;
            float v = 0.0f;
            if (co < co_n) {
                if (FLIP) {
                    v = wt[((cf_u64)(ci0 + ci) * (cf_u64)cin + (cf_u64)co) * (cf_u64)kk +
                           (cf_u64)(kk - 1 - tap)];
                } else {
                    v = wt[((cf_u64)co * (cf_u64)cin + (cf_u64)(ci0 + ci)) * (cf_u64)kk +
                           (cf_u64)tap];
                }
            }
            s_w[idx] = v;
        }
        __syncthreads();
        for (int ci = 0; ci < nci; ++ci) {
            for (int ky = 0; ky < k; ++ky) {
                const float* r0 = s_in + (ci * ts + ty + ky) * ts + tx;
                const float* r1 = r0 + 8 * ts;
                const float4* wrow = reinterpret_cast<const float4*>(s_w + (ci * kk + ky * k) * TCO);
                for (int kx = 0; kx < k; ++kx) {
                    const float a0 = r0[kx];
                    const float a1 = r1[kx];
                    const float4* wv = wrow + kx * (TCO / 4);
#pragma unroll
                    for (int q = 0; q < TCO / 4; ++q) {
                        const float4 w4 = wv[q];
                        acc0[4 * q + 0] += w4.x * a0;
                        acc0[4 * q + 1] += w4.y * a0;
                        acc0[4 * q + 2] += w4.z * a0;
                        acc0[4 * q + 3] += w4.w * a0;
                        acc1[4 * q + 0] += w4.x * a1;
                        acc1[4 * q + 1] += w4.y * a1;
                        acc1[4 * q + 2] += w4.z * a1;
                        acc1[4 * q + 3] += w4.w * a1;
                    }
                }
            }
        }
        __syncthreads();
    }

    const int col = x0 + tx;
    const int row0 = y0 + ty, row1 = y0 + ty + 8;
    if (col >= w) return;
    float* out_n = out + (cf_u64)n * (cf_u64)co_n * (cf_u64)(h * w);
#pragma unroll
    for (int o = 0; o < TCO; ++o) {
        const int co = co0 + o;
        if (co >= co_n) break;
        const float b = FLIP ? 0.0f : bias[co];
        float v0 = acc0[o] + b, v1 = acc1[o] + b;
        if (relu) {
            v0 = fmaxf(v0, 0.0f);
            v1 = fmaxf(v1, 0.0f);
        }
        float* plane = out_n + (cf_u64)co * (cf_u64)(h * w);
        if (row0 < h) plane[row0 * w + col] = v0;
        if (row1 < h) plane[row1 * w + col] = v1;
    }
}

// The launchable variants (TCO = 4, 8, 16).
extern "C" __global__ void __launch_bounds__(128, 4)
    cf_conv_fwd_c4(int batch, int cin, int cout, int h, int w, int k, int cic,
                   const float* __restrict__ x, const float* __restrict__ wt,
                   const float* __restrict__ bias, int relu, float* __restrict__ y) {
    (void)batch;
    cf_conv_tile<4, false>(cin, cout, h, w, k, cic, x, wt, bias, relu, y);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    cf_conv_fwd_c8(int batch, int cin, int cout, int h, int w, int k, int cic,
                   const float* __restrict__ x, const float* __restrict__ wt,
                   const float* __restrict__ bias, int relu, float* __restrict__ y) {
    (void)batch;
    cf_conv_tile<8, false>(cin, cout, h, w, k, cic, x, wt, bias, relu, y);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    cf_conv_fwd_c16(int batch, int cin, int cout, int h, int w, int k, int cic,
                   const float* __restrict__ x, const float* __restrict__ wt,
                   const float* __restrict__ bias, int relu, float* __restrict__ y) {
    (void)batch;
    cf_conv_tile<16, false>(cin, cout, h, w, k, cic, x, wt, bias, relu, y);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    cf_conv_bwd_data_c4(int batch, int cin, int cout, int h, int w, int k, int cic,
                        const float* __restrict__ dy, const float* __restrict__ wt,
                        float* __restrict__ dx) {
    (void)batch;
    cf_conv_tile<4, true>(cin, cout, h, w, k, cic, dy, wt, nullptr, 0, dx);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    cf_conv_bwd_data_c8(int batch, int cin, int cout, int h, int w, int k, int cic,
                        const float* __restrict__ dy, const float* __restrict__ wt,
                        float* __restrict__ dx) {
    (void)batch;
    cf_conv_tile<8, true>(cin, cout, h, w, k, cic, dy, wt, nullptr, 0, dx);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    cf_conv_bwd_data_c16(int batch, int cin, int cout, int h, int w, int k, int cic,
                        const float* __restrict__ dy, const float* __restrict__ wt,
                        float* __restrict__ dx) {
    (void)batch;
    cf_conv_tile<16, true>(cin, cout, h, w, k, cic, dy, wt, nullptr, 0, dx);
}

// Weight-gradient pass 1. Block (256 threads) = (cit input channels, TCO output channels,
// chunk of images). Thread t < nci * k * k owns weight taps (ci, ky, kx) of all TCO output
// channels and sums dy[o][p] * x[ci][p + (ky, kx) - pad] over the chunk's pixels. Per 16x16
// tile, s_x = [cit][ts][ts] (zero-padded x patch) and s_dy = [TCO][256] (dy tile, zero outside
// the image); four consecutive pixels of one dy channel are one float4 (a broadcast: every
// thread reads the same pixels). Threads t < TCO of the blockIdx.x == 0 blocks also sum dy for
// the bias gradient.
template <int TCO>
static __device__ __forceinline__ void cf_conv_wgrad(int batch, int cin, int cout, int h, int w,
                                                     int k, int cit, int imgs_per_chunk,
                                                     const float* __restrict__ x,
                                                     const float* __restrict__ dy,
                                                     float* __restrict__ part) {
    CF_DYNAMIC_SHARED(float, smem);
    const int kk = k * k;
    const int pad = k / 2;
    const int ts = CF_TILE + k - 1;
    const int tiles_x = (w + CF_TILE - 1) / CF_TILE;
    const int tiles_y = (h + CF_TILE - 1) / CF_TILE;
    const int ci0 = blockIdx.x * cit;
    const int nci = cin - ci0 < cit ? cin - ci0 : cit;
    const int co0 = blockIdx.y * TCO;
    const int chunk = blockIdx.z;
    const int n_begin = chunk * imgs_per_chunk;
    const int n_end = n_begin + imgs_per_chunk < batch ? n_begin + imgs_per_chunk : batch;
    const int tid = threadIdx.x;
    const int nthreads = 256;
    const cf_u64 hw = (cf_u64)(h * w);

    float* s_x = smem;                 // [cit][ts][ts]
    float* s_dy = smem + cit * ts * ts;  // [TCO][256]

    const bool owns_tap = tid < nci * kk;
    const int ci = owns_tap ? tid / kk : 0;
    const int tap = owns_tap ? tid - (tid / kk) * kk : 0;
    const int ky = tap / k, kx = tap - (tap / k) * k;
    const bool bias_thread = blockIdx.x == 0 && tid < TCO;

    float acc[TCO];
#pragma unroll
    for (int o = 0; o < TCO; ++o) acc[o] = 0.0f;
    float bacc = 0.0f;

    for (int n = n_begin; n < n_end; ++n) {
        const float* x_n = x + (cf_u64)n * (cf_u64)cin * hw;
        const float* dy_n = dy + (cf_u64)n * (cf_u64)cout * hw;
        for (int tile = 0; tile < tiles_x * tiles_y; ++tile) {
            const int tx0 = (tile % tiles_x) * CF_TILE;
            const int ty0 = (tile / tiles_x) * CF_TILE;
            for (int idx = tid; idx < nci * ts * ts; idx += nthreads) {
                int c = idx / (ts * ts);
                int r = idx - c * ts * ts;
                int yy = r / ts, xx = r - (r / ts) * ts;
                int gy = ty0 - pad + yy, gx = tx0 - pad + xx;
                float v = 0.0f;
                if (gy >= 0 && gy < h && gx >= 0 && gx < w) {
                    v = x_n[(cf_u64)(ci0 + c) * hw + (cf_u64)(gy * w + gx)];
                }
                s_x[idx] = v;
            }
            // One channel's 16x16 tile per 256 threads: coalesced along rows.
            for (int idx = tid; idx < TCO * 256; idx += nthreads) {
                int o = idx >> 8;
                int p = idx & 255;
                int gy = ty0 + (p >> 4), gx = tx0 + (p & 15);
                float v = 0.0f;
                if (co0 + o < cout && gy < h && gx < w) {
                    v = dy_n[(cf_u64)(co0 + o) * hw + (cf_u64)(gy * w + gx)];
                }
                s_dy[idx] = v;
            }
            __syncthreads();
            // Rows and 4-pixel groups of the tile that lie inside the image.
            const int rows = h - ty0 < CF_TILE ? h - ty0 : CF_TILE;
            const int groups = ((w - tx0 < CF_TILE ? w - tx0 : CF_TILE) + 3) / 4;
            if (owns_tap) {
                for (int py = 0; py < rows; ++py) {
                    const float* xr = s_x + (ci * ts + py + ky) * ts + kx;
                    for (int g = 0; g < groups; ++g) {
                        const float a0 = xr[4 * g + 0];
                        const float a1 = xr[4 * g + 1];
                        const float a2 = xr[4 * g + 2];
                        const float a3 = xr[4 * g + 3];
                        const float4* dv = reinterpret_cast<const float4*>(s_dy + py * CF_TILE + 4 * g);
#pragma unroll
                        for (int o = 0; o < TCO; ++o) {
                            const float4 d = dv[o * (256 / 4)];
                            acc[o] += d.x * a0;
                            acc[o] += d.y * a1;
                            acc[o] += d.z * a2;
                            acc[o] += d.w * a3;
                        }
                    }
                }
            }
            if (bias_thread) {
                const float* drow = s_dy + tid * 256;
                for (int p = 0; p < 256; ++p) bacc += drow[p];
            }
            __syncthreads();
        }
    }

    const int wlen = cout * cin * kk;
    float* part_c = part + (cf_u64)chunk * (cf_u64)(wlen + cout);
    if (owns_tap) {
#pragma unroll
        for (int o = 0; o < TCO; ++o) {
            const int co = co0 + o;
            if (co < cout) {
                part_c[((cf_u64)co * (cf_u64)cin + (cf_u64)(ci0 + ci)) * (cf_u64)kk + (cf_u64)tap] =
                    acc[o];
            }
        }
    }
    if (bias_thread && co0 + tid < cout) part_c[wlen + co0 + tid] = bacc;
}

extern "C" __global__ void __launch_bounds__(256)
    cf_conv_bwd_weight_c4(int batch, int cin, int cout, int h, int w, int k, int cit,
                          int imgs_per_chunk, const float* __restrict__ x,
                          const float* __restrict__ dy, float* __restrict__ part) {
    cf_conv_wgrad<4>(batch, cin, cout, h, w, k, cit, imgs_per_chunk, x, dy, part);
}

extern "C" __global__ void __launch_bounds__(256)
    cf_conv_bwd_weight_c8(int batch, int cin, int cout, int h, int w, int k, int cit,
                          int imgs_per_chunk, const float* __restrict__ x,
                          const float* __restrict__ dy, float* __restrict__ part) {
    cf_conv_wgrad<8>(batch, cin, cout, h, w, k, cit, imgs_per_chunk, x, dy, part);
}

extern "C" __global__ void __launch_bounds__(256)
    cf_conv_bwd_weight_c16(int batch, int cin, int cout, int h, int w, int k, int cit,
                          int imgs_per_chunk, const float* __restrict__ x,
                          const float* __restrict__ dy, float* __restrict__ part) {
    cf_conv_wgrad<16>(batch, cin, cout, h, w, k, cit, imgs_per_chunk, x, dy, part);
}

// Weight-gradient pass 2: dw (wlen floats) and db (cout floats) = the chunk partials summed in
// chunk order.
extern "C" __global__ void __launch_bounds__(256)
    cf_conv_bwd_weight_reduce(int nchunks, int wlen, int cout, const float* __restrict__ part,
                              float* __restrict__ dw, float* __restrict__ db) {
    const int i = blockIdx.x * 256 + threadIdx.x;
    const int len = wlen + cout;
    if (i >= len) return;
    float acc = 0.0f;
    for (int c = 0; c < nchunks; ++c) acc += part[(cf_u64)c * (cf_u64)len + (cf_u64)i];
    if (i < wlen) {
        dw[i] = acc;
    } else {
        db[i - wlen] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Convolutions as implicit GEMMs over the pixels of the whole batch (q = n * plane + p): the
// reduction index is (input channel, tap), the input pixel shifted by the tap (zero outside
// the image) is gathered while staging. No block straddles an image border, so 7x7, 8x8 or
// 4x4 images fill every block as well as large ones. Used for every k = 1 convolution (the
// Glow coupling's middle layer, the invertible 1x1 convolutions) and for images of at most
// 64 pixels, where the 16x16 tiles above would leave most threads idle; the weight gradient
// also whenever the tiled kernel would keep fewer than half of its threads busy.
// ---------------------------------------------------------------------------------------------

// Reduction depth staged per step.
#define CF_GK 16

// The input value for reduction index k = ci * k * k + tap at pixel (n, p) of an h x w image
// with `chans` channels: x[n][ci][row + ky - pad][col + kx - pad], 0 outside the image. With
// `flip`, the tap is mirrored (backward-data reads dy at the flipped offsets).
static __device__ __forceinline__ float cf_gather(const float* __restrict__ in, int chans, int h,
                                                  int w, int ksz, unsigned n, unsigned p,
                                                  int k) {
    const int kk = ksz * ksz;
    const int ci = k / kk, tap = k - (k / kk) * kk;
    const int ky = tap / ksz, kx = tap - (tap / ksz) * ksz;
    const int pad = ksz / 2;
    const int row = (int)(p / (unsigned)w) + ky - pad;
    const int col = (int)(p - (p / (unsigned)w) * (unsigned)w) + kx - pad;
    if (row < 0 || row >= h || col < 0 || col >= w) return 0.0f;
    return in[((cf_u64)n * (cf_u64)chans + (cf_u64)ci) * (cf_u64)(h * w) + (cf_u64)(row * w + col)];
}

// out[n][m][p] = sum_k A[m][k] B[k][(n, p)] (+ bias[m], ReLU). Forward (transpose = 0):
// M = cout, K = cin * k * k, A = wt ([cout][cin * k * k]), B = x gathered. Backward-data
// (transpose = 1): M = cin, K = cout * k * k, A[ci][(co, tap)] = wt[co][ci][kk - 1 - tap]
// (flipped, transposed), B = dy gathered; no bias/ReLU. Block (256 threads) = TM rows m x
// TQ = 4096 / TM pixels q; thread (tm, tq) owns rows m0 + 4 tm .. + 4 and pixels
// q0 + tq + j * QT (j < 4), so a warp's stores are consecutive pixels. Per reduction step
// s_a = [CF_GK][TM] (float4 = 4 rows, a broadcast) and s_b = [CF_GK][TQ] (consecutive pixels
// per thread, no bank conflicts).
template <int TM>
static __device__ __forceinline__ void cf_conv_gemm_body(int batch, int cin, int cout, int h,
                                                         int w, int ksz, int transpose,
                                                         const float* __restrict__ in,
                                                         const float* __restrict__ wt,
                                                         const float* __restrict__ bias,
                                                         int relu, float* __restrict__ out) {
    constexpr int TQ = 4096 / TM;
    constexpr int MT = TM / 4;
    constexpr int QT = 256 / MT;
    __shared__ float4 s_a4[CF_GK][TM / 4];
    __shared__ float s_b[CF_GK][TQ];
    float* s_a = reinterpret_cast<float*>(&s_a4[0][0]);
    const int kk = ksz * ksz;
    const int M = transpose ? cin : cout;
    const int C = transpose ? cout : cin;
    const int K = C * kk;
    const int plane = h * w;
    const unsigned Q = (unsigned)batch * (unsigned)plane;
    const int tid = threadIdx.x;
    const int tm = tid / QT, tq = tid - (tid / QT) * QT;
    const int m0 = blockIdx.y * TM;
    const unsigned q0 = blockIdx.x * (unsigned)TQ;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
    for (int k0 = 0; k0 < K; k0 += CF_GK) {
        for (int idx = tid; idx < CF_GK * TM; idx += 256) {
            int kq, mm;
            if (transpose) {
                kq = idx / TM;
                mm = idx - kq * TM;
            } else {
                // Along the weights' rows (k contiguous in wt[m][k]).
                mm = idx / CF_GK;
                kq = idx - mm * CF_GK;
            }
            const int m = m0 + mm, k = k0 + kq;
            float v = 0.0f;
            if (m < M && k < K) {
                if (transpose) {
                    const int co = k / kk, tap = k - (k / kk) * kk;
                    v = wt[((cf_u64)co * (cf_u64)cin + (cf_u64)m) * (cf_u64)kk +
                           (cf_u64)(kk - 1 - tap)];
                } else {
                    v = wt[(cf_u64)m * (cf_u64)K + (cf_u64)k];
                }
            }
            s_a[kq * TM + mm] = v;
        }
        for (int idx = tid; idx < CF_GK * TQ; idx += 256) {
            const int kq = idx / TQ, qq = idx - (idx / TQ) * TQ;
            const unsigned q = q0 + (unsigned)qq;
            const int k = k0 + kq;
            float v = 0.0f;
            if (q < Q && k < K) {
                const unsigned n = q / (unsigned)plane, p = q - n * (unsigned)plane;
                v = cf_gather(in, C, h, w, ksz, n, p, k);
            }
            s_b[kq][qq] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kq = 0; kq < CF_GK; ++kq) {
            const float4 a = s_a4[kq][tm];
            float b[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = s_b[kq][tq + j * QT];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc[0][j] += a.x * b[j];
                acc[1][j] += a.y * b[j];
                acc[2][j] += a.z * b[j];
                acc[3][j] += a.w * b[j];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + tm * 4 + i;
        if (m >= M) break;
        const float bm = transpose ? 0.0f : bias[m];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned q = q0 + (unsigned)(tq + j * QT);
            if (q >= Q) continue;
            const unsigned n = q / (unsigned)plane, p = q - n * (unsigned)plane;
            float v = acc[i][j] + bm;
            if (relu) v = fmaxf(v, 0.0f);
            out[((cf_u64)n * (cf_u64)M + (cf_u64)m) * (cf_u64)plane + p] = v;
        }
    }
}

// TM = 16 (at most 16 output rows: 256 pixels per tile) and TM = 64 (64 pixels per tile).
extern "C" __global__ void __launch_bounds__(256)
    cf_conv_gemm_m16(int batch, int cin, int cout, int h, int w, int k, int transpose,
                     const float* __restrict__ in, const float* __restrict__ wt,
                     const float* __restrict__ bias, int relu, float* __restrict__ out) {
    cf_conv_gemm_body<16>(batch, cin, cout, h, w, k, transpose, in, wt, bias, relu, out);
}

extern "C" __global__ void __launch_bounds__(256)
    cf_conv_gemm_m64(int batch, int cin, int cout, int h, int w, int k, int transpose,
                     const float* __restrict__ in, const float* __restrict__ wt,
                     const float* __restrict__ bias, int relu, float* __restrict__ out) {
    cf_conv_gemm_body<64>(batch, cin, cout, h, w, k, transpose, in, wt, bias, relu, out);
}

// Weight gradient as a GEMM, pass 1: dW[co][j] = sum_q dy[n][co][p] B[j][(n, p)] with
// j = ci * k * k + tap and B = x gathered at the tap's offset, and db[co] = sum_q dy over the
// pixels q of chunk blockIdx.z ([z * q_per_chunk, min(Q, (z + 1) * q_per_chunk))). Block
// (256 threads) = 64 output channels (blockIdx.x) x 64 columns j (blockIdx.y); thread
// (tm, tn) owns the 4 x 4 outputs co0 + 4 tm + i, j0 + 4 tn + jj, every thread busy. Partials
// go to part[z][wlen + cout] as for cf_conv_bwd_weight_c* (every element written: dW by every
// block, db by the blockIdx.y == 0 blocks), summed by cf_conv_bwd_weight_reduce.
extern "C" __global__ void __launch_bounds__(256)
    cf_conv_gemm_wgrad(int batch, int cin, int cout, int h, int w, int k, int q_per_chunk,
                       const float* __restrict__ x, const float* __restrict__ dy,
                       float* __restrict__ part) {
    __shared__ float4 s_d4[CF_GK][16];
    __shared__ float4 s_x4[CF_GK][16];
    float* s_d = reinterpret_cast<float*>(&s_d4[0][0]);
    float* s_x = reinterpret_cast<float*>(&s_x4[0][0]);
    const int plane = h * w;
    const int N = cin * k * k;
    const unsigned Q = (unsigned)batch * (unsigned)plane;
    const int tid = threadIdx.x;
    const int tm = tid / 16, tn = tid - (tid / 16) * 16;
    const int co0 = blockIdx.x * 64, j0 = blockIdx.y * 64;
    const unsigned qb = blockIdx.z * (unsigned)q_per_chunk;
    const unsigned qe = qb + (unsigned)q_per_chunk < Q ? qb + (unsigned)q_per_chunk : Q;
    const bool bias_block = blockIdx.y == 0;
    float acc[4][4], bacc[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        bacc[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
    for (unsigned q0 = qb; q0 < qe; q0 += CF_GK) {
        // 16 consecutive pixels of one channel per 16 threads (coalesced for dy).
        for (int idx = tid; idx < CF_GK * 64; idx += 256) {
            const int ch = idx / CF_GK, qq = idx - (idx / CF_GK) * CF_GK;
            const unsigned q = q0 + (unsigned)qq;
            float d = 0.0f, v = 0.0f;
            if (q < qe) {
                const unsigned n = q / (unsigned)plane, p = q - n * (unsigned)plane;
                if (co0 + ch < cout) {
                    d = dy[((cf_u64)n * (cf_u64)cout + (cf_u64)(co0 + ch)) * (cf_u64)plane + p];
                }
                if (j0 + ch < N) v = cf_gather(x, cin, h, w, k, n, p, j0 + ch);
            }
            s_d[qq * 64 + ch] = d;
            s_x[qq * 64 + ch] = v;
        }
        __syncthreads();
#pragma unroll
        for (int qq = 0; qq < CF_GK; ++qq) {
            const float4 d = s_d4[qq][tm];
            const float4 v = s_x4[qq][tn];
            const float dv[4] = {d.x, d.y, d.z, d.w};
            const float xv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += dv[i] * xv[j];
                bacc[i] += dv[i];
            }
        }
        __syncthreads();
    }
    const int wlen = cout * N;
    float* part_c = part + (cf_u64)blockIdx.z * (cf_u64)(wlen + cout);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int co = co0 + tm * 4 + i;
        if (co >= cout) break;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int jj = j0 + tn * 4 + j;
            if (jj < N) part_c[(cf_u64)co * (cf_u64)N + (cf_u64)jj] = acc[i][j];
        }
        if (bias_block && tn == 0) part_c[wlen + co] = bacc[i];
    }
}
