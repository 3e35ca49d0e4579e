// Shared by the .cpp (host compiler: the CPU twin of each kernel) and the .cu (nvcc): the per-element math,
// written once, so the CPU tests in test_nada.py check exactly the arithmetic the GPU runs.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define NADA_HD __host__ __device__ __forceinline__
#else
#define NADA_HD inline
#endif

// ---- bias_act: y = clamp(gain * act(x + b)), act = identity or leaky ReLU; see _bias_act_ref in nada.py ----

struct BiasActParams {
    bool lrelu;
    double alpha, gain, clamp;  // clamp < 0: no clamp
};

template <typename A>
NADA_HD A bias_act_value(A v, const BiasActParams& p) {
    if (p.lrelu && v < A(0)) v *= A(p.alpha);
    v *= A(p.gain);
    if (p.clamp >= 0) v = v > A(p.clamp) ? A(p.clamp) : (v < A(-p.clamp) ? A(-p.clamp) : v);
    return v;
}

// dL/dx from dL/dy and the saved output y alone: gain * act'(.) * [|y| < clamp]. The sign of y is the sign of
// x + b (alpha, gain > 0), so y tells the leaky ReLU's branch. A clamped y holds the clamp rounded to y's dtype
// T, so that is what y is compared with.
template <typename T, typename A>
NADA_HD A bias_act_grad_value(A dy, A y, const BiasActParams& p) {
    const A c = A(T(A(p.clamp)));
    if (p.clamp >= 0 && !(y < c && y > -c)) return A(0);
    A g = dy * A(p.gain);
    return (p.lrelu && !(y > A(0))) ? g * A(p.alpha) : g;
}

// Channel of the element at memory offset i of a dense tensor whose channel dim has stride s1 and size C.
template <typename I>
NADA_HD I channel_of(I i, I s1, I C) { return (i / s1) % C; }

// ---- upfirdn2d: zero-insert by `up`, pad, correlate with the prepared filter, keep every `down`-th sample ----

struct UpFirDnParams {
    int N, C, H, W, outH, outW;
    int64_t sx[4];              // strides of x, in elements, for n, c, h, w
    int up, down, px0, py0, fh, fw;
};

// One output sample by polyphase: visit only the taps that land on real (not inserted-zero) input samples.
// `f` is the correlation filter (already flipped for a true convolution) times the gain, row-major [fh, fw].
// Template arguments that are 0 are read from p at run time; others are compile-time and unroll.
template <int UP, int DOWN, int FH, int FW, typename T, typename A>
NADA_HD A upfirdn2d_point(const T* x, const A* f, const UpFirDnParams& p, int n, int c, int oy, int ox) {
    const int up = UP ? UP : p.up, down = DOWN ? DOWN : p.down;
    const int fh = FH ? FH : p.fh, fw = FW ? FW : p.fw;
    const int uy = oy * down - p.py0, ux = ox * down - p.px0;   // upsampled coordinate under tap 0
    const int ty0 = ((-uy) % up + up) % up, tx0 = ((-ux) % up + up) % up;
    const T* plane = x + n * p.sx[0] + c * p.sx[1];
    A acc = A(0);
#pragma unroll
    for (int ty = ty0; ty < fh; ty += up) {
        const int iy = (uy + ty) / up;
        if (uy + ty < 0 || iy >= p.H) continue;
#pragma unroll
        for (int tx = tx0; tx < fw; tx += up) {
            const int ix = (ux + tx) / up;
            if (ux + tx < 0 || ix >= p.W) continue;
            acc += f[ty * fw + tx] * A(plane[iy * p.sx[2] + ix * p.sx[3]]);
        }
    }
    return acc;
}

// Output element at linear index i, in NCHW order or (channels_last) NHWC order.
template <typename I>
NADA_HD void output_coords(I i, const UpFirDnParams& p, bool channels_last, int& n, int& c, int& oy, int& ox) {
    if (channels_last) {
        c = int(i % p.C); i /= p.C;
        ox = int(i % p.outW); i /= p.outW;
        oy = int(i % p.outH); n = int(i / p.outH);
    } else {
        ox = int(i % p.outW); i /= p.outW;
        oy = int(i % p.outH); i /= p.outH;
        c = int(i % p.C); n = int(i / p.C);
    }
}
