// The kernel registry's types. build.rs generates `registry.cpp` (in OUT_DIR) from the
// `extern "C" __global__` definitions in cuda/kernels/*.cu: one declaration and one
// `CF_KERNEL(name, max_threads)` entry per kernel.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

namespace clayflow_sim {

/// One kernel: name, parameter type codes, `__launch_bounds__` limit (0: none), and an
/// invoker that unpacks cuLaunchKernel-style `params` (params[i] points at the i-th value).
struct Kernel {
    const char* name;
    const char* signature;
    unsigned max_threads;
    void (*invoke)(void** params);
};

template <typename T>
constexpr char type_code() {
    if constexpr (std::is_pointer_v<T>) {
        return 'p';
    } else if constexpr (std::is_same_v<T, int>) {
        return 'i';
    } else if constexpr (std::is_same_v<T, unsigned int>) {
        return 'u';
    } else if constexpr (std::is_same_v<T, float>) {
        return 'f';
    } else {
        static_assert(sizeof(T) == 0, "kernel parameter type not supported by Param");
        return '?';
    }
}

template <auto F>
struct Invoker;

template <typename... A, void (*F)(A...)>
struct Invoker<F> {
    static constexpr char signature[] = {type_code<A>()..., '\0'};

    template <std::size_t... I>
    static void call_impl(void** p, std::index_sequence<I...>) {
        F(*static_cast<A*>(p[I])...);
    }

    static void call(void** p) { call_impl(p, std::index_sequence_for<A...>{}); }
};

extern const Kernel kKernels[];
extern const std::size_t kKernelCount;

}  // namespace clayflow_sim

#define CF_KERNEL(name, max_threads)                                                     \
    clayflow_sim::Kernel {                                                               \
        #name, clayflow_sim::Invoker<&name>::signature, max_threads,                     \
            &clayflow_sim::Invoker<&name>::call                                          \
    }
