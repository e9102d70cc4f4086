// XLA FFI handlers of non-maximum suppression on the CPU, one per storage
// type, named jax_psroi_nms_<dtype>:
//   (boxes [B, N, 4], scores [B, N] in S, categories [B, N] int32)
//     -> (indices [B, M] int32, counts [B] int32), attribute iou_threshold (F64)
// M, the most boxes kept per image, is the indices' width. The images are
// independent tasks on XLA's intra-op thread pool (nms_kernels.h).
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "cpu/nms_kernels.h"
#include "cpu/parallel.h"
#include "ffi_common.h"
#include "kernel_table.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

template <typename S>
using BoxesBuffer = ffi::Buffer<FfiDType<S>::value, 3>;
template <typename S>
using ScoresBuffer = ffi::Buffer<FfiDType<S>::value, 2>;
using CategoriesBuffer = ffi::Buffer<ffi::DataType::S32, 2>;

ffi::Error nms_error(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_psroi nms: " + message);
}

template <typename S>
ffi::Future nms(ffi::ThreadPool pool, BoxesBuffer<S> boxes, ScoresBuffer<S> scores,
                CategoriesBuffer categories, ffi::Result<ffi::Buffer<ffi::DataType::S32, 2>> indices,
                ffi::Result<ffi::Buffer<ffi::DataType::S32, 1>> counts, double iou_threshold) {
  const auto box_dims = boxes.dimensions();
  const int64_t images = box_dims[0], n = box_dims[1];
  const int64_t max_output = indices->dimensions()[1];
  const auto same = [](ffi::Span<const int64_t> dims, std::initializer_list<int64_t> expected) {
    return std::vector<int64_t>(dims.begin(), dims.end()) == std::vector<int64_t>(expected);
  };
  if (box_dims[2] != 4 || !same(scores.dimensions(), {images, n}) ||
      !same(categories.dimensions(), {images, n}) ||
      indices->dimensions()[0] != images || !same(counts->dimensions(), {images})) {
    return ready_with(nms_error(
        "expects boxes [B, N, 4], scores and categories [B, N], indices [B, M] and counts [B]; "
        "got boxes " + shape_string(box_dims) + ", scores " + shape_string(scores.dimensions()) +
        ", categories " + shape_string(categories.dimensions()) + ", indices " +
        shape_string(indices->dimensions()) + ", counts " + shape_string(counts->dimensions())));
  }
  if (n > INT32_MAX) return ready_with(nms_error("takes fewer than 2^31 boxes per image"));
  // The 16-bit types are bit containers of the same size (storage_types.h).
  const S* box_data = static_cast<const S*>(boxes.untyped_data());
  const S* score_data = static_cast<const S*>(scores.untyped_data());
  const int32_t* category_data = categories.typed_data();
  int32_t* index_data = indices->typed_data();
  int32_t* count_data = counts->typed_data();
  // Work of a call: at most every pair of boxes, for the decision to split.
  const int64_t work = images * n * std::max<int64_t>(1, std::min(n, max_output));
  return run_phases(pool, work, {Phase{images, [=](int64_t b) {
                                   count_data[b] = static_cast<int32_t>(nms_image<S>(
                                       box_data + b * n * 4, score_data + b * n,
                                       category_data + b * n, n, iou_threshold, max_output,
                                       index_data + b * max_output));
                                 }}});
}

template <typename S>
struct NmsHandler {
  static auto make() {
    return ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .template Arg<BoxesBuffer<S>>()
        .template Arg<ScoresBuffer<S>>()
        .template Arg<CategoriesBuffer>()
        .template Ret<ffi::Buffer<ffi::DataType::S32, 2>>()
        .template Ret<ffi::Buffer<ffi::DataType::S32, 1>>()
        .template Attr<double>("iou_threshold")
        .To(nms<S>);
  }
};

}  // namespace
}  // namespace cpu

std::vector<FfiTarget> cpu_nms_targets() {
  std::vector<FfiTarget> targets;
  for_each_type(KernelDTypes{}, [&](auto dtype) {
    using S = typename decltype(dtype)::type;
    targets.push_back(FfiTarget{"jax_psroi_nms_" + lower(FfiDType<S>::suffix), "nms", "forward",
                                "", KernelName<S>::value, &call_handler<cpu::NmsHandler<S>>});
  });
  return targets;
}

}  // namespace jax_psroi
