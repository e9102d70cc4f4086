// Test-only FFI handlers: deformable RoI Align's CUDA kernels
// (lib/cuda/deformable_handlers.cu) run serially on the CPU, the forward
// element by element and the backward unit by unit (one image's input
// channel and band of rows), as the CUDA threads run them, so that the CPU
// tests check the code the GPU runs. Targets
// jax_psroi_testing_deform_<operation>_<direction>_<layout>_<dtype>, in the
// testing module only (JAX_PSROI_TESTING).
#include <cstdint>
#include <vector>

#include "deformable.h"
#include "deformable_ffi.h"
#include "ffi_common.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

template <typename Operation, bool kForward, typename Layout, typename S>
struct SerialDeformHandler {
  // Bound with XLA's thread pool like the CPU's handler (bind_handler
  // takes a context), which the serial rig leaves unused.
  static ffi::Error run(ffi::ThreadPool, ffi::ErrorOr<deform::DeformCall<S>> call,
                        deform::ResultBuffer<S, kForward> result) {
    if (call.has_error()) return call.error();
    const CallShape& shape = call->shape;
    // The kernels the CUDA handler picks for the call's kind of grid.
    deform::with_pixel_sums(call->sampling_ratio, [&](auto pixel_sums) {
      constexpr bool kPixelSums = decltype(pixel_sums)::value;
      if constexpr (kForward) {
        S* output = data<S>(result);
        for (int64_t index = 0; index < shape.outputs(); ++index) {
          output[index] = deform::forward_element<S, Layout, kPixelSums>(*call, index);
        }
      } else {
        const int64_t bands = deform::bands_of(shape);
        for (int64_t image = 0; image < shape.num_images; ++image) {
          for (int64_t band = 0; band < bands; ++band) {
            for (int64_t channel = 0; channel < shape.channels; ++channel) {
              deform::backward_unit<S, Layout, kPixelSums, 1>(*call, result.typed_data(), image,
                                                              channel, channel + 1, band);
            }
          }
        }
      }
    });
    return ffi::Error::Success();
  }

  static auto make() {
    return deform::bind_handler<Operation, Layout, S, kForward, ffi::ThreadPool>(
        ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(), run);
  }
};

}  // namespace
}  // namespace cpu

std::vector<FfiTarget> deform_schedule_testing_targets() {
  return deform::targets<cpu::SerialDeformHandler>("jax_psroi_testing_");
}

}  // namespace jax_psroi
