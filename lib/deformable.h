// Deformable RoI Align (Dai et al., "Deformable Convolutional Networks",
// 2017; mmcv's deform_roi_pool) and its position-sensitive form: RoI Align
// (aligned: -0.5 pixel, no size clamp) or PS-RoI Align whose every bin
// (ph, pw) starts where the plain operator's does, moved by
//
//     gamma * size_w * offset[k, 0, ph, pw]   along x,
//     gamma * size_h * offset[k, 1, ph, pw]   along y,
//
// size the RoI's extent on the map (end - start, as roi_box computes it).
// Every sample, weight, border rule and divisor is roi_math.h's, so an
// offset of 0 gives the plain operator's sampling exactly. The derivative
// directions (BoxRule::derivative) differentiate with respect to a bin's x
// or y start or its RoI's bin size: an offset's derivative is its bin's
// start derivative scaled (jax_psroi/_deformable.py composes them).
//
// What runs where, written once for the host and the device:
//   * forward_element: one pooled element from the bin's samples
//     (pooled_values, the CUDA forward's sum): the CUDA forward, a thread
//     per element, and the test rig's copy of it. The CPU forward applies
//     the CPU kernels' tables instead (lib/cpu/deformable_handlers.cc),
//     which roi_align's and ps_roi_align's CPU forward apply.
//   * backward_unit: the gradient (in the compute type) of one image's
//     input channels [first, end) on one band of rows, zeroed, then the
//     contributions of the image's RoIs added in the order RoI, bin, row
//     tap, column tap. That order is the same however the gradient is cut
//     into units (the CPU: bands of rows with every channel; CUDA: a
//     thread per channel and band), so the result is bitwise the same on
//     every device and thread count, without atomics.
#ifndef JAX_PSROI_DEFORMABLE_H_
#define JAX_PSROI_DEFORMABLE_H_

#include <cstdint>
#include <type_traits>

#include "roi_math.h"
#include "storage_types.h"

namespace jax_psroi {
namespace deform {

// One call: its operand (features forward, the pooled cotangent backward),
// RoIs [K, 5] and offsets [K, 2, PH, PW] (x, then y) in the compute type T,
// and the settings of its kernel-table row.
template <typename S>
struct DeformCall {
  using T = ComputeType<S>;
  const S* operand;
  const T* rois;
  const T* offset;
  CallShape shape;
  BoxRule rule;
  T spatial_scale;
  int64_t sampling_ratio;
  T gamma;
};

// The sampling geometry of bin (ph, pw) of RoI `roi`: the RoI's
// (roi_geometry) with both starts moved by the bin's offset. A start that
// is not finite after the move (a NaN or huge offset) reads nothing.
template <typename S, typename T = ComputeType<S>>
PSROI_HD RoiGeometry<T> bin_geometry(const DeformCall<S>& call, int64_t roi, int64_t ph,
                                     int64_t pw) {
  const CallShape& shape = call.shape;
  RoiGeometry<T> geometry =
      roi_geometry(call.rois, roi, shape, call.rule, call.spatial_scale, call.sampling_ratio);
  if (geometry.image < 0) return geometry;
  // The extent as roi_box computes it (start and end shifted alike).
  const T* box = call.rois + 5 * roi;
  const T shift = static_cast<T>(call.rule.aligned ? 0.5 : 0.0);
  const T size_w = (box[3] * call.spatial_scale - shift) - (box[1] * call.spatial_scale - shift);
  const T size_h = (box[4] * call.spatial_scale - shift) - (box[2] * call.spatial_scale - shift);
  const T* bin_offset = call.offset + roi * 2 * shape.bins() + ph * shape.pooled_w + pw;
  geometry.x.start += call.gamma * size_w * bin_offset[0];
  geometry.y.start += call.gamma * size_h * bin_offset[shape.bins()];
  if (!is_finite(geometry.x.start) || !is_finite(geometry.y.start)) geometry.image = -1;
  return geometry;
}

// Pooled element `index` (in the pooled tensor's `Layout` order) of a
// forward call: its bin's average as the CUDA forward sums it.
// kPixelSums: as pooled_values (the callers pass pixel_sums(sampling_ratio)).
template <typename S, typename Layout, bool kPixelSums, typename T = ComputeType<S>>
PSROI_HD S forward_element(const DeformCall<S>& call, int64_t index) {
  const CallShape& shape = call.shape;
  int64_t roi, c_out, bin;
  if (Layout::kChannelsLast) {
    c_out = index % shape.channels_out;
    bin = index / shape.channels_out % shape.bins();
    roi = index / shape.channels_out / shape.bins();
  } else {
    bin = index % shape.bins();
    c_out = index / shape.bins() % shape.channels_out;
    roi = index / shape.bins() / shape.channels_out;
  }
  const int64_t ph = bin / shape.pooled_w, pw = bin % shape.pooled_w;
  const RoiGeometry<T> geometry = bin_geometry(call, roi, ph, pw);
  if (geometry.empty()) return Storage<S>::store(static_cast<T>(0));
  const Layout layout = Layout::of(shape);
  const S* plane = call.operand + layout.plane_offset(
                                      geometry.image,
                                      shape.first_channel(bin) + c_out * shape.channel_step());
  T value[1];
  pooled_values<1, kPixelSums>(plane, 0, 1, layout, geometry, shape, ph, pw, value);
  return Storage<S>::store(value[0]);
}

// The output channels [begin, end) of bin `bin` whose input channels lie in
// [first_channel, end_channel).
struct ChannelRange {
  int64_t begin, end;
};

PSROI_HD ChannelRange outputs_reading(const CallShape& shape, int64_t bin,
                                             int64_t first_channel, int64_t end_channel) {
  auto clip = [&](int64_t v) {
    return v < 0 ? int64_t{0} : (v > shape.channels_out ? shape.channels_out : v);
  };
  // Output channel c reads shape.first_channel(bin) + c * step: the first c
  // at or past `channel` is ceil((channel - first) / step).
  const int64_t first = shape.first_channel(bin), step = shape.channel_step();
  auto first_reaching = [&](int64_t channel) {
    const int64_t distance = channel - first;
    return distance <= 0 ? int64_t{0} : (distance + step - 1) / step;
  };
  return ChannelRange{clip(first_reaching(first_channel)), clip(first_reaching(end_channel))};
}

// Rows per unit of a backward: bands of at most this many rows.
constexpr int64_t kBandRows = 8;

PSROI_HD int64_t bands_of(const CallShape& shape) {
  return (shape.height + kBandRows - 1) / kBandRows;
}

// The gradient of input channels [first_channel, end_channel) of image
// `image` on the rows of band `band` (kBandRows of them, fewer in the last),
// every column, in the compute type
// (`grad` in the features' layout): zeroed, then every RoI of the image
// adds, bin by bin, its cotangent over its sample count times each pair of
// its row and column taps' weights (for_each_axis_tap<kPixelSums>, the
// weights the forward applies; derivative weights in a derivative
// direction). The output channels of a bin are taken kChannels at a time,
// their shares of the cotangent loaded and divided once per bin; each
// element still adds its terms in the order tap row, tap column, so the
// chunking changes no bit (the CPU takes 8, a CUDA thread its 1 channel).
// kPixelSums: pixel_sums(sampling_ratio), the same on every device.
template <typename S, typename Layout, bool kPixelSums, int kChannels,
          typename T = ComputeType<S>>
PSROI_HD void backward_unit(const DeformCall<S>& call, T* grad, int64_t image,
                            int64_t first_channel, int64_t end_channel, int64_t band) {
  const CallShape& shape = call.shape;
  const int64_t first_row = band * kBandRows;
  const int64_t end_row = first_row + kBandRows < shape.height ? first_row + kBandRows
                                                               : shape.height;
  const Layout layout = Layout::of(shape);
  for (int64_t channel = first_channel; channel < end_channel; ++channel) {
    T* plane = grad + layout.plane_offset(image, channel);
    for (int64_t y = first_row; y < end_row; ++y) {
      for (int64_t x = 0; x < shape.width; ++x) plane[layout.pixel_offset(y, x)] = static_cast<T>(0);
    }
  }
  const int64_t out_stride = Layout::pooled_channel_stride(shape);
  for (int64_t roi = 0; roi < shape.num_rois; ++roi) {
    if (roi_image(call.rois[5 * roi], roi, shape) != image) continue;
    for (int64_t bin = 0; bin < shape.bins(); ++bin) {
      const ChannelRange outputs = outputs_reading(shape, bin, first_channel, end_channel);
      if (outputs.begin >= outputs.end) continue;
      const int64_t ph = bin / shape.pooled_w, pw = bin % shape.pooled_w;
      const RoiGeometry<T> geometry = bin_geometry(call, roi, ph, pw);
      if (geometry.empty()) continue;
      const AxisSpan rows = touched_pixels(geometry.y, ph, shape.height);
      if (rows.last < first_row || rows.first >= end_row) continue;
      const S* cotangent = call.operand + Layout::pooled_offset(shape, roi, 0, bin);
      const int64_t plane_step = shape.channel_step() * layout.channel_stride();
      for (int64_t first = outputs.begin; first < outputs.end; first += kChannels) {
        const int64_t count = outputs.end - first < kChannels ? outputs.end - first : kChannels;
        T share[kChannels];
        for (int k = 0; k < kChannels; ++k) {
          share[k] = k < count ? Storage<S>::load(cotangent[(first + k) * out_stride]) /
                                     geometry.count
                               : static_cast<T>(0);
        }
        T* planes = grad + layout.plane_offset(image, shape.first_channel(bin)) +
                    first * plane_step;
        for_each_axis_tap<kPixelSums>(geometry.y, ph, shape.height, [&](int64_t y, T w_y) {
          if (y < first_row || y >= end_row) return;
          for_each_axis_tap<kPixelSums>(geometry.x, pw, shape.width, [&](int64_t x, T w_x) {
            const T weight = w_y * w_x;
            const int64_t pixel = layout.pixel_offset(y, x);
            for (int k = 0; k < kChannels; ++k) {
              if (k < count) planes[k * plane_step + pixel] += share[k] * weight;
            }
          });
        });
      }
    }
  }
}

// run(std::true_type or std::false_type: pixel_sums(sampling_ratio)), which
// instantiates a call's kernels for its kind of grid (host code).
template <typename Run>
auto with_pixel_sums(int64_t sampling_ratio, Run run) {
  return pixel_sums(sampling_ratio) ? run(std::true_type{}) : run(std::false_type{});
}

}  // namespace deform
}  // namespace jax_psroi

#endif  // JAX_PSROI_DEFORMABLE_H_
