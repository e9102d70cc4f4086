// CPU kernels of PS-RoI Align: plain C++ loops over the shared math, no XLA
// types. Each function does one contiguous share of the work, so a handler can
// split a call into tasks of its thread pool.
//
// The fast kernels use the separable form of a bin (see psroi_math.h): the
// row and column weights of a bin are computed once and reused for every
// output channel, and a bin's value is a small dense weighted sum.
// The elementwise kernels run the GPU's per-element code serially; tests
// check them against the reference so the CUDA arithmetic is exercised here.
#ifndef JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_
#define JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "psroi_math.h"

namespace jax_psroi {
namespace cpu {

// Row weights of every bin row and column weights of every bin column of one
// RoI: PH arrays of H and PW arrays of W, zero outside their spans.
template <typename T>
class RoiWeights {
 public:
  explicit RoiWeights(const PsRoiDims& d)
      : d_(d),
        rows_(static_cast<size_t>(d.pooled_h * d.height), T(0)),
        cols_(static_cast<size_t>(d.pooled_w * d.width), T(0)),
        row_spans_(static_cast<size_t>(d.pooled_h)),
        col_spans_(static_cast<size_t>(d.pooled_w)) {}

  // Fills the weights of one bin row `ph` (or all rows when ph < 0).
  void compute(const RoiGeometry<T>& g, int64_t only_ph = -1,
               int64_t only_pw = -1) {
    clear();
    for (int64_t ph = 0; ph < d_.pooled_h; ++ph) {
      if (only_ph >= 0 && ph != only_ph) continue;
      row_spans_[ph] = accumulate_axis_weights(g.y, ph, d_.height, row(ph));
    }
    for (int64_t pw = 0; pw < d_.pooled_w; ++pw) {
      if (only_pw >= 0 && pw != only_pw) continue;
      col_spans_[pw] = accumulate_axis_weights(g.x, pw, d_.width, col(pw));
    }
  }

  T* row(int64_t ph) { return rows_.data() + ph * d_.height; }
  T* col(int64_t pw) { return cols_.data() + pw * d_.width; }
  const AxisSpan& row_span(int64_t ph) const { return row_spans_[ph]; }
  const AxisSpan& col_span(int64_t pw) const { return col_spans_[pw]; }

 private:
  // Zeroes only what the previous compute() touched.
  void clear() {
    for (int64_t ph = 0; ph < d_.pooled_h; ++ph) {
      const AxisSpan s = row_spans_[ph];
      if (s.first <= s.last) std::fill(row(ph) + s.first, row(ph) + s.last + 1, T(0));
      row_spans_[ph] = AxisSpan{d_.height, -1};
    }
    for (int64_t pw = 0; pw < d_.pooled_w; ++pw) {
      const AxisSpan s = col_spans_[pw];
      if (s.first <= s.last) std::fill(col(pw) + s.first, col(pw) + s.last + 1, T(0));
      col_spans_[pw] = AxisSpan{d_.width, -1};
    }
  }

  PsRoiDims d_;
  std::vector<T> rows_, cols_;
  std::vector<AxisSpan> row_spans_, col_spans_;
};

// Weighted sum of one plane over a bin's span, accumulated per row.
template <typename T>
inline typename Accumulator<T>::type bin_sum(const T* plane, int64_t width,
                                             const T* row_w, AxisSpan rows,
                                             const T* col_w, AxisSpan cols) {
  using Acc = typename Accumulator<T>::type;
  Acc sum = Acc(0);
  for (int64_t r = rows.first; r <= rows.last; ++r) {
    const T* line = plane + r * width;
    Acc line_sum = Acc(0);
    for (int64_t c = cols.first; c <= cols.last; ++c) {
      line_sum += static_cast<Acc>(col_w[c]) * static_cast<Acc>(line[c]);
    }
    sum += static_cast<Acc>(row_w[r]) * line_sum;
  }
  return sum;
}

// Forward for RoIs [roi_begin, roi_end): every output channel of every bin.
template <typename T>
void forward_rois(const T* input, const T* rois, const PsRoiDims& d,
                  T spatial_scale, int64_t sampling_ratio, int64_t roi_begin,
                  int64_t roi_end, T* output) {
  using Acc = typename Accumulator<T>::type;
  const NchwLayout layout{d.channels, d.height, d.width};
  RoiWeights<T> weights(d);
  for (int64_t k = roi_begin; k < roi_end; ++k) {
    T* out_roi = output + k * d.channels_out * d.bins();
    const RoiGeometry<T> g =
        roi_geometry(rois + 5 * k, d, spatial_scale, sampling_ratio);
    if (g.empty()) {
      std::fill(out_roi, out_roi + d.channels_out * d.bins(), T(0));
      continue;
    }
    weights.compute(g);
    for (int64_t ph = 0; ph < d.pooled_h; ++ph) {
      for (int64_t pw = 0; pw < d.pooled_w; ++pw) {
        const int64_t bin = ph * d.pooled_w + pw;
        for (int64_t c_out = 0; c_out < d.channels_out; ++c_out) {
          const T* plane =
              input + layout.plane_offset(g.image, input_channel(d, c_out, ph, pw));
          const Acc sum = bin_sum(plane, d.width, weights.row(ph), weights.row_span(ph),
                                  weights.col(pw), weights.col_span(pw));
          out_roi[c_out * d.bins() + bin] = static_cast<T>(sum / static_cast<Acc>(g.count));
        }
      }
    }
  }
}

// Backward for bins [bin_begin, bin_end) (bin = ph * PW + pw). A bin owns the
// input planes {input_channel(c_out, ph, pw)} of every image, so tasks over
// disjoint bins write disjoint memory: no atomics, and RoIs are added in index
// order, so the result is bitwise reproducible.
template <typename T>
void backward_bins(const T* cotangent, const T* rois, const PsRoiDims& d,
                   T spatial_scale, int64_t sampling_ratio, int64_t bin_begin,
                   int64_t bin_end, T* grad_input) {
  const NchwLayout layout{d.channels, d.height, d.width};
  RoiWeights<T> weights(d);
  for (int64_t bin = bin_begin; bin < bin_end; ++bin) {
    const int64_t ph = bin / d.pooled_w, pw = bin % d.pooled_w;
    for (int64_t n = 0; n < d.num_images; ++n) {
      for (int64_t c_out = 0; c_out < d.channels_out; ++c_out) {
        T* plane = grad_input + layout.plane_offset(n, input_channel(d, c_out, ph, pw));
        std::fill(plane, plane + d.plane_size(), T(0));
      }
    }
    for (int64_t k = 0; k < d.num_rois; ++k) {
      const RoiGeometry<T> g =
          roi_geometry(rois + 5 * k, d, spatial_scale, sampling_ratio);
      if (g.empty()) continue;
      weights.compute(g, ph, pw);
      const AxisSpan rows = weights.row_span(ph), cols = weights.col_span(pw);
      if (rows.first > rows.last || cols.first > cols.last) continue;
      const T* row_w = weights.row(ph);
      const T* col_w = weights.col(pw);
      const T* cot_roi = cotangent + k * d.channels_out * d.bins() + bin;
      for (int64_t c_out = 0; c_out < d.channels_out; ++c_out) {
        const T scaled = cot_roi[c_out * d.bins()] / g.count;
        T* plane = grad_input +
                   layout.plane_offset(g.image, input_channel(d, c_out, ph, pw));
        for (int64_t r = rows.first; r <= rows.last; ++r) {
          const T row_scaled = scaled * row_w[r];
          T* line = plane + r * d.width;
          for (int64_t c = cols.first; c <= cols.last; ++c) {
            line[c] += row_scaled * col_w[c];
          }
        }
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
