// Sums of squares for the loss and the gradient norm. Each block reduces its elements in f64
// with a fixed tree and writes its sum as (hi, lo) floats, hi = (float)s, lo = (float)(s - hi),
// which the host adds back in f64 (buffers are f32). Block of exactly 256 threads.

static __device__ __forceinline__ double cf_block_sum(double v) {
    __shared__ double red[256];
    const unsigned t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (unsigned s = 128; s > 0; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        __syncthreads();
    }
    double r = red[0];
    __syncthreads();
    return r;
}

static __device__ __forceinline__ void cf_write_hi_lo(float* out, double s) {
    float hi = (float)s;
    out[0] = hi;
    out[1] = (float)(s - (double)hi);
}

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

// part[2n], part[2n+1] = (hi, lo) of sum z^2 over image n = blockIdx.x.
extern "C" __global__ void __launch_bounds__(256)
    cf_per_image_sum_squares(int image_len, const float* __restrict__ z, float* __restrict__ part) {
    const float* zn = z + (unsigned long long)blockIdx.x * (unsigned long long)image_len;
    double acc = 0.0;
    for (int i = threadIdx.x; i < image_len; i += 256) {
        double v = (double)zn[i];
        acc += v * v;
    }
    double s = cf_block_sum(acc);
    if (threadIdx.x == 0) cf_write_hi_lo(part + 2 * blockIdx.x, s);
}
