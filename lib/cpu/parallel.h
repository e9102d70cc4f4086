// How a CPU call's work is split over XLA's intra-op thread pool: the work
// estimate that decides whether a call is worth splitting, and the scheduler
// that runs a call as a list of phases of independent items.
#ifndef JAX_PSROI_CPU_PARALLEL_H_
#define JAX_PSROI_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "kernel_table.h"
#include "roi_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {

namespace ffi = ::xla::ffi;

// Rough work of a call, in multiply-adds: every pooled element (an output, or
// a cotangent element) applies a bin window of about kWindowTaps pixels, and
// the backward also writes every gradient element once.
constexpr int64_t kWindowTaps = 16;

inline int64_t call_work(const CallShape& shape, Direction direction) {
  const int64_t windows = shape.outputs() * kWindowTaps;
  if (direction == Direction::kForward) return windows;
  return windows + shape.num_images * shape.channels * shape.plane_size();
}

// Calls doing less work than this run inline: scheduling would cost more
// than it saves.
constexpr int64_t kInlineWork = int64_t{1} << 15;

inline ffi::Future ready() {
  ffi::Promise done;
  ffi::Future future(done);
  done.SetAvailable();
  return future;
}

inline ffi::Future ready_with(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

// One phase of a call: `items` calls of run(i), in any order, on any thread.
struct Phase {
  int64_t items;
  std::function<void(int64_t)> run;
};

// Runs the phases in order on one pool task per thread, which claim items
// as they go; a phase starts once every item of the previous one is done. A
// task that runs out of items waits only for items that other tasks are
// running right now, never for queued ones, so it cannot deadlock however
// busy the pool is. All scheduling happens before the handler returns, while
// its context is valid. Calls doing less than kInlineWork, or with one
// thread, run inline.
inline ffi::Future run_phases(ffi::ThreadPool& pool, int64_t work,
                              std::vector<Phase> phases) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || work < kInlineWork) {
    for (const Phase& phase : phases) {
      for (int64_t i = 0; i < phase.items; ++i) phase.run(i);
    }
    return ready();
  }
  struct Progress {
    explicit Progress(std::vector<Phase> p)
        : phases(std::move(p)), next(phases.size()), done(phases.size()) {}
    std::vector<Phase> phases;
    std::vector<std::atomic<int64_t>> next, done;
  };
  auto progress = std::make_shared<Progress>(std::move(phases));
  ffi::CountDownPromise remaining(threads);
  ffi::Future future(remaining);
  auto task = [progress, remaining]() mutable {
    Progress& p = *progress;
    for (size_t phase = 0; phase < p.phases.size(); ++phase) {
      const int64_t items = p.phases[phase].items;
      for (int64_t i; (i = p.next[phase].fetch_add(1)) < items;) {
        p.phases[phase].run(i);
        p.done[phase].fetch_add(1, std::memory_order_release);
      }
      while (p.done[phase].load(std::memory_order_acquire) < items) {
        std::this_thread::yield();
      }
    }
    remaining.CountDown();
  };
  for (int64_t t = 0; t < threads; ++t) {
    auto copy = task;
    pool.Schedule(std::move(copy));
  }
  return future;
}

// A phase over RoIs [0, num_rois): body(begin, end) on 4 ranges per thread.
inline Phase over_rois(ffi::ThreadPool& pool, int64_t num_rois,
                       std::function<void(int64_t, int64_t)> body) {
  const int64_t ranges = std::min<int64_t>(
      num_rois, 4 * std::max<int64_t>(1, pool.num_threads()));
  return Phase{ranges, [=](int64_t i) {
                 body(num_rois * i / ranges, num_rois * (i + 1) / ranges);
               }};
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_PARALLEL_H_
