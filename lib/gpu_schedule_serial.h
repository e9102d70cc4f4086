// The CUDA kernels' schedule (gpu_schedule.h) run serially on the host,
// block after block, each block's steps over all its threads in turn: what
// the barriers of a thread block guarantee on the GPU. The CPU tests' FFI
// handlers (lib/testing/gpu_schedule_handlers.cc) run it with DefaultTuning; the
// GPU driver (benchmarks/gpu_driver.cu) runs it with each tuning it times,
// so every index, ownership rule and summation order of a variant is
// checked on a machine without a GPU. No XLA types.
#ifndef JAX_PSROI_GPU_SCHEDULE_SERIAL_H_
#define JAX_PSROI_GPU_SCHEDULE_SERIAL_H_

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "gpu_schedule.h"
#include "roi_math.h"

namespace jax_psroi {
namespace gpu_schedule {

// A thread block of `threads` threads as a serial loop (host and device
// qualified like the schedule that calls it; it only ever runs on the host).
struct SerialBlock {
  int64_t threads;

  template <typename F>
  PSROI_HD void each(int64_t n, F f) {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  template <typename F>
  PSROI_HD int64_t sum(int64_t n, F f) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += f(i);
    return total;
  }
  template <typename F, typename G>
  PSROI_HD int64_t scan(int64_t n, F f, int64_t base, G g) {
    int64_t at = base;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t value = f(i);
      g(i, at);
      at += value;
    }
    return at - base;
  }
  template <typename P, typename F>
  PSROI_HD int64_t compact(int64_t n, P pred, int64_t base, int64_t limit, F f) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += pred(i) ? 1 : 0;
    if (base + total > limit) return total;
    int64_t at = base;
    for (int64_t i = 0; i < n; ++i) {
      if (pred(i)) f(i, at++);
    }
    return total;
  }
  template <typename F>
  PSROI_HD void single(F f) {
    f();
  }
};

// The bucket kernels, as the launchers run them, into `storage`.
template <typename Tune, typename T>
Workspace serial_buckets(std::vector<int32_t>& storage, const T* rois, const CallShape& shape,
                         const BoxRule& rule, T spatial_scale, int64_t sampling_ratio,
                         bool backward) {
  storage.assign(workspace_elements<Tune>(shape, backward), 0);
  const Workspace views = workspace_views<Tune>(storage.data(), shape, backward);
  for (int64_t k = 0; k < shape.num_rois; ++k) {
    roi_info<Tune>(rois, shape, rule, spatial_scale, sampling_ratio, k, backward, views);
  }
  SerialBlock block{Tune::kThreads};
  const int64_t blocks = buckets_of<Tune>(shape, backward) * segments_of(shape);
  for (int64_t b = 0; b < blocks; ++b) count_block<Tune>(block, shape, views, backward, b);
  start_block<Tune>(block, shape, views, backward);
  for (int64_t b = 0; b < blocks; ++b) place_block<Tune>(block, shape, views, backward, b);
  return views;
}

// The forward of the averaging operators: buckets, then every block.
template <typename Tune, typename S, typename Layout, typename T = ComputeType<S>>
void serial_forward(const S* input, const T* rois, const CallShape& shape, const BoxRule& rule,
                    T spatial_scale, int64_t sampling_ratio, bool skip_empty_rois, S* output) {
  std::vector<int32_t> storage;
  const Workspace views =
      serial_buckets<Tune>(storage, rois, shape, rule, spatial_scale, sampling_ratio, false);
  SerialBlock block{Tune::kThreads};
  ForwardShared<Tune, T> shared;
  for (int64_t b = 0; b < forward_blocks<Tune, Layout>(shape); ++b) {
    if (pixel_sums(sampling_ratio)) {
      forward_block<Tune, SerialBlock, S, Layout, true>(block, shared, input, shape, rule,
                                                        sampling_ratio, views, b,
                                                        skip_empty_rois, output);
    } else {
      forward_block<Tune, SerialBlock, S, Layout, false>(block, shared, input, shape, rule,
                                                         sampling_ratio, views, b,
                                                         skip_empty_rois, output);
    }
  }
}

// Every backward block, in turn, adding `term`s. A 16-bit gradient carries
// its partial sums in a float32 accumulator, as on the GPU (where it is the
// call's further result).
template <typename Tune, typename S, typename Layout, typename Term, typename T = ComputeType<S>>
void serial_backward(const Term& term, const T* rois, const CallShape& shape, const BoxRule& rule,
                     T spatial_scale, int64_t sampling_ratio, S* grad) {
  std::vector<int32_t> storage;
  const Workspace views =
      serial_buckets<Tune>(storage, rois, shape, rule, spatial_scale, sampling_ratio, true);
  std::vector<T> accumulator;
  T* sums;
  if constexpr (std::is_same_v<S, T>) {
    sums = grad;
  } else {
    accumulator.assign(shape.feature_elements(), T(0));
    sums = accumulator.data();
  }
  SerialBlock block{Tune::kThreads};
  auto shared = std::make_unique<BackwardShared<Tune, T>>();
  const int64_t blocks = BackwardTiling<Tune>::of(shape).blocks(shape);
  for (int64_t b = 0; b < blocks; ++b) {
    if (pixel_sums(sampling_ratio)) {
      backward_block<Tune, SerialBlock, S, Layout, true>(block, *shared, term, shape, rule,
                                                         sampling_ratio, views, b, sums, grad);
    } else {
      backward_block<Tune, SerialBlock, S, Layout, false>(block, *shared, term, shape, rule,
                                                          sampling_ratio, views, b, sums, grad);
    }
  }
}

// RoI Pool's forward (or, with `recorded`, its tangent).
template <typename Tune, typename S, typename Layout, typename T = ComputeType<S>>
void serial_roi_pool_forward(const S* input, const T* rois, const CallShape& shape,
                             const BoxRule& rule, T spatial_scale, const int32_t* recorded,
                             S* output, int32_t* pixels) {
  SerialBlock block{Tune::kThreads};
  RoiPoolShared<T> shared;
  for (int64_t b = 0; b < roi_pool_blocks<Tune>(shape); ++b) {
    roi_pool_block<Tune, SerialBlock, S, Layout>(block, shared, input, rois, shape, rule,
                                                 spatial_scale, recorded, b, output, pixels);
  }
}

}  // namespace gpu_schedule
}  // namespace jax_psroi

#endif  // JAX_PSROI_GPU_SCHEDULE_SERIAL_H_
