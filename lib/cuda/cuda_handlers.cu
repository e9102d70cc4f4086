// XLA FFI handlers for CUDA: decode buffers, check shapes, launch on XLA's
// stream. They never synchronize; launch errors come back as ffi::Error. One
// handler per row of the kernel table.
#include <cstdint>
#include <string>
#include <type_traits>
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

// The int32 workspace: the call's last further result.
ffi::ErrorOr<int32_t*> workspace(const ffi::RemainingRets& further, size_t index,
                                 const PsRoiDims& d, bool backward) {
  // The schedule keeps RoI indices, channels and a block's elements in 32 bits.
  if (d.num_rois > INT32_MAX - d.num_images - 2 || d.channel_bins() > INT32_MAX ||
      gpu_schedule::kTilePixels * d.channels_out > INT32_MAX) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jax_psroi: the CUDA kernels take fewer than 2^31 RoIs and (output channel, bin) "
        "pairs per call"));
  }
  ffi::ErrorOr<WorkspaceBuffer> ws = further_result<WorkspaceBuffer>(
      further, index, gpu_schedule::workspace_elements(d, backward), "an int32 workspace");
  if (ws.has_error()) return ffi::Unexpected<ffi::Error>(ws.error());
  return data<int32_t>(*ws);
}

template <typename Operation, typename S, typename Layout>
ffi::Error forward(cudaStream_t stream, MapBuffer<S> input, RoisBuffer<S> rois,
                   UpdatedBuffer<S> updated, ffi::Result<MapBuffer<S>> output,
                   ffi::RemainingRets further, double spatial_scale, int64_t sampling_ratio,
                   int64_t attribute, int64_t first_bin_row, int64_t bin_rows) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Operation, Layout>(
      input.dimensions(), rois.dimensions(), output->dimensions(), attribute,
      first_bin_row, bin_rows);
  if (dims.has_error()) return dims.error();
  PsRoiDims d = dims.value();
  if (ffi::Error e = apply_update(updated, *output, &d); e.failure()) {
    return e;
  }
  ffi::ErrorOr<int32_t*> ws = workspace(further, 0, d, /*backward=*/false);
  if (ws.has_error()) return ws.error();
  return launch_result("forward kernel launch",
                       launch_forward<S, Layout>(
                           stream, data<S>(input), data<T>(rois), d,
                           static_cast<T>(spatial_scale), sampling_ratio, ws.value(),
                           data<S>(*output)));
}

template <typename Operation, typename S, typename Layout>
ffi::Error backward(cudaStream_t stream, MapBuffer<S> cotangent, RoisBuffer<S> rois,
                    ffi::Result<MapBuffer<S>> grad_input,
                    ffi::RemainingRets further, double spatial_scale,
                    int64_t sampling_ratio, int64_t attribute,
                    int64_t first_bin_row, int64_t bin_rows) {
  using T = ComputeType<S>;
  constexpr bool kNarrow = !std::is_same_v<S, T>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Operation, Layout>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(), attribute,
      first_bin_row, bin_rows);
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  T* sums = reinterpret_cast<T*>(data<S>(*grad_input));
  if constexpr (kNarrow) {
    ffi::ErrorOr<AccumulatorBuffer<S>> accumulator = further_result<AccumulatorBuffer<S>>(
        further, 0, d.feature_elements(), "a float32 accumulator");
    if (accumulator.has_error()) return accumulator.error();
    sums = data<T>(*accumulator);
  }
  ffi::ErrorOr<int32_t*> ws = workspace(further, kNarrow ? 1 : 0, d, /*backward=*/true);
  if (ws.has_error()) return ws.error();
  return launch_result("backward kernel launch",
                       launch_backward<S, Layout>(
                           stream, data<S>(cotangent), data<T>(rois), d,
                           static_cast<T>(spatial_scale), sampling_ratio, ws.value(), sums,
                           data<S>(*grad_input)));
}

}  // namespace

// Stateless launches on the given stream: safe inside CUDA graphs.
template <typename Operation, Direction D, typename Layout, typename S>
struct CudaHandler {
  static auto make() {
    return bind_row<Operation, D, S>(
        [] { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); },
        forward<Operation, S, Layout>, backward<Operation, S, Layout>,
        {ffi::Traits::kCmdBufferCompatible});
  }
};

}  // namespace cuda

std::vector<FfiTarget> cuda_targets() {
  return ffi_targets<cuda::CudaHandler>("jax_psroi_");
}

}  // namespace jax_psroi
