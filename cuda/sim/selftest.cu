// Self-test kernels of the simulator (compiled only into clayflow-cuda-sim, never for the GPU):
// correct and deliberately broken block programs that the simulator must execute faithfully
// or reject. See cuda/src/lib.rs tests.

// y[t] = x[n - 1 - t] through shared memory; the barrier is skipped when sync == 0 (a
// read-after-write race). Block of n threads, 4n bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(1024)
    cf_simtest_reverse(int sync, const float* x, float* y) {
    CF_DYNAMIC_SHARED(float, s);
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = x[blockIdx.x * n + t];
    if (sync) __syncthreads();
    y[blockIdx.x * n + t] = s[n - 1 - t];
}

// Two rounds through one shared buffer; the barrier at the end of a round is skipped when
// sync == 0 (a write-after-read race: the next round overwrites values still being read).
extern "C" __global__ void __launch_bounds__(1024)
    cf_simtest_rounds(int sync, const float* x, float* y) {
    CF_DYNAMIC_SHARED(float, s);
    const int t = threadIdx.x, n = blockDim.x;
    for (int round = 0; round < 2; ++round) {
        s[t] = x[round * n + t];
        __syncthreads();
        y[round * n + t] = s[(t + 1) % n];
        if (sync) __syncthreads();
    }
}

// A barrier that only some threads reach.
extern "C" __global__ void __launch_bounds__(64) cf_simtest_divergent(float* y) {
    if (threadIdx.x < 5) __syncthreads();
    y[threadIdx.x] = 1.0f;
}

// Writes dynamic shared memory at float index `at` (out of bounds when past the launch's size).
extern "C" __global__ void __launch_bounds__(32) cf_simtest_shared_store(int at, float* y) {
    CF_DYNAMIC_SHARED(float, s);
    if (threadIdx.x == 0) s[at] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = (float)threadIdx.x;
}

// Records every thread's coordinates: y[linear block][linear thread] = encoded (block, thread).
extern "C" __global__ void __launch_bounds__(1024) cf_simtest_coords(float* y) {
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    y[b * nt + t] = (float)(b * 1000 + t);
}
