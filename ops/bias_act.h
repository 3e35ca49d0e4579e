// bias_act block code (reference: _bias_act_ref in nada.py), run by the CUDA kernels in bias_act.cu and by their
// CPU twin in bias_act.cpp. y = clamp(gain * act(x + b), -clamp, clamp), act = identity or leaky ReLU.
//
// Layout: a dense tensor is, in memory order, [rows][C][inner] with inner = stride(1), so element i of row r sits in
// channel (i / inner). A thread owns chunks of V consecutive elements of a row (V = 32 bytes' worth when pointers
// are 16-byte aligned and a chunk is one channel or, inner 1, V channels; else 1): it looks a chunk's bias up once
// (the channel from a multiply-high, FastDiv in common.h) and walks down the rows (grid y splits them into G
// groups); where rows are few it takes several chunks (every gx-th window of 256 chunks), so that its setup serves
// at least kTurns vectors. Two 16-byte loads and stores per V elements in the loop: at batch 2 a chunk has two rows,
// and 32 bytes halve what its bias lookup (and, backward, its warp's sums) cost per element, against 16.
// Backward, in the same pass: dx, and the bias gradient. A thread adds its dx over its rows in float64 (a vector's V
// elements of one channel are summed pairwise in the accumulation type first).
// Each warp then sums per channel over its 32 chunks (a "warp window" of 32 * V columns): segment sums by shuffles
// (common.h), no shared memory and no barrier; with inner 1 and V > 1 (CH) every element is its own channel and goes
// out as it is. One partial sum per channel a warp window touches (at most maxch: 2 when inner >= 32 * V) goes to
// part[G][warp windows][maxch], and a small second kernel adds a channel's partial sums in float64, in a fixed order.
// So the buffer is bounded by the warp windows (a row's columns / (32 V), times G), not by the input; no float32
// running sum (a sequential float32 sum of 2^31 terms loses whole percent); deterministic, no atomics.
#pragma once
#include <cmath>
#include <limits>
#include <type_traits>
#include "common.h"

template <typename A>
struct BiasActArgs {
    A alpha;      // slope below zero: alpha for lrelu, 1 for linear
    A nalpha;     // -alpha
    A gain;
    A clamp;      // +inf when there is no clamp
    A inside;     // |y| <= inside: y inside the clamp (below the clamp as y's dtype holds it; +inf when there is
                  // none; -1 for clamp 0)
};

struct BiasActShape {
    int64_t rows, K, inner, chunks;  // K = C * inner elements per row, chunks = K / V
    int64_t windows, gx;             // windows of 256 chunks along a row; blocks along a row (grid x) walk them
    int64_t wwins;                   // warp windows of 32 chunks along a row (the bias gradient's partial sums)
    int64_t chunk_step, inner_v;     // a block's next window: gx * 256 chunks on; chunks per channel (inner / V)
    int64_t c_step, rc_step;         // gx * 256 chunks = c_step channels and rc_step chunks (inner % V == 0)
    int64_t part_step;               // gx * 8 warp windows of partial sums
    int64_t step, end;               // G * K: from a row of a row group to its next; rows * K: the end
    int C, V, G, maxch;              // channels, vector width, row groups (grid y), channels a warp window touches
    FastDiv by_inner;                // column -> channel
    FastDiv32 by_inner32;            // the same for a column below 2^31 (inner clamped to 2^31)
    int inner32;                     // inner clamped to 2^31 - 1
};

constexpr int64_t kTurns = 4;             // vectors a thread handles at least, where the tensor allows: its setup
                                          // is paid once for them all

constexpr int64_t kTargetBlocks = 4096;   // enough blocks to fill any GPU; more rows per thread beyond that
constexpr int kVectorBytes = 32;          // a thread's vector: two 16-byte loads and stores

// The launch plan, the same for the GPU and the CPU twin. vmax: elements per kVectorBytes, usable if every pointer is
// 16-byte aligned (`aligned`) and a vector's elements share one channel (inner a multiple of vmax) or are channels
// one after another (inner 1). Blocks: about kTargetBlocks, but no more than gives every thread kTurns vectors; a
// row's windows of 256 chunks first, then groups of rows (grid y); a block walks every gx-th window.
inline BiasActShape plan_bias_act(int64_t numel, int64_t C, int64_t stride1, int vmax, bool aligned) {
    BiasActShape s;
    s.C = int(C);
    s.inner = C > 1 ? stride1 : numel;        // one channel: a single row (its stride may be anything, even 0)
    s.K = C * s.inner;
    s.rows = numel / s.K;
    s.V = aligned && (s.inner % vmax == 0 || (s.inner == 1 && C % vmax == 0)) ? vmax : 1;
    s.chunks = s.K / s.V;
    s.windows = (s.chunks + kBlockThreads - 1) / kBlockThreads;
    const int64_t want = (s.rows * s.chunks + kBlockThreads * kTurns - 1) / (kBlockThreads * kTurns);
    const int64_t blocks = want < kTargetBlocks ? (want > 0 ? want : 1) : kTargetBlocks;
    s.gx = blocks < s.windows ? blocks : s.windows;
    int64_t G = blocks / s.gx;
    G = G < s.rows ? G : s.rows;
    s.G = int(G < 65535 ? (G > 0 ? G : 1) : 65535);
    s.wwins = (s.chunks + kWarp - 1) / kWarp;
    const int64_t W = int64_t(s.V) * kWarp, most = (W + s.inner - 2) / s.inner + 1;   // inner >= W: 2
    s.maxch = int(most < C ? most : C);
    s.by_inner = make_fast_div(s.inner);
    s.by_inner32 = make_fast_div32(s.inner < (int64_t(1) << 31) ? s.inner : int64_t(1) << 31);
    s.inner32 = int(s.inner < INT32_MAX ? s.inner : INT32_MAX);
    s.chunk_step = s.gx * kBlockThreads;
    s.inner_v = s.inner / s.V;                // (inner 1 with V > 1: 0, and not used)
    s.c_step = s.inner_v ? s.chunk_step / s.inner_v : 0;
    s.rc_step = s.inner_v ? s.chunk_step - s.c_step * s.inner_v : 0;
    s.part_step = s.gx * (kBlockThreads / kWarp) * s.maxch;
    s.step = int64_t(s.G) * s.K;
    s.end = s.rows * s.K;
    return s;
}

// Which block code runs a plan, for the GPU launch and the CPU twin alike: run(V, CH, STRIDED) with each one a
// std::integral_constant. V: 1 or VM elements per vector; CH: a vector is V channels (inner 1); STRIDED: dy is read
// through its strides (the gradient only, one element per vector).
template <int VM, class Run>
inline void with_variant(const BiasActShape& s, bool strided, Run&& run) {
    using One = std::integral_constant<int, 1>;
    using Wide = std::integral_constant<int, VM>;
    if (strided) run(One{}, std::false_type{}, std::true_type{});
    else if (s.V == 1) run(One{}, std::false_type{}, std::false_type{});
    else if (s.inner == 1) run(Wide{}, std::true_type{}, std::false_type{});
    else run(Wide{}, std::false_type{}, std::false_type{});
}

template <typename T, typename A>
inline BiasActArgs<A> make_bias_act_args(bool lrelu, double alpha, double gain, double clamp) {
    BiasActArgs<A> a;
    a.alpha = lrelu ? A(alpha) : A(1);
    a.nalpha = -a.alpha;
    a.gain = A(gain);
    const bool clamped = clamp >= 0;
    a.clamp = clamped ? A(clamp) : std::numeric_limits<A>::infinity();
    const A clamp_y = A(T(a.clamp));                              // the clamp as a clamped y holds it
    a.inside = !clamped ? std::numeric_limits<A>::infinity() : clamp_y > A(0) ? std::nextafter(clamp_y, A(0)) : A(-1);
    return a;
}

// Strides of dy, by the dims of y: dy is read where it lies, whatever its layout (even expanded).
struct DyMap {
    int nd;
    int64_t ys[8], size[8], ds[8];
};

// V elements: at most 16 bytes aligned (a 32-byte vector is read and written as two 16-byte halves).
template <typename T, int V>
struct alignas(sizeof(T) * V < 16 ? sizeof(T) * V : 16) Pack {
    T v[V];
};

// 16-byte stores of a vector. NVVM splits the store of four floats (as a struct, an array or a float4) into four
// 4-byte stores, so for float they are written in PTX (volatile: kept and in order; no memory clobber: nothing in
// these kernels reads what it writes). Forward only: in the gradient's loop the PTX stores cost more than the split
// ones (sm_90 counts).
template <typename T, int V>
NADA_HD void store_pack(T* p, const Pack<T, V>& v) {
    *reinterpret_cast<Pack<T, V>*>(p) = v;
}

#ifdef __CUDA_ARCH__
template <>
__device__ __forceinline__ void store_pack<float, 8>(float* p, const Pack<float, 8>& v) {
    const size_t g = __cvta_generic_to_global(p);                 // st.global takes a global address
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(g), "f"(v.v[0]), "f"(v.v[1]), "f"(v.v[2]),
                 "f"(v.v[3]));
    asm volatile("st.global.v4.f32 [%0+16], {%1, %2, %3, %4};" :: "l"(g), "f"(v.v[4]), "f"(v.v[5]), "f"(v.v[6]),
                 "f"(v.v[7]));
}
#endif


template <typename A>
NADA_HD bool sign_bit(A v) {
#ifdef __CUDA_ARCH__
    return signbit(v);
#else
    return std::signbit(v);
#endif
}

// min(max(v, -c), c) where NaN stays NaN. On sm_80+ one instruction a side for float (PTX min.NaN / max.NaN);
// elsewhere, and in the CPU twin, selects, which give the same values (c >= 0 is never NaN; only with c = 0 might the
// sign of a zero output differ, and then every output is clamped and its gradient is 0 either way).
template <typename A>
NADA_HD A clamp_keep_nan(A v, A c) {
    v = v > c ? c : v;
    return v < -c ? -c : v;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <>
__device__ __forceinline__ float clamp_keep_nan<float>(float v, float c) {
    asm("min.NaN.f32 %0, %0, %1;\n\tmax.NaN.f32 %0, %0, %2;" : "+f"(v) : "f"(c), "f"(-c));
    return v;
}
#endif

// Forward. z <= 0 gives -(|z| alpha): a value that rounds to zero (in y's dtype, or in the accumulation type) keeps
// its sign in the sign of that zero (+0 above zero, -0 at or below it), which is all the gradient needs. (For z < 0,
// |z| (-alpha) is z alpha exactly; one multiply, with the operand's magnitude modifier.)
template <typename A>
NADA_HD A bias_act_value(A v, const BiasActArgs<A>& a) {
    v = v > A(0) ? v : std::abs(v) * a.nalpha;                     // NaN: kept, as |NaN| (-alpha)
    return clamp_keep_nan(v * a.gain, a.clamp);
}

// dL/dx from dL/dy and the saved output y alone: gain * act'(.) * [|y| < clamp]. The sign of y, zeros included
// (bias_act_value), is the sign of x + b before rounding (alpha >= 0, gain > 0), so y tells the leaky ReLU's side
// even where x + b rounded to zero. A value that rounded onto the clamp itself gets gradient 0 (the mask is taken
// from the rounded y, by design: the kernel never sees x + b in backward).
template <typename A>
NADA_HD A bias_act_grad_value(A dy, A y, const BiasActArgs<A>& a) {
    if (!(std::abs(y) <= a.inside)) return A(0);                   // outside the clamp; a NaN y gets 0 too
    const A g = dy * a.gain;
    return sign_bit(y) ? g * a.alpha : g;
}

// The V bias values of chunk `chunk`: one channel for them all, or (CH: inner 1) V channels one after another.
template <int V, bool CH, typename A>
NADA_HD void load_bias(const BiasActShape& s, const A* b, int64_t chunk, A (&bias)[V]) {
    if (CH) {
#pragma unroll
        for (int e = 0; e < V; e++) bias[e] = b ? b[chunk * V + e] : A(0);
    } else {
        const A c = b ? b[fast_div(chunk * V, s.by_inner)] : A(0);
#pragma unroll
        for (int e = 0; e < V; e++) bias[e] = c;
    }
}

template <int V, bool CH, typename T, typename A, class Ex>
NADA_BLOCK void bias_act_block(Ex& ex, const BiasActShape& s, const BiasActArgs<A>& a, const T* x, const A* b,
                               T* y, int64_t bx, int by) {
    ex.phase([&](int tid, NoState&) {
        for (int64_t chunk = bx * kBlockThreads + tid; chunk < s.chunks; chunk += s.gx * kBlockThreads) {
            A bias[V];
            load_bias<V, CH, A>(s, b, chunk, bias);
            for (int64_t off = by * s.K + chunk * V; off < s.end; off += s.step) {
                const Pack<T, V> in = *reinterpret_cast<const Pack<T, V>*>(x + off);
                Pack<T, V> out;
#pragma unroll
                for (int e = 0; e < V; e++) out.v[e] = T(bias_act_value<A>(A(in.v[e]) + bias[e], a));
                store_pack(y + off, out);
            }
        }
    });
}

// A thread's part in its warp's sums per channel: col, its chunk's first column in the row; c and left, that column's
// channel and the chunks from it to the channel's end (all three stepped from window to window); v, its sum (then its
// segment's); len, lanes from it to the end of its channel's run in the warp; c0, the channel of its warp's first
// lane; head: it is the run's first lane, and writes the sum to slot c - c0 of its warp window.
struct GradState {
    int64_t col, left;
    double v;
    int c, c0, len, head;
};

// The pairwise sum of a vector's elements, then in float64 (no sum of more than V terms in float32).
template <int V, typename A>
NADA_HD double vector_sum(const A (&g)[V]) {
    A t[V];
#pragma unroll
    for (int e = 0; e < V; e++) t[e] = g[e];
#pragma unroll
    for (int h = 1; h < V; h *= 2)
#pragma unroll
        for (int e = 0; e + h < V; e += 2 * h) t[e] = add_rn(t[e], t[e + h]);
    return double(t[0]);
}

template <int V, bool CH, bool STRIDED, typename T, typename A, class Ex>
NADA_BLOCK void bias_act_grad_block(Ex& ex, const BiasActShape& s, const BiasActArgs<A>& a, const T* dy,
                                    const DyMap& m, const T* y, T* dx, double* part, int64_t bx, int by) {
    constexpr int kWarps = kBlockThreads / kWarp;
    const int64_t row0 = by * s.K;                                // the row group's first row
    int64_t pw = (int64_t(by) * s.wwins + bx * kWarps) * s.maxch;   // where this block's warp windows' sums go
    ex.each([&](int tid, typename Ex::State& st) {
        st.col = (bx * kBlockThreads + tid) * V;
        if (!part || CH) return;
        // Its channel: one division, then steps. A block's first columns lie below gx * 256 * V <= 2^24 (gx <=
        // kTargetBlocks), so a 32-bit division does (by_inner32: inner, or 2^31 where it is larger: either way 0).
        const int col = int(st.col), c = fast_div(col, s.by_inner32);
        st.c = c;
        st.left = s.inner_v - unsigned(col - c * s.inner32) / V;  // (c > 0 only where inner <= col < 2^24)
    });
    for (int64_t w = bx; w < s.windows; w += s.gx, pw += s.part_step) {   // the same windows for the whole block
        ex.each([&](int tid, typename Ex::State& st) {
            const bool live = st.col < s.K;
            double tot[CH ? V : 1];
#pragma unroll
            for (int e = 0; e < (CH ? V : 1); e++) tot[e] = 0.0;
            for (int64_t off = row0 + st.col; live && off < s.end; off += s.step) {
                const Pack<T, V> yv = *reinterpret_cast<const Pack<T, V>*>(y + off);
                Pack<T, V> gv, out;
                if (STRIDED) {
#pragma unroll
                    for (int e = 0; e < V; e++) {
                        int64_t o = 0;
                        for (int d = 0; d < m.nd; d++) o += (off + e) / m.ys[d] % m.size[d] * m.ds[d];
                        gv.v[e] = dy[o];
                    }
                } else {
                    gv = *reinterpret_cast<const Pack<T, V>*>(dy + off);
                }
                A g[V];
#pragma unroll
                for (int e = 0; e < V; e++) {
                    g[e] = bias_act_grad_value<A>(A(gv.v[e]), A(yv.v[e]), a);
                    out.v[e] = T(g[e]);
                }
                *reinterpret_cast<Pack<T, V>*>(dx + off) = out;   // (not store_pack: see there)
                if (CH)
#pragma unroll
                    for (int e = 0; e < V; e++) tot[e] = add_rn(tot[e], double(g[e]));
                else
                    tot[0] = add_rn(tot[0], vector_sum<V, A>(g));
            }
            st.col += s.chunk_step * V;
            if (!part) return;
            const int lane = tid % kWarp;
            double* at = part + pw + (tid / kWarp) * s.maxch;
            if (CH) {                                             // V channels, one per element: no sums to do
                if (live)
#pragma unroll
                    for (int e = 0; e < V; e++) at[lane * V + e] = tot[e];
                return;
            }
            st.v = tot[0];                                        // (0 where it is not live)
            st.len = int(st.left < kWarp - lane ? st.left : kWarp - lane);
            st.head = int(live) & (int(lane == 0) | int(st.left == s.inner_v));
        });
        if (!part || CH) continue;
        ex.from_lane0(&Ex::State::c, &Ex::State::c0);
        ex.segment_sums();
        ex.each([&](int tid, typename Ex::State& st) {
            if (st.head) part[pw + (tid / kWarp) * s.maxch + (st.c - st.c0)] = st.v;
            const bool wrap = st.left <= s.rc_step;               // to the column gx * 256 chunks on
            st.left += wrap ? s.inner_v - s.rc_step : -s.rc_step;
            st.c += int(s.c_step) + wrap;
        });
    }
}

// db[c] = the sum of channel c's partial sums over every warp window that touches it and every row group, in
// float64, in a fixed order; then rounded once to the accumulation type.
template <int V, typename A, class Ex>
NADA_BLOCK void bias_grad_sum_block(Ex& ex, const BiasActShape& s, const double* part, A* db, double* red, int c) {
    constexpr int64_t W = int64_t(V) * kWarp;
    ex.phase([&](int tid, NoState&) {
        const int64_t first = c * s.inner / W, last = ((c + 1) * s.inner - 1) / W, nb = last - first + 1;
        double t = 0.0;
        for (int64_t i = tid; i < s.G * nb; i += kBlockThreads) {
            const int64_t g = i / nb, wi = first + i % nb, slot = c - wi * W / s.inner;
            t = add_rn(t, part[(g * s.wwins + wi) * s.maxch + slot]);
        }
        red[tid] = t;
    });
    for (int half = kBlockThreads / 2; half > 0; half /= 2)
        ex.phase([&](int tid, NoState&) {
            if (tid < half) red[tid] = add_rn(red[tid], red[tid + half]);
        });
    ex.phase([&](int tid, NoState&) {
        if (tid == 0) db[c] = A(red[0]);
    });
}
