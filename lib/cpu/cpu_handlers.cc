// XLA FFI handlers for the CPU: decode buffers, check shapes, and split the
// work over XLA's intra-op thread pool. Errors are returned, never thrown.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include <sys/mman.h>

#include "cpu/psroi_cpu_kernels.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

// Runs body(begin, end) over [0, total) in chunks_per_thread chunks per pool
// thread and
// returns a future that completes when the last chunk is done. Small calls
// run inline: scheduling costs more than they do.
template <typename Body>
ffi::Future run_chunked(ffi::ThreadPool& pool, int64_t total,
                        int64_t work_per_item, Body body,
                        int64_t chunks_per_thread = 4) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  constexpr int64_t kInlineWork = int64_t{1} << 15;
  const int64_t chunks = std::min<int64_t>(total, threads * chunks_per_thread);
  if (chunks <= 1 || total * work_per_item < kInlineWork) {
    body(0, total);
    ffi::Promise done;
    ffi::Future future(done);
    done.SetAvailable();
    return future;
  }
  ffi::CountDownPromise remaining(chunks);
  ffi::Future future(remaining);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = total * chunk / chunks;
    const int64_t end = total * (chunk + 1) / chunks;
    pool.Schedule([body, begin, end, remaining]() mutable {
      body(begin, end);
      remaining.CountDown();
    });
  }
  return future;
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
  return run_chunked(pool, d.num_rois, d.channels_out * d.bins() * 16,
                     [=](int64_t begin, int64_t end) {
                       forward_rois(in, boxes, d, scale, sampling_ratio,
                                    order->data(), begin, end, out);
                     });
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
  auto order = std::make_shared<const std::vector<int64_t>>(
      locality_order(boxes, d, scale, sampling_ratio));
  // Tasks split the output channels; each one computes every RoI's geometry
  // again, so there are only as many as threads.
  return run_chunked(
      pool, d.channels_out, (d.num_rois + d.num_images * d.plane_size()) * d.bins() * 16,
      [=](int64_t begin, int64_t end) {
        backward_channels(cot, boxes, d, scale, sampling_ratio, order->data(),
                          begin, end, grad);
      }, /*chunks_per_thread=*/1);
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
