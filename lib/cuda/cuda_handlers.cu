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

template <typename S, typename Layout>
ffi::Error forward(cudaStream_t stream, MapBuffer<S> input, RoisBuffer<S> rois,
                   ffi::Result<MapBuffer<S>> output, double spatial_scale,
                   int64_t sampling_ratio, int64_t channel_order) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Layout>(
      input.dimensions(), rois.dimensions(), output->dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  return launch_result("forward kernel launch",
                       launch_forward<S, Layout>(
                           stream, data<S>(input), data<T>(rois), dims.value(),
                           static_cast<T>(spatial_scale), sampling_ratio,
                           data<S>(*output)));
}

template <typename S, typename Layout>
ffi::Error backward(cudaStream_t stream, MapBuffer<S> cotangent, RoisBuffer<S> rois,
                    ffi::Result<MapBuffer<S>> grad_input,
                    ffi::RemainingRets further, double spatial_scale,
                    int64_t sampling_ratio, int64_t channel_order) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Layout>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  ffi::ErrorOr<T*> sums = backward_sums<S>(*grad_input, further);
  if (sums.has_error()) return sums.error();
  return launch_result("backward kernel launch",
                       launch_backward<S, Layout>(
                           stream, data<S>(cotangent), data<T>(rois), dims.value(),
                           static_cast<T>(spatial_scale), sampling_ratio, sums.value(),
                           data<S>(*grad_input)));
}

}  // namespace

template <typename Operation, Direction D, typename Layout, typename S>
struct CudaHandler;

// Stateless launches on the given stream: safe inside CUDA graphs.
template <Direction D, typename Layout, typename S>
struct CudaHandler<PsRoiAlign, D, Layout, S> {
  static auto make() {
    return bind_row<D, S>(
        [] { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); },
        forward<S, Layout>, backward<S, Layout>, {ffi::Traits::kCmdBufferCompatible});
  }
};

}  // namespace cuda

std::vector<FfiTarget> cuda_targets() {
  return ffi_targets<cuda::CudaHandler>("jax_psroi_");
}

}  // namespace jax_psroi
