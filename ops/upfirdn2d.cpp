// upfirdn2d: upsample by zero insertion, pad/crop, FIR filter, downsample (reference: _upfirdn2d_ref in nada.py).
// Operator definition, argument checks, filter preparation, the CPU twin of the kernel, and dispatch.
// The CUDA kernel is in upfirdn2d.cu; the per-sample math is shared through common.h.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include "common.h"

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& f, const UpFirDnParams& p, at::Tensor& y);

// Checks, output allocation (x's memory format is kept) and the correlation filter: flipped unless flip_filter,
// times the gain, in the accumulation dtype.
static UpFirDnParams prepare(const at::Tensor& x, const at::Tensor& f, int64_t up, int64_t down, int64_t px0,
                             int64_t px1, int64_t py0, int64_t py1, bool flip, double gain, at::Tensor& fk,
                             at::Tensor& y) {
    TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be [N, C, H, W], got ", x.dim(), " dims");
    TORCH_CHECK(f.dim() == 2 && f.scalar_type() == at::kFloat, "upfirdn2d: f must be a float32 [fh, fw] filter");
    TORCH_CHECK(up >= 1 && down >= 1, "upfirdn2d: up and down must be >= 1");
    const int64_t fh = f.size(0), fw = f.size(1);
    const int64_t outH = (x.size(2) * up + py0 + py1 - fh) / down + 1;
    const int64_t outW = (x.size(3) * up + px0 + px1 - fw) / down + 1;
    TORCH_CHECK(x.size(2) * up + py0 + py1 >= fh && x.size(3) * up + px0 + px1 >= fw && outH >= 1 && outW >= 1,
                "upfirdn2d: the padded, upsampled input is smaller than the filter");
    TORCH_CHECK(x.numel() < (INT64_C(1) << 40) && x.size(2) * up + std::abs(py0) < INT32_MAX &&
                x.size(3) * up + std::abs(px0) < INT32_MAX, "upfirdn2d: input too large");
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    fk = ((flip ? f : f.flip({0, 1})).to(x.device(), acc) * gain).contiguous();
    y = at::empty({x.size(0), x.size(1), outH, outW}, x.options().memory_format(x.suggest_memory_format()));
    UpFirDnParams p;
    p.N = int(x.size(0)); p.C = int(x.size(1)); p.H = int(x.size(2)); p.W = int(x.size(3));
    p.outH = int(outH); p.outW = int(outW);
    for (int d = 0; d < 4; d++) p.sx[d] = x.stride(d);
    p.up = int(up); p.down = int(down); p.px0 = int(px0); p.py0 = int(py0); p.fh = int(fh); p.fw = int(fw);
    return p;
}

static bool channels_last(const at::Tensor& y) {
    return y.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

static at::Tensor upfirdn2d_cpu(const at::Tensor& x, const at::Tensor& f, int64_t up, int64_t down, int64_t px0,
                                int64_t px1, int64_t py0, int64_t py1, bool flip, double gain) {
    at::Tensor fk, y;
    const UpFirDnParams p = prepare(x, f, up, down, px0, px1, py0, py1, flip, gain, fk, y);
    const bool cl = channels_last(y);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const A* fp = fk.const_data_ptr<A>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, y.numel(), 1024, [&](int64_t lo, int64_t hi) {
            int n, c, oy, ox;
            for (int64_t i = lo; i < hi; i++) {
                output_coords<int64_t>(i, p, cl, n, c, oy, ox);
                yp[i] = scalar_t(upfirdn2d_point<0, 0, 0, 0, scalar_t, A>(xp, fp, p, n, c, oy, ox));
            }
        });
    });
    return y;
}

static at::Tensor upfirdn2d_cuda_checked(const at::Tensor& x, const at::Tensor& f, int64_t up, int64_t down,
                                         int64_t px0, int64_t px1, int64_t py0, int64_t py1, bool flip, double gain) {
    at::Tensor fk, y;
    const UpFirDnParams p = prepare(x, f, up, down, px0, px1, py0, py1, flip, gain, fk, y);
    return upfirdn2d_cuda(x, fk, p, y);
}

TORCH_LIBRARY_FRAGMENT(nada, m) {
    m.def("upfirdn2d(Tensor x, Tensor f, int up, int down, int px0, int px1, int py0, int py1, bool flip, "
          "float gain) -> Tensor");
}

TORCH_LIBRARY_IMPL(nada, CPU, m) { m.impl("upfirdn2d", &upfirdn2d_cpu); }

TORCH_LIBRARY_IMPL(nada, CUDA, m) { m.impl("upfirdn2d", &upfirdn2d_cuda_checked); }
