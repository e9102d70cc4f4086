// Test-only FFI handlers: non-maximum suppression's CUDA schedule
// (nms_schedule.h) run serially on the CPU, tile after tile and image after
// image, each block's steps over all its threads in turn, so that the CPU
// tests check the mask layout and the scan the GPU runs. Targets
// jax_psroi_testing_nms_schedule_<dtype>, of the sorted call of nms_ffi.h,
// in the testing module only (JAX_PSROI_TESTING).
#include <cstdint>
#include <vector>

#include "ffi_common.h"
#include "gpu_schedule_serial.h"
#include "nms_ffi.h"
#include "nms_schedule.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

template <typename S>
ffi::Error serial_nms(nms::BoxesBuffer<S> boxes, nms::IndexBuffer order,
                      nms::IndexBuffer categories, ffi::Result<nms::IndexBuffer> indices,
                      ffi::Result<nms::CountsBuffer> counts, ffi::Result<nms::MaskBuffer> workspace,
                      double iou_threshold) {
  ffi::ErrorOr<nms::SortedCall<S>> call =
      nms::sorted_call<S>(boxes, order, categories, indices, counts, workspace, iou_threshold);
  if (call.has_error()) return call.error();
  gpu_schedule::SerialBlock mask_block{nms::kWordBoxes}, scan_block{nms::kScanThreads};
  nms::ColumnBoxes<ComputeType<S>> column;
  const int64_t words = nms::words_of(call->n);
  for (int64_t tile = 0; tile < call->images * words * words; ++tile) {
    nms::mask_tile(mask_block, *call, tile, column);
  }
  nms::ScanState state;
  for (int64_t b = 0; b < call->images; ++b) nms::scan_image(scan_block, *call, b, state);
  return ffi::Error::Success();
}

template <typename S>
struct SerialNmsHandler {
  static auto make() { return nms::bind_sorted<S>(ffi::Ffi::Bind()).To(serial_nms<S>); }
};

}  // namespace
}  // namespace cpu

std::vector<FfiTarget> nms_schedule_testing_targets() {
  return nms::targets<cpu::SerialNmsHandler>("jax_psroi_testing_nms_schedule_");
}

}  // namespace jax_psroi
