// Test-only FFI handlers: the CUDA kernels' schedule (gpu_schedule.h) run
// serially on the CPU, block after block, each block's steps over all its
// threads in turn, so that the CPU tests check the indexing, ownership and
// ordering the GPU runs. Built into the testing module only
// (JAX_PSROI_TESTING), under their own target prefix.
#include <cstdint>

#include "ffi_common.h"
#include "ffi_handlers.h"
#include "gpu_schedule.h"
#include "gpu_schedule_serial.h"
#include "kernel_table.h"
#include "roi_math.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

namespace gs = gpu_schedule;

using Tune = gs::DefaultTuning;

template <typename Layout, typename S>
ffi::Error average_forward(const ForwardCall<S>& call) {
  gs::serial_forward<Tune, S, Layout>(call.input, call.rois, call.shape, call.rule,
                                      call.spatial_scale, call.sampling_ratio, call.skip_empty_rois,
                                      call.output);
  return ffi::Error::Success();
}

template <typename Layout, typename S>
ffi::Error average_backward(const BackwardCall<S>& call) {
  gs::serial_backward<Tune, S, Layout>(gs::WeightedCotangent<S, Layout>{call.cotangent, call.shape},
                                       call.rois, call.shape, call.rule, call.spatial_scale,
                                       call.sampling_ratio, call.grad);
  return ffi::Error::Success();
}

template <typename Layout, typename S>
ffi::Error max_forward(const ForwardCall<S>& call) {
  gs::serial_roi_pool_forward<Tune, S, Layout>(call.input, call.rois, call.shape, call.rule,
                                               call.spatial_scale, call.recorded, call.output,
                                               call.pixels);
  return ffi::Error::Success();
}

template <typename Layout, typename S>
ffi::Error max_backward(const BackwardCall<S>& call) {
  gs::serial_backward<Tune, S, Layout>(
      gs::CotangentAtMaximum<S, Layout>{call.cotangent, call.pixels, call.shape}, call.rois,
      call.shape, call.rule, call.spatial_scale, 0, call.grad);
  return ffi::Error::Success();
}

}  // namespace

// The schedule's platform (ffi_handlers.h): the CPU's context, which it
// does not use (it runs serially), and plain errors.
struct Scheduled {
  using Context = ffi::ThreadPool;
  using Result = ffi::Error;
  static constexpr bool kCommandBuffer = false;
  static auto bind() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); }
  static ffi::Error fail(ffi::Error error) { return error; }
  template <typename Layout, typename S>
  static ffi::Error average_forward(ffi::ThreadPool, const ForwardCall<S>& call) {
    return cpu::average_forward<Layout>(call);
  }
  template <typename Layout, typename S>
  static ffi::Error average_backward(ffi::ThreadPool, const BackwardCall<S>& call) {
    return cpu::average_backward<Layout>(call);
  }
  template <typename Layout, typename S>
  static ffi::Error max_forward(ffi::ThreadPool, const ForwardCall<S>& call) {
    return cpu::max_forward<Layout>(call);
  }
  template <typename Layout, typename S>
  static ffi::Error max_backward(ffi::ThreadPool, const BackwardCall<S>& call) {
    return cpu::max_backward<Layout>(call);
  }
};

}  // namespace cpu

std::vector<FfiTarget> gpu_schedule_testing_targets() {
  return ffi_targets<PlatformHandler<cpu::Scheduled>::Row>("jax_psroi_testing_gpu_schedule_");
}

}  // namespace jax_psroi
