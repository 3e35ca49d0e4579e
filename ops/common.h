// Shared by the .cpp files (host compiler: the CPU twins) and the .cu files (nvcc): how a block of threads runs.
//
// Each kernel body is written once, in bias_act.h / upfirdn2d.h, as a function of (block index, thread index,
// shared tile) that proceeds in phases separated by barriers. `ex.phase(fn)` runs fn(thread, state) for every
// thread of the block, then waits for all of them: on the GPU each thread runs its own call followed by
// __syncthreads(); on the CPU the twin runs the threads one after another, phase by phase, so tile borders, the
// tile loop and the per-thread quads of outputs are exercised by the CPU tests exactly as the GPU runs them.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define NADA_HD __host__ __device__ __forceinline__
#define NADA_BLOCK __device__ __forceinline__
#else
#define NADA_HD inline
#define NADA_BLOCK inline
#endif

constexpr int kBlockThreads = 256;     // every kernel here runs blocks of 256 threads

// Floor division and its remainder, for coordinates that may be negative (C++ `/` truncates toward zero).
NADA_HD int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// a + b rounded as written: nvcc may not fuse it with the multiply that produced b, so the GPU adds exactly as the
// CPU twin does.
NADA_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

NADA_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}

constexpr int kWarp = 32;

// Warp-level steps (no barrier): `each` runs fn for every thread; `from_lane0` copies a field of each warp's first
// lane into another field of every lane of the warp; `segment_sums` turns each thread's s.v into the sum
// of s.v over its lane and the s.len - 1 lanes after it, where a run of lanes (a segment) ends at the same lane for
// all of its lanes (s.len: lanes from it to its segment's end, within its warp). Doubling steps: after the step of
// h, lane i holds the sum over lanes [i, min(i + 2h, end)), so a segment's first lane ends with the whole segment.

#ifdef __CUDACC__
// One block on the GPU: this thread's state lives in registers; a phase ends with a barrier.
template <class S>
struct GpuBlock {
    using State = S;
    S s;
    template <class F>
    __device__ __forceinline__ void phase(F&& fn) {
        fn(int(threadIdx.x), s);
        __syncthreads();
    }
    template <class F>
    __device__ __forceinline__ void each(F&& fn) { fn(int(threadIdx.x), s); }
    template <class M>
    __device__ __forceinline__ void from_lane0(M S::*from, M S::*to) { s.*to = __shfl_sync(0xffffffffu, s.*from, 0); }
    __device__ __forceinline__ void segment_sums() {
#pragma unroll
        for (int h = 1; h < kWarp; h *= 2) {
            const double o = __shfl_down_sync(0xffffffffu, s.v, h);
            if (h < s.len) s.v = add_rn(s.v, o);
        }
    }
};
#else
// One block on the CPU: every thread's state, and the threads run in order within each phase.
template <class S>
struct CpuBlock {
    using State = S;
    S s[kBlockThreads];
    template <class F>
    void phase(F&& fn) {
        for (int t = 0; t < kBlockThreads; t++) fn(t, s[t]);
    }
    template <class F>
    void each(F&& fn) { phase(fn); }
    template <class M>
    void from_lane0(M S::*from, M S::*to) {
        for (int t = 0; t < kBlockThreads; t++) s[t].*to = s[t - t % kWarp].*from;
    }
    void segment_sums() {           // lanes in increasing order: lane l + h is read before its own step updates it
        for (int w = 0; w < kBlockThreads; w += kWarp)
            for (int h = 1; h < kWarp; h *= 2)
                for (int l = 0; l < kWarp; l++) {
                    const double o = s[w + (l + h < kWarp ? l + h : l)].v;   // a shuffle past the warp: its own
                    if (h < s[w + l].len) s[w + l].v = add_rn(s[w + l].v, o);
                }
    }
};
#endif

struct NoState {};

// n / d by a multiply-high, for 0 <= n < 2^62 and 1 <= d < 2^62, with the constants computed once on the host (a
// 64-bit division costs the GPU about a hundred instructions). With l = ceil(log2 d) and
// m = floor(2^64 (2^l - d) / d) + 1 (so m < 2^64): n / d = (mulhi(m, n) + n) >> l, exactly (Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994, theorem 4.2 with N = 64; no overflow,
// as mulhi(m, n) <= n < 2^62).
struct FastDiv {
    uint64_t m;
    int l;
    int64_t d;
};

inline FastDiv make_fast_div(int64_t d) {
    FastDiv f;
    f.d = d;
    f.l = 0;
    while ((int64_t(1) << f.l) < d) f.l++;
    f.m = uint64_t(((unsigned __int128)1 << 64) * (((unsigned __int128)1 << f.l) - uint64_t(d)) / uint64_t(d)) + 1;
    return f;
}

NADA_HD int64_t fast_div(int64_t n, const FastDiv& f) {
#ifdef __CUDA_ARCH__
    const uint64_t t = __umul64hi(f.m, uint64_t(n));
#else
    const uint64_t t = uint64_t(((unsigned __int128)f.m * uint64_t(n)) >> 64);
#endif
    return int64_t((t + uint64_t(n)) >> f.l);
}

// The same for 0 <= n < 2^31 and 1 <= d <= 2^31 in 32 bits (N = 32: mulhi(m, n) + n < 2^32): two instructions.
struct FastDiv32 {
    uint32_t m;
    int l;
};

inline FastDiv32 make_fast_div32(int64_t d) {
    FastDiv32 f;
    f.l = 0;
    while ((int64_t(1) << f.l) < d) f.l++;
    f.m = uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << f.l) - uint64_t(d)) / uint64_t(d) + 1);
    return f;
}

NADA_HD int fast_div(int n, const FastDiv32& f) {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(f.m, uint32_t(n));
#else
    const uint32_t t = uint32_t((uint64_t(f.m) * uint32_t(n)) >> 32);
#endif
    return int((t + uint32_t(n)) >> f.l);
}
