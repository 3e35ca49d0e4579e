// upfirdn2d: upsample by zero insertion, pad/crop, FIR filter, downsample (reference: _upfirdn2d_ref in nada.py).
// Operator definition, argument checks, the launch plan, the CPU twin of the kernels, and dispatch. The block
// code both run is in upfirdn2d.h; the CUDA launch in upfirdn2d.cu.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <memory>
#include <vector>
#include "upfirdn2d.h"

void upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& f, const UpFirDnParams& p, UpFirDnKernel kind,
                    at::Tensor& y);

constexpr int64_t kSmemLimit = 48 * 1024;      // shared memory a block may use without an opt-in
constexpr int64_t kCoordLimit = INT64_C(1) << 30;   // sizes, pads and coordinates stay far from INT32_MAX

// The output layout: channels_last iff x's channels are its innermost dim (ops/register.py's fake says the same).
bool upfirdn2d_channels_last(const at::Tensor& x) { return x.size(1) > 1 && x.stride(1) < x.stride(3); }

// Checks, output allocation and the parameters of the launch.
static UpFirDnParams prepare(const at::Tensor& x, const at::Tensor& f, int64_t up, int64_t down, int64_t px0,
                             int64_t px1, int64_t py0, int64_t py1, bool flip, double gain, at::Tensor& y) {
    TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be [N, C, H, W], got ", x.dim(), " dims");
    TORCH_CHECK(f.dim() == 2 && f.scalar_type() == at::kFloat, "upfirdn2d: f must be a float32 [fh, fw] filter");
    TORCH_CHECK(f.device() == x.device(), "upfirdn2d: f must be on x's device");
    TORCH_CHECK(up >= 1 && down >= 1 && up < 4096 && down < 4096, "upfirdn2d: up and down must be in [1, 4096)");
    for (int64_t v : {px0, px1, py0, py1})
        TORCH_CHECK(std::abs(v) < kCoordLimit, "upfirdn2d: pad ", v, " is out of range (|pad| < 2^30)");
    const int64_t fh = f.size(0), fw = f.size(1), H = x.size(2), W = x.size(3);
    TORCH_CHECK(fh >= 1 && fw >= 1 && fh < 4096 && fw < 4096, "upfirdn2d: filter size out of range");
    TORCH_CHECK(H * up < kCoordLimit && W * up < kCoordLimit, "upfirdn2d: the upsampled image is too large");
    const int64_t padH = H * up + py0 + py1, padW = W * up + px0 + px1;
    TORCH_CHECK(padH >= fh && padW >= fw, "upfirdn2d: the padded, upsampled input is smaller than the filter");
    const int64_t outH = (padH - fh) / down + 1, outW = (padW - fw) / down + 1;
    TORCH_CHECK((outH + 64) * down < kCoordLimit && (outW + 64) * down < kCoordLimit,
                "upfirdn2d: the output is too large");
    TORCH_CHECK(x.size(0) * x.size(1) < INT32_MAX, "upfirdn2d: more than 2^31 planes");
    const bool cl = upfirdn2d_channels_last(x);
    y = at::empty({x.size(0), x.size(1), outH, outW},
                  x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    // Strides of size-1 dims are never multiplied by a non-zero coordinate: drop them.
    auto st = [](const at::Tensor& t, int d) { return t.size(d) > 1 ? t.stride(d) : 0; };
    // Tile loads form offsets up to a tile's width and height beyond the image: keep a margin.
    TORCH_CHECK((H + 256) * st(x, 2) + (W + 512) * st(x, 3) < INT32_MAX &&
                (outH + 64) * st(y, 2) + (outW + 128) * st(y, 3) < INT32_MAX,
                "upfirdn2d: one plane spans more than 2^31 elements");
    UpFirDnParams p{};
    p.C = int(x.size(1)); p.H = int(H); p.W = int(W); p.outH = int(outH); p.outW = int(outW);
    p.xs_n = st(x, 0); p.xs_c = st(x, 1); p.xs_h = int(st(x, 2)); p.xs_w = int(st(x, 3));
    p.ys_n = st(y, 0); p.ys_c = st(y, 1); p.ys_h = int(st(y, 2)); p.ys_w = int(st(y, 3));
    p.up = int(up); p.down = int(down); p.px0 = int(px0); p.py0 = int(py0); p.fh = int(fh); p.fw = int(fw);
    p.flip = flip; p.gain = gain;
    p.planes = x.size(0) * x.size(1);
    return p;
}

// The CPU twin: every block of the launch grid, each running its 256 threads phase by phase (common.h).
template <typename T, class Run>
static void for_each_block(const UpFirDnParams& p, int64_t planes, Run run) {
    const int64_t groups = (planes * p.tilesY + p.loop - 1) / p.loop, blocks = groups * p.tilesX;
    at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; b++) run(b % groups, int(b / groups));
    });
}

template <int UP, int DOWN, typename T>
static void small_cpu(const T* x, const float* f, T* y, const UpFirDnParams& p, int64_t planes) {
    using A = at::opmath_type<T>;
    using K = SmallTile<UP, DOWN, 4, 4>;
    for_each_block<T>(p, planes, [&](int64_t group, int btx) {
        auto ex = std::make_unique<CpuBlock<SmallStateFor<UP, DOWN, 4, 4, A>>>();
        std::vector<A> tile(K::TILE);
        upfirdn2d_small_block<UP, DOWN, 4, 4, T, A>(*ex, p, x, f, y, tile.data(), group, btx);
    });
}

static at::Tensor upfirdn2d_cpu(const at::Tensor& x_, const at::Tensor& f_, int64_t up, int64_t down, int64_t px0,
                                int64_t px1, int64_t py0, int64_t py1, bool flip, double gain) {
    at::Tensor y, f = f_.contiguous(), x = x_;
    UpFirDnParams p = prepare(x, f, up, down, px0, px1, py0, py1, flip, gain, y);
    if (y.numel() == 0) return y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        UpFirDnKernel kind;
        const char* refused = plan_upfirdn2d(p, sizeof(A), kSmemLimit, kind);
        TORCH_CHECK(!refused, refused);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const float* fp = f.const_data_ptr<float>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        const int64_t planes = x.size(0) * x.size(1);
        switch (kind) {
            case UpFirDnKernel::Blur4: small_cpu<1, 1>(xp, fp, yp, p, planes); break;
            case UpFirDnKernel::Up2x4: small_cpu<2, 1>(xp, fp, yp, p, planes); break;
            case UpFirDnKernel::Down2x4: small_cpu<1, 2>(xp, fp, yp, p, planes); break;
            case UpFirDnKernel::Generic:
                for_each_block<scalar_t>(p, planes, [&](int64_t group, int btx) {
                    auto ex = std::make_unique<CpuBlock<NoState>>();
                    std::vector<A> smem(size_t(p.tih) * p.tiw + size_t(p.fh) * p.fw);
                    upfirdn2d_generic_block<scalar_t, A>(*ex, p, xp, fp, yp, smem.data(), group, btx);
                });
        }
    });
    return y;
}

static at::Tensor upfirdn2d_cuda_checked(const at::Tensor& x, const at::Tensor& f_, int64_t up, int64_t down,
                                         int64_t px0, int64_t px1, int64_t py0, int64_t py1, bool flip, double gain) {
    at::Tensor y, f = f_.contiguous();
    UpFirDnParams p = prepare(x, f, up, down, px0, px1, py0, py1, flip, gain, y);
    if (y.numel() == 0) return y;
    UpFirDnKernel kind;
    const char* refused = plan_upfirdn2d(p, x.scalar_type() == at::kDouble ? 8 : 4, kSmemLimit, kind);
    TORCH_CHECK(!refused, refused);
    upfirdn2d_cuda(x, f, p, kind, y);
    return y;
}

TORCH_LIBRARY_FRAGMENT(nada, m) {
    m.def("upfirdn2d(Tensor x, Tensor f, int up, int down, int px0, int px1, int py0, int py1, bool flip, "
          "float gain) -> Tensor");
}

TORCH_LIBRARY_IMPL(nada, CPU, m) { m.impl("upfirdn2d", &upfirdn2d_cpu); }

TORCH_LIBRARY_IMPL(nada, CUDA, m) { m.impl("upfirdn2d", &upfirdn2d_cuda_checked); }
