// CPU kernels of the averaging operators (ps_roi_align, roi_align,
// ps_roi_pool): plain C++ loops over the shared math, no XLA types. Each
// function does one contiguous share of the work, so a handler can split a
// call into tasks of its thread pool.
//
// The fast kernels use the separable form of a bin (see roi_math.h): the
// row and column weights of an RoI's bins are computed once, each bin's
// window becomes a tile of combined weights, and that tile serves every
// output channel (window_tiles.h). The forward goes RoI by RoI, in an order
// that keeps neighbouring boxes together. The backward first tabulates the
// RoIs' windows (in passes of RoIs, when they are many: BackwardPlan), then
// goes plane by plane: a work unit takes the planes of one bin (and image)
// and lets every RoI visit them while they are in cache, reading the
// cotangent staged bin-major. Scratch follows what the RoIs touch, not the
// map or the channels (RoiWeights, forward_rois, BackwardPlan); the
// backward's, which grows with the RoIs, is a workspace XLA allocates.
// The forward goes RoI by RoI rather than plane by plane: it writes each
// RoI's outputs once, with no bin-major staging to undo.
//
// Each entry point takes the layout of its kernel-table row. In NCHW a bin's
// window is applied as tiles along rows of contiguous pixels
// (window_tiles.h); channels-last, as runs of channels at each pixel of the
// window (channel_windows.h). The channel order only moves the first channel
// of a bin and the step between its output channels.
#ifndef JAX_PSROI_CPU_AVERAGE_KERNELS_H_
#define JAX_PSROI_CPU_AVERAGE_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "cpu/channel_windows.h"
#include "cpu/window_tiles.h"
#include "roi_math.h"

namespace jax_psroi {
namespace cpu {

// The separable weights (roi_math.h) of the bins of a few RoIs, each in a
// slot: for each bin row the weights of the rows it touches (its span,
// touched_pixels), for each bin column those of its columns, packed one
// after another, and the column tile of every bin column. Sized by what the
// RoIs touch, not by the map: a span holds at most min(size, ceil(|bin
// size|) + 3) pixels, and the spans of an RoI's bin rows (columns) overlap
// only where its bins meet, so a slot holds at most min(PH * H, H + 3 * PH)
// + min(PW * W, W + 3 * PW) weights (fewer for an RoI smaller than the map)
// and PW tiles. (Arrays over the whole axis per bin, PH * H + PW * W, held
// 7.7 million weights for one RoI of 256 x 256 bins on a map 30,000 pixels
// wide.) clear() keeps the memory for the next RoIs.
template <typename T>
class RoiWeights {
 public:
  explicit RoiWeights(const CallShape& shape)
      : shape_(shape), axes_(shape.pooled_h + shape.pooled_w) {}

  void clear() {
    slots_ = 0;
    weights_.clear();
  }

  // Tabulates the bins of `geometry` (not empty) in a new slot; returns it.
  int64_t add(const RoiGeometry<T>& geometry) {
    return add_bins(geometry, AxisSpan{0, shape_.pooled_h - 1}, AxisSpan{0, shape_.pooled_w - 1});
  }

  // Tabulates bin rows `rows` and bin columns `cols` of `geometry` (not
  // empty) in a new slot, the others as bins without samples; returns it.
  // A deformable bin, whose start is its own, is a slot of one row and one
  // column (lib/cpu/deformable_handlers.cc).
  int64_t add_bins(const RoiGeometry<T>& geometry, AxisSpan rows, AxisSpan cols) {
    const int64_t slot = slots_++;
    if (entries_.size() < static_cast<size_t>(slots_ * axes_)) {
      entries_.resize(static_cast<size_t>(slots_ * axes_));
      col_tiles_.resize(static_cast<size_t>(slots_ * shape_.pooled_w));
    }
    Entry* entries = entries_.data() + slot * axes_;
    // Zeros for the most the spans should take (a few pixels more where
    // rounding moves a sample, which grows them), then the spans one after
    // another, then the size they took.
    size_t end = weights_.size();
    weights_.resize(end + most_weights(geometry.y, rows.last - rows.first + 1, shape_.height) +
                        most_weights(geometry.x, cols.last - cols.first + 1, shape_.width),
                    T(0));
    for (int64_t a = 0; a < axes_; ++a) {
      const bool row = a < shape_.pooled_h;
      const RoiAxis<T>& axis = row ? geometry.y : geometry.x;
      const int64_t bin = row ? a : a - shape_.pooled_h;
      const int64_t size = row ? shape_.height : shape_.width;
      const AxisSpan tabulated = row ? rows : cols;
      if (bin < tabulated.first || bin > tabulated.last) {
        entries[a] = Entry{AxisSpan{size, -1}, end};
        continue;
      }
      // Few samples: their taps, kept, give the span; more: touched_pixels,
      // and the samples are gone over again below.
      constexpr int64_t kMostTaps = 2 * kWalkWholeGrid;
      int64_t tap_pixels[kMostTaps];
      T tap_weights[kMostTaps];
      int64_t taps = 0;
      const bool keeps_taps = !axis.whole_pixels && axis.grid <= kWalkWholeGrid;
      AxisSpan span{size, -1};
      if (keeps_taps) {
        for_each_sample_tap(axis, bin, size, [&](int64_t pixel, T weight) {
          tap_pixels[taps] = pixel;
          tap_weights[taps++] = weight;
          span.first = std::min(span.first, pixel);
          span.last = std::max(span.last, pixel);
        });
      } else {
        span = touched_pixels(axis, bin, size);
      }
      entries[a] = Entry{span, end};
      if (span.first > span.last) continue;
      const int64_t pixels = span.last - span.first + 1;
      if (weights_.size() < end + pixels) weights_.resize(end + pixels, T(0));
      T* weights = weights_.data() + end;
      if (keeps_taps) {
        for (int64_t t = 0; t < taps; ++t) weights[tap_pixels[t] - span.first] += tap_weights[t];
      } else {
        for_each_axis_tap(axis, bin, size,
                          [&](int64_t pixel, T weight) { weights[pixel - span.first] += weight; });
      }
      if (!row) {
        make_column_tile(weights, span.first, pixels, shape_.width,
                         &col_tiles_[slot * shape_.pooled_w + bin]);
      }
      end += static_cast<size_t>(pixels);
    }
    weights_.resize(end);
    return slot;
  }

  // Bytes the slots fill now, and the most the object has held.
  size_t bytes() const {
    return weights_.size() * sizeof(T) + static_cast<size_t>(slots_ * axes_) * sizeof(Entry) +
           static_cast<size_t>(slots_ * shape_.pooled_w) * sizeof(ColumnTile<T>);
  }
  size_t capacity_bytes() const {
    return weights_.capacity() * sizeof(T) + entries_.capacity() * sizeof(Entry) +
           col_tiles_.capacity() * sizeof(ColumnTile<T>);
  }

  AxisSpan row_span(int64_t slot, int64_t ph) const { return entry(slot, ph).span; }
  AxisSpan col_span(int64_t slot, int64_t pw) const {
    return entry(slot, shape_.pooled_h + pw).span;
  }
  // The weights of a span, from its first pixel.
  const T* row_weights(int64_t slot, int64_t ph) const {
    return weights_.data() + entry(slot, ph).offset;
  }
  const T* col_weights(int64_t slot, int64_t pw) const {
    return weights_.data() + entry(slot, shape_.pooled_h + pw).offset;
  }
  const ColumnTile<T>& col_tile(int64_t slot, int64_t pw) const {
    return col_tiles_[slot * shape_.pooled_w + pw];
  }

  // Window of bin (ph, pw) of a slot. Returns false when the bin has no
  // sample on the map.
  bool window(int64_t slot, int64_t ph, int64_t pw, Window<T>* w) const {
    const Entry& row = entry(slot, ph);
    const Entry& col = entry(slot, shape_.pooled_h + pw);
    const AxisSpan r = row.span, c = col.span;
    if (r.first > r.last || c.first > c.last) return false;
    w->first_row = r.first;
    w->first_col = c.first;
    w->rows = r.last - r.first + 1;
    w->cols = c.last - c.first + 1;
    w->width = shape_.width;
    w->row_w = weights_.data() + row.offset;
    w->col_w = weights_.data() + col.offset;
    w->col_tile = &col_tile(slot, pw);
    return true;
  }

 private:
  // A bin row's or column's span and where its weights start in weights_.
  struct Entry {
    AxisSpan span;
    size_t offset;
  };
  const Entry& entry(int64_t slot, int64_t axis) const { return entries_[slot * axes_ + axis]; }

  // The most weights the spans of `bins` bins of `axis` take on an axis of
  // `size` pixels: a span at most min(size, ceil(|bin size|) + 3), the spans
  // of neighbouring bins overlapping only where the bins meet.
  static size_t most_weights(const RoiAxis<T>& axis, int64_t bins, int64_t size) {
    const T span = ceil(fabs(axis.bin_size)) + static_cast<T>(3);
    const int64_t each = span < static_cast<T>(size) ? static_cast<int64_t>(span) : size;
    return static_cast<size_t>(std::min(bins * each, size + 3 * bins));
  }

  CallShape shape_;
  int64_t axes_;
  int64_t slots_ = 0;
  std::vector<T> weights_;
  std::vector<Entry> entries_;  // per slot: its bin rows, then its bin columns
  std::vector<ColumnTile<T>> col_tiles_;
};

// Order in which the kernels visit RoIs: by image, then by band of rows,
// then by column of the box centre, so that consecutive RoIs touch nearby
// pixels and find them in cache.
// RoIs that read nothing go last. Used by the forward, whose outputs do not
// depend on the order.
template <typename T>
std::vector<int64_t> locality_order(const T* rois, const CallShape& shape, const BoxRule& rule,
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
  std::vector<Key> keys(static_cast<size_t>(shape.num_rois));
  for (int64_t k = 0; k < shape.num_rois; ++k) {
    const RoiGeometry<T> geometry =
        roi_geometry(rois, k, shape, rule, spatial_scale, sampling_ratio);
    Key& key = keys[k];
    key.index = k;
    if (geometry.empty()) {
      key.image = shape.num_images;
      key.band = key.column = 0.0;
      continue;
    }
    key.image = geometry.image;
    // Finite: empty() is false only for finite geometry.
    const double centre_y =
        geometry.y.start + 0.5 * shape.pooled_h * static_cast<double>(geometry.y.bin_size);
    key.band = std::floor(centre_y / kBandRows);
    key.column = geometry.x.start + 0.5 * shape.pooled_w * static_cast<double>(geometry.x.bin_size);
  }
  std::sort(keys.begin(), keys.end());
  std::vector<int64_t> order(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) order[i] = keys[i].index;
  return order;
}

// RoIs whose windows a forward task applies bin by bin: with many output
// channels, one RoI's windows span many pages, and visiting the same bin of
// neighbouring RoIs together keeps those pages hot; with few channels one
// RoI's windows fit in cache, and one RoI at a time saves the block's tables.
inline int64_t forward_roi_block(const CallShape& shape) {
  return shape.channels_out >= 32 ? 32 : 1;
}

// A block takes no further RoI once its weight tables fill this much
// (half a typical L2: a block is about locality). 32 R-FCN boxes take about
// 30 KB; a single RoI may take more.
constexpr size_t kForwardTableBytes = size_t{256} << 10;

// Weighted averages of window `w` of the bin's channels, from `first` (the
// window's first pixel of the bin's first channel), into out[c * out_stride].
// Consecutive output channels of a bin read channels channel_step() apart,
// so one window serves them all.
template <typename T, typename S, typename Layout>
void gather_bin(const Layout& layout, const CallShape& shape, const Window<T>& w, const S* first,
                T count, S* out, int64_t out_stride, T* scratch) {
  const int64_t channel_stride = shape.channel_step() * layout.channel_stride();
  if constexpr (Layout::kChannelsLast) {
    gather_channel_window(w, first, layout.pixel_offset(1, 0), layout.pixel_offset(0, 1),
                          channel_stride, shape.channels_out, count, out, out_stride, scratch);
  } else {
    (void)scratch;
    gather_window(w, first, channel_stride, shape.channels_out, count, out, out_stride);
  }
}

// Forward for RoIs order[begin..end): every output channel of every bin.
// Input and output in storage type S, RoIs and all arithmetic in its compute
// type T. Returns the most scratch it held, in bytes: the weight tables of a
// block (at most kForwardTableBytes plus one RoI's, RoiWeights), C_out sums
// and a block's geometry, whatever the number of RoIs.
template <typename S, typename Layout, typename T = ComputeType<S>>
size_t forward_rois(const S* input, const T* rois, const CallShape& shape, const BoxRule& rule,
                    T spatial_scale, int64_t sampling_ratio, const int64_t* order, int64_t begin,
                    int64_t end, bool skip_empty_rois, S* output) {
  const Layout layout = Layout::of(shape);
  const int64_t out_stride = Layout::pooled_channel_stride(shape);
  std::vector<T> scratch(static_cast<size_t>(shape.channels_out));
  const int64_t block = forward_roi_block(shape);
  RoiWeights<T> weights(shape);
  std::vector<RoiGeometry<T>> geometries(static_cast<size_t>(block));
  std::vector<int64_t> slot(static_cast<size_t>(block));
  size_t tables = 0;
  for (int64_t first = begin, count; first < end; first += count) {
    weights.clear();
    for (count = 0; count < block && first + count < end &&
                    (count == 0 || weights.bytes() < kForwardTableBytes);
         ++count) {
      geometries[count] =
          roi_geometry(rois, order[first + count], shape, rule, spatial_scale, sampling_ratio);
      slot[count] = geometries[count].empty() ? -1 : weights.add(geometries[count]);
    }
    tables = std::max(tables, weights.capacity_bytes());
    for (int64_t ph = 0; ph < shape.pooled_h; ++ph) {
      for (int64_t pw = 0; pw < shape.pooled_w; ++pw) {
        for (int64_t j = 0; j < count; ++j) {
          const RoiGeometry<T>& geometry = geometries[j];
          const int64_t bin = ph * shape.pooled_w + pw;
          S* out_bin = output + Layout::pooled_offset(shape, order[first + j], 0, bin);
          Window<T> w;
          if (geometry.empty() && skip_empty_rois) continue;  // left as it was
          if (geometry.empty() || !weights.window(slot[j], ph, pw, &w)) {
            for (int64_t c = 0; c < shape.channels_out; ++c) {
              out_bin[c * out_stride] = Storage<S>::store(T(0));
            }
            continue;
          }
          const S* first_pixel = input +
                                 layout.plane_offset(geometry.image, shape.first_channel(bin)) +
                                 layout.pixel_offset(w.first_row, w.first_col);
          gather_bin(layout, shape, w, first_pixel, geometry.divisor(ph, pw, shape), out_bin,
                     out_stride, scratch.data());
        }
      }
    }
  }
  return tables + scratch.capacity() * sizeof(T) +
         geometries.capacity() * (sizeof(RoiGeometry<T>) + sizeof(int64_t));
}

// A call's memory carved into arrays one after another, each from a cache
// line (the backward's workspace, which XLA allocates as the call's further
// result). With no memory it only counts the bytes.
class Carver {
 public:
  explicit Carver(void* memory) : memory_(static_cast<char*>(memory)) {}

  template <typename U>
  U* take(int64_t count) {
    U* p = memory_ ? reinterpret_cast<U*>(memory_ + used_) : nullptr;
    used_ += (static_cast<size_t>(count) * sizeof(U) + 63) / 64 * 64;
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* memory_;
  size_t used_ = 0;
};

// What the backward needs of the bins of a pass's RoIs (a pass: the RoIs
// [first, first + n) that the workspace holds at once; slot i is RoI
// first + i), computed once per pass (in parallel, by RoI) and then shared
// by all units: for each bin row its window rows and their weights, for
// each bin column its window columns, their weights and their column tile.
// Only windows of at most kMaxTileRows rows and kMaxTileColumns columns are
// kept (and, for NCHW, only bin columns that fit a tile); units recompute
// the weights of larger ones (boxes whose bins exceed 8 x 12 pixels of the
// map in float32, 8 x 6 in float64), LargeWindows. About 1.3 KB a slot for
// 7 x 7 bins in float32.
template <typename T>
class RoiTables {
 public:
  static constexpr int64_t kMaxTileColumns = kMaxTileVectors * Lanes<T>::kCount;

  // The tables of up to `slots` RoIs, carved from `memory`.
  RoiTables(const CallShape& shape, int64_t slots, Carver& memory)
      : shape_(shape),
        geometry_(memory.take<RoiGeometry<T>>(slots)),
        roi_rows_(memory.take<AxisSpan>(slots)),
        row_spans_(memory.take<AxisSpan>(slots * shape.pooled_h)),
        col_spans_(memory.take<AxisSpan>(slots * shape.pooled_w)),
        row_w_(memory.take<T>(slots * shape.pooled_h * kMaxTileRows)),
        col_w_(memory.take<T>(slots * shape.pooled_w * kMaxTileColumns)),
        col_tiles_(memory.take<ColumnTile<T>>(slots * shape.pooled_w)) {}

  // Fills the slots of RoIs [begin, end) of the pass from RoI `first`;
  // `weights` is scratch.
  void compute(const T* rois, const BoxRule& rule, T spatial_scale, int64_t sampling_ratio,
               int64_t first, int64_t begin, int64_t end, RoiWeights<T>* weights) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = k - first;
      const RoiGeometry<T> geometry =
          roi_geometry(rois, k, shape_, rule, spatial_scale, sampling_ratio);
      geometry_[i] = geometry;
      roi_rows_[i] = AxisSpan{shape_.height, -1};
      if (geometry.empty()) continue;
      weights->clear();
      const int64_t slot = weights->add(geometry);
      for (int64_t ph = 0; ph < shape_.pooled_h; ++ph) {
        const AxisSpan span = weights->row_span(slot, ph);
        row_spans_[i * shape_.pooled_h + ph] = span;
        if (span.first <= span.last) {
          roi_rows_[i].first = std::min(roi_rows_[i].first, span.first);
          roi_rows_[i].last = std::max(roi_rows_[i].last, span.last);
        }
        if (keeps_rows(span)) {
          std::copy_n(weights->row_weights(slot, ph), span.last - span.first + 1,
                      row_w_ + (i * shape_.pooled_h + ph) * kMaxTileRows);
        }
      }
      for (int64_t pw = 0; pw < shape_.pooled_w; ++pw) {
        const AxisSpan span = weights->col_span(slot, pw);
        col_spans_[i * shape_.pooled_w + pw] = span;
        col_tiles_[i * shape_.pooled_w + pw] = weights->col_tile(slot, pw);
        if (keeps_cols(span)) {
          std::copy_n(weights->col_weights(slot, pw), span.last - span.first + 1,
                      col_w_ + (i * shape_.pooled_w + pw) * kMaxTileColumns);
        }
      }
    }
  }

  const RoiGeometry<T>& geometry(int64_t i) const { return geometry_[i]; }
  // The rows that any bin of slot i reads.
  AxisSpan roi_rows(int64_t i) const { return roi_rows_[i]; }
  AxisSpan row_span(int64_t i, int64_t ph) const { return row_spans_[i * shape_.pooled_h + ph]; }
  AxisSpan col_span(int64_t i, int64_t pw) const { return col_spans_[i * shape_.pooled_w + pw]; }
  // Whether the tables keep the weights of a bin row's (column's) span: a
  // span of 1 to kMaxTileRows rows (kMaxTileColumns columns).
  static bool keeps_rows(AxisSpan span) {
    return span.first <= span.last && span.last - span.first < kMaxTileRows;
  }
  static bool keeps_cols(AxisSpan span) {
    return span.first <= span.last && span.last - span.first < kMaxTileColumns;
  }
  // The weights of a span the tables keep.
  const T* row_weights(int64_t i, int64_t ph) const {
    return row_w_ + (i * shape_.pooled_h + ph) * kMaxTileRows;
  }
  const T* col_weights(int64_t i, int64_t pw) const {
    return col_w_ + (i * shape_.pooled_w + pw) * kMaxTileColumns;
  }

  // Window of bin (ph, pw) of slot i. Returns false when the bin has no
  // sample on the map; sets *fits = false, without a window, when the bin
  // needs the RoI's full weights (NCHW windows also need a column tile).
  bool window(int64_t i, int64_t ph, int64_t pw, bool needs_tile, Window<T>* w,
              bool* fits) const {
    const AxisSpan r = row_spans_[i * shape_.pooled_h + ph];
    const AxisSpan c = col_spans_[i * shape_.pooled_w + pw];
    if (r.first > r.last || c.first > c.last) return false;
    const ColumnTile<T>& tile = col_tiles_[i * shape_.pooled_w + pw];
    w->rows = r.last - r.first + 1;
    w->cols = c.last - c.first + 1;
    *fits = keeps_rows(r) && keeps_cols(c) && (!needs_tile || tile.vectors > 0);
    if (!*fits) return true;
    w->first_row = r.first;
    w->first_col = c.first;
    w->width = shape_.width;
    w->row_w = row_weights(i, ph);
    w->col_w = col_weights(i, pw);
    w->col_tile = &tile;
    return true;
  }

 private:
  CallShape shape_;
  RoiGeometry<T>* geometry_;
  AxisSpan *roi_rows_, *row_spans_, *col_spans_;
  T *row_w_, *col_w_;
  ColumnTile<T>* col_tiles_;
};

// Windows of bins too large for the tables: the RoI's weights, computed
// when one of its bins first needs them and kept while the rest of its
// bins are visited.
template <typename T>
class LargeWindows {
 public:
  explicit LargeWindows(const CallShape& shape) : shape_(shape) {}

  void window(int64_t roi, const RoiGeometry<T>& geometry, int64_t ph, int64_t pw, Window<T>* w) {
    if (!weights_) weights_.emplace(shape_);
    if (roi != roi_) {
      weights_->clear();
      weights_->add(geometry);
      roi_ = roi;
    }
    weights_->window(0, ph, pw, w);
  }

 private:
  CallShape shape_;
  std::optional<RoiWeights<T>> weights_;
  int64_t roi_ = -1;  // whose weights weights_ holds
};

// Values the backward keeps of each (bin, RoI): the bin's C_out output
// channels, padded channels-last to whole vectors when a run is short (zero
// cotangent in the padding), so that a tap is a fixed number of vector
// multiply-adds (channel_windows.h).
template <typename T>
int64_t staged_run(const CallShape& shape, bool channels_last) {
  return channels_last ? padded_run<T>(shape.channels_out) : shape.channels_out;
}

// The cotangent (pooled tensor in `Layout`, storage type S) of a pass's
// RoIs [begin, end), slots [0, n) from RoI `first`, laid out bin-major,
// [PH * PW][n][run], in compute type T, so that a backward unit reads one
// bin's values contiguously; written in runs, while the RoI's reads stay in
// cache. Only RoIs that read something (in `tables`): no unit visits the
// others (a level of multi-scale RoI Align sees the RoIs of the other
// levels as such).
template <typename S, typename Layout, typename T = ComputeType<S>>
void to_bin_major(const S* values, const CallShape& shape, const RoiTables<T>& tables,
                  int64_t first, int64_t n, int64_t begin, int64_t end, T* bin_major) {
  const int64_t stride = Layout::pooled_channel_stride(shape);
  const int64_t run = staged_run<T>(shape, Layout::kChannelsLast);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t i = k - first;
    if (tables.geometry(i).empty()) continue;
    for (int64_t bin = 0; bin < shape.bins(); ++bin) {
      T* to = bin_major + (bin * n + i) * run;
      const S* from = values + Layout::pooled_offset(shape, k, 0, bin);
      for (int64_t c = 0; c < shape.channels_out; ++c) to[c] = Storage<S>::load(from[c * stride]);
      std::fill(to + shape.channels_out, to + run, T(0));
    }
  }
}

// The RoIs of each image that read something, in index order: image n's
// are rois[first[n] .. first[n + 1]).
struct RoisByImage {
  std::vector<int64_t> first, rois;
};

// Sorts RoIs by image (a counting sort); image_of(k) is RoI k's image, or
// -1 when it reads nothing.
template <typename ImageOf>
RoisByImage rois_by_image(const CallShape& shape, ImageOf image_of) {
  std::vector<int64_t> image(static_cast<size_t>(shape.num_rois));
  RoisByImage by;
  by.first.assign(static_cast<size_t>(shape.num_images + 1), 0);
  for (int64_t k = 0; k < shape.num_rois; ++k) {
    image[k] = image_of(k);
    if (image[k] >= 0) ++by.first[image[k] + 1];
  }
  for (int64_t n = 0; n < shape.num_images; ++n) by.first[n + 1] += by.first[n];
  by.rois.resize(static_cast<size_t>(by.first[shape.num_images]));
  std::vector<int64_t> next(by.first.begin(), by.first.end() - 1);
  for (int64_t k = 0; k < shape.num_rois; ++k) {
    if (image[k] >= 0) by.rois[next[image[k]]++] = k;
  }
  return by;
}

// The slots [0, n) of filled `tables` that have samples, by image.
template <typename T>
RoisByImage rois_by_image(const RoiTables<T>& tables, const CallShape& shape, int64_t n) {
  CallShape pass = shape;
  pass.num_rois = n;
  return rois_by_image(pass, [&](int64_t i) {
    const RoiGeometry<T>& geometry = tables.geometry(i);
    return geometry.empty() ? int64_t{-1} : geometry.image;
  });
}

// What the units of one pass read: its tables, its RoIs by image (slots)
// and its n slots' cotangent bin-major in runs of `run`.
template <typename T>
struct Pass {
  const RoiTables<T>& tables;
  const RoisByImage& by_image;
  const T* bin_major;
  int64_t n, run;

  const T* cotangent(int64_t i, int64_t bin) const { return bin_major + (bin * n + i) * run; }
};

// A backward work unit owns part of one image's gradient, which stays in
// cache while every RoI of the image visits it, in index order. Units write
// disjoint memory (no atomics), and the sums do not depend on how units are
// split among threads: bitwise reproducible.
//
// The part follows the memory. In NCHW a unit takes the planes of one bin
// and a chunk of output channels, as many as fit the budget (with shared
// channels, roi_align's, every bin feeds the same planes: a unit takes a
// chunk of planes and every bin). Channels-last,
// where the channels of a pixel are contiguous and a bin's channels are not
// (in torchvision's order they are bins() apart), a unit takes a band of
// rows with all their channels: one contiguous block.
struct Unit {
  int64_t image;
  int64_t bin_begin, bin_end;  // NCHW: the bins feeding its planes
  int64_t c_begin, num_c;    // NCHW
  int64_t row_begin, row_end;  // channels-last
};

// Half of this machine's L2 cache (per core) as the system reports it,
// within [256 KiB, 1 MiB]; 256 KiB, half of a typical 512 KiB L2, where it
// does not say.
inline int64_t half_l2_bytes() {
  constexpr int64_t kLeast = int64_t{256} << 10, kMost = int64_t{1} << 20;
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t half =
      std::clamp<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE) / 2, kLeast, kMost);
  return half;
#else
  return kLeast;
#endif
}

class Units {
 public:
  Units(const CallShape& shape, size_t element_bytes, bool channels_last)
      : shape_(shape), channels_last_(channels_last) {
    // Half of a typical 512 KiB L2 cache: NCHW units hold whole planes.
    constexpr int64_t kBudgetBytes = int64_t{256} << 10;
    const int64_t bytes = static_cast<int64_t>(element_bytes);
    if (channels_last) {
      // Bands split the windows that cross them, and each split costs a
      // visit: as many rows as half the L2 holds, so that a band's windows
      // stay in cache while its RoIs visit them. The split does not change
      // any sum: results are the same on every machine.
      const int64_t row_bytes = std::max<int64_t>(1, shape.width * shape.channels * bytes);
      per_unit_ = balanced_chunk(shape.height, half_l2_bytes() / row_bytes);
      chunks_ = shape.channels > 0 ? (shape.height + per_unit_ - 1) / per_unit_ : 0;
    } else {
      const int64_t plane_bytes = std::max<int64_t>(1, shape.plane_size() * bytes);
      per_unit_ = balanced_chunk(shape.channels_out, kBudgetBytes / plane_bytes);
      chunks_ = plane_sets(shape) * ((shape.channels_out + per_unit_ - 1) / per_unit_);
    }
  }

  int64_t count() const { return shape_.num_images * chunks_; }

  Unit operator[](int64_t index) const {
    Unit u{index / chunks_, 0, shape_.bins(), 0, shape_.channels_out, 0, shape_.height};
    const int64_t chunk = index % chunks_;
    if (channels_last_) {
      u.row_begin = chunk * per_unit_;
      u.row_end = std::min(u.row_begin + per_unit_, shape_.height);
    } else {
      const int64_t c_chunks = chunks_ / plane_sets(shape_);
      if (!shape_.shared_channels()) {
        u.bin_begin = chunk / c_chunks;
        u.bin_end = u.bin_begin + 1;
      }
      u.c_begin = chunk % c_chunks * per_unit_;
      u.num_c = std::min(per_unit_, shape_.channels_out - u.c_begin);
    }
    return u;
  }

 private:
  // NCHW: sets of planes that different bins feed (one set with shared
  // channels).
  static int64_t plane_sets(const CallShape& shape) {
    return shape.shared_channels() ? 1 : shape.bins();
  }

  // Equal chunks of at most `most` (at least 1) covering `total`.
  static int64_t balanced_chunk(int64_t total, int64_t most) {
    most = std::max<int64_t>(1, most);
    if (total <= 0) return 1;
    const int64_t chunks = (total + most - 1) / most;
    return (total + chunks - 1) / chunks;
  }

  CallShape shape_;
  bool channels_last_;
  int64_t per_unit_;  // output channels (NCHW) or rows (channels-last)
  int64_t chunks_;    // units per image
};

// NCHW unit: adds every RoI's windows of its bins (RoI by RoI, bins in
// order) of one pass to its num_c planes, `channel_stride` apart from
// `first_plane`.
template <typename T>
void backward_planes(const Pass<T>& pass, const CallShape& shape, const Unit& u, T* first_plane,
                     int64_t channel_stride) {
  const NchwLayout layout = NchwLayout::of(shape);
  const RoisByImage& by_image = pass.by_image;
  LargeWindows<T> large(shape);
  for (int64_t j = by_image.first[u.image]; j < by_image.first[u.image + 1]; ++j) {
    const int64_t i = by_image.rois[j];
    const RoiGeometry<T>& geometry = pass.tables.geometry(i);
    for (int64_t bin = u.bin_begin; bin < u.bin_end; ++bin) {
      const int64_t ph = bin / shape.pooled_w, pw = bin % shape.pooled_w;
      Window<T> w;
      bool fits;
      if (!pass.tables.window(i, ph, pw, /*needs_tile=*/true, &w, &fits)) continue;
      if (!fits) large.window(i, geometry, ph, pw, &w);
      scatter_window(w, first_plane + layout.pixel_offset(w.first_row, w.first_col), channel_stride,
                     u.num_c, geometry.divisor(ph, pw, shape), pass.cotangent(i, bin) + u.c_begin,
                     1);
    }
  }
}

// Rows [first_row, last_row] of bin row ph of slot i, whose rows are in the
// tables, added to a band whose row first_row is `band_row`, in runs of V
// vectors: row by row, skipping rows that weigh nothing (between the samples
// of a large bin), then bin by bin along the row; bins whose columns are not
// in the tables take the RoI's weights (`large`) and skip weightless
// columns.
template <typename T, int V>
void add_bin_row(const Pass<T>& pass, const CallShape& shape, int64_t i, int64_t ph,
                 int64_t first_row, int64_t last_row, T* band_row, int64_t row_stride,
                 int64_t pixel_stride, LargeWindows<T>& large) {
  constexpr int64_t kRun = V * Lanes<T>::kCount;
  const RoiTables<T>& tables = pass.tables;
  const RoiGeometry<T>& geometry = tables.geometry(i);
  const AxisSpan rows = tables.row_span(i, ph);
  const T* row_weights = tables.row_weights(i, ph) - rows.first;
  for (int64_t y = first_row; y <= last_row; ++y, band_row += row_stride) {
    if (row_weights[y] == T(0)) continue;
    for (int64_t pw = 0; pw < shape.pooled_w; ++pw) {
      const AxisSpan cols = tables.col_span(i, pw);
      if (cols.first > cols.last) continue;
      const int64_t bin = ph * shape.pooled_w + pw;
      const T* cot = pass.cotangent(i, bin);
      T* first = band_row + (shape.shared_channels() ? 0 : bin * kRun);
      const T divisor = geometry.divisor(ph, pw, shape);
      Window<T> w{};
      const bool cols_kept = RoiTables<T>::keeps_cols(cols);
      if (cols_kept) {
        w.first_col = cols.first;
        w.cols = cols.last - cols.first + 1;
        w.col_w = tables.col_weights(i, pw);
      } else {
        large.window(i, geometry, ph, pw, &w);
      }
      w.rows = 1;
      w.row_w = row_weights + y;
      T* at = first + w.first_col * pixel_stride;
      if (cols_kept) {
        scatter_vector_runs<T, V>(w, at, row_stride, pixel_stride, divisor, cot);
      } else {
        scatter_sparse_runs(w, at, row_stride, pixel_stride, kRun, divisor, cot);
      }
    }
  }
}

// Channels-last unit: adds the part of every RoI's bin windows of one pass
// that falls in its rows, whose first pixel is `band`. Each pixel's
// channels are summed bin-major, whatever the map's order: bin b's output
// channels are a run at b * run (at 0 for every bin with shared channels),
// `run` = staged_run() channels from the pixel's first; pixels are
// `pixel_stride` apart, rows `width` pixels. V: vectors in a padded run, 0
// for runs too long to pad. With padded runs, a bin row whose weights are in
// the tables goes row by row (add_bin_row): a unit is often a single row of
// the map, and the rows of a window between samples weigh nothing. Other
// bins go window by window, skipping weightless pixels.
template <typename T, int V>
void backward_rows(const Pass<T>& pass, const CallShape& shape, const Unit& u, T* band,
                   int64_t pixel_stride) {
  const RoiTables<T>& tables = pass.tables;
  const RoisByImage& by_image = pass.by_image;
  const int64_t run = pass.run;
  const int64_t row_stride = shape.width * pixel_stride;
  LargeWindows<T> large(shape);
  for (int64_t j = by_image.first[u.image]; j < by_image.first[u.image + 1]; ++j) {
    const int64_t i = by_image.rois[j];
    const AxisSpan roi_rows = tables.roi_rows(i);
    if (roi_rows.last < u.row_begin || roi_rows.first >= u.row_end) continue;
    const RoiGeometry<T>& geometry = tables.geometry(i);
    for (int64_t ph = 0; ph < shape.pooled_h; ++ph) {
      const AxisSpan rows = tables.row_span(i, ph);
      const int64_t first_row = std::max(rows.first, u.row_begin);
      const int64_t last_row = std::min(rows.last, u.row_end - 1);
      if (first_row > last_row) continue;
      if constexpr (V > 0) {
        if (RoiTables<T>::keeps_rows(rows)) {
          add_bin_row<T, V>(pass, shape, i, ph, first_row, last_row,
                            band + (first_row - u.row_begin) * row_stride, row_stride, pixel_stride,
                            large);
          continue;
        }
      }
      for (int64_t pw = 0; pw < shape.pooled_w; ++pw) {
        Window<T> w{};
        bool fits;
        if (!tables.window(i, ph, pw, /*needs_tile=*/false, &w, &fits)) continue;
        if (!fits) large.window(i, geometry, ph, pw, &w);
        // The rows of the window in this unit's band.
        w.row_w += first_row - w.first_row;
        w.first_row = first_row;
        w.rows = last_row - first_row + 1;
        const int64_t bin = ph * shape.pooled_w + pw;
        scatter_sparse_runs(
            w,
            band + (first_row - u.row_begin) * row_stride + w.first_col * pixel_stride +
                (shape.shared_channels() ? 0 : bin * run),
            row_stride, pixel_stride, run, geometry.divisor(ph, pw, shape), pass.cotangent(i, bin));
      }
    }
  }
}

// backward_rows for the pass's runs.
template <typename T>
void backward_rows(const Pass<T>& pass, const CallShape& shape, const Unit& u, T* band,
                   int64_t pixel_stride) {
  constexpr int64_t L = Lanes<T>::kCount;
  const int64_t vectors = pass.run <= kMaxPaddedRun ? pass.run / L : 0;
  auto rows = [&](auto v) {
    backward_rows<T, decltype(v)::value>(pass, shape, u, band, pixel_stride);
  };
  dispatch_vectors<kMaxPaddedRun / L>(vectors, rows);
}

// One pixel's channels, summed bin-major in runs of `run` (backward_rows),
// written in the map's channel order and storage type S. In torchvision's
// order that is a transpose of [bins][C_out] into [C_out][bins], done in
// blocks of kCount x kCount by vector shuffles.
template <typename T, typename S>
void pixel_from_bin_major(const T* from, int64_t run, const CallShape& shape, S* to) {
  if (shape.channel_order != ChannelOrder::kTorchvision) {
    const int64_t groups = shape.shared_channels() ? 1 : shape.bins();
    for (int64_t bin = 0; bin < groups; ++bin) {
      for (int64_t c = 0; c < shape.channels_out; ++c) {
        to[bin * shape.channels_out + c] = Storage<S>::store(from[bin * run + c]);
      }
    }
    return;
  }
  using Vec = typename Lanes<T>::Vec;
  constexpr int64_t L = Lanes<T>::kCount;
  const int64_t bins = shape.bins(), channels_out = shape.channels_out;
  // Output channels c..c + L of bins bin..bin + L; `lanes` of them are real.
  auto block = [&](int64_t bin, int64_t c, int64_t lanes) {
    Vec v[L];
    for (int64_t j = 0; j < L; ++j) v[j] = load_vec(from + (bin + j) * run + c);
    transpose<T>(v);
    for (int64_t i = 0; i < lanes; ++i) {
      S* out = to + (c + i) * bins + bin;
      if constexpr (std::is_same_v<S, T>) {
        store_vec(out, v[i]);
      } else {
        for (int64_t j = 0; j < L; ++j) out[j] = Storage<S>::store(v[i][j]);
      }
    }
  };
  int64_t bin = 0;
  for (; bin + L <= bins; bin += L) {
    int64_t c = 0;
    for (; c + L <= channels_out; c += L) block(bin, c, L);
    if (c == channels_out) continue;
    if (c + L <= run) {  // a padded run: whole vectors
      block(bin, c, channels_out - c);
    } else {
      for (; c < channels_out; ++c) {
        for (int64_t j = 0; j < L; ++j) {
          to[c * bins + bin + j] = Storage<S>::store(from[(bin + j) * run + c]);
        }
      }
    }
  }
  for (; bin < bins; ++bin) {
    for (int64_t c = 0; c < channels_out; ++c) {
      to[c * bins + bin] = Storage<S>::store(from[bin * run + c]);
    }
  }
}

// Whether backward units sum their part of the gradient apart from it (and
// then write it out): 16-bit gradients sum in float32, and channels-last
// ones bin-major in padded runs unless the map's order is that (bin-major
// or shared channels, runs unpadded).
template <typename S, typename Layout, typename T = ComputeType<S>>
bool sums_apart(const CallShape& shape) {
  if (!std::is_same_v<S, T>) return true;
  return Layout::kChannelsLast && !(shape.channel_order != ChannelOrder::kTorchvision &&
                                    staged_run<T>(shape, true) == shape.channels_out);
}

// Elements of the sums of every unit apart from the gradient: the gradient
// in NCHW, each pixel's bin-major runs channels-last.
template <typename T, typename Layout>
int64_t apart_elements(const CallShape& shape) {
  if constexpr (Layout::kChannelsLast) {
    const int64_t groups = shape.shared_channels() ? 1 : shape.bins();
    return shape.num_images * shape.plane_size() * groups * staged_run<T>(shape, true);
  } else {
    return shape.feature_elements();
  }
}

// A backward call takes its RoIs in passes: the tables and the bin-major
// cotangent of a pass's RoIs are made in the workspace that XLA allocates
// as the call's further result, then every unit adds them to its part of
// the gradient. A pass holds as many RoIs as fit max(kPassBytes, the
// gradient's size in the compute type): every RoI's tables at once took
// 1.6-2.1 KB per RoI outside XLA's sight, and with 10^6 RoIs every unit
// streamed them all from memory (11 s where the forward took 1.4 s). Each
// further pass makes each unit that meets its RoIs visit its part again;
// with passes the size of the gradient that costs at most what the pass
// itself moves. Units whose sums are apart from the gradient keep them
// between passes in an accumulator in the workspace (the gradient's size,
// in float32 for 16-bit types; channels-last, padded runs). Each element
// still sums its terms in RoI order from zero: the gradient does not depend
// on the passes, bit for bit.
constexpr int64_t kPassBytes = int64_t{8} << 20;

struct BackwardPlan {
  int64_t pass_rois;  // RoIs of a pass (the last may have fewer)
  int64_t passes;     // at least 1: a call without RoIs still zeroes the gradient
  bool accumulates;   // whether units keep their sums in the workspace's accumulator
};

// Workspace bytes of a plan.
template <typename S, typename Layout, typename T = ComputeType<S>>
size_t workspace_bytes(const CallShape& shape, int64_t pass_rois, bool accumulates) {
  Carver memory(nullptr);
  RoiTables<T>(shape, pass_rois, memory);
  memory.take<T>(pass_rois * shape.bins() * staged_run<T>(shape, Layout::kChannelsLast));
  if (accumulates) memory.take<T>(apart_elements<T, Layout>(shape));
  return memory.used();
}

// The most RoIs, up to all, whose pass fits `limit` bytes of workspace.
template <typename S, typename Layout>
int64_t largest_pass(const CallShape& shape, size_t limit, bool accumulates) {
  int64_t lo = 0, hi = shape.num_rois;  // the answer is in [lo, hi]
  while (lo < hi) {
    const int64_t mid = hi - (hi - lo) / 2;
    if (workspace_bytes<S, Layout>(shape, mid, accumulates) <= limit) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The workspace of passes of `pass_rois` RoIs (all of them: one pass, no
// accumulator).
template <typename S, typename Layout>
size_t pass_workspace_bytes(const CallShape& shape, int64_t pass_rois) {
  return workspace_bytes<S, Layout>(shape, pass_rois,
                                    pass_rois < shape.num_rois && sums_apart<S, Layout>(shape));
}

// The least workspace that any plan fits: all RoIs in one pass, or passes
// of one RoI beside the accumulator.
template <typename S, typename Layout>
size_t least_workspace_bytes(const CallShape& shape) {
  return std::min(pass_workspace_bytes<S, Layout>(shape, shape.num_rois),
                  pass_workspace_bytes<S, Layout>(shape, std::min<int64_t>(1, shape.num_rois)));
}

// The plan of a call given `available` workspace bytes, at least
// least_workspace_bytes: one pass when every RoI fits, else passes of as
// many RoIs as fit beside the accumulator.
template <typename S, typename Layout>
BackwardPlan plan_backward(const CallShape& shape, size_t available) {
  const int64_t k = shape.num_rois;
  if (workspace_bytes<S, Layout>(shape, k, false) <= available) return {k, 1, false};
  const bool accumulates = sums_apart<S, Layout>(shape);
  const int64_t n = largest_pass<S, Layout>(shape, available, accumulates);
  return {n, (k + n - 1) / n, accumulates};
}

// The workspace a backward call asks XLA for (jax_psroi._averaging): all
// RoIs in one pass when their tables and cotangent fit max(kPassBytes, the
// gradient in the compute type), else passes of that size (at least one
// RoI) and the accumulator.
template <typename S, typename Layout, typename T = ComputeType<S>>
size_t backward_workspace_bytes(const CallShape& shape) {
  const size_t budget =
      std::max<size_t>(kPassBytes, static_cast<size_t>(shape.feature_elements()) * sizeof(T));
  const int64_t n = std::max<int64_t>(1, largest_pass<S, Layout>(shape, budget, false));
  return pass_workspace_bytes<S, Layout>(shape, std::min(n, shape.num_rois));
}

// Where a unit's sums go in one pass: the first zeroes them, the last
// writes them into the gradient (when apart from it); with several passes,
// sums apart from the gradient are kept in `accumulator`, laid out as
// apart_elements says.
template <typename T>
struct PassOrder {
  bool first, last;
  T* accumulator;  // null with a single pass
};

// Backward for unit `index` and one pass: its part of the gradient, from
// the pass's bin-major cotangent, summed in compute type T. With a 16-bit
// storage type S the unit sums apart (its part fits the cache budget, or in
// the accumulator) and rounds each result into `grad` once; otherwise it
// sums in `grad` itself where the layout allows.
template <typename S, typename Layout, typename T = ComputeType<S>>
void backward_unit(const Pass<T>& pass, const CallShape& shape, const Units& units, int64_t index,
                   const PassOrder<T>& order, S* grad) {
  const Layout layout = Layout::of(shape);
  const Unit u = units[index];
  thread_local std::vector<T> scratch;
  // A unit is at least a row or a plane, which can exceed the cache budget
  // on large maps: such scratch goes back when the unit is done.
  struct Release {
    ~Release() {
      if (scratch.capacity() * sizeof(T) > (size_t{1} << 20)) std::vector<T>().swap(scratch);
    }
  } release;
  if constexpr (Layout::kChannelsLast) {
    S* band = grad + layout.plane_offset(u.image, 0) + layout.pixel_offset(u.row_begin, 0);
    const int64_t pixels = (u.row_end - u.row_begin) * shape.width;
    if constexpr (std::is_same_v<S, T>) {
      if (!sums_apart<S, Layout>(shape)) {  // summed as laid out
        if (order.first) std::fill(band, band + pixels * shape.channels, T(0));
        backward_rows(pass, shape, u, band, shape.channels);
        return;
      }
    }
    // The band summed bin-major in padded runs (in torchvision's order a
    // tap's output channels would be bins() apart, a cache line each), then
    // each pixel's channels written out in the map's order and type.
    const int64_t pixel_stride = (shape.shared_channels() ? 1 : shape.bins()) * pass.run;
    T* sums;
    if (order.accumulator) {
      sums =
          order.accumulator + (u.image * shape.height + u.row_begin) * shape.width * pixel_stride;
    } else {
      scratch.resize(static_cast<size_t>(pixels * pixel_stride));
      sums = scratch.data();
    }
    if (order.first) std::fill(sums, sums + pixels * pixel_stride, T(0));
    backward_rows(pass, shape, u, sums, pixel_stride);
    if (!order.last) return;
    for (int64_t pixel = 0; pixel < pixels; ++pixel) {
      pixel_from_bin_major(sums + pixel * pixel_stride, pass.run, shape,
                           band + pixel * shape.channels);
    }
  } else {
    const int64_t channel_stride = shape.channel_step() * layout.channel_stride();
    const int64_t first_offset = layout.plane_offset(
        u.image, shape.first_channel(u.bin_begin) + u.c_begin * shape.channel_step());
    auto zero = [&](T* planes, int64_t stride) {
      for (int64_t c = 0; c < u.num_c; ++c) {
        std::fill(planes + c * stride, planes + c * stride + shape.plane_size(), T(0));
      }
    };
    if constexpr (std::is_same_v<S, T>) {
      T* planes = grad + first_offset;
      if (order.first) zero(planes, channel_stride);
      backward_planes(pass, shape, u, planes, channel_stride);
    } else {
      // The unit's planes in the accumulator, at the gradient's places, or
      // packed in scratch.
      T* sums;
      int64_t stride = channel_stride;
      if (order.accumulator) {
        sums = order.accumulator + first_offset;
      } else {
        scratch.resize(static_cast<size_t>(u.num_c * shape.plane_size()));
        sums = scratch.data();
        stride = shape.plane_size();
      }
      if (order.first) zero(sums, stride);
      backward_planes(pass, shape, u, sums, stride);
      if (!order.last) return;
      for (int64_t c = 0; c < u.num_c; ++c) {
        const T* from = sums + c * stride;
        S* to = grad + first_offset + c * channel_stride;
        for (int64_t p = 0; p < shape.plane_size(); ++p) to[p] = Storage<S>::store(from[p]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_AVERAGE_KERNELS_H_
