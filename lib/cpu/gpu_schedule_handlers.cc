// Test-only FFI handlers: the CUDA kernels' schedule (gpu_schedule.h) run
// serially on the CPU, block after block, each block's steps over all its
// threads in turn, so that the CPU tests check the indexing, ownership and
// ordering the GPU runs. They are not part of the product: the module hands
// them out under their own prefix, and only the tests register them.
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "ffi_common.h"
#include "gpu_schedule.h"
#include "kernel_table.h"
#include "psroi_math.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

namespace gs = gpu_schedule;

// A thread block as a serial loop: each step runs for every thread before
// the next starts, which is what the block's barriers guarantee on the GPU.
struct SerialBlock {
  int64_t threads = gs::kThreads;

  template <typename F>
  void each(int64_t n, F f) {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  template <typename F>
  int64_t sum(int64_t n, F f) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += f(i);
    return total;
  }
  template <typename F, typename G>
  int64_t scan(int64_t n, F f, int64_t base, G g) {
    int64_t at = base;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t value = f(i);
      g(i, at);
      at += value;
    }
    return at - base;
  }
  template <typename P, typename F>
  int64_t compact(int64_t n, P pred, int64_t base, int64_t limit, F f) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += pred(i) ? 1 : 0;
    if (base + total > limit) return total;
    int64_t at = base;
    for (int64_t i = 0; i < n; ++i) {
      if (pred(i)) f(i, at++);
    }
    return total;
  }
  template <typename F>
  void single(F f) {
    f();
  }
};

// The bucket kernels, as the CUDA handlers launch them.
template <typename T>
gs::Workspace fill_workspace(std::vector<int32_t>& storage, const T* rois, const PsRoiDims& d,
                             T spatial_scale, int64_t sampling_ratio, bool backward) {
  storage.assign(gs::workspace_elements(d, backward), 0);
  const gs::Workspace ws = gs::workspace_views(storage.data(), d, backward);
  for (int64_t k = 0; k < d.num_rois; ++k) {
    gs::roi_info(rois, d, spatial_scale, sampling_ratio, k, backward, ws);
  }
  SerialBlock block;
  const int64_t blocks = gs::buckets_of(d, backward) * gs::segments_of(d);
  for (int64_t b = 0; b < blocks; ++b) gs::count_block(block, d, ws, backward, b);
  gs::start_block(block, d, ws, backward);
  for (int64_t b = 0; b < blocks; ++b) gs::place_block(block, d, ws, backward, b);
  return ws;
}

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
  const T scale = static_cast<T>(spatial_scale);
  std::vector<int32_t> storage;
  const gs::Workspace ws =
      fill_workspace(storage, data<T>(rois), d, scale, sampling_ratio, false);
  SerialBlock block;
  for (int64_t b = 0; b < gs::forward_blocks<Layout>(d); ++b) {
    if (gs::pixel_sums(sampling_ratio)) {
      gs::forward_block<SerialBlock, S, Layout, true>(block, data<S>(input), d, sampling_ratio,
                                                      ws, b, data<S>(*output));
    } else {
      gs::forward_block<SerialBlock, S, Layout, false>(block, data<S>(input), d, sampling_ratio,
                                                       ws, b, data<S>(*output));
    }
  }
  return ffi::Error::Success();
}

// Every backward block, in turn, adding `term`s. A 16-bit gradient carries
// its partial sums in a float32 accumulator, as on the GPU (where it is the
// call's further result).
template <typename S, typename Layout, typename Term, typename T = ComputeType<S>>
void run_backward_blocks(const Term& term, const PsRoiDims& d, int64_t sampling_ratio,
                         const gs::Workspace& ws, S* grad) {
  std::vector<T> accumulator;
  T* sums;
  if constexpr (std::is_same_v<S, T>) {
    sums = grad;
  } else {
    accumulator.assign(d.feature_elements(), T(0));
    sums = accumulator.data();
  }
  SerialBlock block;
  auto shared = std::make_unique<gs::BackwardShared<T>>();
  const int64_t blocks = gs::BackwardTiling::of(d).blocks(d);
  for (int64_t b = 0; b < blocks; ++b) {
    if (gs::pixel_sums(sampling_ratio)) {
      gs::backward_block<SerialBlock, S, Layout, true>(block, *shared, term, d, sampling_ratio,
                                                       ws, b, sums, grad);
    } else {
      gs::backward_block<SerialBlock, S, Layout, false>(block, *shared, term, d, sampling_ratio,
                                                        ws, b, sums, grad);
    }
  }
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
  const T scale = static_cast<T>(spatial_scale);
  std::vector<int32_t> storage;
  const gs::Workspace ws =
      fill_workspace(storage, data<T>(rois), d, scale, sampling_ratio, true);
  S* grad = data<S>(*grad_input);
  run_backward_blocks<S, Layout>(gs::WeightedCotangent<S, Layout>{data<S>(cotangent), d}, d,
                                 sampling_ratio, ws, grad);
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
  const int32_t* at = recorded ? data<int32_t>(*recorded) : nullptr;
  SerialBlock block;
  gs::RoiPoolShared<T> shared;
  for (int64_t b = 0; b < gs::roi_pool_blocks(d); ++b) {
    gs::roi_pool_block<SerialBlock, S, Layout>(block, shared, data<S>(input), data<T>(rois), d,
                                               static_cast<T>(spatial_scale), at, b,
                                               data<S>(*output), data<int32_t>(*pixels));
  }
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
  const T scale = static_cast<T>(spatial_scale);
  std::vector<int32_t> storage;
  const gs::Workspace ws = fill_workspace(storage, data<T>(rois), d, scale, 0, true);
  run_backward_blocks<S, Layout>(
      gs::CotangentAtMaximum<S, Layout>{data<S>(cotangent), data<int32_t>(pixels), d},
      d, 0, ws, data<S>(*grad_input));
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

std::vector<FfiTarget> cpu_gpu_schedule_targets() {
  return ffi_targets<cpu::ScheduledHandler>("jax_psroi_testing_gpu_schedule_");
}

}  // namespace jax_psroi
