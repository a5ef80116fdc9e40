// What the kernels in cuda/kernels/*.cu share: index types, the grid-stride loop, the
// dynamic shared memory declaration, the fixed-order block sum, the (hi, lo) float pair of an
// f64, the coupling masks' rules and the coupling's scale functions.
//
// Each .cu starts with `#include "common.cuh"`. The simulator's g++ build finds this file next
// to the .cu; for NVRTC (which gets no include path) the trainer pastes it in place of that
// line (`backend::cuda::gpu::kernel_source`). Plain CUDA C++ only: NVRTC compiles it without
// any header.
#pragma once

typedef unsigned long long cf_u64;

// Grid-stride loop over [0, n). Indices are unsigned so that `i + stride` cannot overflow for
// n < 2^31 (the backend checks every count fits an int).
#define CF_GRID_STRIDE(i, n)                                                                 \
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(n);              \
         i += gridDim.x * blockDim.x)

#ifndef CLAYFLOW_SIM
// `extern __shared__` dynamic shared memory, 16-byte aligned (the simulator's shim defines
// its own version, poisoned with NaN).
#define CF_DYNAMIC_SHARED(T, name)                                                           \
    extern __shared__ __align__(16) unsigned char cf_dyn_smem[];                             \
    T* name = reinterpret_cast<T*>(cf_dyn_smem)
#endif

// Sum of `v` over a block of exactly 256 threads (fixed tree, so deterministic). Every thread
// gets the result; every thread of the block must call it (it has barriers).
static __device__ __forceinline__ double cf_block_sum(double v) {
    __shared__ double cf_red[256];
    const unsigned t = threadIdx.x;
    cf_red[t] = v;
    __syncthreads();
    for (unsigned s = 128; s > 0; s >>= 1) {
        if (t < s) cf_red[t] += cf_red[t + s];
        __syncthreads();
    }
    double r = cf_red[0];
    __syncthreads();  // `cf_red` is reused by the next call
    return r;
}

// An f64 as two floats, hi = (float)s, lo = (float)(s - hi) (about 48 bits); the host and
// cf_read_hi_lo add them back in f64 (buffers are f32).
static __device__ __forceinline__ void cf_write_hi_lo(float* out, double s) {
    float hi = (float)s;
    out[0] = hi;
    out[1] = (float)(s - (double)hi);
}

static __device__ __forceinline__ double cf_read_hi_lo(const float* in) {
    return (double)in[0] + (double)in[1];
}

// Mask codes (clayflow_kernel::Mask as u8): 0 ChannelEven, 1 ChannelOdd, 2 CheckerEven,
// 3 CheckerOdd. Channel masks change every pixel of the changed channels; checkerboards
// change the pixels whose (row + col) parity differs from the mask's parity.
static __device__ __forceinline__ bool cf_changes_pixel(int mask, int row, int col) {
    return mask < 2 || ((row + col) & 1) != (mask & 1);
}

// Changed channels of a mask for c channels (Mask::split_channels().0).
static __device__ __forceinline__ int cf_changed_count(int mask, int c) {
    return mask < 2 ? c - (c + 1 - (mask & 1)) / 2 : c;
}

// CNN input channels of a mask for c channels (Mask::split_channels().1).
static __device__ __forceinline__ int cf_kept_count(int mask, int c) {
    return mask < 2 ? (c + 1 - (mask & 1)) / 2 : c;
}

// The channel that the j-th s/t plane acts on (Mask::changed_channel).
static __device__ __forceinline__ int cf_changed_channel(int mask, int j) {
    return mask < 2 ? 2 * j + 1 - (mask & 1) : j;
}

// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), without overflow for any x (the kernel
// crate's coupling::log_sigmoid).
static __device__ __forceinline__ float cf_log_sigmoid(float x) {
    float m = x < 0.0f ? x : 0.0f;
    return m - log1pf(expf(-fabsf(x)));
}

// Coupling scale functions (backend::CouplingScale::code): the log-scale s of a changed
// element from its raw CNN output sr, and e = exp(s). mode 0: RealNVP, s = sc * tanh(sr) with
// the channel's learned scale sc; mode 1: Glow with floor f = sc,
// e = f + (1 - f) sigmoid(sr + 2) (the kernel crate's coupling::glow_scale: for f > 0,
// a = (1 - f) / (1 + exp(sr + 2)), e = 1 - a, s = log1p(-a); for f = 0, s = log sigmoid(sr + 2)
// and e = expf(s)).
#define CF_SCALE_TANH 0
#define CF_SCALE_SIGMOID 1

static __device__ __forceinline__ float cf_coupling_s(int mode, float sc, float sr, float* e) {
    if (mode == CF_SCALE_SIGMOID && sc > 0.0f) {
        float a = (1.0f - sc) / (1.0f + expf(sr + 2.0f));
        *e = 1.0f - a;
        return log1pf(-a);
    }
    float s = mode == CF_SCALE_SIGMOID ? cf_log_sigmoid(sr + 2.0f) : sc * tanhf(sr);
    *e = expf(s);
    return s;
}

// Glow (mode 1) for the backward pass: returns ds/dsr and writes e = exp(s)
// (coupling::glow_scale_grad): (1 - f) sigmoid(x) sigmoid(-x) / e, or 1 - e for f = 0.
static __device__ __forceinline__ float cf_glow_scale_grad(float sr, float floor, float* e) {
    if (floor <= 0.0f) {
        *e = expf(cf_log_sigmoid(sr + 2.0f));
        return 1.0f - *e;
    }
    float q = 1.0f / (1.0f + expf(sr + 2.0f));
    float a = (1.0f - floor) * q;
    *e = 1.0f - a;
    return a * (1.0f - q) / *e;
}
