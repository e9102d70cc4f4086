// XLA FFI handlers of deformable RoI Align on the CPU (deformable_ffi.h),
// on XLA's intra-op thread pool (parallel.h). The forward applies the CPU
// kernels' tables bin by bin (a deformable bin is its own slot of one bin
// row and one bin column: RoiWeights::add_bins), so that an offset of 0
// gives exactly roi_align's and ps_roi_align's CPU forward; the backward
// runs deformable.h's units, bands of rows of one image with every channel.
#include <cstdint>
#include <vector>

#include "cpu/average_kernels.h"
#include "cpu/parallel.h"
#include "deformable.h"
#include "deformable_ffi.h"
#include "ffi_common.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

// Pooled outputs of RoIs [begin, end): each bin's window from its own table.
template <typename S, typename Layout, typename T = ComputeType<S>>
void deform_forward_rois(const deform::DeformCall<S>& call, int64_t begin, int64_t end,
                         S* output) {
  const CallShape& shape = call.shape;
  const Layout layout = Layout::of(shape);
  const int64_t out_stride = Layout::pooled_channel_stride(shape);
  std::vector<T> scratch(static_cast<size_t>(shape.channels_out));
  RoiWeights<T> weights(shape);
  for (int64_t roi = begin; roi < end; ++roi) {
    for (int64_t ph = 0; ph < shape.pooled_h; ++ph) {
      for (int64_t pw = 0; pw < shape.pooled_w; ++pw) {
        const int64_t bin = ph * shape.pooled_w + pw;
        S* out_bin = output + Layout::pooled_offset(shape, roi, 0, bin);
        const RoiGeometry<T> geometry = deform::bin_geometry(call, roi, ph, pw);
        Window<T> w;
        weights.clear();
        if (geometry.empty() ||
            !weights.window(weights.add_bins(geometry, AxisSpan{ph, ph}, AxisSpan{pw, pw}), ph,
                            pw, &w)) {
          for (int64_t c = 0; c < shape.channels_out; ++c) {
            out_bin[c * out_stride] = Storage<S>::store(T(0));
          }
          continue;
        }
        const S* first_pixel = call.operand +
                               layout.plane_offset(geometry.image, shape.first_channel(bin)) +
                               layout.pixel_offset(w.first_row, w.first_col);
        gather_bin(layout, shape, w, first_pixel, geometry.divisor(ph, pw, shape), out_bin,
                   out_stride, scratch.data());
      }
    }
  }
}

// Output channels of a bin whose cotangent shares a backward unit holds at
// once (deform::backward_unit).
constexpr int kBackwardChannels = 8;

template <typename Operation, bool kForward, typename Layout, typename S>
struct DeformHandler {
  static ffi::Future run(ffi::ThreadPool pool, ffi::ErrorOr<deform::DeformCall<S>> checked,
                         deform::ResultBuffer<S, kForward> result) {
    using T = ComputeType<S>;
    if (checked.has_error()) return ready_with(checked.error());
    const deform::DeformCall<S> call = *checked;
    const CallShape& shape = call.shape;
    if constexpr (kForward) {
      S* output = data<S>(result);
      return run_phases(pool, call_work(shape, Direction::kForward),
                        {over_rois(pool, shape.num_rois, [=](int64_t begin, int64_t end) {
                          deform_forward_rois<S, Layout>(call, begin, end, output);
                        })});
    } else {
      T* grad = result.typed_data();
      const int64_t bands = deform::bands_of(shape);
      const Phase units = deform::with_pixel_sums(call.sampling_ratio, [&](auto pixel_sums) {
        return Phase{shape.num_images * bands, [=](int64_t unit) {
                       deform::backward_unit<S, Layout, decltype(pixel_sums)::value,
                                             kBackwardChannels>(call, grad, unit / bands, 0,
                                                                shape.channels, unit % bands);
                     }};
      });
      return run_phases(pool, call_work(shape, Direction::kBackward), {units});
    }
  }

  static auto make() {
    return deform::bind_handler<Operation, Layout, S, kForward, ffi::ThreadPool>(
        ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(), run);
  }
};

}  // namespace
}  // namespace cpu

std::vector<FfiTarget> cpu_deform_targets() {
  return deform::targets<cpu::DeformHandler>("jax_psroi_");
}

}  // namespace jax_psroi
