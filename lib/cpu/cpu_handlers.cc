// XLA FFI handlers for the CPU: decode buffers, check shapes, and split the
// work over XLA's intra-op thread pool. Errors are returned, never thrown.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include <sys/mman.h>

#include "cpu/psroi_cpu_kernels.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

ffi::Future ready() {
  ffi::Promise done;
  ffi::Future future(done);
  done.SetAvailable();
  return future;
}

// Calls doing less work than this (in multiply-adds, roughly) run inline:
// scheduling would cost more than it saves.
constexpr int64_t kInlineWork = int64_t{1} << 15;

// One phase of a call: `items` calls of run(i), in any order, on any thread.
struct Phase {
  int64_t items;
  std::function<void(int64_t)> run;
};

// Runs the phases in order on one pool task per thread, which claim items
// as they go; a phase starts once every item of the previous one is done. A
// task that runs out of items waits only for items that other tasks are
// running right now, never for queued ones, so it cannot deadlock however
// busy the pool is. All scheduling happens before the handler returns, while its
// context is valid. Calls doing less than kInlineWork, or with one thread,
// run inline.
ffi::Future run_phases(ffi::ThreadPool& pool, int64_t work,
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

// Phase items over RoIs: 4 ranges per thread.
Phase over_rois(ffi::ThreadPool& pool, int64_t num_rois,
                std::function<void(int64_t, int64_t)> body) {
  const int64_t ranges = std::min<int64_t>(
      num_rois, 4 * std::max<int64_t>(1, pool.num_threads()));
  return Phase{ranges, [=](int64_t i) {
                 body(num_rois * i / ranges, num_rois * (i + 1) / ranges);
               }};
}

// Asks the kernel to back the 2 MiB-aligned interior of a large output buffer
// with transparent huge pages. glibc serves allocations of 32 MiB and more
// with a fresh mmap every time, so a call that writes such a result pays a
// page fault per 4 KiB page on first touch: 10 of the 17 ms of the R-FCN
// class-map backward (38 MB gradient) went to faults, 3.6 ms with huge pages.
// Smaller buffers are reused from the heap without faults and are left
// alone. The buffer is written whole, so no memory is wasted; where THP is
// disabled the call fails harmlessly and is ignored.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(MADV_HUGEPAGE)
  constexpr size_t kFreshMmapBytes = size_t{32} << 20;
  if (bytes < kFreshMmapBytes) return;
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

ffi::Future ready_with(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

// The shared state of a backward call: every RoI's tables, its RoIs by
// image, its work units and the cotangent bin-major. Built by the handler,
// filled by the phases.
template <typename T>
struct BackwardState {
  explicit BackwardState(const PsRoiDims& d)
      : tables(d),
        units(d, unit_channel_chunk(d, sizeof(T))),
        // Every element is written before it is read: no zero fill.
        bin_major(new T[static_cast<size_t>(d.outputs())]) {}
  RoiTables<T> tables;
  RoisByImage by_image;
  Units units;
  std::unique_ptr<T[]> bin_major;
};

// Work of a call, in multiply-adds roughly: RoIs times outputs, plus planes.
int64_t call_work(const PsRoiDims& d) {
  return (d.num_rois + d.num_images * d.plane_size()) * d.channels_out * d.bins();
}

template <ffi::DataType dtype>
ffi::Future forward(ffi::ThreadPool pool, ffi::Buffer<dtype, 4> input,
                    ffi::Buffer<dtype, 2> rois,
                    ffi::ResultBuffer<dtype, 4> output, double spatial_scale,
                    int64_t sampling_ratio) {
  using T = ffi::NativeType<dtype>;
  ffi::ErrorOr<PsRoiDims> dims =
      call_dims(input.dimensions(), rois.dimensions(), output->dimensions());
  if (dims.has_error()) return ready_with(dims.error());
  const PsRoiDims d = dims.value();
  const T* in = input.typed_data();
  const T* boxes = rois.typed_data();
  T* out = output->typed_data();
  const T scale = static_cast<T>(spatial_scale);
  auto order = std::make_shared<const std::vector<int64_t>>(
      locality_order(boxes, d, scale, sampling_ratio));
  return run_phases(pool, d.num_rois * d.channels_out * d.bins() * 16,
                    {over_rois(pool, d.num_rois, [=](int64_t begin, int64_t end) {
                      forward_rois(in, boxes, d, scale, sampling_ratio,
                                   order->data(), begin, end, out);
                    })});
}

template <ffi::DataType dtype>
ffi::Future backward(ffi::ThreadPool pool, ffi::Buffer<dtype, 4> cotangent,
                     ffi::Buffer<dtype, 2> rois,
                     ffi::ResultBuffer<dtype, 4> grad_input,
                     double spatial_scale, int64_t sampling_ratio) {
  using T = ffi::NativeType<dtype>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions());
  if (dims.has_error()) return ready_with(dims.error());
  const PsRoiDims d = dims.value();
  const T* cot = cotangent.typed_data();
  const T* boxes = rois.typed_data();
  T* grad = grad_input->typed_data();
  advise_huge_pages(grad, grad_input->size_bytes());
  const T scale = static_cast<T>(spatial_scale);
  auto state = std::make_shared<BackwardState<T>>(d);
  // Every RoI's windows and its cotangent bin-major (by RoI); the RoIs of
  // each image (one item); then the gradient (by unit).
  return run_phases(
      pool, call_work(d),
      {over_rois(pool, d.num_rois,
                 [=](int64_t begin, int64_t end) {
                   RoiWeights<T> weights(d);
                   state->tables.compute(boxes, scale, sampling_ratio, begin, end, &weights);
                   to_bin_major(cot, d, begin, end, state->bin_major.get());
                 }),
       Phase{1, [=](int64_t) { state->by_image = rois_by_image(state->tables, d); }},
       Phase{state->units.count(), [=](int64_t unit) {
               backward_unit(state->bin_major.get(), d, state->tables,
                             state->by_image, state->units, unit, grad);
             }}});
}

template <ffi::DataType dtype>
ffi::Error forward_elementwise_handler(ffi::Buffer<dtype, 4> input,
                                       ffi::Buffer<dtype, 2> rois,
                                       ffi::ResultBuffer<dtype, 4> output,
                                       double spatial_scale,
                                       int64_t sampling_ratio) {
  using T = ffi::NativeType<dtype>;
  ffi::ErrorOr<PsRoiDims> dims =
      call_dims(input.dimensions(), rois.dimensions(), output->dimensions());
  if (dims.has_error()) return dims.error();
  forward_elementwise(input.typed_data(), rois.typed_data(), dims.value(),
                      static_cast<T>(spatial_scale), sampling_ratio,
                      output->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType dtype>
ffi::Error backward_elementwise_handler(ffi::Buffer<dtype, 4> cotangent,
                                        ffi::Buffer<dtype, 2> rois,
                                        ffi::ResultBuffer<dtype, 4> grad_input,
                                        double spatial_scale,
                                        int64_t sampling_ratio) {
  using T = ffi::NativeType<dtype>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions());
  if (dims.has_error()) return dims.error();
  backward_elementwise(cotangent.typed_data(), rois.typed_data(), dims.value(),
                       static_cast<T>(spatial_scale), sampling_ratio,
                       grad_input->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cpu
}  // namespace jax_psroi

namespace ffi = ::xla::ffi;

#define JAX_PSROI_DEFINE_CPU_HANDLERS(suffix, dtype)                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      JaxPsroiForwardCpu##suffix, jax_psroi::cpu::forward<dtype>,            \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JAX_PSROI_BIND_ARGS(dtype));   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      JaxPsroiBackwardCpu##suffix, jax_psroi::cpu::backward<dtype>,          \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JAX_PSROI_BIND_ARGS(dtype));   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      JaxPsroiForwardElementwiseCpu##suffix,                                 \
      jax_psroi::cpu::forward_elementwise_handler<dtype>,                    \
      ffi::Ffi::Bind() JAX_PSROI_BIND_ARGS(dtype));                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      JaxPsroiBackwardElementwiseCpu##suffix,                                \
      jax_psroi::cpu::backward_elementwise_handler<dtype>,                   \
      ffi::Ffi::Bind() JAX_PSROI_BIND_ARGS(dtype));

JAX_PSROI_DEFINE_CPU_HANDLERS(F32, ffi::F32)
JAX_PSROI_DEFINE_CPU_HANDLERS(F64, ffi::F64)
