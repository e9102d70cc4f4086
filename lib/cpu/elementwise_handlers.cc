// Test-only FFI handlers: the CUDA kernels' per-element code (psroi_math.h)
// run serially on the CPU, so that the CPU tests check the arithmetic the GPU
// runs. They are not part of the product: the module hands them out under
// their own prefix, and only the tests register them.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ffi_common.h"
#include "kernel_table.h"
#include "psroi_math.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

template <typename S, typename Layout>
ffi::Error forward_elementwise(MapBuffer<S> input, RoisBuffer<S> rois,
                               ffi::Result<MapBuffer<S>> output, double spatial_scale,
                               int64_t sampling_ratio, int64_t channel_order) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Layout>(
      input.dimensions(), rois.dimensions(), output->dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  const Layout layout = Layout::of(d);
  S* out = data<S>(*output);
  for (int64_t i = 0; i < d.outputs(); ++i) {
    out[i] = Storage<S>::store(forward_element(data<S>(input), data<T>(rois), d, layout,
                                               static_cast<T>(spatial_scale),
                                               sampling_ratio, i));
  }
  return ffi::Error::Success();
}

// With a plain add where the GPU adds atomically; summed in the compute
// type, rounded once into a 16-bit gradient, as on the GPU.
template <typename S, typename Layout>
ffi::Error backward_elementwise(MapBuffer<S> cotangent, RoisBuffer<S> rois,
                                ffi::Result<MapBuffer<S>> grad_input,
                                ffi::RemainingRets further,
                                double spatial_scale, int64_t sampling_ratio,
                                int64_t channel_order) {
  using T = ComputeType<S>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Layout>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  ffi::ErrorOr<T*> sums_or = backward_sums<S>(*grad_input, further);
  if (sums_or.has_error()) return sums_or.error();
  const PsRoiDims d = dims.value();
  const Layout layout = Layout::of(d);
  T* sums = sums_or.value();
  std::fill(sums, sums + d.feature_elements(), T(0));
  for (int64_t i = 0; i < d.outputs(); ++i) {
    backward_element(data<S>(cotangent), data<T>(rois), d, layout,
                     static_cast<T>(spatial_scale), sampling_ratio, i, sums,
                     [](T* p, T v) { *p += v; });
  }
  if constexpr (!std::is_same_v<S, T>) {
    S* grad = data<S>(*grad_input);
    for (int64_t i = 0; i < d.feature_elements(); ++i) grad[i] = Storage<S>::store(sums[i]);
  }
  return ffi::Error::Success();
}

}  // namespace

template <typename Operation, Direction D, typename Layout, typename S>
struct ElementwiseHandler;

template <Direction D, typename Layout, typename S>
struct ElementwiseHandler<PsRoiAlign, D, Layout, S> {
  static auto make() {
    return bind_row<D, S>([] { return ffi::Ffi::Bind(); }, forward_elementwise<S, Layout>,
                          backward_elementwise<S, Layout>);
  }
};

}  // namespace cpu

std::vector<FfiTarget> cpu_elementwise_targets() {
  return ffi_targets<cpu::ElementwiseHandler>("jax_psroi_testing_elementwise_");
}

}  // namespace jax_psroi
