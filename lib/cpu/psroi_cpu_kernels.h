// CPU kernels of PS-RoI Align: plain C++ loops over the shared math, no XLA
// types. Each function does one contiguous share of the work, so a handler can
// split a call into tasks of its thread pool.
//
// The fast kernels use the separable form of a bin (see psroi_math.h): the
// row and column weights of an RoI's bins are computed once, each bin's
// window becomes a tile of combined weights, and that tile serves every
// output channel (window_tiles.h). The forward goes RoI by RoI, in an order
// that keeps neighbouring boxes together. The backward first tabulates every
// RoI's windows, then goes plane by plane: a work unit takes the planes of
// one bin (and image) and lets every RoI visit them while they are in cache,
// reading the cotangent staged bin-major. (The same plane-by-plane scheme
// for the forward, with the output staged bin-major, measured slower than
// RoI by RoI on Light-Head and R-FCN box shapes, and no faster on the R-FCN
// class map.)
//
// The kernels read the feature map through NCHW strides (a plane per
// channel, rows of contiguous pixels); each entry point takes the layout of
// its kernel-table row and refuses, at compile time, any other.
#ifndef JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_
#define JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/window_tiles.h"
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

  AxisSpan row_span(int64_t ph) const { return row_spans_[ph]; }
  AxisSpan col_span(int64_t pw) const { return col_spans_[pw]; }
  const T* row_weights(int64_t ph) const { return rows_.data() + ph * d_.height; }
  const ColumnTile<T>& col_tile(int64_t pw) const { return col_tiles_[pw]; }

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
// pixels and find them in cache (measured faster on Light-Head shapes).
// RoIs that read nothing go last. Used by the forward, whose outputs do not
// depend on the order.
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
// neighbouring RoIs together keeps those pages hot (measured faster on
// R-FCN's 81-class map); with few channels, one RoI at a time is faster.
inline int64_t forward_roi_block(const PsRoiDims& d) {
  return d.channels_out >= 32 ? 32 : 1;
}

// Forward for RoIs order[begin..end): every output channel of every bin.
// The planes read by one bin, input_channel(c_out, ph, pw) for all c_out,
// are bins() planes apart, so one window serves them all.
template <typename T, typename Layout>
void forward_rois(const T* input, const T* rois, const PsRoiDims& d,
                  T spatial_scale, int64_t sampling_ratio, const int64_t* order,
                  int64_t begin, int64_t end, T* output) {
  static_assert(std::is_same_v<Layout, NchwLayout>, "the CPU kernels use NCHW strides");
  const Layout layout = Layout::of(d);
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

// What the backward needs of every RoI's bins, computed once per call (in
// parallel, by RoI) and then shared by all tasks: for each bin row its
// window rows and their weights, for each bin column its window columns and
// column tile. The row weights of bin rows of more than kMaxTileRows rows
// are not kept, and bin columns too wide for a tile have no column tile;
// tasks recompute such an RoI's weights (boxes whose bins exceed 8 x 12
// pixels of the map).
template <typename T>
class RoiTables {
 public:
  explicit RoiTables(const PsRoiDims& d)
      : d_(d),
        geometry_(static_cast<size_t>(d.num_rois)),
        row_spans_(static_cast<size_t>(d.num_rois * d.pooled_h), AxisSpan{d.height, -1}),
        col_spans_(static_cast<size_t>(d.num_rois * d.pooled_w), AxisSpan{d.width, -1}),
        row_w_(static_cast<size_t>(d.num_rois * d.pooled_h * kMaxTileRows)),
        col_tiles_(static_cast<size_t>(d.num_rois * d.pooled_w)) {}

  // Fills the entries of RoIs [begin, end); `weights` is scratch.
  void compute(const T* rois, T spatial_scale, int64_t sampling_ratio,
               int64_t begin, int64_t end, RoiWeights<T>* weights) {
    for (int64_t k = begin; k < end; ++k) {
      const RoiGeometry<T> g =
          roi_geometry(rois + 5 * k, d_, spatial_scale, sampling_ratio);
      geometry_[k] = g;
      if (g.empty()) continue;
      weights->compute(g);
      for (int64_t ph = 0; ph < d_.pooled_h; ++ph) {
        const AxisSpan span = weights->row_span(ph);
        row_spans_[k * d_.pooled_h + ph] = span;
        const int64_t rows = span.last - span.first + 1;
        if (rows > 0 && rows <= kMaxTileRows) {
          std::copy(weights->row_weights(ph) + span.first, weights->row_weights(ph) + span.last + 1,
                    row_w_.data() + (k * d_.pooled_h + ph) * kMaxTileRows);
        }
      }
      for (int64_t pw = 0; pw < d_.pooled_w; ++pw) {
        col_spans_[k * d_.pooled_w + pw] = weights->col_span(pw);
        col_tiles_[k * d_.pooled_w + pw] = weights->col_tile(pw);
      }
    }
  }

  const RoiGeometry<T>& geometry(int64_t k) const { return geometry_[k]; }

  // Window of bin (ph, pw) of RoI k. Returns false when the bin has no
  // sample on the map; sets *fits = false, without a window, when the bin
  // needs the RoI's full weights.
  bool window(int64_t k, int64_t ph, int64_t pw, Window<T>* w, bool* fits) const {
    const AxisSpan r = row_spans_[k * d_.pooled_h + ph];
    const AxisSpan c = col_spans_[k * d_.pooled_w + pw];
    if (r.first > r.last || c.first > c.last) return false;
    const ColumnTile<T>& tile = col_tiles_[k * d_.pooled_w + pw];
    w->rows = r.last - r.first + 1;
    *fits = w->rows <= kMaxTileRows && tile.vectors > 0;
    if (!*fits) return true;
    w->first_row = r.first;
    w->first_col = c.first;
    w->cols = c.last - c.first + 1;
    w->width = d_.width;
    w->row_w = row_w_.data() + (k * d_.pooled_h + ph) * kMaxTileRows;
    w->col_w = nullptr;  // tiles read only the column tile
    w->col_tile = &tile;
    return true;
  }

 private:
  PsRoiDims d_;
  std::vector<RoiGeometry<T>> geometry_;
  std::vector<AxisSpan> row_spans_, col_spans_;
  std::vector<T> row_w_;
  std::vector<ColumnTile<T>> col_tiles_;
};

// The cotangent [K, C_out, PH, PW] of RoIs [begin, end) laid out bin-major,
// [PH * PW][K][C_out], so that a backward unit reads one bin's values
// contiguously; written in runs of C_out, while the RoI's reads stay in cache.
template <typename T>
void to_bin_major(const T* values, const PsRoiDims& d, int64_t begin,
                  int64_t end, T* bin_major) {
  for (int64_t k = begin; k < end; ++k) {
    for (int64_t bin = 0; bin < d.bins(); ++bin) {
      T* to = bin_major + (bin * d.num_rois + k) * d.channels_out;
      const T* from = values + k * d.channels_out * d.bins() + bin;
      for (int64_t c = 0; c < d.channels_out; ++c) to[c] = from[c * d.bins()];
    }
  }
}

// The RoIs of each image that have samples, in index order: image n's are
// rois[first[n] .. first[n + 1]).
struct RoisByImage {
  std::vector<int64_t> first, rois;
};

// Sorts the RoIs of filled `tables` by image (a counting sort).
template <typename T>
RoisByImage rois_by_image(const RoiTables<T>& tables, const PsRoiDims& d) {
  RoisByImage by;
  by.first.assign(static_cast<size_t>(d.num_images + 1), 0);
  for (int64_t k = 0; k < d.num_rois; ++k) {
    const RoiGeometry<T>& g = tables.geometry(k);
    if (!g.empty()) ++by.first[g.image + 1];
  }
  for (int64_t n = 0; n < d.num_images; ++n) by.first[n + 1] += by.first[n];
  by.rois.resize(static_cast<size_t>(by.first[d.num_images]));
  std::vector<int64_t> next(by.first.begin(), by.first.end() - 1);
  for (int64_t k = 0; k < d.num_rois; ++k) {
    const RoiGeometry<T>& g = tables.geometry(k);
    if (!g.empty()) by.rois[next[g.image]++] = k;
  }
  return by;
}

// Output channels a work unit takes: all of them, unless their planes
// exceed half of a typical 512 KiB L2 cache; then equal chunks that fit.
inline int64_t unit_channel_chunk(const PsRoiDims& d, size_t element_bytes) {
  if (d.channels_out <= 0) return 1;  // no units; avoids dividing by zero
  constexpr int64_t kPlaneBudgetBytes = int64_t{256} << 10;
  const int64_t bytes_per_c_out = d.plane_size() * static_cast<int64_t>(element_bytes);
  const int64_t most = std::max<int64_t>(1, kPlaneBudgetBytes / std::max<int64_t>(1, bytes_per_c_out));
  const int64_t chunks = (d.channels_out + most - 1) / most;
  return (d.channels_out + chunks - 1) / chunks;
}

// A backward work unit: one image, one bin and a chunk of output channels.
// It owns the gradient planes input_channel(c_out, ph, pw) of that image for
// those channels, which stay in cache while every RoI of the image visits
// them.
struct Unit {
  int64_t image, bin, ph, pw, c_begin, num_c;
};

class Units {
 public:
  Units(const PsRoiDims& d, int64_t c_out_chunk)
      : d_(d), c_out_chunk_(c_out_chunk),
        chunks_((d.channels_out + c_out_chunk - 1) / c_out_chunk) {}

  int64_t count() const { return d_.num_images * d_.bins() * chunks_; }

  Unit operator[](int64_t index) const {
    Unit u;
    u.image = index / (d_.bins() * chunks_);
    u.bin = index / chunks_ % d_.bins();
    u.ph = u.bin / d_.pooled_w;
    u.pw = u.bin % d_.pooled_w;
    u.c_begin = (index % chunks_) * c_out_chunk_;
    u.num_c = std::min(c_out_chunk_, d_.channels_out - u.c_begin);
    return u;
  }

 private:
  PsRoiDims d_;
  int64_t c_out_chunk_, chunks_;
};

// Backward for unit `index`: zeroes the unit's planes and adds the share of
// every RoI of its image, in index order, from the bin-major cotangent.
// Units write disjoint memory (no atomics), and the sums do not depend on
// how units are split among threads: bitwise reproducible.
template <typename T, typename Layout>
void backward_unit(const T* cotangent_bin_major, const PsRoiDims& d,
                   const RoiTables<T>& tables, const RoisByImage& by_image,
                   const Units& units, int64_t index, T* grad_input) {
  static_assert(std::is_same_v<Layout, NchwLayout>, "the CPU kernels use NCHW strides");
  const Layout layout = Layout::of(d);
  const int64_t plane_stride = d.bins() * d.plane_size();
  const Unit u = units[index];
  T* first_plane = grad_input + layout.plane_offset(u.image, input_channel(d, u.c_begin, u.ph, u.pw));
  for (int64_t c = 0; c < u.num_c; ++c) {
    std::fill(first_plane + c * plane_stride,
              first_plane + c * plane_stride + d.plane_size(), T(0));
  }
  std::optional<RoiWeights<T>> weights;  // for bins too large for the tables
  for (int64_t i = by_image.first[u.image]; i < by_image.first[u.image + 1]; ++i) {
    const int64_t k = by_image.rois[i];
    Window<T> w;
    bool fits;
    if (!tables.window(k, u.ph, u.pw, &w, &fits)) continue;
    const RoiGeometry<T>& g = tables.geometry(k);
    if (!fits) {
      if (!weights) weights.emplace(d);
      weights->compute(g);
      weights->window(u.ph, u.pw, &w);
    }
    scatter_window(w, first_plane + layout.pixel_offset(w.first_row, w.first_col),
                   plane_stride, u.num_c, g.count,
                   cotangent_bin_major + (u.bin * d.num_rois + k) * d.channels_out + u.c_begin,
                   1);
  }
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_PSROI_CPU_KERNELS_H_
