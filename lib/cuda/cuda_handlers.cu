// XLA FFI handlers for CUDA: after the shared prologue (ffi_handlers.h),
// launch on XLA's stream. They never synchronize; launch errors come back as
// ffi::Error. One handler per row of the kernel table.
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"
#include "ffi_common.h"
#include "ffi_handlers.h"
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
                                 const CallShape& shape, bool backward) {
  // The schedule keeps RoI indices, channels, a block's elements, positions
  // in its workspace (the backward's lists) and each RoI's span of pixels in
  // 32 bits.
  const int64_t elements =
      gpu_schedule::workspace_elements<gpu_schedule::DefaultTuning>(shape, backward);
  if (shape.num_rois > INT32_MAX - shape.num_images - 2 || shape.channel_bins() > INT32_MAX ||
      gpu_schedule::DefaultTuning::kTilePixels * shape.channels_out > INT32_MAX ||
      elements > INT32_MAX || shape.height > INT32_MAX || shape.width > INT32_MAX) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jax_psroi: the CUDA kernels take fewer than 2^31 RoIs, (output channel, bin) "
        "pairs, workspace entries and pixels a side per call"));
  }
  ffi::ErrorOr<WorkspaceBuffer> words =
      further_result<WorkspaceBuffer>(further, index, elements, "an int32 workspace");
  if (words.has_error()) return ffi::Unexpected<ffi::Error>(words.error());
  return data<int32_t>(*words);
}

template <typename Layout, typename S>
ffi::Error average_forward(cudaStream_t stream, const ForwardCall<S>& call) {
  ffi::ErrorOr<int32_t*> words = workspace(call.further, 0, call.shape, /*backward=*/false);
  if (words.has_error()) return words.error();
  return launch_result("forward kernel launch",
                       launch_forward<S, Layout>(stream, call.input, call.rois, call.shape,
                                                 call.rule, call.spatial_scale, call.sampling_ratio,
                                                 words.value(), call.skip_empty_rois, call.output));
}

// A backward's launch: the accumulator (16-bit gradients) and the workspace
// from the further results, then the schedule with `term`.
template <typename Layout, typename S, typename Term>
ffi::Error launch_backward_call(cudaStream_t stream, const Term& term,
                                const BackwardCall<S>& call) {
  using T = ComputeType<S>;
  constexpr bool kNarrow = !std::is_same_v<S, T>;
  T* sums = reinterpret_cast<T*>(call.grad);
  if constexpr (kNarrow) {
    ffi::ErrorOr<AccumulatorBuffer<S>> accumulator = further_result<AccumulatorBuffer<S>>(
        call.further, 0, call.shape.feature_elements(), "a float32 accumulator");
    if (accumulator.has_error()) return accumulator.error();
    sums = data<T>(*accumulator);
  }
  ffi::ErrorOr<int32_t*> words = workspace(call.further, kNarrow ? 1 : 0, call.shape,
                                        /*backward=*/true);
  if (words.has_error()) return words.error();
  return launch_result(
      "backward kernel launch",
      launch_backward<S, Layout>(stream, term, call.rois, call.shape, call.rule, call.spatial_scale,
                                 call.sampling_ratio, words.value(), sums, call.grad));
}

template <typename Layout, typename S>
ffi::Error average_backward(cudaStream_t stream, const BackwardCall<S>& call) {
  return launch_backward_call<Layout>(
      stream, gpu_schedule::WeightedCotangent<S, Layout>{call.cotangent, call.shape}, call);
}

// RoI Pool (ffi_common.h): maxima and pixels, or the input at recorded
// pixels; a thread per output element.
template <typename Layout, typename S>
ffi::Error max_forward(cudaStream_t stream, const ForwardCall<S>& call) {
  return launch_result("roi_pool forward kernel launch",
                       launch_roi_pool_forward<S, Layout>(stream, call.input, call.rois, call.shape,
                                                          call.rule, call.spatial_scale,
                                                          call.recorded, call.output, call.pixels));
}

// RoI Pool's backward: the backward schedule, each covering entry adding its
// cotangent where its recorded maximum is the pixel (deterministic).
template <typename Layout, typename S>
ffi::Error max_backward(cudaStream_t stream, const BackwardCall<S>& call) {
  return launch_backward_call<Layout>(
      stream,
      gpu_schedule::CotangentAtMaximum<S, Layout>{call.cotangent, call.pixels, call.shape},
      call);
}

}  // namespace

// The CUDA platform (ffi_handlers.h): launches on XLA's stream, stateless,
// so safe inside CUDA graphs.
struct Cuda {
  using Context = cudaStream_t;
  using Result = ffi::Error;
  static constexpr bool kCommandBuffer = true;
  static auto bind() { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); }
  static ffi::Error fail(ffi::Error error) { return error; }
  template <typename Layout, typename S>
  static ffi::Error average_forward(cudaStream_t stream, const ForwardCall<S>& call) {
    return cuda::average_forward<Layout>(stream, call);
  }
  template <typename Layout, typename S>
  static ffi::Error average_backward(cudaStream_t stream, const BackwardCall<S>& call) {
    return cuda::average_backward<Layout>(stream, call);
  }
  template <typename Layout, typename S>
  static ffi::Error max_forward(cudaStream_t stream, const ForwardCall<S>& call) {
    return cuda::max_forward<Layout>(stream, call);
  }
  template <typename Layout, typename S>
  static ffi::Error max_backward(cudaStream_t stream, const BackwardCall<S>& call) {
    return cuda::max_backward<Layout>(stream, call);
  }
};

}  // namespace cuda

std::vector<FfiTarget> cuda_targets() {
  return ffi_targets<PlatformHandler<cuda::Cuda>::Row>("jax_psroi_");
}

}  // namespace jax_psroi
