// CUDA launch of upfirdn2d (reference: _upfirdn2d_ref in nada.py). The block code, the tiling and the launch plan
// are in upfirdn2d.h and shared with the CPU twin in upfirdn2d.cpp; this file only turns them into kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include "upfirdn2d.h"

template <int UP, int DOWN, typename T>
__global__ void __launch_bounds__(kBlockThreads)
upfirdn2d_small_kernel(const T* __restrict__ x, const float* __restrict__ f, T* __restrict__ y, UpFirDnParams p) {
    using A = at::opmath_type<T>;
    using K = SmallTile<UP, DOWN, 4, 4>;
    __shared__ __align__(16) A tile[K::TILE];
    GpuBlock<SmallStateFor<UP, DOWN, 4, 4, A>> ex;
    upfirdn2d_small_block<UP, DOWN, 4, 4, T, A>(ex, p, x, f, y, tile, int64_t(blockIdx.x), int(blockIdx.y));
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
upfirdn2d_generic_kernel(const T* __restrict__ x, const float* __restrict__ f, T* __restrict__ y, UpFirDnParams p) {
    using A = at::opmath_type<T>;
    extern __shared__ __align__(16) unsigned char smem[];
    GpuBlock<NoState> ex;
    upfirdn2d_generic_block<T, A>(ex, p, x, f, y, reinterpret_cast<A*>(smem), int64_t(blockIdx.x), int(blockIdx.y));
}

void upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& f, const UpFirDnParams& p, UpFirDnKernel kind,
                    at::Tensor& y) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t groups = (p.planes * p.tilesY + p.loop - 1) / p.loop;
    // plan_upfirdn2d refused anything past these limits already (for the CPU twin too): a guard, not a new limit.
    TORCH_CHECK(p.tilesX <= kMaxGridYZ && groups < INT32_MAX, "upfirdn2d: the plan exceeds the grid's limits");
    const dim3 grid(unsigned(groups), unsigned(p.tilesX));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const float* fp = f.const_data_ptr<float>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        switch (kind) {
            case UpFirDnKernel::Blur4:
                upfirdn2d_small_kernel<1, 1, scalar_t><<<grid, kBlockThreads, 0, stream>>>(xp, fp, yp, p); break;
            case UpFirDnKernel::Up2x4:
                upfirdn2d_small_kernel<2, 1, scalar_t><<<grid, kBlockThreads, 0, stream>>>(xp, fp, yp, p); break;
            case UpFirDnKernel::Down2x4:
                upfirdn2d_small_kernel<1, 2, scalar_t><<<grid, kBlockThreads, 0, stream>>>(xp, fp, yp, p); break;
            case UpFirDnKernel::Generic: {
                const size_t shared = (size_t(p.tih) * p.tiw + size_t(p.fh) * p.fw) * sizeof(A);
                upfirdn2d_generic_kernel<scalar_t><<<grid, kBlockThreads, shared, stream>>>(xp, fp, yp, p);
            }
        }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
