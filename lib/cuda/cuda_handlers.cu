// XLA FFI handlers for CUDA: decode buffers, check shapes, launch on XLA's
// stream. They never synchronize; launch errors come back as ffi::Error. One
// handler per row of the kernel table.
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "cuda/psroi_cuda_kernels.cuh"
#include "ffi_common.h"
#include "kernel_table.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cuda {
namespace {

ffi::Error launch_result(const char* what, cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_psroi: ") + what + ": " +
                              cudaGetErrorString(err));
}

template <typename T, typename Layout>
ffi::Error forward(cudaStream_t stream, ffi::Buffer<FfiDType<T>::value, 4> input,
                   ffi::Buffer<FfiDType<T>::value, 2> rois,
                   ffi::ResultBuffer<FfiDType<T>::value, 4> output,
                   double spatial_scale, int64_t sampling_ratio,
                   int64_t channel_order) {
  ffi::ErrorOr<PsRoiDims> dims =
      call_dims<Layout>(input.dimensions(), rois.dimensions(),
                        output->dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  return launch_result("forward kernel launch",
                       launch_forward<T, Layout>(
                           stream, input.typed_data(), rois.typed_data(), dims.value(),
                           static_cast<T>(spatial_scale), sampling_ratio,
                           output->typed_data()));
}

template <typename T, typename Layout>
ffi::Error backward(cudaStream_t stream, ffi::Buffer<FfiDType<T>::value, 4> cotangent,
                    ffi::Buffer<FfiDType<T>::value, 2> rois,
                    ffi::ResultBuffer<FfiDType<T>::value, 4> grad_input,
                    double spatial_scale, int64_t sampling_ratio,
                    int64_t channel_order) {
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Layout>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  return launch_result("backward kernel launch",
                       launch_backward<T, Layout>(
                           stream, cotangent.typed_data(), rois.typed_data(),
                           dims.value(), static_cast<T>(spatial_scale),
                           sampling_ratio, grad_input->typed_data()));
}

}  // namespace

template <typename Operation, Direction D, typename Layout, typename T>
struct CudaHandler;

// Stateless launches on the given stream: safe inside CUDA graphs.
template <Direction D, typename Layout, typename T>
struct CudaHandler<PsRoiAlign, D, Layout, T> {
  static auto make() {
    return bind_operands<T>(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
        .To(D == Direction::kForward ? forward<T, Layout> : backward<T, Layout>,
            {ffi::Traits::kCmdBufferCompatible});
  }
};

}  // namespace cuda

std::vector<FfiTarget> cuda_targets() {
  return ffi_targets<cuda::CudaHandler>("jax_psroi_");
}

}  // namespace jax_psroi
