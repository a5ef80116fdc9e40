// The grid runner behind `clayflow_sim_launch`: executes a registered kernel on the CPU with
// CUDA's execution model (see shim.h for what is modelled and how).

#include "shim.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include <ucontext.h>

#include "registry.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {

// Unwinds a kernel thread out of __syncthreads when the launch has failed.
struct Abort {};

// Canary bytes on both sides of the dynamic shared memory: any write there is detected after
// the block, and a read gives NaN, which poisons the result.
constexpr std::size_t kGuard = 256;
constexpr unsigned char kCanary = 0xFF;  // reads of it are NaN (like the poison)
// Limits of every CUDA device since sm_20 (and the default dynamic shared memory limit,
// which needs no cudaFuncSetAttribute opt-in).
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxDynamicShared = 48 * 1024;

struct Runner;
thread_local Runner* current = nullptr;

struct Runner {
    const clayflow_sim::Kernel* kernel = nullptr;
    void** params = nullptr;
    dim3 grid{}, block{};
    unsigned nthreads = 0;
    unsigned long long nblocks = 0;
    bool serial = true;
    std::mt19937_64 rng;

    std::vector<unsigned char> shared_store;
    unsigned char* shared = nullptr;
    std::size_t shared_bytes = 0;

    std::vector<std::unique_ptr<std::counting_semaphore<>>> sem;
    std::mutex mu;
    // Per phase (the stretch between two barriers): threads that have not arrived yet,
    // arrived at __syncthreads, and returned from the kernel.
    unsigned pending = 0, at_sync = 0, finished = 0;
    std::vector<unsigned> order;
    unsigned turn = 0;
    unsigned long long block_index = 0;
    bool stop = false, aborted = false;
    std::string error;

    void poison() {
        std::memset(shared_store.data(), kCanary, shared_store.size());
        // All-ones bytes are a NaN as float and as double: reading unwritten shared memory
        // poisons the result.
        std::memset(shared, 0xFF, shared_bytes);
    }

    bool canaries_intact() const {
        const unsigned char* lo = shared - kGuard;
        const unsigned char* hi = shared + shared_bytes;
        for (std::size_t i = 0; i < kGuard; ++i) {
            if (lo[i] != kCanary || hi[i] != kCanary) return false;
        }
        return true;
    }

    // Caller holds `mu`.
    void release_all() {
        for (auto& s : sem) s->release();
    }

    // Caller holds `mu`.
    void abort_all() {
        aborted = true;
        stop = true;
        release_all();
    }

    // Caller holds `mu`.
    void start_phase() {
        pending = nthreads;
        at_sync = 0;
        finished = 0;
        if (serial) {
            std::shuffle(order.begin(), order.end(), rng);
            turn = 0;
            sem[order[0]]->release();
        } else {
            release_all();
        }
    }

    // Every thread has arrived. Caller holds `mu`.
    void phase_end() {
        if (!error.empty()) {
            abort_all();
            return;
        }
        if (at_sync == nthreads) {
            start_phase();
            return;
        }
        if (finished == nthreads) {
            if (!canaries_intact()) {
                char buf[200];
                std::snprintf(buf, sizeof buf,
                              "%s wrote outside its %zu bytes of dynamic shared memory (block %llu)",
                              kernel->name, shared_bytes, block_index);
                error = buf;
                abort_all();
                return;
            }
            ++block_index;
            if (block_index == nblocks) {
                stop = true;
                release_all();
                return;
            }
            poison();
            start_phase();
            return;
        }
        char buf[200];
        std::snprintf(buf, sizeof buf,
                      "%s: divergent __syncthreads in block %llu (%u threads wait at a barrier, %u "
                      "returned)",
                      kernel->name, block_index, at_sync, finished);
        error = buf;
        abort_all();
    }

    // Thread `tid` reached a barrier (`sync`) or returned from the kernel.
    void arrive(unsigned tid, bool sync) {
        {
            std::unique_lock<std::mutex> lk(mu);
            if (sync) {
                ++at_sync;
            } else {
                ++finished;
            }
            --pending;
            if (pending > 0) {
                if (serial) {
                    ++turn;
                    sem[order[turn]]->release();
                }
            } else {
                phase_end();
            }
        }
        if (sync) {
            sem[tid]->acquire();
            if (aborted) throw Abort{};
        }
    }

    void fail(const std::string& what) {
        std::lock_guard<std::mutex> lk(mu);
        if (error.empty()) error = what;
    }

    void thread_main(unsigned tid) {
        current = this;
        blockDim = block;
        gridDim = grid;
        threadIdx = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
        for (;;) {
            sem[tid]->acquire();
            if (stop) return;
            unsigned long long b = block_index;
            blockIdx = uint3{static_cast<unsigned>(b % grid.x),
                             static_cast<unsigned>((b / grid.x) % grid.y),
                             static_cast<unsigned>(b / (static_cast<unsigned long long>(grid.x) * grid.y))};
            try {
                kernel->invoke(params);
            } catch (const Abort&) {
                return;
            } catch (const std::exception& e) {
                fail(std::string(kernel->name) + " threw: " + e.what());
            } catch (...) {
                fail(std::string(kernel->name) + " threw");
            }
            try {
                arrive(tid, false);
            } catch (const Abort&) {
                return;
            }
        }
    }
};

// Shuffled mode: the block's threads are fibers (ucontext) on the launching OS thread. A
// phase runs every unfinished fiber, one at a time in a fresh random order, until it reaches
// __syncthreads or returns; switching costs ~0.2 us instead of an OS context switch.
struct FiberSched {
    Runner* r = nullptr;
    std::vector<ucontext_t> ctx;
    std::vector<std::unique_ptr<char[]>> stacks;
    std::vector<unsigned char> state;  // 0 running, 1 at a barrier, 2 returned
    ucontext_t sched{};
    unsigned cur = 0;
    bool aborted = false;
};

constexpr std::size_t kFiberStack = 256 * 1024;
thread_local FiberSched* g_fiber = nullptr;

uint3 coords(unsigned tid, dim3 block) {
    return uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
}

void fiber_entry() {
    FiberSched* f = g_fiber;
    const unsigned tid = f->cur;
    try {
        f->r->kernel->invoke(f->r->params);
    } catch (const Abort&) {
    } catch (const std::exception& e) {
        f->r->fail(std::string(f->r->kernel->name) + " threw: " + e.what());
    } catch (...) {
        f->r->fail(std::string(f->r->kernel->name) + " threw");
    }
    f->state[tid] = 2;
    // Returning resumes uc_link, the scheduler.
}

void fiber_sync() {
    FiberSched* f = g_fiber;
    const unsigned tid = f->cur;
    f->state[tid] = 1;
    swapcontext(&f->ctx[tid], &f->sched);
    if (f->aborted) throw Abort{};
}

// Runs the whole grid of `r` as fibers; returns with r.error set on failure.
void run_fibers(Runner& r) {
    FiberSched f;
    f.r = &r;
    const unsigned n = r.nthreads;
    f.ctx.resize(n);
    f.state.assign(n, 0);
    for (unsigned i = 0; i < n; ++i) f.stacks.emplace_back(new char[kFiberStack]);
    g_fiber = &f;
    current = &r;
    blockDim = r.block;
    gridDim = r.grid;
    for (r.block_index = 0; r.block_index < r.nblocks && r.error.empty(); ++r.block_index) {
        const unsigned long long b = r.block_index;
        blockIdx = uint3{static_cast<unsigned>(b % r.grid.x),
                         static_cast<unsigned>((b / r.grid.x) % r.grid.y),
                         static_cast<unsigned>(b / (static_cast<unsigned long long>(r.grid.x) * r.grid.y))};
        if (b > 0) r.poison();
        for (unsigned i = 0; i < n; ++i) {
            getcontext(&f.ctx[i]);
            f.ctx[i].uc_stack.ss_sp = f.stacks[i].get();
            f.ctx[i].uc_stack.ss_size = kFiberStack;
            f.ctx[i].uc_link = &f.sched;
            makecontext(&f.ctx[i], fiber_entry, 0);
            f.state[i] = 0;
        }
        for (;;) {
            std::shuffle(r.order.begin(), r.order.end(), r.rng);
            for (unsigned tid : r.order) {
                if (f.state[tid] == 2) continue;
                f.cur = tid;
                f.state[tid] = 0;
                threadIdx = coords(tid, r.block);
                swapcontext(&f.sched, &f.ctx[tid]);
            }
            unsigned at_sync = 0, finished = 0;
            for (unsigned char st : f.state) {
                at_sync += st == 1;
                finished += st == 2;
            }
            if (finished == n || !r.error.empty()) {
                if (finished == n) break;
            } else if (at_sync == n) {
                continue;
            } else {
                char buf[200];
                std::snprintf(buf, sizeof buf,
                              "%s: divergent __syncthreads in block %llu (%u threads wait at a "
                              "barrier, %u returned)",
                              r.kernel->name, b, at_sync, finished);
                r.error = buf;
            }
            // Failure: unwind the fibers still waiting at a barrier.
            f.aborted = true;
            for (unsigned tid = 0; tid < n; ++tid) {
                if (f.state[tid] == 1) {
                    f.cur = tid;
                    threadIdx = coords(tid, r.block);
                    swapcontext(&f.sched, &f.ctx[tid]);
                }
            }
            break;
        }
        if (r.error.empty() && !r.canaries_intact()) {
            char buf[200];
            std::snprintf(buf, sizeof buf,
                          "%s wrote outside its %zu bytes of dynamic shared memory (block %llu)",
                          r.kernel->name, r.shared_bytes, b);
            r.error = buf;
        }
    }
    g_fiber = nullptr;
    current = nullptr;
}

std::mutex g_launch;

const clayflow_sim::Kernel* find(const char* name) {
    for (std::size_t i = 0; i < clayflow_sim::kKernelCount; ++i) {
        if (std::strcmp(clayflow_sim::kKernels[i].name, name) == 0) return &clayflow_sim::kKernels[i];
    }
    return nullptr;
}

void set_error(char* err, std::size_t err_len, const std::string& msg) {
    if (err == nullptr || err_len == 0) return;
    std::size_t n = std::min(err_len - 1, msg.size());
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
}

}  // namespace

void __syncthreads() {
    if (g_fiber != nullptr) {
        fiber_sync();
        return;
    }
    Runner* r = current;
    if (r == nullptr) return;
    unsigned tid = threadIdx.x + r->block.x * (threadIdx.y + r->block.y * threadIdx.z);
    r->arrive(tid, true);
}

void* clayflow_sim_dynamic_shared() { return current == nullptr ? nullptr : current->shared; }

extern "C" {

/// Number of registered kernels.
std::size_t clayflow_sim_kernel_count() { return clayflow_sim::kKernelCount; }

/// Name of kernel `i` (null past the end).
const char* clayflow_sim_kernel_name(std::size_t i) {
    return i < clayflow_sim::kKernelCount ? clayflow_sim::kKernels[i].name : nullptr;
}

/// Parameter type codes of kernel `name` ('p' pointer, 'i' int, 'u' unsigned, 'f' float), or
/// null when no such kernel is registered.
const char* clayflow_sim_signature(const char* name) {
    const clayflow_sim::Kernel* k = find(name);
    return k == nullptr ? nullptr : k->signature;
}

/// Runs kernel `name`. `mode` 0: a block's threads take turns in a shuffled order (seeded by
/// `seed`) between barriers; 1: they run concurrently. Returns 0 on success, otherwise writes
/// a message to `err` (`err_len` bytes, NUL-terminated) and returns non-zero.
int clayflow_sim_launch_ex(const char* name, dim3 grid, dim3 block, unsigned shared_bytes,
                           void** params, int mode, unsigned long long seed, char* err,
                           std::size_t err_len) {
    const clayflow_sim::Kernel* k = find(name);
    if (k == nullptr) {
        set_error(err, err_len, std::string("no kernel named ") + name);
        return 1;
    }
    unsigned long long nthreads = static_cast<unsigned long long>(block.x) * block.y * block.z;
    unsigned long long nblocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
    char buf[256];
    if (nthreads == 0 || nthreads > kMaxThreads || block.z > 64 || nblocks == 0 ||
        grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        std::snprintf(buf, sizeof buf,
                      "%s: invalid launch geometry grid (%u,%u,%u) block (%u,%u,%u)", name, grid.x,
                      grid.y, grid.z, block.x, block.y, block.z);
        set_error(err, err_len, buf);
        return 2;
    }
    if (k->max_threads != 0 && nthreads > k->max_threads) {
        std::snprintf(buf, sizeof buf, "%s: %llu threads per block exceed __launch_bounds__(%u)",
                      name, nthreads, k->max_threads);
        set_error(err, err_len, buf);
        return 2;
    }
    if (shared_bytes > kMaxDynamicShared) {
        std::snprintf(buf, sizeof buf,
                      "%s: %u bytes of dynamic shared memory exceed the 48 KiB default limit",
                      name, shared_bytes);
        set_error(err, err_len, buf);
        return 2;
    }

    std::lock_guard<std::mutex> launch_lock(g_launch);
    Runner r;
    r.kernel = k;
    r.params = params;
    r.grid = grid;
    r.block = block;
    r.nthreads = static_cast<unsigned>(nthreads);
    r.nblocks = nblocks;
    r.serial = mode == 0;
    r.rng.seed(seed);
    r.shared_bytes = shared_bytes;
    r.shared_store.assign(shared_bytes + 2 * kGuard + 16, 0);
    {
        // kGuard canary bytes, then the 16-byte aligned region, then at least kGuard more.
        auto base = reinterpret_cast<std::uintptr_t>(r.shared_store.data()) + kGuard;
        base = (base + 15) & ~static_cast<std::uintptr_t>(15);
        r.shared = reinterpret_cast<unsigned char*>(base);
    }
    r.poison();
    r.order.resize(r.nthreads);
    for (unsigned i = 0; i < r.nthreads; ++i) r.order[i] = i;
    for (unsigned i = 0; i < r.nthreads; ++i) {
        r.sem.push_back(std::make_unique<std::counting_semaphore<>>(0));
    }

    if (r.serial) {
        run_fibers(r);
        if (!r.error.empty()) {
            set_error(err, err_len, r.error);
            return 4;
        }
        return 0;
    }

    std::vector<std::thread> threads;
    threads.reserve(r.nthreads);
    try {
        for (unsigned i = 0; i < r.nthreads; ++i) {
            threads.emplace_back([&r, i] { r.thread_main(i); });
        }
    } catch (const std::exception& e) {
        {
            std::lock_guard<std::mutex> lk(r.mu);
            r.error = std::string("cannot start simulator threads: ") + e.what();
            r.abort_all();
        }
        for (auto& t : threads) t.join();
        set_error(err, err_len, r.error);
        return 3;
    }
    {
        std::lock_guard<std::mutex> lk(r.mu);
        r.start_phase();
    }
    for (auto& t : threads) t.join();
    if (!r.error.empty()) {
        set_error(err, err_len, r.error);
        return 4;
    }
    return 0;
}

/// The contract's entry point (cuLaunchKernel convention): shuffled turns, seed 0.
int clayflow_sim_launch(const char* name, dim3 grid, dim3 block, unsigned shared_bytes,
                        void** params) {
    return clayflow_sim_launch_ex(name, grid, block, shared_bytes, params, 0, 0, nullptr, 0);
}

}  // extern "C"
