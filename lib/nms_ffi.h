// The FFI side of non-maximum suppression, shared by its handlers: the CPU
// kernel's (lib/cpu/nms_handlers.cc), the CUDA kernels'
// (lib/cuda/nms_handlers.cu) and the test rig's
// (lib/testing/nms_schedule_handlers.cc). Every call is over images:
//   CPU:    (boxes [B, N, 4], scores [B, N] in S, categories [B, N] int32)
//   sorted: (boxes [B, N, 4] in S in visiting order, order [B, N] int32,
//            categories [B, N] int32 in that order)
//   -> (indices [B, M] int32, counts [B] int32[, sorted: workspace [2 W] uint32])
// with the attribute iou_threshold (F64). M, the most boxes kept per image,
// is the indices' width.
#ifndef JAX_PSROI_NMS_FFI_H_
#define JAX_PSROI_NMS_FFI_H_

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "ffi_common.h"
#include "kernel_table.h"
#include "nms_math.h"
#include "nms_schedule.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace nms {

template <typename S>
using BoxesBuffer = ffi::Buffer<FfiDType<S>::value, 3>;
template <typename S>
using PerBoxBuffer = ffi::Buffer<FfiDType<S>::value, 2>;
using IndexBuffer = ffi::Buffer<ffi::DataType::S32, 2>;
using CountsBuffer = ffi::Buffer<ffi::DataType::S32, 1>;
// The workspace of 64-bit words as pairs of uint32 (JAX has no uint64
// arrays without jax_enable_x64); XLA aligns buffers to at least 16 bytes.
using MaskBuffer = ffi::Buffer<ffi::DataType::U32, 1>;

inline ffi::Error call_error(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_psroi nms: " + message);
}

// An error unless `boxes` is [B, N, 4], every `per_box` [B, N], `indices`
// [B, M] and `counts` [B], with N < 2^31 (the indices are int32).
inline ffi::Error check_shapes(ffi::Span<const int64_t> boxes,
                               std::initializer_list<ffi::Span<const int64_t>> per_box,
                               ffi::Span<const int64_t> indices,
                               ffi::Span<const int64_t> counts) {
  const auto is = [](ffi::Span<const int64_t> dims, std::initializer_list<int64_t> expected) {
    return std::vector<int64_t>(dims.begin(), dims.end()) == std::vector<int64_t>(expected);
  };
  bool fits = boxes[2] == 4 && indices[0] == boxes[0] && is(counts, {boxes[0]});
  std::string got = "boxes " + shape_string(boxes);
  for (ffi::Span<const int64_t> dims : per_box) {
    fits = fits && is(dims, {boxes[0], boxes[1]});
    got += ", " + shape_string(dims);
  }
  if (!fits) {
    return call_error("expects boxes [B, N, 4], per-box operands [B, N], indices [B, M] and "
                      "counts [B]; got " + got + ", indices " + shape_string(indices) +
                      ", counts " + shape_string(counts));
  }
  if (boxes[1] > INT32_MAX) return call_error("takes fewer than 2^31 boxes per image");
  return ffi::Error::Success();
}

// The sorted call of the CUDA kernels and of the rig, its shapes and its
// workspace checked.
template <typename S>
ffi::ErrorOr<SortedCall<S>> sorted_call(BoxesBuffer<S> boxes, IndexBuffer order,
                                        IndexBuffer categories, ffi::Result<IndexBuffer> indices,
                                        ffi::Result<CountsBuffer> counts,
                                        ffi::Result<MaskBuffer> workspace, double iou_threshold) {
  ffi::Error shapes = check_shapes(boxes.dimensions(), {order.dimensions(), categories.dimensions()},
                                   indices->dimensions(), counts->dimensions());
  if (shapes.failure()) return ffi::Unexpected<ffi::Error>(shapes);
  const int64_t images = boxes.dimensions()[0], n = boxes.dimensions()[1];
  const int64_t needed = 2 * images * image_words(n);
  if (static_cast<int64_t>(workspace->element_count()) < needed) {
    return ffi::Unexpected<ffi::Error>(call_error(
        "needs a workspace of " + std::to_string(needed) + " uint32 elements; got " +
        std::to_string(workspace->element_count())));
  }
  return SortedCall<S>{data<const S>(boxes),
                       order.typed_data(),
                       categories.typed_data(),
                       images,
                       n,
                       indices->dimensions()[1],
                       threshold_in<ComputeType<S>>(iou_threshold),
                       indices->typed_data(),
                       counts->typed_data(),
                       reinterpret_cast<uint64_t*>(workspace->untyped_data())};
}

// The binding of a sorted call after the platform's context (`bound`).
template <typename S, typename Binding>
auto bind_sorted(Binding bound) {
  return std::move(bound)
      .template Arg<BoxesBuffer<S>>()
      .template Arg<IndexBuffer>()
      .template Arg<IndexBuffer>()
      .template Ret<IndexBuffer>()
      .template Ret<CountsBuffer>()
      .template Ret<MaskBuffer>()
      .template Attr<double>("iou_threshold");
}

// One target per storage type S of Handler<S> (its make() binds it), named
// <prefix><dtype>, e.g. jax_psroi_nms_f32: operation "nms", direction
// "forward", no layout. Target names are ABI: exported programs refer to them.
template <template <typename> class Handler>
std::vector<FfiTarget> targets(const std::string& prefix) {
  std::vector<FfiTarget> named;
  for_each_type(KernelDTypes{}, [&](auto dtype) {
    using S = typename decltype(dtype)::type;
    named.push_back(FfiTarget{prefix + lower(FfiDType<S>::suffix), "nms", "forward", "",
                              KernelName<S>::value, &call_handler<Handler<S>>});
  });
  return named;
}

}  // namespace nms
}  // namespace jax_psroi

#endif  // JAX_PSROI_NMS_FFI_H_
