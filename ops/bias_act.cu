// CUDA kernels for bias_act (reference: _bias_act_ref in nada.py). One pass, grid-stride over the elements in
// memory order, so any dense layout works (NCHW, channels_last); the math lives in common.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include "common.h"

constexpr int kThreads = 256;

template <typename T, typename I>
__global__ void bias_act_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y, I n, I s1, I C,
                                BiasActParams p) {
    using A = at::opmath_type<T>;
    for (I i = I(blockIdx.x) * kThreads + threadIdx.x; i < n; i += I(gridDim.x) * kThreads) {
        A v = A(x[i]);
        if (b) v += A(b[channel_of<I>(i, s1, C)]);
        y[i] = T(bias_act_value<A>(v, p));
    }
}

template <typename T, typename I>
__global__ void bias_act_grad_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, I n,
                                     BiasActParams p) {
    using A = at::opmath_type<T>;
    for (I i = I(blockIdx.x) * kThreads + threadIdx.x; i < n; i += I(gridDim.x) * kThreads)
        dx[i] = T(bias_act_grad_value<T, A>(A(dy[i]), A(y[i]), p));
}

// Enough blocks to fill the GPU a few times over; the grid-stride loops cover the rest.
static unsigned blocks_for(int64_t n) {
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(sms) * 32)));
}

at::Tensor bias_act_cuda(const at::Tensor& x, const at::Tensor& b, const BiasActParams& p, int64_t s1) {
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor y = at::empty_like(x);
    const int64_t n = x.numel(), C = x.size(1);
    if (n == 0) return y;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
        const scalar_t* bp = b.numel() ? b.const_data_ptr<scalar_t>() : nullptr;
        if (n < (int64_t(1) << 31))
            bias_act_kernel<scalar_t, uint32_t><<<blocks_for(n), kThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), bp, y.mutable_data_ptr<scalar_t>(), uint32_t(n), uint32_t(s1),
                uint32_t(C), p);
        else
            bias_act_kernel<scalar_t, int64_t><<<blocks_for(n), kThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), bp, y.mutable_data_ptr<scalar_t>(), n, s1, C, p);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

at::Tensor bias_act_grad_cuda(const at::Tensor& dy, const at::Tensor& y, const BiasActParams& p) {
    const c10::cuda::CUDAGuard guard(y.device());
    at::Tensor dx = at::empty_like(y);
    const int64_t n = y.numel();
    if (n == 0) return dx;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bias_act_grad_cuda", [&] {
        bias_act_grad_kernel<scalar_t, int64_t><<<blocks_for(n), kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), n, p);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return dx;
}
