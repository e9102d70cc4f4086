// CPU kernels of RoI Pool: window maxima with their arg-max (the forward),
// the features at recorded arg-maxima (its tangent) and the cotangent
// scattered to them (its gradient). The scan of a window is roi_math.h's
// (window_max_start, fold_max), so the CPU and CUDA kernels keep the same
// element. No XLA types; each function does one share of a call.
#ifndef JAX_PSROI_CPU_MAX_KERNELS_H_
#define JAX_PSROI_CPU_MAX_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/average_kernels.h"
#include "roi_math.h"

namespace jax_psroi {
namespace cpu {

// NCHW: planes scanned together by the forward, which then share the
// window loops' overhead; more planes than this no longer pay.
constexpr int64_t kNchwChannelBlock = 16;

// Maxima and pixels of every bin of RoI `roi` (windows rows[ph] x cols[pw])
// in planes [first, first + kPlanes) of image `image`.
template <int64_t kPlanes, typename S, typename Layout, typename T = ComputeType<S>>
void nchw_window_maxima(const S* input, const Layout& layout, const CallShape& shape, int64_t image,
                        int64_t roi, int64_t first, const AxisSpan* rows, const AxisSpan* cols,
                        S* output, int32_t* pixels) {
  const S* plane[kPlanes];
  for (int64_t j = 0; j < kPlanes; ++j) plane[j] = input + layout.plane_offset(image, first + j);
  for (int64_t bin = 0; bin < shape.bins(); ++bin) {
    const AxisSpan& r = rows[bin / shape.pooled_w];
    const AxisSpan& c = cols[bin % shape.pooled_w];
    const WindowMax<T> start = window_max_start<T>(r, c);
    T best[kPlanes];
    int32_t best_pixel[kPlanes];
    for (int64_t j = 0; j < kPlanes; ++j) {
      best[j] = start.value;
      best_pixel[j] = start.pixel;
    }
    for (int64_t y = r.first; y <= r.last; ++y) {
      for (int64_t x = c.first; x <= c.last; ++x) {
        const int64_t offset = layout.pixel_offset(y, x);
        const int32_t here = static_cast<int32_t>(y * shape.width + x);
        for (int64_t j = 0; j < kPlanes; ++j) {
          fold_max(best[j], best_pixel[j], Storage<S>::load(plane[j][offset]), here);
        }
      }
    }
    for (int64_t j = 0; j < kPlanes; ++j) {
      const int64_t at = Layout::pooled_offset(shape, roi, first + j, bin);
      output[at] = Storage<S>::store(best[j]);
      pixels[at] = best_pixel[j];
    }
  }
}

// Forward of RoIs [begin, end): every channel of every bin, into `output`
// and `pixels` (both in the pooled layout). With `recorded` (the arg-max of
// an earlier forward) each output is instead the input at that pixel, and
// `pixels` (aliased to `recorded`) is left alone. In NCHW the windows are
// scanned kNchwChannelBlock planes at a time; channels-last, each pixel of a
// window updates the running maxima of all channels (the same scan per
// channel either way).
template <typename S, typename Layout, typename T = ComputeType<S>>
void roi_pool_forward_rois(const S* input, const T* rois, const CallShape& shape,
                           const BoxRule& rule, T spatial_scale, const int32_t* recorded,
                           int64_t begin, int64_t end, S* output, int32_t* pixels) {
  const Layout layout = Layout::of(shape);
  const int64_t stride = Layout::pooled_channel_stride(shape);
  // Channels-last: the running maxima of every channel and their pixels.
  const size_t running = Layout::kChannelsLast && !recorded ? shape.channels : 0;
  std::vector<T> best(running);
  std::vector<int32_t> best_pixel(running);
  // The RoI's windows, per bin row and per bin column.
  std::vector<AxisSpan> rows(static_cast<size_t>(shape.pooled_h));
  std::vector<AxisSpan> cols(static_cast<size_t>(shape.pooled_w));
  for (int64_t roi = begin; roi < end; ++roi) {
    const RoiGeometry<T> geometry = roi_geometry(rois, roi, shape, rule, spatial_scale, 0);
    if (geometry.empty() || recorded) {
      for (int64_t c = 0; c < shape.channels; ++c) {
        const S* plane =
            geometry.empty() ? nullptr : input + layout.plane_offset(geometry.image, c);
        for (int64_t bin = 0; bin < shape.bins(); ++bin) {
          const int64_t at = Layout::pooled_offset(shape, roi, c, bin);
          output[at] = Storage<S>::store(plane ? value_at_pixel(plane, layout, shape, recorded[at])
                                               : static_cast<T>(0));
          if (!recorded) pixels[at] = -1;
        }
      }
      continue;
    }
    for (int64_t ph = 0; ph < shape.pooled_h; ++ph) rows[ph] = geometry.y.window(ph, shape.height);
    for (int64_t pw = 0; pw < shape.pooled_w; ++pw) cols[pw] = geometry.x.window(pw, shape.width);
    if constexpr (Layout::kChannelsLast) {
      // Each pixel of a window updates the running maxima of every channel.
      const S* image = input + layout.plane_offset(geometry.image, 0);
      for (int64_t bin = 0; bin < shape.bins(); ++bin) {
        const AxisSpan& r = rows[bin / shape.pooled_w];
        const AxisSpan& c = cols[bin % shape.pooled_w];
        const WindowMax<T> start = window_max_start<T>(r, c);
        std::fill(best.begin(), best.end(), start.value);
        std::fill(best_pixel.begin(), best_pixel.end(), start.pixel);
        T* best_value = best.data();
        int32_t* best_at = best_pixel.data();
        for (int64_t y = r.first; y <= r.last; ++y) {
          for (int64_t x = c.first; x <= c.last; ++x) {
            const S* pixel = image + layout.pixel_offset(y, x);
            const int32_t here = static_cast<int32_t>(y * shape.width + x);
            for (int64_t ch = 0; ch < shape.channels; ++ch) {
              fold_max(best_value[ch], best_at[ch], Storage<S>::load(pixel[ch]), here);
            }
          }
        }
        const int64_t at = Layout::pooled_offset(shape, roi, 0, bin);
        for (int64_t ch = 0; ch < shape.channels; ++ch) {
          output[at + ch * stride] = Storage<S>::store(best_value[ch]);
          pixels[at + ch * stride] = best_at[ch];
        }
      }
    } else {
      // kNchwChannelBlock planes at a time, every bin's window: the window
      // loops serve them all, and their folds are independent.
      int64_t ch = 0;
      for (; ch + kNchwChannelBlock <= shape.channels; ch += kNchwChannelBlock) {
        nchw_window_maxima<kNchwChannelBlock>(input, layout, shape, geometry.image, roi, ch,
                                              rows.data(), cols.data(), output, pixels);
      }
      for (; ch < shape.channels; ++ch) {
        nchw_window_maxima<1>(input, layout, shape, geometry.image, roi, ch, rows.data(),
                              cols.data(), output, pixels);
      }
    }
  }
}

// The RoIs of each image that read something (average_kernels.h) and the
// window rows of every RoI's bin rows, rows[roi * PH + ph].
struct RoiPoolByImage {
  RoisByImage images;
  std::vector<AxisSpan> rows;
};

template <typename T>
RoiPoolByImage roi_pool_by_image(const T* rois, const CallShape& shape, const BoxRule& rule,
                                 T spatial_scale) {
  RoiPoolByImage by;
  by.rows.resize(static_cast<size_t>(shape.num_rois * shape.pooled_h));
  by.images = rois_by_image(shape, [&](int64_t k) {
    const RoiGeometry<T> geometry = roi_geometry(rois, k, shape, rule, spatial_scale, 0);
    for (int64_t ph = 0; ph < shape.pooled_h; ++ph) {
      by.rows[k * shape.pooled_h + ph] =
          geometry.empty() ? AxisSpan{0, -1} : geometry.y.window(ph, shape.height);
    }
    return geometry.empty() ? int64_t{-1} : geometry.image;
  });
  return by;
}

// The gradient is split into units, enough for every thread to have
// several; a unit owns its elements, and every RoI of its image adds to them
// in index order (bins in order within an RoI): no atomics, and the sums do
// not depend on the threads. A unit is one image's run of channels (NCHW:
// whole planes) or, channels-last, a band of its rows with every channel,
// so that it reads whole rows of the pooled tensor's channels (narrow runs
// of channels would read each pixel's channels in pieces; bands skip the bin
// rows whose windows miss them).
struct RoiPoolUnits {
  int64_t run, runs;    // channels per unit, runs per image
  int64_t band, bands;  // rows per unit, bands per image

  static RoiPoolUnits of(const CallShape& shape, int64_t threads, bool channels_last) {
    const int64_t images = std::max<int64_t>(1, shape.num_images);
    if (channels_last) {
      const int64_t wanted =
          std::clamp<int64_t>(2 * threads / images, 1, std::max<int64_t>(1, shape.height));
      const int64_t band = std::max<int64_t>(1, (shape.height + wanted - 1) / wanted);
      return RoiPoolUnits{shape.channels, 1, band, (shape.height + band - 1) / band};
    }
    const int64_t wanted = std::max<int64_t>(1, 8 * threads / images);
    const int64_t run = std::max<int64_t>(1, (shape.channels + wanted - 1) / wanted);
    return RoiPoolUnits{run, (shape.channels + run - 1) / run, shape.height, 1};
  }
  int64_t count(const CallShape& shape) const { return shape.num_images * runs * bands; }
};

// Gradient of unit `unit`: zero, then every cotangent element of its image's
// RoIs added at its recorded pixel. 16-bit gradients are summed in float32
// and rounded once.
template <typename S, typename Layout, typename T = ComputeType<S>>
void roi_pool_backward_unit(const S* cotangent, const int32_t* pixels, const CallShape& shape,
                            const RoiPoolByImage& by, const RoiPoolUnits& units, int64_t unit,
                            S* grad) {
  constexpr bool kDirect = std::is_same_v<S, T>;
  const Layout layout = Layout::of(shape);
  const int64_t image = unit / (units.runs * units.bands);
  const int64_t run = unit / units.bands % units.runs, band = unit % units.bands;
  const int64_t c0 = run * units.run, c1 = std::min(c0 + units.run, shape.channels);
  const int64_t r0 = band * units.band, r1 = std::min(r0 + units.band, shape.height);
  // The unit's pixels [p0, p1): its rows, row-major.
  const int64_t p0 = r0 * shape.width, p1 = r1 * shape.width;
  std::vector<T> scratch(kDirect ? 0 : static_cast<size_t>((c1 - c0) * (p1 - p0)));
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
      return scratch[(c - c0) * (p1 - p0) + (p - p0)];
    }
  };
  // Every element of the unit, in memory order.
  auto for_each_element = [&](auto f) {
    if constexpr (Layout::kChannelsLast) {
      for (int64_t p = p0; p < p1; ++p) {
        for (int64_t c = c0; c < c1; ++c) f(c, p);
      }
    } else {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t p = p0; p < p1; ++p) f(c, p);
      }
    }
  };
  if constexpr (kDirect) {
    for_each_element([&](int64_t c, int64_t p) { sum_at(c, p) = static_cast<T>(0); });
  }
  // Per element, the RoIs in order and within an RoI its bins in order;
  // the loops follow the pooled tensor's memory.
  auto add = [&](int64_t roi, int64_t c, int64_t bin) {
    const int64_t at = Layout::pooled_offset(shape, roi, c, bin);
    const int32_t p = pixels[at];
    if (p >= p0 && p < p1) sum_at(c, p) += Storage<S>::load(cotangent[at]);
  };
  for (int64_t i = by.images.first[image]; i < by.images.first[image + 1]; ++i) {
    const int64_t roi = by.images.rois[i];
    if constexpr (Layout::kChannelsLast) {
      for (int64_t ph = 0; ph < shape.pooled_h; ++ph) {
        const AxisSpan rows = by.rows[roi * shape.pooled_h + ph];
        if (rows.last < r0 || rows.first >= r1) continue;  // misses the band
        for (int64_t bin = ph * shape.pooled_w; bin < (ph + 1) * shape.pooled_w; ++bin) {
          for (int64_t c = c0; c < c1; ++c) add(roi, c, bin);
        }
      }
    } else {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t bin = 0; bin < shape.bins(); ++bin) add(roi, c, bin);
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

#endif  // JAX_PSROI_CPU_MAX_KERNELS_H_
