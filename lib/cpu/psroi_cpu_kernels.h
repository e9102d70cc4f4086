// CPU kernels of PS-RoI Align: plain C++ loops over the shared math, no XLA
// types. Each function does one contiguous share of the work, so a handler can
// split a call into tasks of its thread pool.
//
// The fast kernels use the separable form of a bin (see psroi_math.h): the
// row and column weights of an RoI's bins are computed once, each bin's
// window becomes a tile of combined weights, and that tile serves every
// output channel (span_kernels.h).
// The elementwise kernels run the GPU's per-element code serially; tests
// check them against the reference so the CUDA arithmetic is exercised here.
#ifndef JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_
#define JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/span_kernels.h"
#include "psroi_math.h"

namespace jax_psroi {
namespace cpu {

// Row weights of every bin row and column weights of every bin column of one
// RoI: PH arrays of H and PW arrays of W, zero outside their spans, and the
// column tile of every bin column.
template <typename T>
class RoiWeights {
 public:
  explicit RoiWeights(const PsRoiDims& d)
      : d_(d),
        rows_(static_cast<size_t>(d.pooled_h * d.height), T(0)),
        cols_(static_cast<size_t>(d.pooled_w * d.width), T(0)),
        row_spans_(static_cast<size_t>(d.pooled_h), AxisSpan{d.height, -1}),
        col_spans_(static_cast<size_t>(d.pooled_w), AxisSpan{d.width, -1}),
        col_tiles_(static_cast<size_t>(d.pooled_w)) {}

  void compute(const RoiGeometry<T>& g) {
    for (int64_t ph = 0; ph < d_.pooled_h; ++ph) {
      clear(row(ph), row_spans_[ph]);
      row_spans_[ph] = accumulate_axis_weights(g.y, ph, d_.height, row(ph));
    }
    for (int64_t pw = 0; pw < d_.pooled_w; ++pw) {
      clear(col(pw), col_spans_[pw]);
      const AxisSpan span = accumulate_axis_weights(g.x, pw, d_.width, col(pw));
      col_spans_[pw] = span;
      if (span.first <= span.last) {
        make_column_tile(col(pw) + span.first, span.first, span.last - span.first + 1,
                         d_.width, &col_tiles_[pw]);
      }
    }
  }

  // Window of bin (ph, pw). Returns false when the bin has no sample on the
  // map.
  bool window(int64_t ph, int64_t pw, Window<T>* w) const {
    const AxisSpan r = row_spans_[ph], c = col_spans_[pw];
    if (r.first > r.last || c.first > c.last) return false;
    w->first_row = r.first;
    w->first_col = c.first;
    w->rows = r.last - r.first + 1;
    w->cols = c.last - c.first + 1;
    w->width = d_.width;
    w->row_w = rows_.data() + ph * d_.height + r.first;
    w->col_w = cols_.data() + pw * d_.width + c.first;
    w->col_tile = &col_tiles_[pw];
    return true;
  }

 private:
  T* row(int64_t ph) { return rows_.data() + ph * d_.height; }
  T* col(int64_t pw) { return cols_.data() + pw * d_.width; }

  // Zeroes only what the previous compute() touched.
  static void clear(T* weights, AxisSpan span) {
    if (span.first <= span.last) std::fill(weights + span.first, weights + span.last + 1, T(0));
  }

  PsRoiDims d_;
  std::vector<T> rows_, cols_;
  std::vector<AxisSpan> row_spans_, col_spans_;
  std::vector<ColumnTile<T>> col_tiles_;
};

// Order in which the kernels visit RoIs: by image, then by band of rows,
// then by column of the box centre, so that consecutive RoIs touch nearby
// pixels and find them in cache (measured: 1.6-2x on Light-Head shapes).
// RoIs that read nothing go last. The order depends only on the RoIs, so
// the backward's sums are still bitwise reproducible.
template <typename T>
std::vector<int64_t> locality_order(const T* rois, const PsRoiDims& d,
                                    T spatial_scale, int64_t sampling_ratio) {
  constexpr double kBandRows = 4.0;
  struct Key {
    int64_t image;
    double band, column;
    int64_t index;
    bool operator<(const Key& o) const {
      if (image != o.image) return image < o.image;
      if (band != o.band) return band < o.band;
      if (column != o.column) return column < o.column;
      return index < o.index;
    }
  };
  std::vector<Key> keys(static_cast<size_t>(d.num_rois));
  for (int64_t k = 0; k < d.num_rois; ++k) {
    const RoiGeometry<T> g =
        roi_geometry(rois + 5 * k, d, spatial_scale, sampling_ratio);
    Key& key = keys[k];
    key.index = k;
    if (g.empty()) {
      key.image = d.num_images;
      key.band = key.column = 0.0;
      continue;
    }
    key.image = g.image;
    // Finite: empty() is false only for finite geometry.
    const double centre_y = g.y.start + 0.5 * d.pooled_h * static_cast<double>(g.y.bin_size);
    key.band = std::floor(centre_y / kBandRows);
    key.column = g.x.start + 0.5 * d.pooled_w * static_cast<double>(g.x.bin_size);
  }
  std::sort(keys.begin(), keys.end());
  std::vector<int64_t> order(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) order[i] = keys[i].index;
  return order;
}

// RoIs whose windows a forward task applies bin by bin: with many output
// channels, one RoI's windows span many pages, and visiting the same bin of
// neighbouring RoIs together keeps those pages hot (measured on R-FCN's
// 81-class map: 2x); with few channels, one RoI at a time is faster.
inline int64_t forward_roi_block(const PsRoiDims& d) {
  return d.channels_out >= 32 ? 32 : 1;
}

// Forward for RoIs order[begin..end): every output channel of every bin.
// The planes read by one bin, input_channel(c_out, ph, pw) for all c_out,
// are bins() planes apart, so one window serves them all.
template <typename T>
void forward_rois(const T* input, const T* rois, const PsRoiDims& d,
                  T spatial_scale, int64_t sampling_ratio, const int64_t* order,
                  int64_t begin, int64_t end, T* output) {
  const NchwLayout layout{d.channels, d.height, d.width};
  const int64_t plane_stride = d.bins() * d.plane_size();
  const int64_t block = forward_roi_block(d);
  std::vector<RoiWeights<T>> weights(static_cast<size_t>(block), RoiWeights<T>(d));
  std::vector<RoiGeometry<T>> geometry(static_cast<size_t>(block));
  for (int64_t first = begin; first < end; first += block) {
    const int64_t count = std::min(block, end - first);
    for (int64_t j = 0; j < count; ++j) {
      geometry[j] = roi_geometry(rois + 5 * order[first + j], d, spatial_scale,
                                 sampling_ratio);
      if (!geometry[j].empty()) weights[j].compute(geometry[j]);
    }
    for (int64_t ph = 0; ph < d.pooled_h; ++ph) {
      for (int64_t pw = 0; pw < d.pooled_w; ++pw) {
        for (int64_t j = 0; j < count; ++j) {
          const RoiGeometry<T>& g = geometry[j];
          T* out_bin = output + order[first + j] * d.channels_out * d.bins() +
                       ph * d.pooled_w + pw;
          Window<T> w;
          if (g.empty() || !weights[j].window(ph, pw, &w)) {
            for (int64_t c = 0; c < d.channels_out; ++c) out_bin[c * d.bins()] = T(0);
            continue;
          }
          const T* planes = input +
                            layout.plane_offset(g.image, input_channel(d, 0, ph, pw)) +
                            layout.pixel_offset(w.first_row, w.first_col);
          gather_window(w, planes, plane_stride, d.channels_out, g.count,
                        out_bin, d.bins());
        }
      }
    }
  }
}

// Backward for output channels [c_out_begin, c_out_end). Those own the input
// planes input_channel(c_out, *, *) of every image, so tasks over disjoint
// channel ranges write disjoint memory: no atomics, and RoIs are added in
// `order`, so the result is bitwise reproducible.
template <typename T>
void backward_channels(const T* cotangent, const T* rois, const PsRoiDims& d,
                       T spatial_scale, int64_t sampling_ratio,
                       const int64_t* order, int64_t c_out_begin,
                       int64_t c_out_end, T* grad_input) {
  const NchwLayout layout{d.channels, d.height, d.width};
  const int64_t plane_stride = d.bins() * d.plane_size();
  const int64_t num_c_out = c_out_end - c_out_begin;
  for (int64_t n = 0; n < d.num_images; ++n) {
    T* first = grad_input + layout.plane_offset(n, input_channel(d, c_out_begin, 0, 0));
    std::fill(first, first + num_c_out * plane_stride, T(0));
  }
  RoiWeights<T> weights(d);
  for (int64_t i = 0; i < d.num_rois; ++i) {
    const int64_t k = order[i];
    const RoiGeometry<T> g =
        roi_geometry(rois + 5 * k, d, spatial_scale, sampling_ratio);
    if (g.empty()) continue;
    weights.compute(g);
    const T* cot_roi = cotangent + (k * d.channels_out + c_out_begin) * d.bins();
    for (int64_t ph = 0; ph < d.pooled_h; ++ph) {
      for (int64_t pw = 0; pw < d.pooled_w; ++pw) {
        Window<T> w;
        if (!weights.window(ph, pw, &w)) continue;
        T* planes = grad_input +
                    layout.plane_offset(g.image, input_channel(d, c_out_begin, ph, pw)) +
                    layout.pixel_offset(w.first_row, w.first_col);
        scatter_window(w, planes, plane_stride, num_c_out, g.count,
                       cot_roi + ph * d.pooled_w + pw, d.bins());
      }
    }
  }
}

// The GPU's per-element forward, run serially.
template <typename T>
void forward_elementwise(const T* input, const T* rois, const PsRoiDims& d,
                         T spatial_scale, int64_t sampling_ratio, T* output) {
  const NchwLayout layout{d.channels, d.height, d.width};
  for (int64_t i = 0; i < d.outputs(); ++i) {
    output[i] = forward_element(input, rois, d, layout, spatial_scale,
                                sampling_ratio, i);
  }
}

// The GPU's per-element backward, run serially with a plain add.
template <typename T>
void backward_elementwise(const T* cotangent, const T* rois, const PsRoiDims& d,
                          T spatial_scale, int64_t sampling_ratio,
                          T* grad_input) {
  const NchwLayout layout{d.channels, d.height, d.width};
  std::fill(grad_input, grad_input + d.num_images * d.channels * d.plane_size(), T(0));
  for (int64_t i = 0; i < d.outputs(); ++i) {
    backward_element(cotangent, rois, d, layout, spatial_scale, sampling_ratio,
                     i, grad_input, [](T* p, T v) { *p += v; });
  }
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_
