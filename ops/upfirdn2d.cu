// CUDA kernel for upfirdn2d (reference: _upfirdn2d_ref in nada.py). One thread per output sample, polyphase:
// the zero-stuffed image is never built and zero taps are never visited. The filter sits in shared memory.
// StyleGAN2's shapes (4x4 filter with up 2, down 2, or neither) get compile-time loops; anything else runs the
// same code with run-time sizes. Output samples are visited in the output's memory order (NCHW or NHWC).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include "common.h"

constexpr int kThreads = 256;

template <int UP, int DOWN, int FH, int FW, typename T, typename I>
__global__ void upfirdn2d_kernel(const T* __restrict__ x, const at::opmath_type<T>* __restrict__ f,
                                 T* __restrict__ y, UpFirDnParams p, I total, bool channels_last) {
    using A = at::opmath_type<T>;
    extern __shared__ unsigned char smem[];
    A* sf = reinterpret_cast<A*>(smem);
    for (int i = threadIdx.x; i < p.fh * p.fw; i += kThreads) sf[i] = f[i];
    __syncthreads();
    for (I i = I(blockIdx.x) * kThreads + threadIdx.x; i < total; i += I(gridDim.x) * kThreads) {
        int n, c, oy, ox;
        output_coords<I>(i, p, channels_last, n, c, oy, ox);
        y[i] = T(upfirdn2d_point<UP, DOWN, FH, FW, T, A>(x, sf, p, n, c, oy, ox));
    }
}

template <int UP, int DOWN, int FH, int FW, typename T>
static void launch(const at::Tensor& x, const at::Tensor& f, const UpFirDnParams& p, at::Tensor& y) {
    using A = at::opmath_type<T>;
    const int64_t total = y.numel();
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const unsigned blocks = unsigned(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(sms) * 32)));
    const size_t shared = size_t(p.fh) * p.fw * sizeof(A);
    const bool cl = y.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (total < (int64_t(1) << 31))
        upfirdn2d_kernel<UP, DOWN, FH, FW, T, uint32_t><<<blocks, kThreads, shared, stream>>>(
            x.const_data_ptr<T>(), f.const_data_ptr<A>(), y.mutable_data_ptr<T>(), p, uint32_t(total), cl);
    else
        upfirdn2d_kernel<UP, DOWN, FH, FW, T, int64_t><<<blocks, kThreads, shared, stream>>>(
            x.const_data_ptr<T>(), f.const_data_ptr<A>(), y.mutable_data_ptr<T>(), p, total, cl);
}

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& f, const UpFirDnParams& p, at::Tensor& y) {
    const c10::cuda::CUDAGuard guard(x.device());
    TORCH_CHECK(size_t(p.fh) * p.fw * sizeof(double) <= 48 * 1024, "upfirdn2d: filter too large");
    if (y.numel() == 0) return y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cuda", [&] {
        const bool k4 = p.fh == 4 && p.fw == 4;
        if (k4 && p.up == 2 && p.down == 1) launch<2, 1, 4, 4, scalar_t>(x, f, p, y);
        else if (k4 && p.up == 1 && p.down == 2) launch<1, 2, 4, 4, scalar_t>(x, f, p, y);
        else if (k4 && p.up == 1 && p.down == 1) launch<1, 1, 4, 4, scalar_t>(x, f, p, y);
        else launch<0, 0, 0, 0, scalar_t>(x, f, p, y);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}
