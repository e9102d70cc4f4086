// The FFI side of deformable RoI Align (deformable.h), shared by its
// handlers: the CPU's (lib/cpu/deformable_handlers.cc), the CUDA kernels'
// (lib/cuda/deformable_handlers.cu) and the test rig's
// (lib/testing/deformable_schedule_handlers.cc). Calls:
//   forward:  (features, rois [K, 5], offset [K, 2, PH, PW]) -> pooled
//   backward: (cotangent (pooled), rois, offset) -> grad (features' shape,
//             in the compute type: 16-bit maps are rounded once, by the
//             caller)
// in the row's layout and storage type S, rois and offsets in S's compute
// type, with the attributes spatial_scale (F64), sampling_ratio, gamma
// (F64), the plain operator's own attribute (ps_roi_align's
// channel_order; roi_align's aligned, which must be 1), the bin rows of
// the call (first_bin_row, bin_rows: a device's share of a bin-major map
// split over channels computes those rows, with the offsets of those rows),
// box_parameter (0: values; 1 to 4: the derivative directions,
// BoxParameter) and the image groups.
#ifndef JAX_PSROI_DEFORMABLE_FFI_H_
#define JAX_PSROI_DEFORMABLE_FFI_H_

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "deformable.h"
#include "ffi_common.h"
#include "kernel_table.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace deform {

// The operations: each plain operator's policy with its deformable name.
template <typename Operation>
struct DeformName;
template <>
struct DeformName<PsRoiAlign> {
  static constexpr const char* value = "deform_ps_roi_align";
};
template <>
struct DeformName<RoiAlign> {
  static constexpr const char* value = "deform_roi_align";
};
using DeformOperations = TypeList<PsRoiAlign, RoiAlign>;

template <typename S>
using OffsetBuffer = ffi::Buffer<FfiDType<ComputeType<S>>::value, 4>;
template <typename S>
using GradBuffer = ffi::Buffer<FfiDType<ComputeType<S>>::value, 4>;
// A direction's result: the pooled tensor (S) or the gradient (compute type).
template <typename S, bool kForward>
using ResultBuffer = std::conditional_t<kForward, MapBuffer<S>, GradBuffer<S>>;

// A call's attributes, as bind_handler binds them.
struct DeformAttributes {
  double spatial_scale;
  int64_t sampling_ratio;
  double gamma;
  int64_t operation;
  int64_t first_bin_row;  // CallShape: a device's share of the bin rows
  int64_t bin_rows;
  int64_t box_parameter;
  int64_t rois_per_group;
  int64_t images_per_group;
};

// The checked call: shapes (call_dims's checks, and offsets [K, 2, PH, PW])
// and attributes, or an error that names what is wrong.
template <typename Operation, typename Layout, typename S, bool kForward>
ffi::ErrorOr<DeformCall<S>> checked_call(const MapBuffer<S>& operand, const RoisBuffer<S>& rois,
                                         const OffsetBuffer<S>& offset,
                                         const ResultBuffer<S, kForward>& result,
                                         const DeformAttributes& attributes) {
  using T = ComputeType<S>;
  const ffi::Span<const int64_t> features = kForward ? operand.dimensions() : result.dimensions();
  const ffi::Span<const int64_t> pooled = kForward ? result.dimensions() : operand.dimensions();
  CallAttributes plain;
  plain.spatial_scale = attributes.spatial_scale;
  plain.sampling_ratio = attributes.sampling_ratio;
  plain.operation = attributes.operation;
  plain.first_bin_row = attributes.first_bin_row;
  plain.bin_rows = attributes.bin_rows;
  plain.rois_per_group = attributes.rois_per_group;
  plain.images_per_group = attributes.images_per_group;
  ffi::ErrorOr<CallShape> shape =
      call_dims<Operation, Layout, T>(features, rois.dimensions(), pooled, plain);
  if (shape.has_error()) return ffi::Unexpected<ffi::Error>(shape.error());
  const std::string name = DeformName<Operation>::value;
  const std::vector<int64_t> offsets{shape->num_rois, 2, shape->pooled_h, shape->pooled_w};
  if (shape_string(offset.dimensions()) != shape_string(offsets)) {
    return invalid_call(name + "'s offsets must be [K, 2, PH, PW] = " + shape_string(offsets) +
                        "; got " + shape_string(offset.dimensions()));
  }
  const BoxRule rule = Operation::box_rule(attributes.operation);
  if (!rule.aligned) {
    return invalid_call(name + " samples as aligned RoI Align does (mmcv's deform_roi_pool): "
                               "aligned must be 1");
  }
  const T gamma = static_cast<T>(attributes.gamma);
  if (!is_finite(gamma)) {
    return invalid_call(name + "'s gamma must be finite in the boxes' type, got " +
                        std::to_string(attributes.gamma));
  }
  if (attributes.box_parameter < 0 || attributes.box_parameter > 4) {
    return invalid_call(name + "'s box_parameter must be 0 (values) to 4, got " +
                        std::to_string(attributes.box_parameter));
  }
  DeformCall<S> call;
  call.operand = data<const S>(operand);
  call.rois = rois.typed_data();
  call.offset = offset.typed_data();
  call.shape = *shape;
  call.rule = rule;
  call.rule.derivative = static_cast<BoxParameter>(attributes.box_parameter);
  call.spatial_scale = static_cast<T>(attributes.spatial_scale);
  call.sampling_ratio = attributes.sampling_ratio;
  call.gamma = gamma;
  return call;
}

// A handler: the platform's context (`bound`: its binding, decoded as
// Context), then the call's buffers and attributes, which it hands to
// run(context, checked_call's call or its error, result buffer).
template <typename Operation, typename Layout, typename S, bool kForward, typename Context,
          typename Binding, typename Run>
auto bind_handler(Binding bound, Run run, std::initializer_list<ffi::Traits> traits = {}) {
  using Result = ResultBuffer<S, kForward>;
  return std::move(bound)
      .template Arg<MapBuffer<S>>()     // features / cotangent
      .template Arg<RoisBuffer<S>>()    // rois
      .template Arg<OffsetBuffer<S>>()  // offset
      .template Ret<Result>()
      .template Attr<double>("spatial_scale")
      .template Attr<int64_t>("sampling_ratio")
      .template Attr<double>("gamma")
      .template Attr<int64_t>(Operation::kAttribute)
      .template Attr<int64_t>("first_bin_row")
      .template Attr<int64_t>("bin_rows")
      .template Attr<int64_t>("box_parameter")
      .template Attr<int64_t>("rois_per_group")
      .template Attr<int64_t>("images_per_group")
      .To(
          [run](Context context, MapBuffer<S> operand, RoisBuffer<S> rois,
                OffsetBuffer<S> offset, ffi::Result<Result> result, double spatial_scale,
                int64_t sampling_ratio, double gamma, int64_t operation, int64_t first_bin_row,
                int64_t bin_rows, int64_t box_parameter, int64_t rois_per_group,
                int64_t images_per_group) {
            const DeformAttributes attributes{spatial_scale, sampling_ratio, gamma,
                                              operation,     first_bin_row,  bin_rows,
                                              box_parameter, rois_per_group, images_per_group};
            return run(context,
                       checked_call<Operation, Layout, S, kForward>(operand, rois, offset,
                                                                    *result, attributes),
                       *result);
          },
          traits);
}

// One target per (operation, direction, layout, storage type) of
// Handler<Operation, kForward, Layout, S> (its make() binds it), named
// <prefix><operation>_<direction>_<layout>_<dtype>, e.g.
// jax_psroi_deform_roi_align_forward_nhwc_f32. Target names are ABI.
template <template <typename, bool, typename, typename> class Handler>
std::vector<FfiTarget> targets(const std::string& prefix) {
  std::vector<FfiTarget> named;
  for_each_type(DeformOperations{}, [&](auto operation) {
    using Operation = typename decltype(operation)::type;
    auto for_direction = [&](auto forward) {
      constexpr bool kForward = decltype(forward)::value;
      const char* direction = kForward ? "forward" : "backward";
      for_each_type(KernelLayouts{}, [&](auto layout) {
        using Layout = typename decltype(layout)::type;
        for_each_type(KernelDTypes{}, [&](auto dtype) {
          using S = typename decltype(dtype)::type;
          named.push_back(FfiTarget{
              prefix + DeformName<Operation>::value + "_" + direction + "_" +
                  lower(KernelName<Layout>::value) + "_" + lower(FfiDType<S>::suffix),
              DeformName<Operation>::value, direction, KernelName<Layout>::value,
              KernelName<S>::value, &call_handler<Handler<Operation, kForward, Layout, S>>});
        });
      });
    };
    for_direction(std::true_type{});
    for_direction(std::false_type{});
  });
  return named;
}

}  // namespace deform
}  // namespace jax_psroi

#endif  // JAX_PSROI_DEFORMABLE_FFI_H_
