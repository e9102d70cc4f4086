// Test-only FFI handlers: the CUDA kernels' schedule (gpu_schedule.h) run
// serially on the CPU, block after block, each block's steps over all its
// threads in turn, so that the CPU tests check the indexing, ownership and
// ordering the GPU runs. Built into the testing module only
// (JAX_PSROI_TESTING), under their own target prefix.
#include <cstdint>
#include <optional>

#include "ffi_common.h"
#include "gpu_schedule.h"
#include "gpu_schedule_serial.h"
#include "kernel_table.h"
#include "psroi_math.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

namespace gs = gpu_schedule;

using Tune = gs::DefaultTuning;

template <typename Operation, typename S, typename Layout>
ffi::Error forward_scheduled(MapBuffer<S> input, RoisBuffer<S> rois,
                             UpdatedBuffer<S> updated, ffi::Result<MapBuffer<S>> output,
                             ffi::RemainingRets, double spatial_scale,
                             int64_t sampling_ratio, int64_t attribute,
                             int64_t first_bin_row, int64_t bin_rows,
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
  gs::serial_forward<Tune, S, Layout>(data<S>(input), data<T>(rois), d,
                                     static_cast<T>(spatial_scale), sampling_ratio,
                                     data<S>(*output));
  return ffi::Error::Success();
}

template <typename Operation, typename S, typename Layout>
ffi::Error backward_scheduled(MapBuffer<S> cotangent, RoisBuffer<S> rois,
                              ffi::Result<MapBuffer<S>> grad_input,
                              ffi::RemainingRets, double spatial_scale,
                              int64_t sampling_ratio, int64_t attribute,
                              int64_t first_bin_row, int64_t bin_rows,
                              int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Operation, Layout, T>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(),
      {spatial_scale, sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group,
       images_per_group});
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  gs::serial_backward<Tune, S, Layout>(
      gs::WeightedCotangent<S, Layout>{data<S>(cotangent), d}, data<T>(rois), d,
      static_cast<T>(spatial_scale), sampling_ratio, data<S>(*grad_input));
  return ffi::Error::Success();
}

template <typename S, typename Layout>
ffi::Error roi_pool_forward_scheduled(MapBuffer<S> input, RoisBuffer<S> rois,
                                      std::optional<PixelsBuffer> recorded,
                                      ffi::Result<MapBuffer<S>> output,
                                      ffi::Result<PixelsBuffer> pixels, ffi::RemainingRets,
                                      double spatial_scale, int64_t rois_per_group,
                                      int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = roi_pool_forward_dims<Layout, T>(
      input, rois, recorded, *output, *pixels,
      roi_pool_attributes(spatial_scale, rois_per_group, images_per_group));
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  gs::serial_roi_pool_forward<Tune, S, Layout>(
      data<S>(input), data<T>(rois), d, static_cast<T>(spatial_scale),
      recorded ? data<int32_t>(*recorded) : nullptr, data<S>(*output),
      data<int32_t>(*pixels));
  return ffi::Error::Success();
}

template <typename S, typename Layout>
ffi::Error roi_pool_backward_scheduled(MapBuffer<S> cotangent, RoisBuffer<S> rois,
                                       PixelsBuffer pixels,
                                       ffi::Result<MapBuffer<S>> grad_input,
                                       ffi::RemainingRets, double spatial_scale,
                                       int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = roi_pool_dims<Layout, T>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(),
      pixels.dimensions(),
      roi_pool_attributes(spatial_scale, rois_per_group, images_per_group));
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  gs::serial_backward<Tune, S, Layout>(
      gs::CotangentAtMaximum<S, Layout>{data<S>(cotangent), data<int32_t>(pixels), d},
      data<T>(rois), d, static_cast<T>(spatial_scale), 0, data<S>(*grad_input));
  return ffi::Error::Success();
}

}  // namespace

template <typename Operation, Direction D, typename Layout, typename S>
struct ScheduledHandler {
  static auto make() {
    auto context = [] { return ffi::Ffi::Bind(); };
    if constexpr (OperationTraits<Operation>::kMaxPool) {
      return bind_row<Operation, D, S>(context, roi_pool_forward_scheduled<S, Layout>,
                                       roi_pool_backward_scheduled<S, Layout>);
    } else {
      return bind_row<Operation, D, S>(context, forward_scheduled<Operation, S, Layout>,
                                       backward_scheduled<Operation, S, Layout>);
    }
  }
};

}  // namespace cpu

std::vector<FfiTarget> gpu_schedule_testing_targets() {
  return ffi_targets<cpu::ScheduledHandler>("jax_psroi_testing_gpu_schedule_");
}

}  // namespace jax_psroi
