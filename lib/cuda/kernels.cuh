// CUDA kernels of the RoI operators and their launchers. What each block does is
// in gpu_schedule.h (shared with the CPU tests), the arithmetic in
// roi_math.h; this file gives the schedule a real thread block and
// launches it. No XLA types: the handlers in cuda_handlers.cu translate FFI
// buffers into these calls. Every kernel is deterministic: no float atomics.
#ifndef JAX_PSROI_CUDA_KERNELS_CUH_
#define JAX_PSROI_CUDA_KERNELS_CUH_

#include <algorithm>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "gpu_schedule.h"
#include "roi_math.h"

namespace jax_psroi {
namespace cuda {

namespace gs = gpu_schedule;
using gs::DefaultTuning;

// The grid-stride loops cover any count of blocks with at most this many.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

inline int grid_for(int64_t blocks) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, std::max<int64_t>(blocks, 1)));
}

// The executor of gpu_schedule.h for a thread block of kThreads threads;
// every step ends in a barrier, so all threads must call every step.
template <int kThreads>
struct DeviceBlock {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int64_t threads = kThreads;
  int* warp_totals;  // shared, kWarps entries

  template <typename F>
  __device__ void each(int64_t n, F f) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) f(i);
    __syncthreads();
  }
  template <typename F>
  __device__ int64_t sum(int64_t n, F f) {
    int value = threadIdx.x < n ? static_cast<int>(f(threadIdx.x)) : 0;
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = value;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_totals[w];
    __syncthreads();  // warp_totals is reused by the next step
    return total;
  }
  template <typename F, typename G>
  __device__ int64_t scan(int64_t n, F f, int64_t base, G g) {
    const int value = threadIdx.x < n ? static_cast<int>(f(threadIdx.x)) : 0;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int inclusive = value;
    for (int offset = 1; offset < 32; offset *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warp_totals[w];
      total += warp_totals[w];
    }
    if (threadIdx.x < n) g(threadIdx.x, base + before + inclusive - value);
    __syncthreads();
    return total;
  }
  // Rank = set flags of lower lanes of this warp plus totals of lower warps.
  template <typename P, typename F>
  __device__ int64_t compact(int64_t n, P pred, int64_t base, int64_t limit, F f) {
    const bool flag = threadIdx.x < n && pred(threadIdx.x);
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warp_totals[w];
      total += warp_totals[w];
    }
    if (flag && base + total <= limit) {
      f(threadIdx.x, base + before + __popc(ballot & ((1u << lane) - 1u)));
    }
    __syncthreads();
    return total;
  }
  template <typename F>
  __device__ void single(F f) {
    if (threadIdx.x == 0) f();
    __syncthreads();
  }
};

template <typename Tune, typename T>
__global__ void __launch_bounds__(Tune::kThreads)
    roi_info_kernel(const T* __restrict__ rois, CallShape shape, BoxRule rule, T spatial_scale,
                    int64_t sampling_ratio, bool backward, gs::Workspace views) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * Tune::kThreads + threadIdx.x;
       k < shape.num_rois; k += static_cast<int64_t>(gridDim.x) * Tune::kThreads) {
    gs::roi_info<Tune>(rois, shape, rule, spatial_scale, sampling_ratio, k, backward, views);
  }
}

// The launches of the bucketing (gpu_schedule.h, part 1): count, then
// start (one block), then place, the first and last over (bucket, segment)
// blocks.
template <typename Tune, bool kPlace>
__global__ void __launch_bounds__(Tune::kThreads)
    segment_kernel(CallShape shape, gs::Workspace views, bool backward) {
  using Block = DeviceBlock<Tune::kThreads>;
  __shared__ int warp_totals[Block::kWarps];
  Block block{warp_totals};
  const int64_t blocks = gs::buckets_of<Tune>(shape, backward) * gs::segments_of(shape);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    if constexpr (kPlace) {
      gs::place_block<Tune>(block, shape, views, backward, b);
    } else {
      gs::count_block<Tune>(block, shape, views, backward, b);
    }
  }
}

template <typename Tune>
__global__ void __launch_bounds__(Tune::kThreads)
    start_kernel(CallShape shape, gs::Workspace views, bool backward) {
  using Block = DeviceBlock<Tune::kThreads>;
  __shared__ int warp_totals[Block::kWarps];
  Block block{warp_totals};
  gs::start_block<Tune>(block, shape, views, backward);
}

// Launch bounds (minimum blocks per SM) are the tuning's: they set the
// register budget (gpu_schedule.h, DefaultTuning).
template <typename Tune, typename S, typename Layout, bool kPixelSums>
__global__ void __launch_bounds__(Tune::kThreads, Tune::kForwardBlocksPerSm)
    forward_kernel(const S* __restrict__ input, CallShape shape, BoxRule rule,
                   int64_t sampling_ratio, gs::Workspace views, bool skip_empty_rois,
                   S* __restrict__ output) {
  using Block = DeviceBlock<Tune::kThreads>;
  Block block{nullptr};  // the forward never compacts
  const int64_t blocks = gs::forward_blocks<Tune, Layout>(shape);
  auto run = [&](gs::ForwardShared<Tune, ComputeType<S>>& shared) {
    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
      gs::forward_block<Tune, Block, S, Layout, kPixelSums>(block, shared, input, shape, rule,
                                                            sampling_ratio, views, b,
                                                            skip_empty_rois, output);
    }
  };
  if constexpr (Tune::kStageRois > 0) {
    __shared__ gs::ForwardShared<Tune, ComputeType<S>> stage;
    run(stage);
  } else {  // no shared memory
    gs::NoStage none;
    run(none);
  }
}

// The backward's __launch_bounds__ blocks per SM: the tuning's, or as many
// as its shared memory lets share an SM if fewer (sm_90, the largest of the
// targets: 228 KB, 1 KB reserved a block). Asking ptxas for blocks that
// cannot run only takes registers from those that do: float64's list
// (40 KB a block) lets 5 share an SM, and the register cap of 7 spills.
template <typename Tune, typename T>
constexpr int backward_blocks_per_sm() {
  constexpr size_t kSharedPerSm = 228 * 1024, kReservedPerBlock = 1024;
  constexpr size_t kBlockShared = sizeof(gs::BackwardShared<Tune, T>) +
                                  sizeof(int) * DeviceBlock<Tune::kThreads>::kWarps +
                                  kReservedPerBlock;
  constexpr int kFit = static_cast<int>(kSharedPerSm / kBlockShared);
  return kFit < Tune::kBackwardBlocksPerSm ? kFit : Tune::kBackwardBlocksPerSm;
}

// `term`: what a covering list entry adds (gpu_schedule.h: the weighted
// cotangent, or RoI Pool's cotangent at its maximum).
template <typename Tune, typename S, typename Layout, bool kPixelSums, typename Term,
          typename T = ComputeType<S>>
__global__ void __launch_bounds__(Tune::kThreads, (backward_blocks_per_sm<Tune, T>()))
    backward_kernel(Term term, CallShape shape, BoxRule rule, int64_t sampling_ratio,
                    gs::Workspace views, T* sums, S* grad) {
  using Block = DeviceBlock<Tune::kThreads>;
  static_assert(sizeof(gs::BackwardShared<Tune, T>) <= 48 * 1024,
                "a tuning's backward list must fit static shared memory");
  __shared__ gs::BackwardShared<Tune, T> shared;
  __shared__ int warp_totals[Block::kWarps];
  Block block{warp_totals};
  const int64_t blocks = gs::BackwardTiling<Tune>::of(shape).blocks(shape);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    gs::backward_block<Tune, Block, S, Layout, kPixelSums>(block, shared, term, shape, rule,
                                                           sampling_ratio, views, b, sums, grad);
  }
}

// RoI Pool's forward (or, with `recorded`, its tangent): a block per run of
// one RoI's outputs (gpu_schedule.h, roi_pool_block).
template <typename Tune, typename S, typename Layout, typename T = ComputeType<S>>
__global__ void __launch_bounds__(Tune::kThreads)
    roi_pool_forward_kernel(const S* __restrict__ input, const T* __restrict__ rois,
                            CallShape shape, BoxRule rule, T spatial_scale, const int32_t* recorded,
                            S* output, int32_t* pixels) {
  using Block = DeviceBlock<Tune::kThreads>;
  __shared__ gs::RoiPoolShared<T> shared;
  Block block{nullptr};  // never compacts
  const int64_t blocks = gs::roi_pool_blocks<Tune>(shape);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    gs::roi_pool_block<Tune, Block, S, Layout>(block, shared, input, rois, shape, rule,
                                               spatial_scale, recorded, b, output, pixels);
  }
}

// Enqueues the RoI buckets (gpu_schedule.h, part 1) into `workspace`, of
// gs::workspace_elements<Tune>(shape, backward) int32s.
template <typename Tune, typename T>
cudaError_t launch_buckets(cudaStream_t stream, const T* rois, const CallShape& shape,
                           const BoxRule& rule, T spatial_scale, int64_t sampling_ratio,
                           int32_t* workspace, bool backward, gs::Workspace* views) {
  constexpr int kThreads = Tune::kThreads;
  *views = gs::workspace_views<Tune>(workspace, shape, backward);
  if (shape.num_rois > 0) {
    roi_info_kernel<Tune, T>
        <<<grid_for((shape.num_rois + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
            rois, shape, rule, spatial_scale, sampling_ratio, backward, *views);
  }
  const int64_t blocks = gs::buckets_of<Tune>(shape, backward) * gs::segments_of(shape);
  segment_kernel<Tune, false><<<grid_for(blocks), kThreads, 0, stream>>>(shape, *views, backward);
  start_kernel<Tune><<<1, kThreads, 0, stream>>>(shape, *views, backward);
  segment_kernel<Tune, true><<<grid_for(blocks), kThreads, 0, stream>>>(shape, *views, backward);
  return cudaGetLastError();
}

template <typename S, typename Layout, typename Tune = DefaultTuning, typename T = ComputeType<S>>
cudaError_t launch_forward(cudaStream_t stream, const S* input, const T* rois,
                           const CallShape& shape, const BoxRule& rule, T spatial_scale,
                           int64_t sampling_ratio, int32_t* workspace, bool skip_empty_rois,
                           S* output) {
  if (shape.outputs() == 0) return cudaSuccess;
  gs::Workspace views;
  cudaError_t err = launch_buckets<Tune>(stream, rois, shape, rule, spatial_scale, sampling_ratio,
                                         workspace, /*backward=*/false, &views);
  if (err != cudaSuccess) return err;
  const int blocks = grid_for(gs::forward_blocks<Tune, Layout>(shape));
  if (gs::pixel_sums(sampling_ratio)) {
    if constexpr (!Tune::kLargeGrids) return cudaErrorNotSupported;
    forward_kernel<Tune, S, Layout, Tune::kLargeGrids><<<blocks, Tune::kThreads, 0, stream>>>(
        input, shape, rule, sampling_ratio, views, skip_empty_rois, output);
  } else {
    forward_kernel<Tune, S, Layout, false><<<blocks, Tune::kThreads, 0, stream>>>(
        input, shape, rule, sampling_ratio, views, skip_empty_rois, output);
  }
  return cudaGetLastError();
}

template <typename S, typename Layout, typename Tune = DefaultTuning, typename T = ComputeType<S>>
cudaError_t launch_roi_pool_forward(cudaStream_t stream, const S* input, const T* rois,
                                    const CallShape& shape, const BoxRule& rule, T spatial_scale,
                                    const int32_t* recorded, S* output, int32_t* pixels) {
  if (shape.outputs() == 0) return cudaSuccess;
  roi_pool_forward_kernel<Tune, S, Layout>
      <<<grid_for(gs::roi_pool_blocks<Tune>(shape)), Tune::kThreads, 0, stream>>>(
          input, rois, shape, rule, spatial_scale, recorded, output, pixels);
  return cudaGetLastError();
}

// `sums` is the gradient when S is its own compute type, else the float32
// accumulator of a 16-bit gradient; `term` what each covering entry adds.
template <typename S, typename Layout, typename Tune = DefaultTuning, typename Term,
          typename T = ComputeType<S>>
cudaError_t launch_backward(cudaStream_t stream, const Term& term, const T* rois,
                            const CallShape& shape, const BoxRule& rule, T spatial_scale,
                            int64_t sampling_ratio, int32_t* workspace, T* sums, S* grad) {
  if (shape.feature_elements() == 0) return cudaSuccess;
  gs::Workspace views;
  cudaError_t err = launch_buckets<Tune>(stream, rois, shape, rule, spatial_scale, sampling_ratio,
                                         workspace, /*backward=*/true, &views);
  if (err != cudaSuccess) return err;
  const int blocks = grid_for(gs::BackwardTiling<Tune>::of(shape).blocks(shape));
  if (gs::pixel_sums(sampling_ratio)) {
    if constexpr (!Tune::kLargeGrids) return cudaErrorNotSupported;
    backward_kernel<Tune, S, Layout, Tune::kLargeGrids><<<blocks, Tune::kThreads, 0, stream>>>(
        term, shape, rule, sampling_ratio, views, sums, grad);
  } else {
    backward_kernel<Tune, S, Layout, false><<<blocks, Tune::kThreads, 0, stream>>>(
        term, shape, rule, sampling_ratio, views, sums, grad);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace jax_psroi

#endif  // JAX_PSROI_CUDA_KERNELS_CUH_
