// Deformable RoI Align's CUDA kernels (deformable.h on CUDA threads) and
// their XLA FFI handlers, targets jax_psroi_deform_<operation>_<direction>_
// <layout>_<dtype> registered for platform CUDA (deformable_ffi.h). The
// forward is a thread per pooled element; the backward a thread per unit of
// one image's input channel and band of rows, which owns that part of the
// gradient: no atomics, the same sums as the CPU's. One launch on XLA's
// stream, no synchronisation, no state: safe inside CUDA graphs.
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"
#include "deformable.h"
#include "deformable_ffi.h"
#include "ffi_common.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cuda {
namespace {

constexpr int kDeformThreads = 256;

template <typename S, typename Layout, bool kPixelSums>
__global__ void __launch_bounds__(kDeformThreads)
    deform_forward_kernel(deform::DeformCall<S> call, S* output) {
  const int64_t outputs = call.shape.outputs();
  for (int64_t index = blockIdx.x * int64_t{kDeformThreads} + threadIdx.x; index < outputs;
       index += int64_t{gridDim.x} * kDeformThreads) {
    output[index] = deform::forward_element<S, Layout, kPixelSums>(call, index);
  }
}

template <typename S, typename Layout, bool kPixelSums, typename T = ComputeType<S>>
__global__ void __launch_bounds__(kDeformThreads)
    deform_backward_kernel(deform::DeformCall<S> call, T* grad) {
  const CallShape& shape = call.shape;
  const int64_t bands = deform::bands_of(shape);
  const int64_t units = shape.num_images * shape.channels * bands;
  for (int64_t unit = blockIdx.x * int64_t{kDeformThreads} + threadIdx.x; unit < units;
       unit += int64_t{gridDim.x} * kDeformThreads) {
    // Neighbouring threads take neighbouring channels of one band (channels
    // last, their writes are adjacent).
    const int64_t channel = unit % shape.channels;
    const int64_t band = unit / shape.channels % bands;
    const int64_t image = unit / shape.channels / bands;
    deform::backward_unit<S, Layout, kPixelSums, 1>(call, grad, image, channel, channel + 1,
                                                    band);
  }
}

inline int blocks_for(int64_t threads) {
  return grid_for((threads + kDeformThreads - 1) / kDeformThreads);
}

template <typename Operation, bool kForward, typename Layout, typename S>
struct DeformHandler {
  static ffi::Error run(cudaStream_t stream, ffi::ErrorOr<deform::DeformCall<S>> call,
                        deform::ResultBuffer<S, kForward> result) {
    if (call.has_error()) return call.error();
    const CallShape& shape = call->shape;
    // Kernels of the call's kind of grid (pixel_sums): the others carry no
    // code of the pixel sums, nor its registers.
    deform::with_pixel_sums(call->sampling_ratio, [&](auto pixel_sums) {
      constexpr bool kPixelSums = decltype(pixel_sums)::value;
      if constexpr (kForward) {
        if (shape.outputs() == 0) return;
        deform_forward_kernel<S, Layout, kPixelSums>
            <<<blocks_for(shape.outputs()), kDeformThreads, 0, stream>>>(*call,
                                                                           data<S>(result));
      } else {
        const int64_t units = shape.num_images * shape.channels * deform::bands_of(shape);
        if (units == 0) return;
        deform_backward_kernel<S, Layout, kPixelSums>
            <<<blocks_for(units), kDeformThreads, 0, stream>>>(*call, result.typed_data());
      }
    });
    const cudaError_t launched = cudaGetLastError();
    if (launched == cudaSuccess) return ffi::Error::Success();
    return ffi::Error::Internal(std::string("jax_psroi: deformable kernel launch: ") +
                                cudaGetErrorString(launched));
  }

  static auto make() {
    return deform::bind_handler<Operation, Layout, S, kForward, cudaStream_t>(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(), run,
        {ffi::Traits::kCmdBufferCompatible});
  }
};

}  // namespace
}  // namespace cuda

std::vector<FfiTarget> cuda_deform_targets() {
  return deform::targets<cuda::DeformHandler>("jax_psroi_");
}

}  // namespace jax_psroi
