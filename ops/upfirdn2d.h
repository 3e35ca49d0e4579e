// upfirdn2d block code (reference: _upfirdn2d_ref in nada.py), run by the CUDA kernels in upfirdn2d.cu and by
// their CPU twin in upfirdn2d.cpp. Math (upfirdn2d in nada.py): zero-insert by `up`, pad by (px0, px1, py0, py1),
// correlate with F = flip_filter ? f : f flipped, times gain, keep every `down`-th sample. Output o, tap t reads upsampled
// coordinate u = o*down - p0 + t, which is an input sample iff u % up == 0 (polyphase: zero taps are never visited).
//
// Design: the tiles of every plane (n, c), taken plane by plane and tile row by tile row, are "slots"; a block owns
// one tile column (grid y) and `loop` consecutive slots (grid x: the groups of slots), which it walks through, from
// one plane into the next where planes are small: the per-block setup (taps, tile columns) is paid once for up to
// kMaxLoop tiles at any plane size, and the plane's pointers once per plane. Per tile, phase 1 stages the tile's
// input footprint plus its border in shared memory, zero-filled outside the image (so the taps need no bounds checks); phase 2
// computes the outputs. Offsets within a plane are 32-bit (checked on the host).
//  - Small kernels (StyleGAN2: 4x4 filter with up 2, down 2 or neither): the tap count, factors and tile are
//    compile-time constants; 32 x 8 threads each compute a 2x2 quad of outputs (a 64 x 16 tile) from a register
//    window of the tile, with the taps in registers. The tiles start where the quad's first output is on
//    up-phase 0 (host: shift), so every up=2 phase is a constant and the loops unroll completely.
//  - Generic kernel: everything else, sizes at run time, taps in shared memory, one output per thread and turn.
#pragma once
#include <cmath>
#include "common.h"

struct UpFirDnParams {
    int C, H, W, outH, outW;
    int64_t planes;                  // N * C
    FastDiv32 by_C;                  // plane -> (n, c)
    FastDiv by_tilesY;               // slot -> (plane, tile row)
    int64_t xs_n, xs_c, ys_n, ys_c;  // strides between planes, in elements
    int64_t xs_wrap, ys_wrap;        // from plane (n, C - 1) to (n + 1, 0)
    int xs_h, xs_w, ys_h, ys_w;      // strides within a plane: 32-bit
    int up, down, px0, py0, fh, fw;
    int shiftx, shifty;              // tile 0 starts this many outputs before output 0 (up-phase alignment)
    int tilesX, tilesY, loop;        // tiles per row and column of the output; slots (tiles) per block
    int tow, toh, tiw, tih;          // tile of outputs and its input footprint (the small kernels: constants)
    bool flip;
    double gain;
    float gainf;                     // gain rounded to float (the float taps: float(f) * float(gain))
};

constexpr int kMaxLoop = 16;          // tiles one block walks at most

template <typename A> NADA_HD A gain_of(const UpFirDnParams& p);
template <> NADA_HD float gain_of<float>(const UpFirDnParams& p) { return p.gainf; }
template <> NADA_HD double gain_of<double>(const UpFirDnParams& p) { return p.gain; }

// Walks a block's slots: calls plane_fn(xp, yp) at each plane it enters and tile_fn(bty) for each of its tiles. The
// first plane's offsets are computed, the next ones stepped to: c + 1, or n + 1 and c = 0 (the host's wrap strides).
template <typename T, class PlaneFn, class TileFn>
NADA_BLOCK void walk_slots(const UpFirDnParams& p, const T* x, T* y, int64_t group, PlaneFn&& plane_fn, TileFn&& tile_fn) {
    const int64_t k0 = group * p.loop, total = p.planes * p.tilesY;
    int left = int(total - k0 < p.loop ? total - k0 : p.loop);  // tiles this block computes
    const int plane = int(fast_div(k0, p.by_tilesY));
    int bty = int(k0 - int64_t(plane) * p.tilesY);
    const unsigned n = unsigned(fast_div(plane, p.by_C));
    unsigned c = unsigned(plane) - n * unsigned(p.C);
    int64_t xo = int64_t(n) * p.xs_n + int64_t(c) * p.xs_c, yo = int64_t(n) * p.ys_n + int64_t(c) * p.ys_c;
    for (;;) {
        plane_fn(x + xo, y + yo);
        for (; bty < p.tilesY && left > 0; bty++, left--) tile_fn(bty);
        if (left == 0) return;
        bty = 0;
        const bool wrap = ++c == unsigned(p.C);
        c = wrap ? 0u : c;
        xo += wrap ? p.xs_wrap : p.xs_c;
        yo += wrap ? p.ys_wrap : p.ys_c;
    }
}

// acc + a*b rounded once, on the GPU and on the CPU alike, so the twin matches the kernel bit for bit.
template <typename A>
NADA_HD A mac(A acc, A a, A b) {
#ifdef __CUDA_ARCH__
    return fma(a, b, acc);
#else
    return std::fma(a, b, acc);
#endif
}

// Tap i (row-major) of the correlation filter: flip and gain folded into the load.
template <typename A>
NADA_HD A load_tap(const float* f, const UpFirDnParams& p, int i) {
    return A(f[p.flip ? i : p.fh * p.fw - 1 - i]) * gain_of<A>(p);
}

template <int UP, int DOWN, int FH, int FW>
struct SmallTile {
    static constexpr int QX = 2, QY = 2;                          // outputs per thread: a 2x2 quad
    static constexpr int TX = 32, TY = kBlockThreads / TX;        // threads: one warp per row of quads
    static constexpr int TOW = TX * QX, TOH = TY * QY;            // 64 x 16 outputs per tile
    static constexpr int TIW = ((TOW - 1) * DOWN + FW - 1) / UP + 1, TIH = ((TOH - 1) * DOWN + FH - 1) / UP + 1;
    static constexpr int WX = ((QX - 1) * DOWN + FW - 1) / UP + 1, WY = ((QY - 1) * DOWN + FH - 1) / UP + 1;
    // The tile in shared memory: rows of SW (a whole number of warps' columns: every thread's column lies inside
    // its row, zeros beyond TIW) and one spare row at TIH that catches the rows past the tile: so phase 1 has no
    // branches.
    static constexpr int SW = (TIW + TX - 1) / TX * TX, TILE = (TIH + 1) * SW;
    static_assert((QX * DOWN) % UP == 0 && (QY * DOWN) % UP == 0, "every quad must start on up-phase 0");
};

// A thread's registers in the small kernels: the taps, and its offsets from a tile's corner, the same for every tile
// of the block's column in every plane (so that per tile and per plane only uniform values change).
template <typename A, int NT, int NK>
struct SmallState {
    A t[NT];
    int xo;         // offset in x of its first input: tile row tid / 32, tile column lane (column lane + 32k is
                    // k * 32 * xs_w further, row r + 8j is 8j * xs_h further), from the tile's input row 0, column 0
    int yo;         // offset in y of its quad's first output from the tile's output row 0, column 0
    int qy;         // its quad's first row in the tile
    unsigned cok;   // bit k: tile column lane + 32k is inside the image (and inside the tile)
    unsigned xok;   // bit b: output column b of its quad is inside the image
};

template <int UP, int DOWN, int FH, int FW, typename A>
using SmallStateFor = SmallState<A, FH * FW, (SmallTile<UP, DOWN, FH, FW>::TIW + 31) / 32>;

template <int UP, int DOWN, int FH, int FW, typename T, typename A, class Ex>
NADA_BLOCK void upfirdn2d_small_block(Ex& ex, const UpFirDnParams& p, const T* x, const float* f, T* y, A* tile,
                                      int64_t group, int btx) {
    using K = SmallTile<UP, DOWN, FH, FW>;
    const T* xp = x;
    T* yp = y;
    constexpr int NK = (K::TIW + K::TX - 1) / K::TX, NJ = (K::TIH + K::TY - 1) / K::TY;
    const int o0x = btx * K::TOW - p.shiftx;
    const int in0x = floor_div(o0x * DOWN - p.px0, UP);           // exact: the host aligned the phase
    ex.phase([&](int tid, typename Ex::State& s) {                // once per block: taps, tile columns
        A v[FH * FW];                                             // loads at fixed offsets, then the flip: selects
#pragma unroll
        for (int i = 0; i < FH * FW; i++) v[i] = A(f[i]);
        const A g = gain_of<A>(p);
#pragma unroll
        for (int i = 0; i < FH * FW; i++) s.t[i] = (p.flip ? v[i] : v[FH * FW - 1 - i]) * g;
        const int lane = tid % K::TX, row0 = tid / K::TX;
        // Its first column, clamped where none of its columns lies in the image (huge pads): they are never
        // loaded (cok), and the offset stays within the plane's 32-bit range.
        const int cx = in0x + lane < -NK * K::TX ? -NK * K::TX : in0x + lane > p.W ? p.W : in0x + lane;
        s.xo = row0 * p.xs_h + cx * p.xs_w;
        s.qy = row0 * K::QY;
        s.yo = s.qy * p.ys_h + (o0x + lane * K::QX) * p.ys_w;
        s.xok = 0;
#pragma unroll
        for (int b = 0; b < K::QX; b++) s.xok |= unsigned(unsigned(o0x + lane * K::QX + b) < unsigned(p.outW)) << b;
        s.cok = 0;
#pragma unroll
        for (int k = 0; k < NK; k++) {
            const int cc = tid % K::TX + k * K::TX, ix = in0x + cc;
            s.cok |= unsigned(cc < K::TIW && unsigned(ix) < unsigned(p.W)) << k;
        }
    });
    walk_slots(p, x, y, group, [&](const T* xq, T* yq) { xp = xq; yp = yq; }, [&](int bty) {
        const int o0y = bty * K::TOH - p.shifty;
        const int in0y = floor_div(o0y * DOWN - p.py0, UP);
        const T* xt = xp + int64_t(in0y) * p.xs_h;                // the tile's corners: uniform, x's may lie outside
        T* yt = yp + o0y * p.ys_h;
        ex.phase([&](int tid, typename Ex::State& s) {            // phase 1: the input tile, zeros outside x
            const int lane = tid % K::TX, row0 = tid / K::TX;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                const int r = row0 + j * K::TY;
                const bool in_tile = j < NJ - 1 || r < K::TIH;    // only the last rows may lie past the tile
                const unsigned ok = in_tile && unsigned(in0y + r) < unsigned(p.H) ? s.cok : 0u;
                A* dst = tile + (in_tile ? r : K::TIH) * K::SW + lane;
                // A byte pointer stepped by a byte stride: one 64-bit add per element, for any T.
                const char* src = reinterpret_cast<const char*>(xt + (s.xo + j * K::TY * p.xs_h));
                const int64_t step = int64_t(K::TX) * p.xs_w * int64_t(sizeof(T));
#pragma unroll
                for (int k = 0; k < NK; k++, src += step)
                    dst[k * K::TX] = (ok >> k) & 1u ? A(*reinterpret_cast<const T*>(src)) : A(0);
            }
        });
        ex.phase([&](int tid, typename Ex::State& s) {            // phase 2: one 2x2 quad per thread
            const int qx = tid % K::TX, qy = tid / K::TX;
            const A* src = tile + (qy * (K::QY * DOWN / UP)) * K::SW + qx * (K::QX * DOWN / UP);
            A win[K::WY][K::WX];
#pragma unroll
            for (int i = 0; i < K::WY; i++)
#pragma unroll
                for (int j = 0; j < K::WX; j++) win[i][j] = src[i * K::SW + j];
            char* quad = reinterpret_cast<char*>(yt + s.yo);      // its first output: the others are a byte step away
#pragma unroll
            for (int a = 0; a < K::QY; a++) {
                const bool row_ok = unsigned(o0y + s.qy + a) < unsigned(p.outH);
#pragma unroll
                for (int b = 0; b < K::QX; b++) {
                    A acc = A(0);
#pragma unroll
                    for (int ty = 0; ty < FH; ty++) {
                        if ((a * DOWN + ty) % UP) continue;       // a zero inserted by the upsampling
#pragma unroll
                        for (int tx = 0; tx < FW; tx++) {
                            if ((b * DOWN + tx) % UP) continue;
                            acc = mac(acc, s.t[ty * FW + tx], win[(a * DOWN + ty) / UP][(b * DOWN + tx) / UP]);
                        }
                    }
                    T* dst = reinterpret_cast<T*>(quad + (a * p.ys_h + b * p.ys_w) * int64_t(sizeof(T)));
                    if (row_ok && (s.xok >> b) & 1u) *dst = T(acc);
                }
            }
        });
    });
}

// Any factors and filter size. Shared memory: the tile [tih, tiw], then the taps [fh, fw].
template <typename T, typename A, class Ex>
NADA_BLOCK void upfirdn2d_generic_block(Ex& ex, const UpFirDnParams& p, const T* x, const float* f, T* y, A* smem,
                                        int64_t group, int btx) {
    A* tile = smem;
    A* taps = smem + p.tih * p.tiw;
    const T* xp = x;
    T* yp = y;
    const int o0x = btx * p.tow, u0x = o0x * p.down - p.px0, in0x = floor_div(u0x, p.up), r0x = u0x - in0x * p.up;
    bool first = true;
    walk_slots(p, x, y, group, [&](const T* xq, T* yq) { xp = xq; yp = yq; }, [&](int bty) {
        const bool l0 = first;
        first = false;
        const int o0y = bty * p.toh, u0y = o0y * p.down - p.py0, in0y = floor_div(u0y, p.up),
                  r0y = u0y - in0y * p.up;
        ex.phase([&](int tid, NoState&) {
            if (l0)
                for (int i = tid; i < p.fh * p.fw; i += kBlockThreads) taps[i] = load_tap<A>(f, p, i);
            for (int i = tid; i < p.tih * p.tiw; i += kBlockThreads) {
                const int r = i / p.tiw, cc = i - r * p.tiw, iy = in0y + r, ix = in0x + cc;
                tile[i] = unsigned(iy) < unsigned(p.H) && unsigned(ix) < unsigned(p.W)
                              ? A(xp[iy * p.xs_h + ix * p.xs_w]) : A(0);
            }
        });
        ex.phase([&](int tid, NoState&) {
            for (int i = tid; i < p.tow * p.toh; i += kBlockThreads) {
                const int a = i / p.tow, b = i - a * p.tow, oy = o0y + a, ox = o0x + b;
                if (oy >= p.outH || ox >= p.outW) continue;
                const int ry = r0y + a * p.down, rx = r0x + b * p.down;   // upsampled coordinate in the tile
                A acc = A(0);
                for (int ty = (p.up - ry % p.up) % p.up; ty < p.fh; ty += p.up) {
                    const A* row = tile + ((ry + ty) / p.up) * p.tiw;
                    for (int tx = (p.up - rx % p.up) % p.up; tx < p.fw; tx += p.up)
                        acc = mac(acc, taps[ty * p.fw + tx], row[(rx + tx) / p.up]);
                }
                yp[oy * p.ys_h + ox * p.ys_w] = T(acc);
            }
        });
    });
}

enum class UpFirDnKernel { Generic, Blur4, Up2x4, Down2x4 };

// The launch plan, the same for the GPU and the CPU twin: which kernel, tile sizes, tile alignment, the tile loop.
// Returns why the op cannot run (nullptr if it can): the limits live here, so the CPU twin refuses exactly what the
// GPU refuses.
constexpr int kMaxGridYZ = 65535;                                 // CUDA's limit on grid y and z
constexpr int64_t kTargetTileBlocks = 4096;                       // blocks that fill any GPU

inline const char* plan_upfirdn2d(UpFirDnParams& p, int acc_bytes, int64_t smem_limit, UpFirDnKernel& kind) {
    const bool k4 = p.fh == 4 && p.fw == 4;
    kind = !k4 ? UpFirDnKernel::Generic
         : p.up == 1 && p.down == 1 ? UpFirDnKernel::Blur4
         : p.up == 2 && p.down == 1 ? UpFirDnKernel::Up2x4
         : p.up == 1 && p.down == 2 ? UpFirDnKernel::Down2x4 : UpFirDnKernel::Generic;
    p.shiftx = p.shifty = 0;
    if (kind == UpFirDnKernel::Up2x4) {                           // quads start on up-phase 0
        p.shiftx = ((p.px0 % 2) + 2) % 2;
        p.shifty = ((p.py0 % 2) + 2) % 2;
    }
    if (kind != UpFirDnKernel::Generic) {
        p.tow = 64;
        p.toh = 16;
        p.tiw = p.tih = 0;                                        // compile-time in the kernel
    } else {
        p.tow = 32;
        p.toh = 8;
        for (;;) {
            p.tiw = (p.up - 1 + (p.tow - 1) * p.down + p.fw - 1) / p.up + 1;
            p.tih = (p.up - 1 + (p.toh - 1) * p.down + p.fh - 1) / p.up + 1;
            if (int64_t(p.tiw) * p.tih * acc_bytes + int64_t(p.fh) * p.fw * acc_bytes <= smem_limit) break;
            if (p.toh > 1) p.toh /= 2;
            else if (p.tow > 1) p.tow /= 2;
            else return "upfirdn2d: filter too large";
        }
    }
    p.tilesX = (p.outW + p.shiftx + p.tow - 1) / p.tow;
    p.tilesY = (p.outH + p.shifty + p.toh - 1) / p.toh;
    if (p.tilesX > kMaxGridYZ) return "upfirdn2d: the output is too wide for one launch (tile columns > 65535)";
    // Tiles per block: enough blocks for kTargetTiles / loop to fill the GPU, but at least 4 tiles where there are
    // as many slots, and at most kMaxLoop.
    const int64_t slots = p.planes * p.tilesY, work = slots * p.tilesX;
    int64_t loop = (work + kTargetTileBlocks - 1) / kTargetTileBlocks;
    loop = loop < 4 ? 4 : loop > kMaxLoop ? kMaxLoop : loop;
    p.loop = int(loop < slots ? loop : slots);
    if ((slots + p.loop - 1) / p.loop >= INT32_MAX) return "upfirdn2d: too many planes for one launch";
    p.gainf = float(p.gain);
    p.by_C = make_fast_div32(p.C);
    p.xs_wrap = p.xs_n - (p.C - 1) * p.xs_c;
    p.ys_wrap = p.ys_n - (p.C - 1) * p.ys_c;
    p.by_tilesY = make_fast_div(p.tilesY);
    return nullptr;
}
