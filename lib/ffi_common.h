// What the CPU and CUDA FFI handlers share: the argument binding (written once,
// for every dtype and platform), the shape checks that turn buffer dimensions
// into CallShape or an ffi::Error, and the list of FFI targets built from the
// kernel table.
#ifndef JAX_PSROI_FFI_COMMON_H_
#define JAX_PSROI_FFI_COMMON_H_

#include <cctype>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernel_table.h"
#include "roi_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {

namespace ffi = xla::ffi;

// The XLA data type of each storage type of the kernel table.
template <typename T>
struct FfiDType;
#define JAX_PSROI_FFI_DTYPE_(type, name, ffi_type)                 \
  template <>                                                      \
  struct FfiDType<type> {                                          \
    static constexpr ffi::DataType value = ffi::DataType::ffi_type; \
    static constexpr const char* suffix = #ffi_type;               \
  };
JAX_PSROI_DTYPES(JAX_PSROI_FFI_DTYPE_)
#undef JAX_PSROI_FFI_DTYPE_

// A 4-d map (features, gradient or pooled tensor) in storage type S, the
// RoIs and the accumulator in its compute type.
template <typename S>
using MapBuffer = ffi::Buffer<FfiDType<S>::value, 4>;
template <typename S>
using RoisBuffer = ffi::Buffer<FfiDType<ComputeType<S>>::value, 2>;
template <typename S>
using AccumulatorBuffer = ffi::Buffer<FfiDType<ComputeType<S>>::value, 1>;

// Forward:  (input, rois [K, 5], [updated]) -> output (the pooled tensor),
//           and further results a platform may ask for. With the optional
//           `updated` (the pooled tensor the call updates, which the call
//           must alias to output), RoIs that read nothing leave their
//           output as it was: multi-scale RoI Align pools each level's RoIs
//           into one result, level after level.
// Backward: (cotangent (the pooled tensor), rois [K, 5]) -> grad (as input),
//           and further results.
// Input and grad are [N, C, H, W] or [N, H, W, C], the pooled tensor
// [K, C_out, PH, PW] or [K, PH, PW, C_out], as the row's layout says, all in
// the storage type S; rois are in S's compute type (float32 for the 16-bit
// types: boxes are never rounded to 16 bits). The CPU takes no further
// results. CUDA takes, in this order: for a 16-bit backward, an accumulator
// (the gradient in float32, which carries partial sums between the passes
// of a crowded tile before the one rounding into grad); then an int32
// workspace (gpu_schedule.h) in both directions.
// `binding` carries the platform's context (stream or thread pool).

// RoI Pool's arg-max: the plane pixel y * W + x of each pooled element's
// maximum, -1 for none, shaped like the pooled tensor.
using PixelsBuffer = ffi::Buffer<ffi::DataType::S32, 4>;

// The image groups every call takes last (CallShape::rois_per_group and
// images_per_group, jax.vmap's; 0 and 0: one group).
template <typename Binding>
auto bind_image_groups(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("rois_per_group")
      .template Attr<int64_t>("images_per_group");
}

// The attributes both directions read, after their buffers.
template <typename Operation, typename Binding>
auto bind_attributes(Binding binding) {
  return bind_image_groups(std::move(binding)
                               .template Attr<double>("spatial_scale")
                               .template Attr<int64_t>("sampling_ratio")
                               .template Attr<int64_t>(Operation::kAttribute)
                               .template Attr<int64_t>("first_bin_row")  // CallShape
                               .template Attr<int64_t>("bin_rows"));     // CallShape
}

// A call's attributes, as bound above, before call_dims checks them. They
// come from the program, which need not be one jax_psroi's Python wrote (a
// hand-written or deserialized one): every value is checked before use.
struct CallAttributes {
  double spatial_scale = 1.0;
  int64_t sampling_ratio = 0;  // RoI Pool: none (0)
  int64_t operation = 0;       // the policy's kAttribute (RoI Pool: none, 0)
  int64_t first_bin_row = 0;
  int64_t bin_rows = 0;  // RoI Pool: none (the pooled tensor's PH)
  int64_t rois_per_group = 0;
  int64_t images_per_group = 0;
};

// Max pooling's attributes: a scale and the image groups; its grid is the
// pooled tensor's `pooled_h` rows.
inline CallAttributes max_pool_attributes(double spatial_scale, int64_t rois_per_group,
                                          int64_t images_per_group, int64_t pooled_h) {
  CallAttributes attributes;
  attributes.spatial_scale = spatial_scale;
  attributes.bin_rows = pooled_h;
  attributes.rois_per_group = rois_per_group;
  attributes.images_per_group = images_per_group;
  return attributes;
}

// The results and attributes after a direction's operands.
template <typename Operation, typename S, typename Binding>
auto bind_results(Binding binding) {
  return bind_attributes<Operation>(std::move(binding)
                                        .template Ret<MapBuffer<S>>()  // output / grad
                                        .RemainingRets());  // CUDA: (accumulator,) workspace
}

// How a call of each pooling binds its buffers and attributes (a binding is
// not movable: each is built in one expression).
template <typename Pooling>
struct PoolingBinding;

// Averaging: both directions take a pooled-or-feature map and the RoIs (and
// the forward, optionally, the pooled tensor it updates), and return a map
// and further results.
template <>
struct PoolingBinding<AveragePooling> {
  template <typename Operation, Direction D, typename S, typename Binding>
  static auto bind(Binding binding) {
    if constexpr (D == Direction::kForward) {
      return bind_results<Operation, S>(std::move(binding)
                                            .template Arg<MapBuffer<S>>()            // input
                                            .template Arg<RoisBuffer<S>>()           // rois
                                            .template OptionalArg<MapBuffer<S>>());  // updated
    } else if constexpr (D == Direction::kBackward) {
      return bind_results<Operation, S>(std::move(binding)
                                            .template Arg<MapBuffer<S>>()     // cotangent
                                            .template Arg<RoisBuffer<S>>());  // rois
    } else {  // the box directions: input or cotangent, rois
      return bind_results<Operation, S>(std::move(binding)
                                            .template Arg<MapBuffer<S>>()
                                            .template Arg<RoisBuffer<S>>())
          .template Attr<int64_t>("box_parameter");
    }
  }
};

// Maxima:
//   forward:  (input, rois, [recorded]) -> (output, pixels), further results;
//             with `recorded` (an earlier forward's pixels, which the call
//             must alias to its `pixels` result) the output is the input at
//             those pixels: the forward's tangent, linear in the input;
//   backward: (cotangent, rois, pixels) -> grad, further results;
// and their attributes are the spatial scale and the image groups.
template <>
struct PoolingBinding<MaxPooling> {
  template <typename Operation, Direction D, typename S, typename Binding>
  static auto bind(Binding binding) {
    if constexpr (D == Direction::kForward) {
      return bind_image_groups(std::move(binding)
                                   .template Arg<MapBuffer<S>>()          // input
                                   .template Arg<RoisBuffer<S>>()         // rois
                                   .template OptionalArg<PixelsBuffer>()  // recorded
                                   .template Ret<MapBuffer<S>>()          // output
                                   .template Ret<PixelsBuffer>()          // pixels
                                   .RemainingRets()
                                   .template Attr<double>("spatial_scale"));
    } else {
      return bind_image_groups(std::move(binding)
                                   .template Arg<MapBuffer<S>>()   // cotangent
                                   .template Arg<RoisBuffer<S>>()  // rois
                                   .template Arg<PixelsBuffer>()   // pixels
                                   .template Ret<MapBuffer<S>>()   // grad
                                   .RemainingRets()                // CUDA: (accumulator,) workspace
                                   .template Attr<double>("spatial_scale"));
    }
  }
};

// The optional pooled tensor a forward updates in place (see above): sets
// `skip_empty_rois`, so that the outputs of RoIs that read nothing stay.
template <typename S>
using UpdatedBuffer = std::optional<MapBuffer<S>>;

template <typename Buffer>
ffi::Error apply_update(const std::optional<Buffer>& updated, const Buffer& output,
                        bool* skip_empty_rois) {
  if (!updated) return ffi::Error::Success();
  if (updated->untyped_data() != output.untyped_data()) {
    return ffi::Error::InvalidArgument(
        "jax_psroi: a third operand is the pooled tensor a forward updates, and must be "
        "aliased to its result");
  }
  *skip_empty_rois = true;
  return ffi::Error::Success();
}

// A buffer's elements as the kernel table's storage type (XLA's native type
// of the 16-bit types is uint16_t).
template <typename S, typename Buffer>
S* data(Buffer& buffer) {
  return reinterpret_cast<S*>(buffer.untyped_data());
}

using WorkspaceBuffer = ffi::Buffer<ffi::DataType::S32, 1>;

// Further result `index` of a call as a rank-1 buffer of type `Buffer` with at
// least `elements` elements, or an error naming `what`.
template <typename Buffer>
ffi::ErrorOr<Buffer> further_result(const ffi::RemainingRets& further, size_t index,
                                    int64_t elements, const char* what) {
  if (index < further.size()) {
    ffi::ErrorOr<ffi::Result<Buffer>> result = further.get<Buffer>(index);
    if (!result.has_error() &&
        static_cast<int64_t>((*result)->element_count()) >= elements) {
      return **result;
    }
  }
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
      std::string("jax_psroi: this call needs as its further result ") +
      std::to_string(index) + " " + what + " of at least " + std::to_string(elements) +
      " elements"));
}

inline std::string shape_string(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// a * b into *product, false when it overflows int64 (a, b >= 0). Written
// with a division: these checks compile under nvcc's host compiler too.
inline bool multiply(int64_t a, int64_t b, int64_t* product) {
  if (a != 0 && b > INT64_MAX / a) return false;
  *product = a * b;
  return true;
}

// Whether the elements of a shape, every extent counted as at least 1, fit
// int64: so do the products the kernels form of its extents (a zero-size
// buffer may still have huge extents).
inline bool extents_fit(ffi::Span<const int64_t> dims) {
  int64_t product = 1;
  for (int64_t extent : dims) {
    if (extent < 0 || !multiply(product, extent > 0 ? extent : 1, &product)) return false;
  }
  return true;
}

inline ffi::Unexpected<ffi::Error> invalid_call(const std::string& message) {
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument("jax_psroi: " + message));
}

// Dims of a call of `Operation` from its feature map, rois [K, 5], pooled
// tensor (the forward's output, the backward's input), in `Layout`, with
// boxes of type T, and its attributes, every one checked: an error names
// what is wrong, and nothing the kernels compute from an accepted call
// overflows or runs without bound.
template <typename Operation, typename Layout, typename T>
ffi::ErrorOr<CallShape> call_dims(ffi::Span<const int64_t> features, ffi::Span<const int64_t> rois,
                                  ffi::Span<const int64_t> pooled,
                                  const CallAttributes& attributes) {
  if (rois[1] != 5 || pooled[0] != rois[0]) {
    return invalid_call("rois must be [K, 5] and the pooled tensor's first axis K; got rois " +
                        shape_string(rois) + ", pooled " + shape_string(pooled));
  }
  if (!extents_fit(features) || !extents_fit(pooled)) {
    return invalid_call("the extents of features " + shape_string(features) +
                        " and of the pooled tensor " + shape_string(pooled) +
                        " must multiply to less than 2^63");
  }
  if (attributes.operation != 0 && attributes.operation != 1) {
    return invalid_call(std::string(Operation::kAttributeRule) + ", got " +
                        std::to_string(attributes.operation));
  }
  // In T, where the kernels use it: 1e300 is inf in float32, 1e-50 zero.
  const T scale = static_cast<T>(attributes.spatial_scale);
  if (!(is_finite(scale) && scale > static_cast<T>(0))) {
    return invalid_call("spatial_scale must be finite and positive in the boxes' type, got " +
                        std::to_string(attributes.spatial_scale));
  }
  if (attributes.sampling_ratio > kMaxGridPerAxis) {
    return invalid_call("sampling_ratio must be at most " + std::to_string(kMaxGridPerAxis) +
                        " samples per bin axis (<= 0: adaptive), got " +
                        std::to_string(attributes.sampling_ratio));
  }
  constexpr const int* kAxes = Layout::kAxes;  // N, C, H, W (K, C_out, PH, PW)
  CallShape shape;
  shape.num_images = features[kAxes[0]];
  shape.channels = features[kAxes[1]];
  shape.height = features[kAxes[2]];
  shape.width = features[kAxes[3]];
  shape.num_rois = pooled[kAxes[0]];
  shape.channels_out = pooled[kAxes[1]];
  shape.pooled_h = pooled[kAxes[2]];
  shape.pooled_w = pooled[kAxes[3]];
  shape.channel_order = Operation::channel_order(attributes.operation);
  const bool shared = shape.channel_order == ChannelOrder::kShared;
  int64_t channels = 0;
  if (shape.pooled_h <= 0 || shape.pooled_w <= 0 ||
      !multiply(shape.channels_out, shared ? 1 : shape.bins(), &channels) ||
      shape.channels != channels) {
    return invalid_call(std::string(shared ? "feature channels must equal C_out"
                                           : "feature channels must equal C_out * PH * PW") +
                        "; got features " + shape_string(features) + ", pooled " +
                        shape_string(pooled));
  }
  // Both non-negative: their difference does not overflow.
  shape.first_bin_row = attributes.first_bin_row;
  shape.bin_rows = attributes.bin_rows;
  if (shape.first_bin_row < 0 || shape.bin_rows < 0 ||
      shape.bin_rows - shape.first_bin_row < shape.pooled_h) {
    return invalid_call("the pooled tensor's " + std::to_string(shape.pooled_h) +
                        " bin rows from row " + std::to_string(attributes.first_bin_row) +
                        " must lie in a grid of " + std::to_string(attributes.bin_rows) + " rows");
  }
  shape.rois_per_group = attributes.rois_per_group;
  shape.images_per_group = attributes.images_per_group;
  if (shape.rois_per_group < 0 || shape.images_per_group < 0 ||
      (shape.images_per_group > 0 && shape.num_images % shape.images_per_group != 0)) {
    return invalid_call(
        "rois_per_group and images_per_group must be >= 0 (0: one group), "
        "images_per_group a divisor of the " +
        std::to_string(shape.num_images) + " images; got " + std::to_string(shape.rois_per_group) +
        " and " + std::to_string(shape.images_per_group));
  }
  return shape;
}

// Shape of a max-pooling call (features, rois, pooled tensor and its
// pixels), which record pixels in 32 bits.
template <typename Operation, typename Layout, typename T>
ffi::ErrorOr<CallShape> max_pool_dims(ffi::Span<const int64_t> features,
                                      ffi::Span<const int64_t> rois,
                                      ffi::Span<const int64_t> pooled,
                                      ffi::Span<const int64_t> pixels,
                                      const CallAttributes& attributes) {
  ffi::ErrorOr<CallShape> shape =
      call_dims<Operation, Layout, T>(features, rois, pooled, attributes);
  if (shape.has_error()) return shape;
  if (shape_string(pixels) != shape_string(pooled)) {
    return invalid_call(std::string(Operation::kName) +
                        "'s pixels must be shaped like its pooled tensor " + shape_string(pooled) +
                        "; got " + shape_string(pixels));
  }
  if (shape->plane_size() > INT32_MAX) {
    return invalid_call(std::string(Operation::kName) +
                        " takes feature maps of fewer than 2^31 pixels per plane; got " +
                        shape_string(features));
  }
  return shape;
}

// Shape of a max-pooling forward, whose optional `recorded` pixels (the
// gather of its tangent) must be aliased to its pixels result.
template <typename Operation, typename Layout, typename T, typename Input, typename Rois,
          typename Output>
ffi::ErrorOr<CallShape> max_pool_forward_dims(const Input& input, const Rois& rois,
                                              const std::optional<PixelsBuffer>& recorded,
                                              const Output& output, const PixelsBuffer& pixels,
                                              const CallAttributes& attributes) {
  if (recorded && recorded->untyped_data() != pixels.untyped_data()) {
    return invalid_call(std::string(Operation::kName) +
                        "'s third operand is the pixels it gathers at, and must be aliased to "
                        "its pixels result");
  }
  return max_pool_dims<Operation, Layout, T>(input.dimensions(), rois.dimensions(),
                                             output.dimensions(), pixels.dimensions(), attributes);
}

// One FFI target: a row of the kernel table, its name and its handler.
struct FfiTarget {
  std::string name;
  const char* operation;
  const char* direction;
  const char* layout;
  const char* dtype;
  XLA_FFI_Handler* handler;
};

inline std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// The C entry point XLA calls for a target: the handler that
// Handler::make() binds, made on the first call and kept for the process.
template <typename Handler>
XLA_FFI_Error* call_handler(XLA_FFI_CallFrame* call_frame) {
  static auto* handler = Handler::make().release();
  return handler->Call(call_frame);
}

// The targets of one platform: Handler<Operation, direction, Layout, T> for
// every row of the kernel table (its make() binds the row's handler), named
// <prefix><operation>_<direction>_<layout>_<dtype>, e.g.
// jax_psroi_ps_roi_align_forward_nchw_f32. Target names are ABI: exported
// programs refer to them.
template <template <typename, Direction, typename, typename> class Handler>
std::vector<FfiTarget> ffi_targets(const std::string& prefix) {
  std::vector<FfiTarget> targets;
  for_each_kernel([&](auto operation, auto direction, auto layout, auto dtype) {
    using Operation = typename decltype(operation)::type;
    using Layout = typename decltype(layout)::type;
    using T = typename decltype(dtype)::type;
    constexpr Direction kDirection = decltype(direction)::value;
    targets.push_back(FfiTarget{
        prefix + KernelName<Operation>::value + "_" + decltype(direction)::name +
            "_" + lower(KernelName<Layout>::value) + "_" + lower(FfiDType<T>::suffix),
        KernelName<Operation>::value, decltype(direction)::name,
        KernelName<Layout>::value, KernelName<T>::value,
        &call_handler<Handler<Operation, kDirection, Layout, T>>});
  });
  return targets;
}

}  // namespace jax_psroi

#endif  // JAX_PSROI_FFI_COMMON_H_
