// Test-only FFI handlers: the CUDA kernels' per-element code (psroi_math.h)
// run serially on the CPU, so that the CPU tests check the arithmetic the GPU
// runs. They are not part of the product: the module hands them out under
// their own prefix, and only the tests register them.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "ffi_common.h"
#include "kernel_table.h"
#include "psroi_math.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

template <typename T, typename Layout>
ffi::Error forward_elementwise(ffi::Buffer<FfiDType<T>::value, 4> input,
                               ffi::Buffer<FfiDType<T>::value, 2> rois,
                               ffi::ResultBuffer<FfiDType<T>::value, 4> output,
                               double spatial_scale, int64_t sampling_ratio,
                               int64_t channel_order) {
  ffi::ErrorOr<PsRoiDims> dims =
      call_dims<Layout>(input.dimensions(), rois.dimensions(),
                        output->dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  const Layout layout = Layout::of(d);
  for (int64_t i = 0; i < d.outputs(); ++i) {
    output->typed_data()[i] =
        forward_element(input.typed_data(), rois.typed_data(), d, layout,
                        static_cast<T>(spatial_scale), sampling_ratio, i);
  }
  return ffi::Error::Success();
}

// With a plain add where the GPU adds atomically.
template <typename T, typename Layout>
ffi::Error backward_elementwise(ffi::Buffer<FfiDType<T>::value, 4> cotangent,
                                ffi::Buffer<FfiDType<T>::value, 2> rois,
                                ffi::ResultBuffer<FfiDType<T>::value, 4> grad_input,
                                double spatial_scale, int64_t sampling_ratio,
                                int64_t channel_order) {
  ffi::ErrorOr<PsRoiDims> dims = call_dims<Layout>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(), channel_order);
  if (dims.has_error()) return dims.error();
  const PsRoiDims d = dims.value();
  const Layout layout = Layout::of(d);
  T* grad = grad_input->typed_data();
  std::fill(grad, grad + grad_input->element_count(), T(0));
  for (int64_t i = 0; i < d.outputs(); ++i) {
    backward_element(cotangent.typed_data(), rois.typed_data(), d, layout,
                     static_cast<T>(spatial_scale), sampling_ratio, i, grad,
                     [](T* p, T v) { *p += v; });
  }
  return ffi::Error::Success();
}

}  // namespace

template <typename Operation, Direction D, typename Layout, typename T>
struct ElementwiseHandler;

template <Direction D, typename Layout, typename T>
struct ElementwiseHandler<PsRoiAlign, D, Layout, T> {
  static auto make() {
    return bind_operands<T>(ffi::Ffi::Bind())
        .To(D == Direction::kForward ? forward_elementwise<T, Layout>
                                     : backward_elementwise<T, Layout>);
  }
};

}  // namespace cpu

std::vector<FfiTarget> cpu_elementwise_targets() {
  return ffi_targets<cpu::ElementwiseHandler>("jax_psroi_testing_elementwise_");
}

}  // namespace jax_psroi
