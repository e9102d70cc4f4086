// XLA FFI handlers of non-maximum suppression on the CPU, one per storage
// type, named jax_psroi_nms_<dtype>, of the CPU call of nms_ffi.h. The
// images are independent tasks on XLA's intra-op thread pool
// (nms_kernels.h).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/nms_kernels.h"
#include "cpu/parallel.h"
#include "ffi_common.h"
#include "nms_ffi.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

template <typename S>
ffi::Future suppress(ffi::ThreadPool pool, nms::BoxesBuffer<S> boxes, nms::PerBoxBuffer<S> scores,
                nms::IndexBuffer categories, ffi::Result<nms::IndexBuffer> indices,
                ffi::Result<nms::CountsBuffer> counts, double iou_threshold) {
  ffi::Error shapes = nms::check_shapes(boxes.dimensions(), {scores.dimensions(), categories.dimensions()},
                                        indices->dimensions(), counts->dimensions());
  if (shapes.failure()) return ready_with(shapes);
  const int64_t images = boxes.dimensions()[0], n = boxes.dimensions()[1];
  const int64_t max_output = indices->dimensions()[1];
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
        .template Arg<nms::BoxesBuffer<S>>()
        .template Arg<nms::PerBoxBuffer<S>>()
        .template Arg<nms::IndexBuffer>()
        .template Ret<nms::IndexBuffer>()
        .template Ret<nms::CountsBuffer>()
        .template Attr<double>("iou_threshold")
        .To(suppress<S>);
  }
};

}  // namespace
}  // namespace cpu

std::vector<FfiTarget> cpu_nms_targets() {
  return nms::targets<cpu::NmsHandler>("jax_psroi_nms_");
}

}  // namespace jax_psroi
