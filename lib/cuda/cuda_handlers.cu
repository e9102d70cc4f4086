// XLA FFI handlers for CUDA: decode buffers, check shapes, launch on XLA's
// stream. They never synchronize; launch errors come back as ffi::Error. One
// handler per row of the kernel table.
#include <cstdint>
#include <optional>
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
      gpu_schedule::DefaultTuning::kTilePixels * d.channels_out > INT32_MAX) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jax_psroi: the CUDA kernels take fewer than 2^31 RoIs and (output channel, bin) "
        "pairs per call"));
  }
  ffi::ErrorOr<WorkspaceBuffer> ws = further_result<WorkspaceBuffer>(
      further, index, gpu_schedule::workspace_elements<gpu_schedule::DefaultTuning>(d, backward), "an int32 workspace");
  if (ws.has_error()) return ffi::Unexpected<ffi::Error>(ws.error());
  return data<int32_t>(*ws);
}

template <typename Operation, typename S, typename Layout>
ffi::Error forward(cudaStream_t stream, MapBuffer<S> input, RoisBuffer<S> rois,
                   UpdatedBuffer<S> updated, ffi::Result<MapBuffer<S>> output,
                   ffi::RemainingRets further, double spatial_scale, int64_t sampling_ratio,
                   int64_t attribute, int64_t first_bin_row, int64_t bin_rows,
                   int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Operation, Layout, T>(
      input.dimensions(), rois.dimensions(), output->dimensions(),
      {spatial_scale, sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group,
       images_per_group});
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

// A backward's launch after its dims: the accumulator (16-bit gradients)
// and the workspace from the further results, then the schedule with `term`.
template <typename S, typename Layout, typename Term>
ffi::Error launch_backward_call(cudaStream_t stream, const Term& term, RoisBuffer<S> rois,
                                const PsRoiDims& d, double spatial_scale,
                                int64_t sampling_ratio, ffi::Result<MapBuffer<S>> grad_input,
                                const ffi::RemainingRets& further) {
  using T = ComputeType<S>;
  constexpr bool kNarrow = !std::is_same_v<S, T>;
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
                           stream, term, data<T>(rois), d, static_cast<T>(spatial_scale),
                           sampling_ratio, ws.value(), sums, data<S>(*grad_input)));
}

template <typename Operation, typename S, typename Layout>
ffi::Error backward(cudaStream_t stream, MapBuffer<S> cotangent, RoisBuffer<S> rois,
                    ffi::Result<MapBuffer<S>> grad_input,
                    ffi::RemainingRets further, double spatial_scale,
                    int64_t sampling_ratio, int64_t attribute,
                    int64_t first_bin_row, int64_t bin_rows, int64_t rois_per_group,
                    int64_t images_per_group) {
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Operation, Layout, ComputeType<S>>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(),
      {spatial_scale, sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group,
       images_per_group});
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  return launch_backward_call<S, Layout>(
      stream, gpu_schedule::WeightedCotangent<S, Layout>{data<S>(cotangent), d}, rois, d,
      spatial_scale, sampling_ratio, grad_input, further);
}

// RoI Pool (ffi_common.h): maxima and pixels, or the input at recorded
// pixels; a thread per output element.
template <typename S, typename Layout>
ffi::Error roi_pool_forward(cudaStream_t stream, MapBuffer<S> input, RoisBuffer<S> rois,
                            std::optional<PixelsBuffer> recorded,
                            ffi::Result<MapBuffer<S>> output, ffi::Result<PixelsBuffer> pixels,
                            ffi::RemainingRets, double spatial_scale, int64_t rois_per_group,
                            int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = roi_pool_forward_dims<Layout, T>(
      input, rois, recorded, *output, *pixels,
      roi_pool_attributes(spatial_scale, rois_per_group, images_per_group));
  if (dims.has_error()) return dims.error();
  return launch_result("roi_pool forward kernel launch",
                       launch_roi_pool_forward<S, Layout>(
                           stream, data<S>(input), data<T>(rois), dims.value(),
                           static_cast<T>(spatial_scale),
                           recorded ? data<int32_t>(*recorded) : nullptr, data<S>(*output),
                           data<int32_t>(*pixels)));
}

// RoI Pool's backward: the backward schedule, each covering entry adding its
// cotangent where its recorded maximum is the pixel (deterministic).
template <typename S, typename Layout>
ffi::Error roi_pool_backward(cudaStream_t stream, MapBuffer<S> cotangent, RoisBuffer<S> rois,
                             PixelsBuffer pixels, ffi::Result<MapBuffer<S>> grad_input,
                             ffi::RemainingRets further, double spatial_scale,
                             int64_t rois_per_group, int64_t images_per_group) {
  ffi::ErrorOr<PsRoiDims> dims = roi_pool_dims<Layout, ComputeType<S>>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(),
      pixels.dimensions(),
      roi_pool_attributes(spatial_scale, rois_per_group, images_per_group));
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  return launch_backward_call<S, Layout>(
      stream,
      gpu_schedule::CotangentAtMaximum<S, Layout>{data<S>(cotangent), data<int32_t>(pixels),
                                                  d},
      rois, d, spatial_scale, 0, grad_input, further);
}

}  // namespace

// Stateless launches on the given stream: safe inside CUDA graphs.
template <typename Operation, Direction D, typename Layout, typename S>
struct CudaHandler {
  static auto make() {
    auto context = [] { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); };
    if constexpr (OperationTraits<Operation>::kMaxPool) {
      return bind_row<Operation, D, S>(context, roi_pool_forward<S, Layout>,
                                       roi_pool_backward<S, Layout>,
                                       {ffi::Traits::kCmdBufferCompatible});
    } else {
      return bind_row<Operation, D, S>(context, forward<Operation, S, Layout>,
                                       backward<Operation, S, Layout>,
                                       {ffi::Traits::kCmdBufferCompatible});
    }
  }
};

}  // namespace cuda

std::vector<FfiTarget> cuda_targets() {
  return ffi_targets<cuda::CudaHandler>("jax_psroi_");
}

}  // namespace jax_psroi
