// The one handler prologue of every platform: the FFI entry points bind a
// row's buffers and attributes, check them (ffi_common.h) and hand the
// platform a ForwardCall or BackwardCall: the call's shape, its buffers as
// the kernel table's types and the attributes the kernels read. A platform
// is a type with
//   Context, Result:   what its handlers decode first and return;
//   bind():            a binding that starts with the Context;
//   fail(error):       a Result for an error of the prologue;
//   kCommandBuffer:    whether its handlers may run inside command buffers;
//   average_forward<Layout>(context, call), average_backward<Layout>(...),
//   max_forward<Layout>(...), max_backward<Layout>(...):  the work of each
//                      pooling (operators/pooling.h).
#ifndef JAX_PSROI_FFI_HANDLERS_H_
#define JAX_PSROI_FFI_HANDLERS_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "ffi_common.h"
#include "kernel_table.h"
#include "operators/pooling.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {

// A forward call, checked: pool `input` over `rois` into `output`.
template <typename S>
struct ForwardCall {
  using T = ComputeType<S>;
  CallShape shape;
  BoxRule rule;          // the operator's (its policy's box_rule)
  bool skip_empty_rois;  // RoIs that read nothing leave their outputs
  const S* input;
  const T* rois;
  S* output;
  T spatial_scale;
  int64_t sampling_ratio;     // RoI Pool: 0
  const int32_t* recorded;    // RoI Pool: the pixels to gather at, or null
  int32_t* pixels;            // RoI Pool: where each maximum is; else null
  ffi::RemainingRets further;
};

// A backward call, checked: the gradient `grad` of the input for the
// pooled tensor's `cotangent`.
template <typename S>
struct BackwardCall {
  using T = ComputeType<S>;
  CallShape shape;
  BoxRule rule;
  const S* cotangent;
  const T* rois;
  S* grad;
  size_t grad_bytes;
  T spatial_scale;
  int64_t sampling_ratio;     // RoI Pool: 0
  const int32_t* pixels;      // RoI Pool: where each maximum was; else null
  ffi::RemainingRets further;
};

namespace entry {

// The parameter a box direction's call names, checked.
inline ffi::ErrorOr<BoxParameter> box_parameter_of(int64_t value) {
  if (value < 1 || value > 4) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jax_psroi: box_parameter must be 1 (x start), 2 (bin width), 3 (y start) or 4 (bin "
        "height), got " + std::to_string(value)));
  }
  return static_cast<BoxParameter>(value);
}

// The forward, or with a box parameter its derivative with respect to it.
template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result average_forward_of(
    BoxParameter parameter, typename Platform::Context context, MapBuffer<S> input,
    RoisBuffer<S> rois, UpdatedBuffer<S> updated, ffi::Result<MapBuffer<S>> output,
    ffi::RemainingRets further, double spatial_scale, int64_t sampling_ratio, int64_t attribute,
    int64_t first_bin_row, int64_t bin_rows, int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<CallShape> shape =
      call_dims<Operation, Layout, T>(input.dimensions(), rois.dimensions(), output->dimensions(),
                                      {spatial_scale, sampling_ratio, attribute, first_bin_row,
                                       bin_rows, rois_per_group, images_per_group});
  if (shape.has_error()) return Platform::fail(shape.error());
  ForwardCall<S> call{shape.value(),
                      Operation::box_rule(attribute),
                      /*skip_empty_rois=*/false,
                      data<S>(input),
                      data<T>(rois),
                      data<S>(*output),
                      static_cast<T>(spatial_scale),
                      sampling_ratio,
                      nullptr,
                      nullptr,
                      further};
  call.rule.derivative = parameter;
  if (ffi::Error error = apply_update(updated, *output, &call.skip_empty_rois); error.failure()) {
    return Platform::fail(error);
  }
  return Platform::template average_forward<Layout>(context, call);
}

template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result average_forward(
    typename Platform::Context context, MapBuffer<S> input, RoisBuffer<S> rois,
    UpdatedBuffer<S> updated, ffi::Result<MapBuffer<S>> output, ffi::RemainingRets further,
    double spatial_scale, int64_t sampling_ratio, int64_t attribute, int64_t first_bin_row,
    int64_t bin_rows, int64_t rois_per_group, int64_t images_per_group) {
  return average_forward_of<Platform, Operation, Layout, S>(
      BoxParameter::kValue, context, input, rois, updated, output, further, spatial_scale,
      sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group, images_per_group);
}

template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result box_forward(
    typename Platform::Context context, MapBuffer<S> input, RoisBuffer<S> rois,
    ffi::Result<MapBuffer<S>> output, ffi::RemainingRets further, double spatial_scale,
    int64_t sampling_ratio, int64_t attribute, int64_t first_bin_row, int64_t bin_rows,
    int64_t rois_per_group, int64_t images_per_group, int64_t box_parameter) {
  ffi::ErrorOr<BoxParameter> parameter = box_parameter_of(box_parameter);
  if (parameter.has_error()) return Platform::fail(parameter.error());
  return average_forward_of<Platform, Operation, Layout, S>(
      parameter.value(), context, input, rois, std::nullopt, output, further, spatial_scale,
      sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group, images_per_group);
}

// The backward, or with a box parameter the transpose of box_forward's.
template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result average_backward_of(
    BoxParameter parameter, typename Platform::Context context, MapBuffer<S> cotangent,
    RoisBuffer<S> rois, ffi::Result<MapBuffer<S>> grad_input, ffi::RemainingRets further,
    double spatial_scale, int64_t sampling_ratio, int64_t attribute, int64_t first_bin_row,
    int64_t bin_rows, int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<CallShape> shape = call_dims<Operation, Layout, T>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(),
      {spatial_scale, sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group,
       images_per_group});
  if (shape.has_error()) return Platform::fail(shape.error());
  BackwardCall<S> call{shape.value(),
                       Operation::box_rule(attribute),
                       data<S>(cotangent),
                       data<T>(rois),
                       data<S>(*grad_input),
                       grad_input->size_bytes(),
                       static_cast<T>(spatial_scale),
                       sampling_ratio,
                       nullptr,
                       further};
  call.rule.derivative = parameter;
  return Platform::template average_backward<Layout>(context, call);
}

template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result average_backward(
    typename Platform::Context context, MapBuffer<S> cotangent, RoisBuffer<S> rois,
    ffi::Result<MapBuffer<S>> grad_input, ffi::RemainingRets further, double spatial_scale,
    int64_t sampling_ratio, int64_t attribute, int64_t first_bin_row, int64_t bin_rows,
    int64_t rois_per_group, int64_t images_per_group) {
  return average_backward_of<Platform, Operation, Layout, S>(
      BoxParameter::kValue, context, cotangent, rois, grad_input, further, spatial_scale,
      sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group, images_per_group);
}

template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result box_backward(
    typename Platform::Context context, MapBuffer<S> cotangent, RoisBuffer<S> rois,
    ffi::Result<MapBuffer<S>> grad_input, ffi::RemainingRets further, double spatial_scale,
    int64_t sampling_ratio, int64_t attribute, int64_t first_bin_row, int64_t bin_rows,
    int64_t rois_per_group, int64_t images_per_group, int64_t box_parameter) {
  ffi::ErrorOr<BoxParameter> parameter = box_parameter_of(box_parameter);
  if (parameter.has_error()) return Platform::fail(parameter.error());
  return average_backward_of<Platform, Operation, Layout, S>(
      parameter.value(), context, cotangent, rois, grad_input, further, spatial_scale,
      sampling_ratio, attribute, first_bin_row, bin_rows, rois_per_group, images_per_group);
}

template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result max_forward(typename Platform::Context context, MapBuffer<S> input,
                                      RoisBuffer<S> rois, std::optional<PixelsBuffer> recorded,
                                      ffi::Result<MapBuffer<S>> output,
                                      ffi::Result<PixelsBuffer> pixels,
                                      ffi::RemainingRets further, double spatial_scale,
                                      int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<CallShape> shape = max_pool_forward_dims<Operation, Layout, T>(
      input, rois, recorded, *output, *pixels,
      max_pool_attributes(spatial_scale, rois_per_group, images_per_group,
                          output->dimensions()[Layout::kAxes[2]]));
  if (shape.has_error()) return Platform::fail(shape.error());
  const ForwardCall<S> call{shape.value(),
                            Operation::box_rule(0),
                            /*skip_empty_rois=*/false,
                            data<S>(input),
                            data<T>(rois),
                            data<S>(*output),
                            static_cast<T>(spatial_scale),
                            0,
                            recorded ? data<int32_t>(*recorded) : nullptr,
                            data<int32_t>(*pixels),
                            further};
  return Platform::template max_forward<Layout>(context, call);
}

template <typename Platform, typename Operation, typename Layout, typename S>
typename Platform::Result max_backward(typename Platform::Context context,
                                       MapBuffer<S> cotangent, RoisBuffer<S> rois,
                                       PixelsBuffer pixels,
                                       ffi::Result<MapBuffer<S>> grad_input,
                                       ffi::RemainingRets further, double spatial_scale,
                                       int64_t rois_per_group, int64_t images_per_group) {
  using T = ComputeType<S>;
  ffi::ErrorOr<CallShape> shape = max_pool_dims<Operation, Layout, T>(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions(), pixels.dimensions(),
      max_pool_attributes(spatial_scale, rois_per_group, images_per_group,
                          cotangent.dimensions()[Layout::kAxes[2]]));
  if (shape.has_error()) return Platform::fail(shape.error());
  const BackwardCall<S> call{shape.value(),
                             Operation::box_rule(0),
                             data<S>(cotangent),
                             data<T>(rois),
                             data<S>(*grad_input),
                             grad_input->size_bytes(),
                             static_cast<T>(spatial_scale),
                             0,
                             data<int32_t>(pixels),
                             further};
  return Platform::template max_backward<Layout>(context, call);
}

// The entry points of each pooling.
template <typename Pooling>
struct PoolingEntries;
template <>
struct PoolingEntries<AveragePooling> {
  template <typename Platform, typename Operation, typename Layout, typename S>
  static constexpr auto forward = &average_forward<Platform, Operation, Layout, S>;
  template <typename Platform, typename Operation, typename Layout, typename S>
  static constexpr auto backward = &average_backward<Platform, Operation, Layout, S>;
  template <typename Platform, typename Operation, typename Layout, typename S>
  static constexpr auto box_forward = &entry::box_forward<Platform, Operation, Layout, S>;
  template <typename Platform, typename Operation, typename Layout, typename S>
  static constexpr auto box_backward = &entry::box_backward<Platform, Operation, Layout, S>;
};
template <>
struct PoolingEntries<MaxPooling> {
  template <typename Platform, typename Operation, typename Layout, typename S>
  static constexpr auto forward = &max_forward<Platform, Operation, Layout, S>;
  template <typename Platform, typename Operation, typename Layout, typename S>
  static constexpr auto backward = &max_backward<Platform, Operation, Layout, S>;
};

}  // namespace entry

// The handler of a kernel-table row on `Platform`: the binding of the
// operator's pooling in direction D, bound to its shared entry point.
template <typename Platform>
struct PlatformHandler {
  template <typename Operation, Direction D, typename Layout, typename S>
  struct Row {
    static auto make() {
      using Pooling = typename Operation::Pooling;
      using Entries = entry::PoolingEntries<Pooling>;
      auto binding = [] {
        return PoolingBinding<Pooling>::template bind<Operation, D, S>(Platform::bind());
      };
      if constexpr (D == Direction::kForward) {
        return bind_to(binding(), Entries::template forward<Platform, Operation, Layout, S>);
      } else if constexpr (D == Direction::kBackward) {
        return bind_to(binding(), Entries::template backward<Platform, Operation, Layout, S>);
      } else if constexpr (D == Direction::kBoxForward) {
        return bind_to(binding(), Entries::template box_forward<Platform, Operation, Layout, S>);
      } else {
        return bind_to(binding(), Entries::template box_backward<Platform, Operation, Layout, S>);
      }
    }

   private:
    template <typename Binding, typename Fn>
    static auto bind_to(Binding binding, Fn fn) {
      if constexpr (Platform::kCommandBuffer) {
        return binding.To(fn, {ffi::Traits::kCmdBufferCompatible});
      } else {
        return binding.To(fn);
      }
    }
  };
};

}  // namespace jax_psroi

#endif  // JAX_PSROI_FFI_HANDLERS_H_
