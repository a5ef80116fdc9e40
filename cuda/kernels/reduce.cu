// Sums of squares for the loss and the gradient norm. Each block reduces its elements in f64
// with a fixed tree and writes its sum as (hi, lo) floats, hi = (float)s, lo = (float)(s - hi),
// which the host adds back in f64 (buffers are f32). Block of exactly 256 threads.

#include "common.cuh"

// part[2b], part[2b+1] = (hi, lo) of sum x[i]^2 over block b's grid-stride elements.
extern "C" __global__ void __launch_bounds__(256)
    cf_sum_squares_partial(int n, const float* __restrict__ x, float* __restrict__ part) {
    double acc = 0.0;
    for (unsigned i = blockIdx.x * 256 + threadIdx.x; i < (unsigned)n; i += gridDim.x * 256) {
        double v = (double)x[i];
        acc += v * v;
    }
    double s = cf_block_sum(acc);
    if (threadIdx.x == 0) cf_write_hi_lo(part + 2 * blockIdx.x, s);
}

// acc[2n], acc[2n+1] (the (hi, lo) pair of image n's running f64 total) += sum z^2 over
// image n = blockIdx.x (the images' latents of several levels add up in one buffer).
extern "C" __global__ void __launch_bounds__(256)
    cf_per_image_sum_squares(int image_len, const float* __restrict__ z, float* __restrict__ acc) {
    const float* zn = z + (cf_u64)blockIdx.x * (cf_u64)image_len;
    double sum = 0.0;
    for (int i = threadIdx.x; i < image_len; i += 256) {
        double v = (double)zn[i];
        sum += v * v;
    }
    double s = cf_block_sum(sum);
    if (threadIdx.x == 0) {
        float* pair = acc + 2 * (cf_u64)blockIdx.x;
        cf_write_hi_lo(pair, cf_read_hi_lo(pair) + s);
    }
}

// Several tensors' sums of squares in one launch: block b reads its task, 4 u64 at
// tasks[4b]: (tensor address, length n, g, G), and writes (hi, lo) of the f64 sum of x[i]^2 over
// i = g * 256 + t + k * G * 256 to part[2b], part[2b + 1]: exactly block g of
// cf_sum_squares_partial on that tensor with G blocks, so the sums are bitwise the same.
extern "C" __global__ void __launch_bounds__(256)
    cf_sum_squares_multi(const unsigned long long* __restrict__ tasks, float* __restrict__ part) {
    const unsigned long long* task = tasks + 4 * (cf_u64)blockIdx.x;
    const float* x = reinterpret_cast<const float*>(task[0]);
    const unsigned n = (unsigned)task[1], g = (unsigned)task[2], G = (unsigned)task[3];
    double acc = 0.0;
    for (unsigned i = g * 256 + threadIdx.x; i < n; i += G * 256) {
        double v = (double)x[i];
        acc += v * v;
    }
    double s = cf_block_sum(acc);
    if (threadIdx.x == 0) cf_write_hi_lo(part + 2 * (cf_u64)blockIdx.x, s);
}
