// XLA FFI handlers for the CPU: decode buffers, check shapes, and split the
// work over XLA's intra-op thread pool (parallel.h). Errors are returned,
// never thrown. One handler per row of the kernel table.
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "cpu/huge_pages.h"
#include "cpu/parallel.h"
#include "cpu/psroi_cpu_kernels.h"
#include "cpu/roi_pool_cpu_kernels.h"
#include "ffi_common.h"
#include "kernel_table.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

// The shared state of a backward call: every RoI's tables, its RoIs by
// image, its work units and the cotangent bin-major, in the compute type T.
// Built by the handler, filled by the phases.
template <typename T, typename Layout>
struct BackwardState {
  explicit BackwardState(const PsRoiDims& d)
      : tables(d),
        units(d, sizeof(T), Layout::kChannelsLast),
        // Every element is written before it is read: no zero fill.
        bin_major(new T[static_cast<size_t>(d.num_rois * d.bins() *
                                            staged_run<T>(d, Layout::kChannelsLast))]) {}
  RoiTables<T> tables;
  RoisByImage by_image;
  Units units;
  std::unique_ptr<T[]> bin_major;
};

template <typename Operation, typename S, typename Layout>
ffi::Future forward(ffi::ThreadPool pool, MapBuffer<S> input, RoisBuffer<S> rois,
                    UpdatedBuffer<S> updated, ffi::Result<MapBuffer<S>> output,
                    ffi::RemainingRets, double spatial_scale, int64_t sampling_ratio,
                    int64_t attribute, int64_t first_bin_row, int64_t bin_rows,
                    int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Operation, Layout, T>(
      input.dimensions(), rois.dimensions(), output->dimensions(),
      {spatial_scale, sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group,
       images_per_group});
  if (dims.has_error()) return ready_with(dims.error());
  PsRoiDims d = dims.value();
  if (ffi::Error e = apply_update(updated, *output, &d); e.failure()) {
    return ready_with(e);
  }
  const S* in = data<S>(input);
  const T* boxes = data<T>(rois);
  S* out = data<S>(*output);
  const T scale = static_cast<T>(spatial_scale);
  auto order = std::make_shared<const std::vector<int64_t>>(
      locality_order(boxes, d, scale, sampling_ratio));
  return run_phases(pool, call_work(d, Direction::kForward),
                    {over_rois(pool, d.num_rois, [=](int64_t begin, int64_t end) {
                      forward_rois<S, Layout>(in, boxes, d, scale, sampling_ratio,
                                              order->data(), begin, end, out);
                    })});
}

template <typename Operation, typename S, typename Layout>
ffi::Future backward(ffi::ThreadPool pool, MapBuffer<S> cotangent, RoisBuffer<S> rois,
                     ffi::Result<MapBuffer<S>> grad_input,
                     ffi::RemainingRets, double spatial_scale, int64_t sampling_ratio,
                     int64_t attribute, int64_t first_bin_row, int64_t bin_rows,
                     int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Operation, Layout, T>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(),
      {spatial_scale, sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group,
       images_per_group});
  if (dims.has_error()) return ready_with(dims.error());
  // Units sum 16-bit gradients in scratch of their own: the CPU takes no
  // further results.
  const PsRoiDims d = dims.value();
  const S* cot = data<S>(cotangent);
  const T* boxes = data<T>(rois);
  S* grad = data<S>(*grad_input);
  advise_huge_pages(grad, grad_input->size_bytes());
  const T scale = static_cast<T>(spatial_scale);
  auto state = std::make_shared<BackwardState<T, Layout>>(d);
  // Every RoI's windows and its cotangent bin-major (by RoI); the RoIs of
  // each image (one item); then the gradient (by unit).
  return run_phases(
      pool, call_work(d, Direction::kBackward),
      {over_rois(pool, d.num_rois,
                 [=](int64_t begin, int64_t end) {
                   RoiWeights<T> weights(d);
                   state->tables.compute(boxes, scale, sampling_ratio, begin, end, &weights);
                   to_bin_major<S, Layout>(cot, d, state->tables, begin, end,
                                           state->bin_major.get());
                 }),
       Phase{1, [=](int64_t) { state->by_image = rois_by_image(state->tables, d); }},
       Phase{state->units.count(), [=](int64_t unit) {
               backward_unit<S, Layout>(state->bin_major.get(), d, state->tables,
                                        state->by_image, state->units, unit, grad);
             }}});
}

// RoI Pool's forward: maxima and their pixels, or with `recorded` the
// input at recorded pixels (ffi_common.h). By RoI.
template <typename S, typename Layout>
ffi::Future roi_pool_forward(ffi::ThreadPool pool, MapBuffer<S> input, RoisBuffer<S> rois,
                             std::optional<PixelsBuffer> recorded,
                             ffi::Result<MapBuffer<S>> output,
                             ffi::Result<PixelsBuffer> pixels, ffi::RemainingRets,
                             double spatial_scale, int64_t rois_per_group,
                             int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = roi_pool_forward_dims<Layout, T>(
      input, rois, recorded, *output, *pixels,
      roi_pool_attributes(spatial_scale, rois_per_group, images_per_group));
  if (dims.has_error()) return ready_with(dims.error());
  const PsRoiDims d = dims.value();
  const S* in = data<S>(input);
  const T* boxes = data<T>(rois);
  const int32_t* at = recorded ? data<int32_t>(*recorded) : nullptr;
  S* out = data<S>(*output);
  int32_t* px = data<int32_t>(*pixels);
  const T scale = static_cast<T>(spatial_scale);
  return run_phases(pool, call_work(d, Direction::kForward),
                    {over_rois(pool, d.num_rois, [=](int64_t begin, int64_t end) {
                      roi_pool_forward_rois<S, Layout>(in, boxes, d, scale, at, begin, end,
                                                       out, px);
                    })});
}

// RoI Pool's backward: the cotangent added at the recorded pixels, by
// (image, channel run).
template <typename S, typename Layout>
ffi::Future roi_pool_backward(ffi::ThreadPool pool, MapBuffer<S> cotangent,
                              RoisBuffer<S> rois, PixelsBuffer pixels,
                              ffi::Result<MapBuffer<S>> grad_input, ffi::RemainingRets,
                              double spatial_scale, int64_t rois_per_group,
                              int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = roi_pool_dims<Layout, T>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(),
      pixels.dimensions(),
      roi_pool_attributes(spatial_scale, rois_per_group, images_per_group));
  if (dims.has_error()) return ready_with(dims.error());
  const PsRoiDims d = dims.value();
  const S* cot = data<S>(cotangent);
  const int32_t* px = data<int32_t>(pixels);
  S* grad = data<S>(*grad_input);
  advise_huge_pages(grad, grad_input->size_bytes());
  const RoiPoolUnits units = RoiPoolUnits::of(d, pool.num_threads(), Layout::kChannelsLast);
  auto by_image = std::make_shared<const RoiPoolByImage>(
      roi_pool_by_image(data<T>(rois), d, static_cast<T>(spatial_scale)));
  return run_phases(pool, call_work(d, Direction::kBackward),
                    {Phase{units.count(d), [=](int64_t unit) {
                       roi_pool_backward_unit<S, Layout>(cot, px, d, *by_image, units, unit,
                                                         grad);
                     }}});
}

}  // namespace

template <typename Operation, Direction D, typename Layout, typename S>
struct CpuHandler {
  static auto make() {
    auto context = [] { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); };
    if constexpr (OperationTraits<Operation>::kMaxPool) {
      return bind_row<Operation, D, S>(context, roi_pool_forward<S, Layout>,
                                       roi_pool_backward<S, Layout>);
    } else {
      return bind_row<Operation, D, S>(context, forward<Operation, S, Layout>,
                                       backward<Operation, S, Layout>);
    }
  }
};

}  // namespace cpu

std::vector<FfiTarget> cpu_targets() {
  return ffi_targets<cpu::CpuHandler>("jax_psroi_");
}

}  // namespace jax_psroi
