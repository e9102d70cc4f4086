// CPU kernels of RoI Pool: window maxima with their arg-max (the forward),
// the features at recorded arg-maxima (its tangent) and the cotangent
// scattered to them (its gradient). The scan of a window is psroi_math.h's
// (window_max_start / window_max_fold), so the CPU and CUDA kernels keep
// the same element. No XLA types; each function does one share of a call.
#ifndef JAX_PSROI_CPU_ROI_POOL_CPU_KERNELS_H_
#define JAX_PSROI_CPU_ROI_POOL_CPU_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "psroi_math.h"

namespace jax_psroi {
namespace cpu {

// Forward of RoIs [begin, end): every channel of every bin, into `output`
// and `pixels` (both in the pooled layout). With `recorded` (the arg-max of
// an earlier forward) each output is instead the input at that pixel, and
// `pixels` (aliased to `recorded`) is left alone. In NCHW each channel's
// windows are scanned plane by plane; channels-last, each pixel of a window
// updates the running maxima of all channels (the same scan per channel).
template <typename S, typename Layout, typename T = ComputeType<S>>
void roi_pool_forward_rois(const S* input, const T* rois, const PsRoiDims& d, T spatial_scale,
                           const int32_t* recorded, int64_t begin, int64_t end, S* output,
                           int32_t* pixels) {
  const Layout layout = Layout::of(d);
  const int64_t stride = Layout::pooled_channel_stride(d);
  std::vector<WindowMax<T>> maxima(
      Layout::kChannelsLast && !recorded ? static_cast<size_t>(d.channels) : 0);
  for (int64_t roi = begin; roi < end; ++roi) {
    const RoiGeometry<T> g = roi_geometry(rois + 5 * roi, d, spatial_scale, 0);
    for (int64_t bin = 0; bin < d.bins(); ++bin) {
      const int64_t ph = bin / d.pooled_w, pw = bin % d.pooled_w;
      const int64_t at = Layout::pooled_offset(d, roi, 0, bin);
      if (g.empty()) {
        for (int64_t c = 0; c < d.channels; ++c) {
          output[at + c * stride] = Storage<S>::store(static_cast<T>(0));
          if (!recorded) pixels[at + c * stride] = -1;
        }
        continue;
      }
      if (recorded) {
        for (int64_t c = 0; c < d.channels; ++c) {
          const S* plane = input + layout.plane_offset(g.image, c);
          output[at + c * stride] =
              Storage<S>::store(value_at_pixel(plane, layout, d, recorded[at + c * stride]));
        }
      } else if (Layout::kChannelsLast) {
        const AxisSpan rows = g.y.window(ph, d.height), cols = g.x.window(pw, d.width);
        std::fill(maxima.begin(), maxima.end(), window_max_start<T>(rows, cols));
        const S* image = input + layout.plane_offset(g.image, 0);
        for (int64_t y = rows.first; y <= rows.last; ++y) {
          for (int64_t x = cols.first; x <= cols.last; ++x) {
            const S* pixel = image + layout.pixel_offset(y, x);
            for (int64_t c = 0; c < d.channels; ++c) {
              window_max_fold(maxima[c], Storage<S>::load(pixel[c]), y * d.width + x);
            }
          }
        }
        for (int64_t c = 0; c < d.channels; ++c) {
          output[at + c] = Storage<S>::store(maxima[c].value);
          pixels[at + c] = maxima[c].pixel;
        }
      } else {
        for (int64_t c = 0; c < d.channels; ++c) {
          const WindowMax<T> m =
              window_max(input + layout.plane_offset(g.image, c), layout, g, d, ph, pw);
          output[at + c * stride] = Storage<S>::store(m.value);
          pixels[at + c * stride] = m.pixel;
        }
      }
    }
  }
}

// The RoIs of each image that read something, in index order: image n's
// are rois[first[n] .. first[n + 1]).
struct RoiPoolByImage {
  std::vector<int64_t> first, rois;
};

template <typename T>
RoiPoolByImage roi_pool_by_image(const T* rois, const PsRoiDims& d, T spatial_scale) {
  std::vector<int64_t> image(static_cast<size_t>(d.num_rois));
  RoiPoolByImage by;
  by.first.assign(static_cast<size_t>(d.num_images + 1), 0);
  for (int64_t k = 0; k < d.num_rois; ++k) {
    const RoiGeometry<T> g = roi_geometry(rois + 5 * k, d, spatial_scale, 0);
    image[k] = g.empty() ? -1 : g.image;
    if (image[k] >= 0) ++by.first[image[k] + 1];
  }
  for (int64_t n = 0; n < d.num_images; ++n) by.first[n + 1] += by.first[n];
  by.rois.resize(static_cast<size_t>(by.first[d.num_images]));
  std::vector<int64_t> next(by.first.begin(), by.first.end() - 1);
  for (int64_t k = 0; k < d.num_rois; ++k) {
    if (image[k] >= 0) by.rois[next[image[k]]++] = k;
  }
  return by;
}

// The gradient is split into units of one image and a run of channels,
// enough for every thread to have several; a unit owns its elements, and
// every RoI of its image adds to them in index order (bins in order within
// an RoI): no atomics, and the sums do not depend on the threads.
struct RoiPoolUnits {
  int64_t per_unit, chunks;

  static RoiPoolUnits of(const PsRoiDims& d, int64_t threads) {
    const int64_t wanted = std::max<int64_t>(1, 8 * threads / std::max<int64_t>(1, d.num_images));
    const int64_t per_unit = std::max<int64_t>(1, (d.channels + wanted - 1) / wanted);
    return RoiPoolUnits{per_unit, (d.channels + per_unit - 1) / per_unit};
  }
  int64_t count(const PsRoiDims& d) const { return d.num_images * chunks; }
};

// Gradient of unit `unit`: zero, then every cotangent element of its image's
// RoIs added at its recorded pixel. 16-bit gradients are summed in float32
// and rounded once.
template <typename S, typename Layout, typename T = ComputeType<S>>
void roi_pool_backward_unit(const S* cotangent, const int32_t* pixels, const PsRoiDims& d,
                            const RoiPoolByImage& by, const RoiPoolUnits& units, int64_t unit,
                            S* grad) {
  constexpr bool kDirect = std::is_same_v<S, T>;
  const Layout layout = Layout::of(d);
  const int64_t image = unit / units.chunks;
  const int64_t c0 = (unit % units.chunks) * units.per_unit;
  const int64_t c1 = std::min(c0 + units.per_unit, d.channels);
  const int64_t plane = d.plane_size();
  std::vector<T> scratch(kDirect ? 0 : static_cast<size_t>((c1 - c0) * plane));
  // Gradient element (channel c, pixel p) of the image: pixels are
  // row-major in both layouts, so pixel p sits where (0, p) would.
  auto offset = [&](int64_t c, int64_t p) {
    return layout.plane_offset(image, c) + layout.pixel_offset(0, p);
  };
  // Where element (c, p) of the unit is summed.
  auto sum_at = [&](int64_t c, int64_t p) -> T& {
    if constexpr (kDirect) {
      return grad[offset(c, p)];
    } else {
      return scratch[(c - c0) * plane + p];
    }
  };
  // Every element of the unit, in memory order.
  auto for_each_element = [&](auto f) {
    if constexpr (Layout::kChannelsLast) {
      for (int64_t p = 0; p < plane; ++p) {
        for (int64_t c = c0; c < c1; ++c) f(c, p);
      }
    } else {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t p = 0; p < plane; ++p) f(c, p);
      }
    }
  };
  if constexpr (kDirect) {
    for_each_element([&](int64_t c, int64_t p) { sum_at(c, p) = static_cast<T>(0); });
  }
  const int64_t stride = Layout::pooled_channel_stride(d);
  for (int64_t i = by.first[image]; i < by.first[image + 1]; ++i) {
    const int64_t roi = by.rois[i];
    for (int64_t bin = 0; bin < d.bins(); ++bin) {
      const int64_t at = Layout::pooled_offset(d, roi, c0, bin);
      for (int64_t c = c0; c < c1; ++c) {
        const int32_t p = pixels[at + (c - c0) * stride];
        if (p >= 0 && p < plane) {
          sum_at(c, p) += Storage<S>::load(cotangent[at + (c - c0) * stride]);
        }
      }
    }
  }
  if constexpr (!kDirect) {
    for_each_element([&](int64_t c, int64_t p) {
      grad[offset(c, p)] = Storage<S>::store(sum_at(c, p));
    });
  }
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_ROI_POOL_CPU_KERNELS_H_
