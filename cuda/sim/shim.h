// Host shim: lets the CUDA C++ sources in cuda/kernels/*.cu compile with g++ (C++20) and run
// on the CPU under the simulator in sim.cpp.
//
// Model of execution (see sim.cpp):
// - blocks of a grid run one after another;
// - the threads of a block either take turns as fibers (ucontext) on one OS thread, each
//   phase between two barriers in a freshly shuffled order (default: deterministic, and a
//   missing barrier makes a thread read shared memory that another has not written yet or
//   has already overwritten), or run as real OS threads meeting at a barrier (concurrent);
// - dynamic shared memory (CF_DYNAMIC_SHARED) is poisoned with NaN before every block and
//   fenced by canaries that are checked after it;
// - static __shared__ arrays are function-level statics: one instance, which is correct
//   because launches are serialised and blocks run one at a time.
//
// Only what NVRTC offers without headers may be used by kernels: this shim maps exactly that.
#pragma once

#include <math.h>
#include <stdint.h>

#define CLAYFLOW_SIM 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// The running thread's coordinates (set by the simulator before the kernel is called).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// The block barrier.
void __syncthreads();
// The block's dynamic shared memory (16-byte aligned, poisoned with NaN before each block).
void* clayflow_sim_dynamic_shared();

// `extern __shared__ T name[];` on the device.
#define CF_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(clayflow_sim_dynamic_shared())


// Bit casts (CUDA intrinsics that NVRTC offers without headers).
static inline float __int_as_float(int v) {
    float f;
    __builtin_memcpy(&f, &v, sizeof f);
    return f;
}
