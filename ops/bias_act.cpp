// Fused bias + activation + gain + clamp (reference: _bias_act_ref in nada.py): operator definitions, argument
// checks, the launch plan, the CPU twin of the kernels, and dispatch. The block code both run is in bias_act.h; the
// CUDA launch in bias_act.cu.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <memory>
#include <vector>
#include "bias_act.h"

void bias_act_cuda(const at::Tensor& x, const at::Tensor& b, at::Tensor& y, const BiasActShape& s, bool lrelu,
                   double alpha, double gain, double clamp);
void bias_act_grad_cuda(const at::Tensor& dy, const DyMap& m, bool strided, const at::Tensor& y, at::Tensor& dx,
                        at::Tensor& part, at::Tensor& db, const BiasActShape& s, bool lrelu, double alpha, double gain,
                        double clamp);

static void check_args(bool lrelu, double alpha, double gain) {
    TORCH_CHECK(gain > 0, "bias_act: gain must be positive (the gradient is rebuilt from y), got ", gain);
    TORCH_CHECK(!lrelu || alpha >= 0, "bias_act: lrelu needs alpha >= 0 (the gradient is rebuilt from y), got ",
                alpha);
}

static bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

static at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The CPU twin runs every block of the launch grid, each block's threads phase by phase (common.h).
template <class Run>
static void for_each_block(int64_t gx, int64_t gy, Run run) {
    at::parallel_for(0, gx * gy, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; i++) run(i % gx, int(i / gx));
    });
}

static at::Tensor bias_act_op(const at::Tensor& x, const c10::optional<at::Tensor>& b_, bool lrelu, double alpha,
                              double gain, double clamp) {
    TORCH_CHECK(x.dim() >= 2, "bias_act: x must have at least 2 dims, got ", x.dim());
    TORCH_CHECK(x.is_non_overlapping_and_dense(), "bias_act: x must be dense (call .contiguous())");
    TORCH_CHECK(x.is_floating_point(), "bias_act: x must be floating point");
    check_args(lrelu, alpha, gain);
    at::Tensor b;
    if (b_.has_value() && b_->defined()) {
        TORCH_CHECK(b_->dim() == 1 && b_->size(0) == x.size(1), "bias_act: b must have shape [", x.size(1), "]");
        TORCH_CHECK(b_->device() == x.device() && b_->is_floating_point(),
                    "bias_act: b must be a floating-point tensor on x's device");
        b = b_->to(acc_type(x)).contiguous();   // the kernels read it in the accumulation type
    }
    at::Tensor y = at::empty_like(x);
    if (x.numel() == 0) return y;
    const BiasActShape s = plan_bias_act(x.numel(), x.size(1), x.stride(1), int(kVectorBytes / x.element_size()),
                                         aligned16(x) && aligned16(y));
    TORCH_CHECK(x.numel() < (int64_t(1) << 62), "bias_act: x is too large");   // FastDiv's range
    if (x.is_cuda()) {
        bias_act_cuda(x, b, y, s, lrelu, alpha, gain, clamp);
        return y;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        constexpr int VM = kVectorBytes / sizeof(scalar_t);
        const auto a = make_bias_act_args<scalar_t, A>(lrelu, alpha, gain, clamp);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const A* bp = b.defined() ? b.const_data_ptr<A>() : nullptr;
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        with_variant<VM>(s, false, [&](auto v, auto ch, auto) {
            for_each_block(s.gx, s.G, [&](int64_t bx, int by) {
                CpuBlock<NoState> ex;
                bias_act_block<v(), ch(), scalar_t, A>(ex, s, a, xp, bp, yp, bx, by);
            });
        });
    });
    return y;
}

// dx, and db (summed in the accumulation type, returned as db_dtype) when db_dtype is given; else an empty db.
static std::tuple<at::Tensor, at::Tensor> bias_act_backward_op(const at::Tensor& dy_, const at::Tensor& y, bool lrelu,
                                                               double alpha, double gain, double clamp,
                                                               c10::optional<at::ScalarType> db_dtype) {
    TORCH_CHECK(dy_.sizes() == y.sizes() && dy_.scalar_type() == y.scalar_type(),
                "bias_act_grad: dy must have y's shape and dtype");
    TORCH_CHECK(dy_.device() == y.device(), "bias_act_grad: dy must be on y's device, got ", dy_.device(), " and ",
                y.device());
    TORCH_CHECK(y.dim() >= 2 && y.is_non_overlapping_and_dense(), "bias_act_grad: y must be dense");
    check_args(lrelu, alpha, gain);
    at::Tensor dx = at::empty_like(y), dy = dy_;
    const auto acc = acc_type(y);
    at::Tensor db = at::empty({db_dtype ? y.size(1) : 0}, y.options().dtype(acc));
    if (y.numel() == 0) return {dx, db.zero_().to(db_dtype.value_or(y.scalar_type()))};
    DyMap m{};
    bool strided = false;
    for (int d = 0; d < y.dim(); d++) {
        if (y.size(d) == 1 || dy.stride(d) == y.stride(d)) continue;
        strided = true;
    }
    int big = 0;
    for (int d = 0; d < y.dim(); d++) big += y.size(d) > 1;
    if (strided && big > 8) {                   // more dims than DyMap holds: a copy in y's layout
        dy = at::empty_like(y).copy_(dy_);
        strided = false;
    }
    if (strided)                                // read dy through its strides, by y's dims of size > 1
        for (int d = 0; d < y.dim(); d++)
            if (y.size(d) > 1) {
                m.ys[m.nd] = y.stride(d); m.size[m.nd] = y.size(d); m.ds[m.nd] = dy.stride(d); m.nd++;
            }
    const BiasActShape s = plan_bias_act(y.numel(), y.size(1), y.stride(1), int(kVectorBytes / y.element_size()),
                                         !strided && aligned16(dy) && aligned16(y) && aligned16(dx));
    TORCH_CHECK(y.numel() < (int64_t(1) << 62), "bias_act_grad: y is too large");
    at::Tensor part;
    if (db_dtype) part = at::empty({int64_t(s.G) * s.wwins * s.maxch}, y.options().dtype(at::kDouble));   // per warp window
    if (y.is_cuda()) {
        bias_act_grad_cuda(dy, m, strided, y, dx, part, db, s, lrelu, alpha, gain, clamp);
    } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bias_act_grad_cpu", [&] {
            using A = at::opmath_type<scalar_t>;
            constexpr int VM = kVectorBytes / sizeof(scalar_t);
            const auto a = make_bias_act_args<scalar_t, A>(lrelu, alpha, gain, clamp);
            const scalar_t* gp = dy.const_data_ptr<scalar_t>();
            const scalar_t* yp = y.const_data_ptr<scalar_t>();
            scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
            double* pp = part.defined() ? part.mutable_data_ptr<double>() : nullptr;
            with_variant<VM>(s, strided, [&](auto v, auto ch, auto st) {
                for_each_block(s.gx, s.G, [&](int64_t bx, int by) {
                    auto ex = std::make_unique<CpuBlock<GradState>>();
                    bias_act_grad_block<v(), ch(), st(), scalar_t, A>(*ex, s, a, gp, m, yp, dp, pp, bx, by);
                });
                if (!pp) return;
                A* dbp = db.mutable_data_ptr<A>();
                for_each_block(s.C, 1, [&](int64_t c, int) {
                    CpuBlock<NoState> ex;
                    std::vector<double> red(kBlockThreads);
                    bias_grad_sum_block<v(), A>(ex, s, pp, dbp, red.data(), int(c));
                });
            });
        });
    }
    return {dx, db_dtype ? db.to(*db_dtype) : db.to(y.scalar_type())};
}

static at::Tensor bias_act_grad_op(const at::Tensor& dy, const at::Tensor& y, bool lrelu, double alpha, double gain,
                                   double clamp) {
    return std::get<0>(bias_act_backward_op(dy, y, lrelu, alpha, gain, clamp, c10::nullopt));
}

TORCH_LIBRARY_FRAGMENT(nada, m) {
    m.def("bias_act(Tensor x, Tensor? b, bool lrelu, float alpha, float gain, float clamp) -> Tensor");
    m.def("bias_act_backward(Tensor dy, Tensor y, bool lrelu, float alpha, float gain, float clamp, "
          "ScalarType? db_dtype) -> (Tensor, Tensor)");
    m.def("bias_act_grad(Tensor dy, Tensor y, bool lrelu, float alpha, float gain, float clamp) -> Tensor");
}

// One function per op serves both devices: the checks and the plan are shared, the launch differs.
TORCH_LIBRARY_IMPL(nada, CPU, m) {
    m.impl("bias_act", &bias_act_op);
    m.impl("bias_act_backward", &bias_act_backward_op);
    m.impl("bias_act_grad", &bias_act_grad_op);
}

TORCH_LIBRARY_IMPL(nada, CUDA, m) {
    m.impl("bias_act", &bias_act_op);
    m.impl("bias_act_backward", &bias_act_backward_op);
    m.impl("bias_act_grad", &bias_act_grad_op);
}
