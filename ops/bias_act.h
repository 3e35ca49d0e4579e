// bias_act block code (reference: _bias_act_ref in nada.py), run by the CUDA kernels in bias_act.cu and by their
// CPU twin in bias_act.cpp. y = clamp(gain * act(x + b), -clamp, clamp), act = identity or leaky ReLU.
//
// Layout: a dense tensor is, in memory order, [rows][C][inner] with inner = stride(1), so element i of row r sits in
// channel (i / inner). A thread owns one chunk of V consecutive elements of a row (V = 16 bytes' worth when rows
// and pointers allow, else 1), looks its V bias values up once, and walks down the rows (grid y splits them into
// G groups): no division and one 16-byte load and store per V elements in the loop.
// Backward, in the same pass: dx, and per thread the sum of its dx per channel in the accumulation type; those
// partial sums are reduced per `unit` of columns (a thread's chunk, or the whole block through a shared-memory
// tree when one channel spans the block) into part[G][K / unit], which a small second kernel sums per channel in
// a fixed order: deterministic, no atomics.
#pragma once
#include <limits>
#include "common.h"

template <typename A>
struct BiasActArgs {
    A alpha;      // slope below zero: alpha for lrelu, 1 for linear
    A gain;
    A clamp;      // +inf when there is no clamp
    A clamp_y;    // the clamp as a clamped y holds it: rounded to y's dtype
    bool clamped;
};

struct BiasActShape {
    int64_t rows, K, inner, chunks;  // K = C * inner elements per row, chunks = K / V
    int C, V, G, unit;               // channels, vector width, row groups (grid y), columns per bias-gradient partial
};

constexpr int64_t kTargetBlocks = 4096;   // enough blocks to fill any GPU; more rows per thread beyond that

// The launch plan, the same for the GPU and the CPU twin. vmax: elements per 16 bytes, usable if every pointer is
// 16-byte aligned (`aligned`) and rows split into whole vectors.
inline BiasActShape plan_bias_act(int64_t numel, int64_t C, int64_t stride1, int vmax, bool aligned) {
    BiasActShape s;
    s.C = int(C);
    s.inner = C > 1 ? stride1 : numel;        // one channel: a single row (its stride may be anything, even 0)
    s.K = C * s.inner;
    s.rows = numel / s.K;
    s.V = aligned && s.K % vmax == 0 ? vmax : 1;
    s.chunks = s.K / s.V;
    const int64_t gx = (s.chunks + kBlockThreads - 1) / kBlockThreads;
    int64_t G = (kTargetBlocks + gx - 1) / gx;
    G = G < s.rows ? G : s.rows;
    s.G = int(G < 65535 ? G : 65535);
    s.unit = s.inner % (int64_t(s.V) * kBlockThreads) == 0 ? s.V * kBlockThreads : s.inner % s.V == 0 ? s.V : 1;
    return s;
}

template <typename T, typename A>
inline BiasActArgs<A> make_bias_act_args(bool lrelu, double alpha, double gain, double clamp) {
    BiasActArgs<A> a;
    a.alpha = lrelu ? A(alpha) : A(1);
    a.gain = A(gain);
    a.clamped = clamp >= 0;
    a.clamp = a.clamped ? A(clamp) : std::numeric_limits<A>::infinity();
    a.clamp_y = A(T(a.clamp));
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

template <typename A>
NADA_HD A bias_act_value(A v, const BiasActArgs<A>& a) {
    v = v < A(0) ? v * a.alpha : v;
    v *= a.gain;
    return v > a.clamp ? a.clamp : (v < -a.clamp ? -a.clamp : v);
}

// dL/dx from dL/dy and the saved output y alone: gain * act'(.) * [|y| < clamp]. The sign of y is the sign of
// x + b (alpha >= 0, gain > 0), so y tells the leaky ReLU's branch.
template <typename A>
NADA_HD A bias_act_grad_value(A dy, A y, const BiasActArgs<A>& a) {
    if (a.clamped && !(y < a.clamp_y && y > -a.clamp_y)) return A(0);
    const A g = dy * a.gain;
    return y > A(0) ? g : g * a.alpha;
}

template <int V, typename T, typename A, class Ex>
NADA_BLOCK void bias_act_block(Ex& ex, const BiasActShape& s, const BiasActArgs<A>& a, const T* x, const A* b,
                               T* y, int64_t bx, int by) {
    ex.phase([&](int tid, NoState&) {
        const int64_t chunk = bx * kBlockThreads + tid;
        if (chunk >= s.chunks) return;
        A bias[V];
#pragma unroll
        for (int e = 0; e < V; e++) bias[e] = b ? b[(chunk * V + e) / s.inner] : A(0);
        const int64_t step = int64_t(s.G) * s.K, end = s.rows * s.K;
        for (int64_t off = by * s.K + chunk * V; off < end; off += step) {
            const Pack<T, V> in = *reinterpret_cast<const Pack<T, V>*>(x + off);
            Pack<T, V> out;
#pragma unroll
            for (int e = 0; e < V; e++) out.v[e] = T(bias_act_value<A>(A(in.v[e]) + bias[e], a));
            *reinterpret_cast<Pack<T, V>*>(y + off) = out;
        }
    });
}

template <int V, bool STRIDED, typename T, typename A, class Ex>
NADA_BLOCK void bias_act_grad_block(Ex& ex, const BiasActShape& s, const BiasActArgs<A>& a, const T* dy,
                                    const DyMap& m, const T* y, T* dx, A* part, A* red, int64_t bx, int by) {
    ex.phase([&](int tid, NoState&) {
        const int64_t chunk = bx * kBlockThreads + tid;
        A acc[V];
#pragma unroll
        for (int e = 0; e < V; e++) acc[e] = A(0);
        if (chunk < s.chunks) {
            const int64_t step = int64_t(s.G) * s.K, end = s.rows * s.K;
            for (int64_t off = by * s.K + chunk * V; off < end; off += step) {
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
                    acc[e] = add_rn(acc[e], g);
                }
                *reinterpret_cast<Pack<T, V>*>(dx + off) = out;
            }
        }
        if (!part) return;
        if (s.unit == 1) {
            if (chunk < s.chunks)
                for (int e = 0; e < V; e++) part[by * s.K + chunk * V + e] = acc[e];
            return;
        }
        A t = acc[0];
#pragma unroll
        for (int e = 1; e < V; e++) t += acc[e];
        if (s.unit == V) {
            if (chunk < s.chunks) part[by * s.chunks + chunk] = t;
        } else {
            red[tid] = t;                           // one channel spans the block: reduce it in shared memory
        }
    });
    if (!part || s.unit != V * kBlockThreads) return;
    for (int half = kBlockThreads / 2; half > 0; half /= 2)
        ex.phase([&](int tid, NoState&) {
            if (tid < half) red[tid] += red[tid + half];
        });
    ex.phase([&](int tid, NoState&) {
        if (tid == 0) part[by * (s.chunks / kBlockThreads) + bx] = red[0];
    });
}

// db[c] = the sum of channel c's partial sums part[g][c * upc + u] over every row group g, in a fixed order.
template <typename A, class Ex>
NADA_BLOCK void bias_grad_sum_block(Ex& ex, const A* part, int G, int64_t units, int64_t upc, A* db, A* red, int c) {
    ex.phase([&](int tid, NoState&) {
        A t = A(0);
        for (int g = 0; g < G; g++)
            for (int64_t u = tid; u < upc; u += kBlockThreads) t += part[g * units + c * upc + u];
        red[tid] = t;
    });
    for (int half = kBlockThreads / 2; half > 0; half /= 2)
        ex.phase([&](int tid, NoState&) {
            if (tid < half) red[tid] += red[tid + half];
        });
    ex.phase([&](int tid, NoState&) {
        if (tid == 0) db[c] = red[0];
    });
}
