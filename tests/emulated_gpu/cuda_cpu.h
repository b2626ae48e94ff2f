/*
 * tests/emulated_gpu/cuda_cpu.h: just enough of CUDA's device side, in plain C++17, to run kernels/*.cu on
 * a CPU, so that the GPU backend's kernels and the Python code that launches them are exercised in CI,
 * where there is no GPU. Used by tests/emulated_gpu/kernel_runner.py, which pastes a kernel file after
 * this header, compiles it with g++ into a shared library and calls `launch` through ctypes.
 *
 * The execution model, faithful where our kernels depend on it:
 *   - a launch runs its blocks one after another on the calling OS thread (so kernels launched from
 *     different worker threads run concurrently, as kernels on different streams do), first to last on
 *     one launch and last to first on the next, and the threads of a block likewise (a GPU promises no
 *     order, so a kernel that needs one fails either way);
 *   - the threads of a block are fibers on that OS thread, switched by a few lines of assembly: a
 *     thread runs until it reaches __syncthreads() or a warp shuffle, then the next one runs. A barrier
 *     opens when every live thread of the block (or of the warp, for a shuffle) has arrived; threads
 *     that returned count as arrived, as on current GPUs. A barrier that can never open is reported;
 *   - __shared__ variables are per OS thread (blocks of one launch run in turn, so they share them), and
 *     every block starts with them all ones (NaN as floats), as a block on a GPU starts with garbage there:
 *     static ones (`__shared__ T name[N];`, rewritten by the runner into block_shared) are filled when first
 *     used and before each later block; dynamic shared memory (`extern __shared__ T name[];`) is a buffer of
 *     the requested size, filled before each block;
 *   - atomics are real atomics (std::atomic_ref), globaltimer is the steady clock.
 * What it does not model: memory coalescing, timing, warp divergence costs, denormal flushing (-ftz),
 * and the fused multiply-adds nvcc contracts on its own (only explicit fmaf is fused here).
 */
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------ qualifiers

#define __global__
#define __launch_bounds__(...)
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
// kernel_runner rewrites every __shared__ declaration (block_shared, dynamic_shared): one it missed fails to compile
#define __shared__ cpuemu_unrewritten_shared_declaration

// ------------------------------------------------------------------ vector types and thread indices

struct uint3 { unsigned int x = 0, y = 0, z = 0; };
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct double2 { double x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

// Set by the scheduler before it resumes a thread (fibers of one OS thread share these variables).
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// ------------------------------------------------------------------ bfloat16 (bits as cuda_bf16.h)

struct __nv_bfloat16 {
    unsigned short bits;
};

inline float __bfloat162float(__nv_bfloat16 v)
{
    const unsigned int u = (unsigned int)v.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    unsigned int u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {          // NaN stays a (quiet) NaN
        r.bits = (unsigned short)((u >> 16) | 0x0040u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);                // round to nearest, ties to even
    r.bits = (unsigned short)(u >> 16);
    return r;
}

// ------------------------------------------------------------------ arithmetic intrinsics

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline unsigned int __float_as_uint(float v) { unsigned int u; std::memcpy(&u, &v, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }
// Explicitly rounded operations: volatile keeps the compiler from contracting them into an fma.
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
// fmaf, fmaxf, expf, logf, sqrtf, sqrt, fmax: the C library's, from <cmath>
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
using std::max;
using std::min;

// ------------------------------------------------------------------ fibers

namespace cpuemu {

#if defined(__x86_64__)
// switch_stack(from, to): save the callee-saved registers and the FP control words on the current stack,
// store its pointer in *from, continue on `to` (a stack saved the same way, or a fresh one).
extern "C" void cpuemu_switch_stack(void** from, void* to);
asm(R"(
    .text
    .p2align 4
    .type cpuemu_switch_stack,@function
cpuemu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cpuemu_switch_stack,.-cpuemu_switch_stack
)");
#else
#error "tests/emulated_gpu/cuda_cpu.h switches fibers with x86-64 assembly only"
#endif

constexpr size_t STACK_BYTES = 64 * 1024;
constexpr int WARP = 32;

enum class Wait { none, block, warp };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;
    uint3 idx;
    bool done = false;
    Wait wait = Wait::none;
    unsigned long long wait_generation = 0;
};

struct Barrier {
    int live = 0;                       // threads that have not returned
    int arrived = 0;
    unsigned long long generation = 0;
};

constexpr int FRAGMENT_WORDS = 8;
struct Fragments { unsigned int word[FRAGMENT_WORDS]; };

struct Scheduler {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;          // reused by every launch of this OS thread
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<unsigned long long> exchange;   // two 8-byte slots per thread, for shuffles (shuffle_down)
    std::vector<unsigned long long> written;    // per slot: 1 + the warp barrier generation that wrote it
    std::vector<Fragments> fragments;           // two slots per thread, for the tensor-core products (warp_gather)
    std::vector<unsigned long long> gathered;   // per slot: as `written`
    std::vector<char> dynamic_shared;
    std::vector<std::pair<void*, size_t>> block_shared;   // this OS thread's static __shared__ storage
    void* scheduler_sp = nullptr;
    int current = -1;
    bool reverse = false;               // this launch runs threads and blocks last to first
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
};

inline Scheduler& scheduler()
{
    thread_local Scheduler s;
    return s;
}

inline void* dynamic_shared() { return scheduler().dynamic_shared.data(); }

// A block's shared memory starts as garbage: all ones (NaN as floats) here.
inline void poison_shared(Scheduler& s, size_t dynamic_bytes)
{
    s.dynamic_shared.assign(dynamic_bytes + 16, (char)0xFF);
    for (auto [storage, bytes] : s.block_shared) std::memset(storage, 0xFF, bytes);
}

inline bool register_block_shared(void* storage, size_t bytes)
{
    scheduler().block_shared.emplace_back(storage, bytes);
    std::memset(storage, 0xFF, bytes);
    return true;
}

// `__shared__ T name[N];` (kernel_runner rewrites it to `auto& name = cpuemu::block_shared<T[N]>([] {});`): storage
// per OS thread and per place in the source (Tag: that place's lambda), all ones at first use and before each block.
template <typename T, typename Tag> T& block_shared(Tag)
{
    static thread_local T storage;
    static thread_local bool registered = register_block_shared(&storage, sizeof(T));
    (void)registered;
    return storage;
}

[[noreturn]] inline void fiber_entry()
{
    Scheduler& s = scheduler();
    s.body(s.body_arg);
    Fiber& f = s.fibers[s.current];
    f.done = true;
    void* unused;
    cpuemu_switch_stack(&unused, s.scheduler_sp);
    std::abort();                       // never resumed
}

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __asan_unpoison_memory_region(void const volatile* address, size_t size);
#endif

// A fresh stack whose first switch "returns" into fiber_entry with the ABI's alignment.
inline void* fresh_stack(char* stack)
{
#if defined(__SANITIZE_ADDRESS__)
    // AddressSanitizer (CUPYNET_EMULATOR_SANITIZE) left redzones of the previous fiber's frames here
    __asan_unpoison_memory_region(stack, STACK_BYTES);
#endif
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + STACK_BYTES) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                    // fiber_entry's (never used) return address
    *--sp = reinterpret_cast<void*>(&fiber_entry);      // where `ret` goes
    for (int r = 0; r < 6; ++r) *--sp = nullptr;        // rbp rbx r12 r13 r14 r15
    --sp;                                               // mxcsr and the x87 control word
    const unsigned int mxcsr = 0x1f80u;
    const unsigned short fpucw = 0x037fu;
    std::memcpy(sp, &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
    return sp;
}

// Arrive at a barrier; return when it opens (the last arrival opens it without yielding).
inline void arrive(Barrier& barrier, Wait kind)
{
    Scheduler& s = scheduler();
    if (++barrier.arrived >= barrier.live) {
        barrier.arrived = 0;
        ++barrier.generation;
        return;
    }
    Fiber& f = s.fibers[s.current];
    f.wait = kind;
    f.wait_generation = barrier.generation;
    cpuemu_switch_stack(&f.sp, s.scheduler_sp);
    // resumed by the scheduler only once the barrier's generation moved on
}

inline bool can_resume(const Scheduler& s, const Fiber& f, int index)
{
    if (f.wait == Wait::block) return s.block.generation != f.wait_generation;
    if (f.wait == Wait::warp) return s.warps[index / WARP].generation != f.wait_generation;
    return true;
}

// A thread returned: barriers it would have joined now wait for one thread fewer.
inline void retire(Scheduler& s, int index)
{
    for (Barrier* barrier : {&s.block, &s.warps[index / WARP]}) {
        --barrier->live;
        if (barrier->arrived > 0 && barrier->arrived >= barrier->live) {
            barrier->arrived = 0;
            ++barrier->generation;
        }
    }
}

// Run body(arg) once per thread of one block; returns an error message or "".
inline std::string run_block(void (*body)(void*), void* arg, int threads)
{
    Scheduler& s = scheduler();
    s.body = body;
    s.body_arg = arg;
    while ((int)s.stacks.size() < threads) s.stacks.push_back(static_cast<char*>(std::malloc(STACK_BYTES)));
    s.fibers.assign(threads, Fiber{});
    s.block = Barrier{threads, 0, 0};
    s.warps.assign((threads + WARP - 1) / WARP, Barrier{});
    for (int t = 0; t < threads; ++t) ++s.warps[t / WARP].live;
    s.exchange.assign(2 * threads, 0ull);
    s.written.assign(2 * threads, 0ull);
    s.fragments.assign(2 * threads, Fragments{});
    s.gathered.assign(2 * threads, 0ull);
    for (int t = 0; t < threads; ++t) {
        Fiber& f = s.fibers[t];
        f.stack = s.stacks[t];
        f.sp = fresh_stack(f.stack);
        f.idx.x = t % blockDim.x;
        f.idx.y = (t / blockDim.x) % blockDim.y;
        f.idx.z = t / (blockDim.x * blockDim.y);
    }
    int remaining = threads;
    while (remaining > 0) {
        bool progressed = false;
        for (int k = 0; k < threads; ++k) {
            const int t = s.reverse ? threads - 1 - k : k;
            Fiber& f = s.fibers[t];
            if (f.done || !can_resume(s, f, t)) continue;
            f.wait = Wait::none;
            s.current = t;
            threadIdx = f.idx;
            cpuemu_switch_stack(&s.scheduler_sp, f.sp);
            progressed = true;
            if (f.done) {
                --remaining;
                retire(s, t);
            }
        }
        if (!progressed) {
            int at_block = 0, at_warp = 0;
            for (const Fiber& f : s.fibers) {
                at_block += !f.done && f.wait == Wait::block;
                at_warp += !f.done && f.wait == Wait::warp;
            }
            return "deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads and " +
                   std::to_string(at_warp) + " at a warp shuffle that can never complete";
        }
    }
    return "";
}

// ------------------------------------------------------------------ launching a kernel with void** arguments

template <typename... A, size_t... I>
void call_kernel(void (*kernel)(A...), void** args, std::index_sequence<I...>)
{
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
struct Launch {
    void (*kernel)(A...);
    void** args;
    static void body(void* self)
    {
        auto* launch = static_cast<Launch*>(self);
        call_kernel(launch->kernel, launch->args, std::index_sequence_for<A...>{});
    }
};

// This OS thread's gridDim, blockDim and blockIdx for block number b of a launch (x fastest).
inline void enter_block(const unsigned* grid, const unsigned* block, unsigned long long b)
{
    gridDim.x = grid[0]; gridDim.y = grid[1]; gridDim.z = grid[2];
    blockDim.x = block[0]; blockDim.y = block[1]; blockDim.z = block[2];
    blockIdx.x = (unsigned)(b % grid[0]);
    blockIdx.y = (unsigned)((b / grid[0]) % grid[1]);
    blockIdx.z = (unsigned)(b / ((unsigned long long)grid[0] * grid[1]));
}

// grid and block: 3 unsigned each, already checked (kernel_runner.check_geometry). Returns 0, or 1 with
// a message in `error`.
template <typename... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, size_t shared_bytes, void** args,
           char* error, int error_bytes)
{
    const int threads = (int)(block[0] * block[1] * block[2]);
    std::string problem;
    Scheduler& s = scheduler();
    Launch<A...> launch_state{kernel, args};
    // A GPU promises no order between blocks, nor between threads until a barrier: alternate launches run
    // them first to last and last to first, so a kernel that relies on either order fails one way or the other.
    s.reverse = !s.reverse;
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    for (unsigned long long k = 0; problem.empty() && k < blocks; ++k) {
        // each block starts with its shared memory, static and dynamic, all ones (NaN as floats): one that reads
        // what it never wrote gets garbage, not the previous block's values, as on a GPU, where blocks do not share it
        poison_shared(s, shared_bytes);
        enter_block(grid, block, s.reverse ? blocks - 1 - k : k);
        problem = run_block(&Launch<A...>::body, &launch_state, threads);
    }
    if (problem.empty()) return 0;
    std::snprintf(error, error_bytes, "%s", problem.c_str());
    return 1;
}

// A launch whose blocks wait for each other (a grid-wide barrier: kernels/batchnorm.cu's one-launch passes):
// every block runs at once, on an OS thread of its own, as a GPU runs a grid it holds whole (the runner
// refuses a grid larger than what the emulated GPU would hold); the threads of a block stay fibers of that
// thread, and each block has its own __shared__ variables (they are per OS thread) and dynamic shared memory.
template <typename... A>
int launch_concurrent(void (*kernel)(A...), const unsigned* grid, const unsigned* block, size_t shared_bytes,
                      void** args, char* error, int error_bytes)
{
    const int threads = (int)(block[0] * block[1] * block[2]);
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    std::vector<std::string> problems(blocks);
    std::vector<std::thread> workers;
    for (unsigned long long b = 0; b < blocks; ++b) {
        workers.emplace_back([&, b]() {
            Scheduler& s = scheduler();
            poison_shared(s, shared_bytes);                           // garbage, as in launch
            enter_block(grid, block, b);
            Launch<A...> launch_state{kernel, args};
            problems[b] = run_block(&Launch<A...>::body, &launch_state, threads);
            for (char* stack : s.stacks) std::free(stack);     // the thread ends: its fiber stacks with it
            s.stacks.clear();
        });
    }
    for (std::thread& worker : workers) worker.join();
    for (const std::string& problem : problems) {
        if (!problem.empty()) {
            std::snprintf(error, error_bytes, "%s", problem.c_str());
            return 1;
        }
    }
    return 0;
}

// The parameter types of a kernel as codes the runner checks its arguments against:
// p = pointer, i4/i8 = signed, u4/u8 = unsigned, f4/f8 = floating (by size), space-separated.
template <typename T> std::string type_code()
{
    if (std::is_pointer_v<T>) return "p";
    if (std::is_floating_point_v<T>) return "f" + std::to_string(sizeof(T));
    if (std::is_integral_v<T>) return (std::is_signed_v<T> ? "i" : "u") + std::to_string(sizeof(T));
    return "?" + std::to_string(sizeof(T));
}

template <typename... A> std::string signature(void (*)(A...))
{
    std::string codes;
    ((codes += (codes.empty() ? "" : " ") + type_code<std::remove_cv_t<A>>()), ...);
    return codes;
}

// ------------------------------------------------------------------ warp shuffles

// v from lane (lane + delta) of the same warp; own v when that lane is past the warp (CUDA's rule). When that
// lane has exited, or does not exist (a block whose size is not a multiple of 32), CUDA leaves the value
// undefined: here it is all ones (NaN as a float, -1 as an integer), so that a sum that takes it in is wrong
// rather than quietly right (zeros would be).
// One rendezvous per shuffle: consecutive shuffles of a warp write alternate slots (the parity of the warp
// barrier's generation, the same for every lane that arrives at one rendezvous), and a lane can only write a
// slot again two rendezvous later, by which time every lane has read it (each reads right after the first
// one completes, before it arrives at the next). A slot stamped with another generation was not written at
// this rendezvous: its lane had exited.
template <typename T> T shuffle_down(T v, int delta)
{
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    Scheduler& s = scheduler();
    const int t = s.current;
    const int lane = t % WARP;
    Barrier& warp = s.warps[t / WARP];
    const unsigned long long stamp = warp.generation + 1ull;
    const int slots = (int)(warp.generation & 1ull) * (int)s.fibers.size();
    std::memcpy(&s.exchange[slots + t], &v, sizeof(T));
    s.written[slots + t] = stamp;
    arrive(warp, Wait::warp);
    T result = v;
    const int source = t + delta;
    if (lane + delta < WARP) {
        if (source < (int)s.fibers.size() && s.written[slots + source] == stamp) {
            std::memcpy(&result, &s.exchange[slots + source], sizeof(T));
        } else {
            std::memset(&result, 0xFF, sizeof(T));
        }
    }
    return result;
}

// Every lane's fragments (up to FRAGMENT_WORDS 32-bit registers) gathered at one warp rendezvous, the double-slot
// scheme of shuffle_down in buffers of its own: what a warp-wide tensor-core instruction (mma.sync) reads. Returns
// the warp's 32 slots (valid until this lane's next rendezvous). Every lane of the warp must take part, as mma.sync
// requires: a lane that has exited is reported and ends the process.
inline const Fragments* warp_gather(const Fragments& mine)
{
    Scheduler& s = scheduler();
    const int t = s.current;
    const int first = t - t % WARP;
    Barrier& warp = s.warps[t / WARP];
    const unsigned long long stamp = warp.generation + 1ull;
    const int slots = (int)(warp.generation & 1ull) * (int)s.fibers.size();
    s.fragments[slots + t] = mine;
    s.gathered[slots + t] = stamp;
    arrive(warp, Wait::warp);
    for (int lane = 0; lane < WARP; ++lane) {
        const int source = first + lane;
        if (source >= (int)s.fibers.size() || s.gathered[slots + source] != stamp) {
            std::fprintf(stderr, "emulated GPU: mma.sync in a warp whose lane %d has exited or does not exist\n", lane);
            std::abort();
        }
    }
    return &s.fragments[slots + first];
}

inline float bf16_half(unsigned int word, int high)
{
    __nv_bfloat16 v;
    v.bits = (unsigned short)(high ? word >> 16 : word & 0xffffu);
    return __bfloat162float(v);
}

// The fragment layouts of PTX's mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 and ...m16n8k8...tf32...:
// lane = 4 * group + thread_in_group; A (16 x K, row-major) in a[0..3], B (K x 8, column-major) in b[0..1], the
// float32 accumulator D (16 x 8) in d[0..3]: d[i] is row group + 8 * (i / 2), column 2 * thread_in_group + i % 2.
// A lane reads the two rows of A and the two columns of B its results need (element(all, is_a, i, j): A(i, j) or
// B(i, j) from the gathered fragments), then adds their products in k order, then to d. The products are exact in
// float32 (bf16 and tf32 have at most 11 significant bits); the order the hardware adds in is its own, so results
// agree to float32 rounding, not bit for bit.
template <int K, typename Element>
inline void emulated_mma(float (&d)[4], const Fragments& mine, Element element)
{
    const Fragments* all = warp_gather(mine);
    const int lane = scheduler().current % WARP;
    const int group = lane / 4, thread_in_group = lane % 4;
    float a[2][K], b[2][K];
    for (int k = 0; k < K; ++k) {
        for (int h = 0; h < 2; ++h) {
            a[h][k] = element(all, true, group + 8 * h, k);
            b[h][k] = element(all, false, k, 2 * thread_in_group + h);
        }
    }
    for (int i = 0; i < 4; ++i) {
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) sum += a[i / 2][k] * b[i % 2][k];
        d[i] += sum;
    }
}

// A(row, k): register (row >= 8) + 2 * (k >= 8) of lane 4 * (row % 8) + (k % 8) / 2, half k % 2;
// B(k, n): register 4 + (k >= 8) (b follows a's four in the gathered words) of lane 4 * n + (k % 8) / 2, half k % 2.
inline void mma_bf16_m16n8k16(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
    const Fragments mine{{a[0], a[1], a[2], a[3], b[0], b[1], 0u, 0u}};
    emulated_mma<16>(d, mine, [](const Fragments* all, bool is_a, int i, int j) {
        return is_a ? bf16_half(all[4 * (i % 8) + (j % 8) / 2].word[(i >= 8) + 2 * (j >= 8)], j % 2)
                    : bf16_half(all[4 * j + (i % 8) / 2].word[4 + (i >= 8)], i % 2);
    });
}

// A(row, k): register (row >= 8) + 2 * (k >= 4) of lane 4 * (row % 8) + k % 4; B(k, n): register 4 + (k >= 4) of
// lane 4 * n + k % 4; each a float32 whose low 13 bits the caller has cleared (tf32_round).
inline void mma_tf32_m16n8k8(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
    const Fragments mine{{a[0], a[1], a[2], a[3], b[0], b[1], 0u, 0u}};
    emulated_mma<8>(d, mine, [](const Fragments* all, bool is_a, int i, int j) {
        return is_a ? __uint_as_float(all[4 * (i % 8) + j % 4].word[(i >= 8) + 2 * (j >= 4)])
                    : __uint_as_float(all[4 * j + i % 4].word[4 + (i >= 4)]);
    });
}

// PTX's cvt.rna.tf32.f32: float32 rounded to 10 mantissa bits, to nearest with ties away from zero; NaN and
// infinity only lose their low 13 bits, as in the SASS ptxas emits for sm_90 (a NaN whose payload lay only there
// becomes an infinity).
inline unsigned int tf32_round(float v)
{
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
    return u & 0xffffe000u;
}

inline unsigned long long global_time_ns()
{
    return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace cpuemu

inline void __syncthreads() { cpuemu::arrive(cpuemu::scheduler().block, cpuemu::Wait::block); }

template <typename T> T __shfl_down_sync(unsigned int /*mask*/, T v, unsigned int delta)
{
    return cpuemu::shuffle_down(v, (int)delta);
}

// ------------------------------------------------------------------ atomics and fences

template <typename T> T atomicAdd(T* address, T value)
{
    return std::atomic_ref<T>(*address).fetch_add(value);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// A load that bypasses L1 on a GPU (reads another block's fenced writes); one memory here.
template <typename T> T __ldcg(const T* address) { return *address; }
inline void __nanosleep(unsigned int ns) { std::this_thread::sleep_for(std::chrono::nanoseconds(ns)); }
// kernels/batchnorm.cu's grid-wide wait traps after GRID_WAIT_LIMIT_NS: here a launch's blocks are threads
// sharing a busy CI machine's cores, so a wait can last much longer than on a GPU without anything being wrong.
#define GRID_WAIT_LIMIT_NS 120000000000ull

// A GPU kernel's trap ends its launch with an error the host sees; here it ends the process, loudly.
[[noreturn]] inline void __trap()
{
    std::fprintf(stderr, "emulated GPU: a kernel executed __trap()\n");
    std::abort();
}
