// Non-maximum suppression's CUDA kernels (the schedule of nms_schedule.h on
// real thread blocks) and their XLA FFI handlers, targets
// jax_psroi_nms_<dtype> registered for platform CUDA, of the sorted call of
// nms_ffi.h: the lowering sorts each image's boxes with XLA's sort first
// (jax_psroi/_nms.py). Two launches on XLA's stream, no synchronisation, no
// state: safe inside CUDA graphs.
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"
#include "ffi_common.h"
#include "nms_ffi.h"
#include "nms_schedule.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cuda {
namespace {

template <typename S>
__global__ void __launch_bounds__(nms::kWordBoxes) mask_kernel(nms::SortedCall<S> call) {
  using Block = DeviceBlock<nms::kWordBoxes>;
  __shared__ int warp_totals[Block::kWarps];
  __shared__ nms::ColumnBoxes<ComputeType<S>> column;
  Block block{warp_totals};
  const int64_t words = nms::words_of(call.n);
  const int64_t tiles = call.images * words * words;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    nms::mask_tile(block, call, tile, column);
  }
}

template <typename S>
__global__ void __launch_bounds__(nms::kScanThreads) scan_kernel(nms::SortedCall<S> call) {
  using Block = DeviceBlock<nms::kScanThreads>;
  __shared__ int warp_totals[Block::kWarps];
  __shared__ nms::ScanState state;
  Block block{warp_totals};
  for (int64_t b = blockIdx.x; b < call.images; b += gridDim.x) {
    nms::scan_image(block, call, b, state);
  }
}

template <typename S>
ffi::Error suppress(cudaStream_t stream, nms::BoxesBuffer<S> boxes, nms::IndexBuffer order,
                    nms::IndexBuffer categories, ffi::Result<nms::IndexBuffer> indices,
                    ffi::Result<nms::CountsBuffer> counts, ffi::Result<nms::MaskBuffer> workspace,
                    double iou_threshold) {
  ffi::ErrorOr<nms::SortedCall<S>> call =
      nms::sorted_call<S>(boxes, order, categories, indices, counts, workspace, iou_threshold);
  if (call.has_error()) return call.error();
  if (call->images == 0) return ffi::Error::Success();
  const int64_t words = nms::words_of(call->n);
  if (words > 0) {
    mask_kernel<S><<<grid_for(call->images * words * words), nms::kWordBoxes, 0, stream>>>(*call);
  }
  scan_kernel<S><<<grid_for(call->images), nms::kScanThreads, 0, stream>>>(*call);
  const cudaError_t launched = cudaGetLastError();
  if (launched == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_psroi: nms kernel launch: ") +
                              cudaGetErrorString(launched));
}

template <typename S>
struct NmsHandler {
  static auto make() {
    return nms::bind_sorted<S>(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
        .To(suppress<S>, {ffi::Traits::kCmdBufferCompatible});
  }
};

}  // namespace
}  // namespace cuda

std::vector<FfiTarget> cuda_nms_targets() {
  return nms::targets<cuda::NmsHandler>("jax_psroi_nms_");
}

}  // namespace jax_psroi
