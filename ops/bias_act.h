// bias_act block code (reference: _bias_act_ref in nada.py), run by the CUDA kernels in bias_act.cu and by their
// CPU twin in bias_act.cpp. y = clamp(gain * act(x + b), -clamp, clamp), act = identity or leaky ReLU.
//
// Layout: a dense tensor is, in memory order, [rows][C][inner] with inner = stride(1), so element i of row r sits in
// channel (i / inner). A thread owns chunks of V consecutive elements of a row (V = 16 bytes' worth when pointers
// allow and a chunk is one channel or, inner 1, V channels; else 1): it looks a chunk's bias up once (the channel
// from a multiply-high, FastDiv in common.h) and walks down the rows (grid y splits them into G groups); where
// rows are few it takes several chunks (every gx-th window of 256 chunks), so that its setup serves at least
// kTurns vectors. One 16-byte load and store per V elements in the loop.
// Backward, in the same pass: dx, and the bias gradient. A thread adds its dx per element in float64 over its rows.
// Each warp then sums per channel over its 32 chunks (a "warp window" of 32 * V columns): segment sums by shuffles
// (common.h), no shared memory and no barrier; with inner 1 and V > 1 (CH) every element is its own channel and goes
// out as it is. One partial sum per channel a warp window touches (at most maxch: 2 when inner >= 32 * V) goes to
// part[G][warp windows][maxch], and a small second kernel adds a channel's partial sums in float64, in a fixed order.
// So the buffer is bounded by the warp windows (a row's columns / (32 V), times G), not by the input; no float32
// running sum at all (a sequential float32 sum of 2^31 terms loses whole percent); deterministic, no atomics.
#pragma once
#include <cmath>
#include <cstring>
#include <limits>
#include "common.h"

template <typename A> struct BitsOf { using type = uint32_t; };   // an unsigned integer of A's size
template <> struct BitsOf<double> { using type = uint64_t; };

// The bits of |v| as an unsigned integer: for non-negative floats their order is the order of the values, and NaN
// lies above infinity.
template <typename A>
NADA_HD typename BitsOf<A>::type magnitude_bits(A v) {
    using U = typename BitsOf<A>::type;
    U u;
#ifdef __CUDA_ARCH__
    if constexpr (sizeof(A) == 4) u = __float_as_uint(v);
    else u = U(__double_as_longlong(v));
#else
    std::memcpy(&u, &v, sizeof u);
#endif
    return u & (~U(0) >> 1);
}

template <typename A>
struct BiasActArgs {
    A alpha;      // slope below zero: alpha for lrelu, 1 for linear
    A nalpha;     // -alpha
    A gain;
    A clamp;      // +inf when there is no clamp
    A clamp_y;    // the clamp as a clamped y holds it: rounded to y's dtype
    typename BitsOf<A>::type below;   // |y|'s bits below this: inside the clamp (all ones when there is none)
    bool clamped;
};

struct BiasActShape {
    int64_t rows, K, inner, chunks;  // K = C * inner elements per row, chunks = K / V
    int64_t windows, gx;             // windows of 256 chunks along a row; blocks along a row (grid x) walk them
    int64_t wwins;                   // warp windows of 32 chunks along a row (the bias gradient's partial sums)
    int64_t chunk_step, col_q, col_r;  // a block's next window: gx * 256 chunks on, gx * 256 * V = q inner + r columns
    int64_t step, end;               // G * K: from a row of a row group to its next; rows * K: the end
    int C, V, G, maxch;              // channels, vector width, row groups (grid y), channels a warp window touches
    FastDiv by_inner;                // column -> channel
};

constexpr int64_t kTurns = 4;             // vectors a thread handles at least, where the tensor allows: its setup
                                          // is paid once for them all

constexpr int64_t kTargetBlocks = 4096;   // enough blocks to fill any GPU; more rows per thread beyond that

// The launch plan, the same for the GPU and the CPU twin. vmax: elements per 16 bytes, usable if every pointer is
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
    s.chunk_step = s.gx * kBlockThreads;
    s.col_q = s.chunk_step * s.V / s.inner;
    s.col_r = s.chunk_step * s.V - s.col_q * s.inner;
    s.step = int64_t(s.G) * s.K;
    s.end = s.rows * s.K;
    return s;
}

template <typename T, typename A>
inline BiasActArgs<A> make_bias_act_args(bool lrelu, double alpha, double gain, double clamp) {
    BiasActArgs<A> a;
    a.alpha = lrelu ? A(alpha) : A(1);
    a.nalpha = -a.alpha;
    a.gain = A(gain);
    a.clamped = clamp >= 0;
    a.clamp = a.clamped ? A(clamp) : std::numeric_limits<A>::infinity();
    a.clamp_y = A(T(a.clamp));
    a.below = a.clamped ? magnitude_bits(a.clamp_y) : ~typename BitsOf<A>::type(0);
    return a;
}

// Strides of dy, by the dims of y: dy is read where it lies, whatever its layout (even expanded).
struct DyMap {
    int nd;
    int64_t ys[8], size[8], ds[8];
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

// One 16-byte store where V elements fill 16 bytes. NVVM splits the store of four floats (as a struct, an array or a
// float4) into four 4-byte stores, so for float it is written in PTX. No memory clobber: nothing in these kernels
// reads what it writes. Forward only: in the gradient's loop the PTX store costs more than the four (sm_90 counts).
template <typename T, int V>
NADA_HD void store_pack(T* p, const Pack<T, V>& v) {
    *reinterpret_cast<Pack<T, V>*>(p) = v;
}

#ifdef __CUDA_ARCH__
template <>
__device__ __forceinline__ void store_pack<float, 4>(float* p, const Pack<float, 4>& v) {
    asm("st.global.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(p), "f"(v.v[0]), "f"(v.v[1]), "f"(v.v[2]), "f"(v.v[3]));
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
    if (!(magnitude_bits(y) < a.below)) return A(0);              // |y| < clamp_y, NaN and inf outside it
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

// A thread's part in its warp's sums per channel: c and rem, its column's channel and place in it (stepped from window
// to window); v, its sum (then its segment's); len, lanes from it to the end of its channel's run in the warp; c0,
// the channel of its warp's first lane; head: it is the run's first lane, and writes the sum to slot c - c0 of its
// warp window.
struct GradState {
    int64_t rem;
    double v;
    int c, c0, len;
    bool head;
};

template <int V, bool CH, bool STRIDED, typename T, typename A, class Ex>
NADA_BLOCK void bias_act_grad_block(Ex& ex, const BiasActShape& s, const BiasActArgs<A>& a, const T* dy,
                                    const DyMap& m, const T* y, T* dx, double* part, int64_t bx, int by) {
    constexpr int kWarps = kBlockThreads / kWarp;
    if (part && !CH)
        ex.each([&](int tid, typename Ex::State& st) {            // the channel of its first column: one division
            const int64_t col = (bx * kBlockThreads + tid) * V, c = fast_div(col, s.by_inner);
            st.c = int(c);
            st.rem = col - c * s.inner;
        });
    for (int64_t w = bx; w < s.windows; w += s.gx) {              // the same windows for every thread of the block
        const int64_t at = (int64_t(by) * s.wwins + w * kWarps) * s.maxch;   // its warp windows' partial sums
        ex.each([&](int tid, typename Ex::State& st) {
            const int64_t chunk = w * kBlockThreads + tid;
            const bool live = chunk < s.chunks;
            double tot[V];
#pragma unroll
            for (int e = 0; e < V; e++) tot[e] = 0.0;
            for (int64_t off = by * s.K + chunk * V; live && off < s.end; off += s.step) {
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
#pragma unroll
                for (int e = 0; e < V; e++) {
                    const A g = bias_act_grad_value<A>(A(gv.v[e]), A(yv.v[e]), a);
                    out.v[e] = T(g);
                    tot[e] = add_rn(tot[e], double(g));
                }
                *reinterpret_cast<Pack<T, V>*>(dx + off) = out;   // (split in four, it counts less)
            }
            if (!part) return;
            const int lane = tid % kWarp;
            if (CH) {                                             // V channels, one per element: no sums to do
                if (live)
#pragma unroll
                    for (int e = 0; e < V; e++) part[at + (tid / kWarp) * s.maxch + lane * V + e] = tot[e];
                return;
            }
            double t = tot[0];
#pragma unroll
            for (int e = 1; e < V; e++) t = add_rn(t, tot[e]);
            const int64_t left = (s.inner - st.rem) / V;          // chunks from its own to its channel's end
            st.v = live ? t : 0.0;
            st.len = int(left < kWarp - lane ? left : kWarp - lane);
            st.head = live && (lane == 0 || st.rem == 0);
        });
        if (!part || CH) continue;
        ex.from_lane0(&Ex::State::c, &Ex::State::c0);
        ex.segment_sums();
        ex.each([&](int tid, typename Ex::State& st) {
            if (st.head) part[at + (tid / kWarp) * s.maxch + (st.c - st.c0)] = st.v;
            st.rem += s.col_r;                                    // to the column gx * 256 chunks on
            st.c += int(s.col_q);
            if (st.rem >= s.inner) {
                st.rem -= s.inner;
                st.c++;
            }
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
