// CUDA launch of bias_act (reference: _bias_act_ref in nada.py). The block code and the launch plan are in
// bias_act.h and shared with the CPU twin in bias_act.cpp; this file only turns them into kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include "bias_act.h"

template <int V, bool CH, typename T>
__global__ void __launch_bounds__(kBlockThreads)
bias_act_kernel(const T* __restrict__ x, const at::opmath_type<T>* __restrict__ b, T* __restrict__ y, BiasActShape s,
                BiasActArgs<at::opmath_type<T>> a) {
    GpuBlock<NoState> ex;
    bias_act_block<V, CH, T, at::opmath_type<T>>(ex, s, a, x, b, y, int64_t(blockIdx.x), int(blockIdx.y));
}

template <int V, bool CH, bool STRIDED, typename T>
__global__ void __launch_bounds__(kBlockThreads)
bias_act_grad_kernel(const T* __restrict__ dy, DyMap m, const T* __restrict__ y, T* __restrict__ dx,
                     double* __restrict__ part, BiasActShape s, BiasActArgs<at::opmath_type<T>> a) {
    GpuBlock<GradState> ex;
    bias_act_grad_block<V, CH, STRIDED, T, at::opmath_type<T>>(ex, s, a, dy, m, y, dx, part, int64_t(blockIdx.x),
                                                               int(blockIdx.y));
}

template <int V, typename A>
__global__ void __launch_bounds__(kBlockThreads)
bias_grad_sum_kernel(const double* __restrict__ part, BiasActShape s, A* __restrict__ db) {
    __shared__ double red[kBlockThreads];
    GpuBlock<NoState> ex;
    bias_grad_sum_block<V, A>(ex, s, part, db, red, int(blockIdx.x));
}

static dim3 grid_of(const BiasActShape& s) {
    return dim3(unsigned(s.gx), unsigned(s.G));
}

void bias_act_cuda(const at::Tensor& x, const at::Tensor& b, at::Tensor& y, const BiasActShape& s, bool lrelu,
                   double alpha, double gain, double clamp) {
    const c10::cuda::CUDAGuard guard(x.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        constexpr int VM = kVectorBytes / sizeof(scalar_t);
        const auto a = make_bias_act_args<scalar_t, A>(lrelu, alpha, gain, clamp);
        const A* bp = b.defined() ? b.const_data_ptr<A>() : nullptr;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        with_variant<VM>(s, false, [&](auto v, auto ch, auto) {
            bias_act_kernel<v(), ch(), scalar_t><<<grid_of(s), kBlockThreads, 0, stream>>>(xp, bp, yp, s, a);
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bias_act_grad_cuda(const at::Tensor& dy, const DyMap& m, bool strided, const at::Tensor& y, at::Tensor& dx,
                        at::Tensor& part, at::Tensor& db, const BiasActShape& s, bool lrelu, double alpha, double gain,
                        double clamp) {
    const c10::cuda::CUDAGuard guard(y.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bias_act_grad_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        constexpr int VM = kVectorBytes / sizeof(scalar_t);
        const auto a = make_bias_act_args<scalar_t, A>(lrelu, alpha, gain, clamp);
        const scalar_t* gp = dy.const_data_ptr<scalar_t>();
        const scalar_t* yp = y.const_data_ptr<scalar_t>();
        scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
        double* pp = part.defined() ? part.mutable_data_ptr<double>() : nullptr;
        with_variant<VM>(s, strided, [&](auto v, auto ch, auto st) {
            bias_act_grad_kernel<v(), ch(), st(), scalar_t><<<grid_of(s), kBlockThreads, 0, stream>>>(gp, m, yp, dp, pp,
                                                                                                     s, a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            if (!pp) return;
            bias_grad_sum_kernel<v(), A><<<unsigned(s.C), kBlockThreads, 0, stream>>>(pp, s, db.mutable_data_ptr<A>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
}
