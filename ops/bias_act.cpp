// Fused bias + activation + gain + clamp (reference: _bias_act_ref in nada.py): operator definitions,
// argument checks, the CPU twin of the kernel, and dispatch. The CUDA kernel is in bias_act.cu.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include "common.h"

at::Tensor bias_act_cuda(const at::Tensor& x, const at::Tensor& b, const BiasActParams& p, int64_t s1);
at::Tensor bias_act_grad_cuda(const at::Tensor& dy, const at::Tensor& y, const BiasActParams& p);

static BiasActParams make_params(bool lrelu, double alpha, double gain, double clamp) {
    TORCH_CHECK(gain > 0 && alpha > 0, "bias_act: gain and alpha must be positive (the gradient is rebuilt from y)");
    return BiasActParams{lrelu, alpha, gain, clamp};
}

static void check_x(const at::Tensor& x, const at::Tensor& b) {
    TORCH_CHECK(x.dim() >= 2, "bias_act: x must have at least 2 dims, got ", x.dim());
    TORCH_CHECK(x.is_non_overlapping_and_dense(), "bias_act: x must be dense (call .contiguous())");
    TORCH_CHECK(x.numel() <= INT64_C(1) << 40, "bias_act: x is too large");
    if (b.numel()) {
        TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(1), "bias_act: b must have shape [", x.size(1), "]");
        TORCH_CHECK(b.is_contiguous() && b.scalar_type() == x.scalar_type() && b.device() == x.device(),
                    "bias_act: b must be contiguous, with x's dtype and device");
    }
}

static at::Tensor bias_act_cpu(const at::Tensor& x, const at::Tensor& b, bool lrelu, double alpha, double gain,
                               double clamp) {
    check_x(x, b);
    const BiasActParams p = make_params(lrelu, alpha, gain, clamp);
    at::Tensor y = at::empty_like(x);
    const int64_t n = x.numel(), s1 = x.stride(1), C = x.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* bp = b.numel() ? b.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; i++) {
                A v = A(xp[i]) + (bp ? A(bp[channel_of<int64_t>(i, s1, C)]) : A(0));
                yp[i] = scalar_t(bias_act_value<A>(v, p));
            }
        });
    });
    return y;
}

static at::Tensor bias_act_grad_cpu(const at::Tensor& dy_, const at::Tensor& y, bool lrelu, double alpha, double gain,
                                    double clamp) {
    const BiasActParams p = make_params(lrelu, alpha, gain, clamp);
    at::Tensor dy = dy_.strides() == y.strides() ? dy_ : at::empty_like(y).copy_(dy_);
    at::Tensor dx = at::empty_like(y);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bias_act_grad_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* gp = dy.const_data_ptr<scalar_t>();
        const scalar_t* yp = y.const_data_ptr<scalar_t>();
        scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, y.numel(), 4096, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; i++) dp[i] = scalar_t(bias_act_grad_value<scalar_t, A>(A(gp[i]), A(yp[i]), p));
        });
    });
    return dx;
}

static at::Tensor bias_act_cuda_checked(const at::Tensor& x, const at::Tensor& b, bool lrelu, double alpha,
                                        double gain, double clamp) {
    check_x(x, b);
    return bias_act_cuda(x, b, make_params(lrelu, alpha, gain, clamp), x.stride(1));
}

static at::Tensor bias_act_grad_cuda_checked(const at::Tensor& dy, const at::Tensor& y, bool lrelu, double alpha,
                                             double gain, double clamp) {
    TORCH_CHECK(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type(), "bias_act_grad: dy must match y");
    TORCH_CHECK(y.is_non_overlapping_and_dense(), "bias_act_grad: y must be dense");
    return bias_act_grad_cuda(dy.strides() == y.strides() ? dy : at::empty_like(y).copy_(dy), y,
                              make_params(lrelu, alpha, gain, clamp));
}

TORCH_LIBRARY_FRAGMENT(nada, m) {
    m.def("bias_act(Tensor x, Tensor b, bool lrelu, float alpha, float gain, float clamp) -> Tensor");
    m.def("bias_act_grad(Tensor dy, Tensor y, bool lrelu, float alpha, float gain, float clamp) -> Tensor");
}

TORCH_LIBRARY_IMPL(nada, CPU, m) {
    m.impl("bias_act", &bias_act_cpu);
    m.impl("bias_act_grad", &bias_act_grad_cpu);
}

TORCH_LIBRARY_IMPL(nada, CUDA, m) {
    m.impl("bias_act", &bias_act_cuda_checked);
    m.impl("bias_act_grad", &bias_act_grad_cuda_checked);
}
