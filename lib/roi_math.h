// The per-element math every operator shares: box geometry, sampling grids,
// bilinear weights, windows of whole pixels and their maxima.
//
// This header is the single source of truth for box geometry, the sampling
// grid, bilinear weights and the per-output-element work. It compiles for the
// host (CPU kernels, and therefore every CPU test) and for the device (CUDA
// kernels), so the GPU runs exactly the arithmetic the CPU tests check.
//
// Semantics follow torchvision's ps_roi_align kernel (0.29), and its
// roi_align with kShared channels: a -0.5 pixel offset and no clamp of the
// RoI size (roi_align with aligned=False, BoxRule::aligned false: no
// offset, sizes clamped to at least 1), an adaptive grid of ceil(bin_size)
// samples per bin axis when sampling_ratio <= 0, samples in [-1, 0] reading the border,
// samples outside [-1, size] contributing 0, and division by the sample count.
// With BoxRule::whole_pixels (ps_roi_pool) a bin instead averages the whole
// pixels of a window (RoiAxis::window): the same bins, channels and
// separable form, another rule for which pixels a bin weighs.
// Deliberate deviations (each one a case where torchvision reads out of
// bounds, returns NaN or never terminates):
//   * an RoI with a batch index outside [0, N) or NaN gives 0 and reads nothing;
//   * an RoI with non-finite geometry gives 0;
//   * an empty sampling grid (zero-size or inverted box, adaptive) gives 0;
//   * samples outside the feature map are skipped by computing the range of
//     in-map samples (binary search over a monotone coordinate), so the work
//     per bin is bounded by the map size however large the box is;
//   * the grid is capped at kMaxGridPerAxis samples per bin axis.
#ifndef JAX_PSROI_ROI_MATH_H_
#define JAX_PSROI_ROI_MATH_H_

#include <cmath>
#include <cstdint>

#include "storage_types.h"

namespace jax_psroi {

// Beyond 2^23 samples, `i + 0.5` is no longer exact in float32 (torchvision
// computes it in float), and torchvision would loop that many times per bin.
constexpr int64_t kMaxGridPerAxis = int64_t{1} << 23;

// Which input channel each output channel of each bin reads.
enum class ChannelOrder : int64_t {
  // torchvision's: output channel c of bin (i, j) reads (c * PH + i) * PW + j.
  kTorchvision = 0,
  // The TF Object Detection API's grouping: (i * PW + j) * C_out + c, so the
  // C_out channels of one bin are contiguous.
  kBinMajor = 1,
  // RoI Align's: output channel c of every bin reads input channel c
  // (C = C_out). Not position-sensitive; a pixel's bins all feed the same
  // channels.
  kShared = 2,
};

// Sizes of one call, shared by forward and backward.
struct CallShape {
  int64_t num_images;    // N
  int64_t channels;      // C = channels_out * pooled_h * pooled_w
  int64_t height;        // H
  int64_t width;         // W
  int64_t num_rois;      // K
  int64_t channels_out;  // C / (pooled_h * pooled_w)
  int64_t pooled_h;
  int64_t pooled_w;
  ChannelOrder channel_order;
  // The bin rows this call computes: rows [first_bin_row, first_bin_row +
  // pooled_h) of each RoI's grid of bin_rows rows. A device's share of a
  // bin-major map split over channels holds whole bin rows of every RoI
  // (jax_psroi/_partitioning.py); every other call computes the whole grid.
  int64_t first_bin_row = 0;
  int64_t bin_rows = 0;  // 0: pooled_h
  // Image groups, which let jax.vmap fold its mapped axis into the images
  // without rewriting batch indices: the RoIs come in groups of
  // rois_per_group, group g reads the images_per_group images of image group
  // g % (N / images_per_group), and an RoI's batch index counts from its
  // group's first image. 0 (the default) for either: one group, the batch
  // index is the image. Integers, so the image is exact however many images
  // a batch folds together (a float32 batch index is not past 2^24).
  int64_t rois_per_group = 0;
  int64_t images_per_group = 0;

  PSROI_HD int64_t group_rois() const {
    return rois_per_group > 0 ? rois_per_group : (num_rois > 0 ? num_rois : 1);
  }
  PSROI_HD int64_t group_images() const {
    return images_per_group > 0 ? images_per_group : num_images;
  }
  PSROI_HD int64_t plane_size() const { return height * width; }
  PSROI_HD int64_t grid_rows() const { return bin_rows > 0 ? bin_rows : pooled_h; }
  PSROI_HD int64_t bins() const { return pooled_h * pooled_w; }
  PSROI_HD int64_t outputs() const { return num_rois * channels_out * bins(); }
  PSROI_HD int64_t feature_elements() const { return num_images * channels * plane_size(); }

  // Input channel read by output channel `c_out` at bin `bin` (= ph * PW + pw):
  // first_channel(bin) + c_out * channel_step().
  PSROI_HD int64_t first_channel(int64_t bin) const {
    if (channel_order == ChannelOrder::kShared) return 0;
    return channel_order == ChannelOrder::kTorchvision ? bin : bin * channels_out;
  }
  PSROI_HD int64_t channel_step() const {
    return channel_order == ChannelOrder::kTorchvision ? bins() : 1;
  }
  PSROI_HD bool shared_channels() const { return channel_order == ChannelOrder::kShared; }
  // (output channel, bin) pairs: the input channels in the position-sensitive
  // orders; C_out times as many as the input's channels when shared.
  PSROI_HD int64_t channel_bins() const { return channels_out * bins(); }
};

// What a kernel computes of the pooled tensor: its value, or its derivative
// with respect to one sampling parameter of each RoI (RoiBox: where an axis
// starts, its bin size), from which jax_psroi/_box_derivatives.py composes
// the derivatives with respect to the box corners. Only rules of samples
// have derivatives: a window of whole pixels is piecewise constant in them.
enum class BoxParameter : int8_t { kValue = 0, kStartX = 1, kBinW = 2, kStartY = 3, kBinH = 4 };

// How an operator turns an RoI into bins: what its policy's box_rule gives
// (lib/operators/).
struct BoxRule {
  // Coordinates shifted by -0.5 pixel, sizes as they are; false: no shift,
  // RoI sizes clamped to at least 1 pixel.
  bool aligned;
  // Corners rounded to whole pixels (C's round), and each bin a window of
  // whole pixels (RoiAxis::window) instead of a grid of samples: the
  // sampling ratio plays no part.
  bool whole_pixels;
  // With whole_pixels: both rounded corner pixels belong to the RoI (end -
  // start + 1 pixels), and windows are clipped to [0, size], so they may
  // reach the last row and column (RoI Pool's; ps_roi_pool's forward clips
  // them to [0, size - 1]).
  bool inclusive_corners;
  // The box directions' parameter (kernel_table.h); the operator's rule
  // computes values.
  BoxParameter derivative = BoxParameter::kValue;

  static constexpr PSROI_HD BoxRule samples(bool aligned) { return {aligned, false, false}; }
  static constexpr PSROI_HD BoxRule windows(bool inclusive_corners) {
    return {false, true, inclusive_corners};
  }
};

// Layouts: where feature element (n, c, y, x) and pooled element
// (k, c_out, ph, pw) live. Each is one line in the kernel table's list of
// layouts (kernel_table.h). kAxes: the positions of N, C, H, W in the
// features' shape, which are also those of K, C_out, PH, PW in the pooled
// tensor's.

// Features [N, C, H, W], pooled [K, C_out, PH, PW]: planes of contiguous rows.
struct NchwLayout {
  static constexpr bool kChannelsLast = false;
  static constexpr int kAxes[4] = {0, 1, 2, 3};
  int64_t channels, height, width;

  static PSROI_HD NchwLayout of(const CallShape& shape) {
    return NchwLayout{shape.channels, shape.height, shape.width};
  }
  PSROI_HD int64_t plane_offset(int64_t image, int64_t channel) const {
    return (image * channels + channel) * height * width;
  }
  PSROI_HD int64_t pixel_offset(int64_t y, int64_t x) const { return y * width + x; }
  // Elements between channel c and c + 1 of one pixel.
  PSROI_HD int64_t channel_stride() const { return height * width; }

  static PSROI_HD int64_t pooled_offset(const CallShape& shape, int64_t roi, int64_t c_out,
                                        int64_t bin) {
    return (roi * shape.channels_out + c_out) * shape.bins() + bin;
  }
  static PSROI_HD int64_t pooled_channel_stride(const CallShape& shape) { return shape.bins(); }
};

// Features [N, H, W, C], pooled [K, PH, PW, C_out]: every pixel holds its
// channels contiguously (Flax's convention).
struct NhwcLayout {
  static constexpr bool kChannelsLast = true;
  static constexpr int kAxes[4] = {0, 3, 1, 2};
  int64_t channels, height, width;

  static PSROI_HD NhwcLayout of(const CallShape& shape) {
    return NhwcLayout{shape.channels, shape.height, shape.width};
  }
  PSROI_HD int64_t plane_offset(int64_t image, int64_t channel) const {
    return image * height * width * channels + channel;
  }
  PSROI_HD int64_t pixel_offset(int64_t y, int64_t x) const {
    return (y * width + x) * channels;
  }
  PSROI_HD int64_t channel_stride() const { return 1; }

  static PSROI_HD int64_t pooled_offset(const CallShape& shape, int64_t roi, int64_t c_out,
                                        int64_t bin) {
    return (roi * shape.bins() + bin) * shape.channels_out + c_out;
  }
  static PSROI_HD int64_t pooled_channel_stride(const CallShape&) { return 1; }
};

// Pixels [first, last] of an axis; empty when first > last.
struct AxisSpan {
  int64_t first, last;
};

// One axis (y or x) of an RoI: where it starts, its bin size and how many
// samples each bin takes along this axis.
template <typename T>
struct RoiAxis {
  T start;
  T bin_size;
  int64_t grid;  // samples per bin along this axis; 0 means "no samples"
  int64_t first_bin;  // the RoI's bin that this call's bin 0 is
  bool whole_pixels;  // BoxRule::whole_pixels: bins are windows, not samples
  bool reaches_last;  // BoxRule::inclusive_corners: windows clipped to [0, size]
  // What the taps of a sample weigh (sample_tap): 0, their bilinear
  // weights; 1 or 2, those weights' derivatives with respect to `start` or
  // `bin_size` (BoxRule::derivative).
  int8_t derivative;

  // Window of bin `bin` on an axis of `size` pixels (whole_pixels), as
  // torchvision's ps_roi_pool forward and roi_pool take it: [floor(b *
  // bin_size), ceil((b + 1) * bin_size)) past the rounded start, both ends
  // clipped to [0, size - 1] (ps_roi_pool: its windows never reach the last
  // pixel) or to [0, size] (reaches_last, roi_pool). Computed in T and
  // clipped before any conversion: huge boxes give in-range windows.
  PSROI_HD AxisSpan window(int64_t bin, int64_t size) const {
    const T b = static_cast<T>(first_bin + bin);
    const T last = static_cast<T>(reaches_last ? size : size - 1);
    auto clip = [&](T v) {
      return v < static_cast<T>(0) ? static_cast<T>(0) : (v > last ? last : v);
    };
    const T begin = clip(floor(b * bin_size) + start);
    const T end = clip(ceil((b + static_cast<T>(1)) * bin_size) + start);
    return AxisSpan{static_cast<int64_t>(begin), static_cast<int64_t>(end) - 1};
  }

  // Coordinate of sample `i` of bin `bin`, in torchvision's evaluation order
  // (bin start first, then (i + 0.5) * bin_size / grid added to it).
  PSROI_HD T sample(int64_t bin, int64_t i) const {
    const T bin_start = static_cast<T>(first_bin + bin) * bin_size + start;
    return bin_start +
           (static_cast<T>(i) + static_cast<T>(0.5)) * bin_size /
               static_cast<T>(grid);
  }
};

template <typename T>
struct RoiGeometry {
  int64_t image;  // -1 when the RoI reads nothing (bad batch index or geometry)
  RoiAxis<T> y, x;
  T count;        // samples per bin, the divisor of the average (not whole_pixels)

  PSROI_HD bool empty() const { return image < 0 || y.grid <= 0 || x.grid <= 0; }

  // The divisor of bin (ph, pw)'s average: its samples, or the pixels of its
  // window (then 0 for an empty window, whose value is 0); 1 for RoI Pool's
  // maxima, which average nothing.
  PSROI_HD T divisor(int64_t ph, int64_t pw, const CallShape& shape) const {
    if (!y.whole_pixels) return count;
    if (y.reaches_last) return static_cast<T>(1);
    const AxisSpan r = y.window(ph, shape.height), c = x.window(pw, shape.width);
    const int64_t rows = r.last - r.first + 1, cols = c.last - c.first + 1;
    return rows > 0 && cols > 0 ? static_cast<T>(rows * cols) : static_cast<T>(0);
  }
};

template <typename T>
PSROI_HD bool is_finite(T v) {
  return v - v == static_cast<T>(0);  // false for NaN and +-inf, on host and device
}

// end - start + 1 for whole-number corners, rounded once: torchvision takes
// it in int, exactly, and converts the sum to T. Rounding the difference and
// then the sum, as T's arithmetic would, loses the 1 past 2^24 pixels in
// float32. The difference's rounding error is a whole number that a two-sum
// recovers exactly, and adding 1 to it is exact while it is below 2^24 (boxes
// within 2^48 pixels, far past torchvision's int range). A non-finite
// difference has no error to recover; it stays as T's arithmetic gives it.
// jax_psroi/reference_pools.py, inclusive_extent, is the same computation.
template <typename T>
PSROI_HD T inclusive_extent(T start, T end) {
  const T one = static_cast<T>(1);
  const T difference = end - start;
  const T end_part = difference + start;
  const T start_part = difference - end_part;  // -start, rounded as the difference took it
  const T error = (end - end_part) + (-start - start_part);
  const T extent = difference + (error + one);
  return is_finite(difference) ? extent : difference + one;
}

// Samples per bin along one axis: the user's ratio, or ceil(bin_size) clamped
// to [0, kMaxGridPerAxis] before any float-to-int conversion.
template <typename T>
PSROI_HD int64_t grid_size(T bin_size, int64_t sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  const T g = ceil(bin_size);
  if (!(g > static_cast<T>(0))) return 0;
  if (g >= static_cast<T>(kMaxGridPerAxis)) return kMaxGridPerAxis;
  return static_cast<int64_t>(g);
}

// What RoI `roi` = (batch_index, x1, y1, x2, y2) is on the map before any
// sampling, as torchvision computes it in T: its image (-1 when it reads
// nothing: bad batch index or non-finite geometry) and, per axis, where it
// starts and its bin size. The CUDA kernels keep it per RoI in their
// workspace (gpu_schedule.h) and derive the rest with geometry_of_box.
template <typename T>
struct RoiBox {
  int64_t image;
  T start_y, start_x, bin_h, bin_w;
};

// The image RoI `roi` reads, from its batch index `batch`, or -1 when it
// reads none. torchvision truncates the index toward zero, so (-1, N) is
// accepted; the comparisons are false for NaN. The index counts from the
// first image of the RoI's group (CallShape::rois_per_group); the group's
// offset is integer arithmetic. A map without images has nothing to read.
template <typename T>
PSROI_HD int64_t roi_image(T batch, int64_t roi, const CallShape& shape) {
  const int64_t per_group = shape.group_images();
  if (shape.num_images <= 0 || per_group <= 0) return -1;
  // Bounded by the group's size before any conversion (no undefined
  // float-to-int conversion of a huge index); the integer test catches a
  // size that rounded up in T.
  if (!(batch > static_cast<T>(-1) && batch < static_cast<T>(per_group))) return -1;
  const int64_t index = static_cast<int64_t>(batch);
  if (index >= per_group) return -1;
  const int64_t group = (roi / shape.group_rois()) % (shape.num_images / per_group);
  return group * per_group + index;
}

// Box `roi` of `rois` [K, 5] = (batch_index, x1, y1, x2, y2).
template <typename T>
PSROI_HD RoiBox<T> roi_box(const T* rois, int64_t roi, const CallShape& shape, const BoxRule& rule,
                           T spatial_scale) {
  const T* values = rois + 5 * roi;
  const T offset = static_cast<T>(rule.aligned ? 0.5 : 0.0);
  T start_w = values[1] * spatial_scale - offset;
  T start_h = values[2] * spatial_scale - offset;
  T end_w = values[3] * spatial_scale - offset;
  T end_h = values[4] * spatial_scale - offset;
  if (rule.whole_pixels) {  // C's round: halves away from zero
    start_w = round(start_w);
    start_h = round(start_h);
    end_w = round(end_w);
    end_h = round(end_h);
  }
  T size_w = end_w - start_w, size_h = end_h - start_h;
  if (rule.inclusive_corners) {  // both corner pixels count
    size_w = inclusive_extent(start_w, end_w);
    size_h = inclusive_extent(start_h, end_h);
  }
  if (!rule.aligned) {
    // torchvision's std::max(size, 1): a NaN size stays NaN.
    const T one = static_cast<T>(1);
    if (size_w < one) size_w = one;
    if (size_h < one) size_h = one;
  }
  RoiBox<T> box;
  box.start_x = start_w;
  box.start_y = start_h;
  box.bin_w = size_w / static_cast<T>(shape.pooled_w);
  box.bin_h = size_h / static_cast<T>(shape.grid_rows());

  // A map without pixels has nothing to read (with H or W = 0, the border
  // rule would take pixel -1).
  const bool map_ok = shape.height > 0 && shape.width > 0;
  const bool finite = is_finite(start_w) && is_finite(start_h) &&
                      is_finite(box.bin_w) && is_finite(box.bin_h);
  const int64_t image = roi_image(values[0], roi, shape);
  box.image = (map_ok && finite) ? image : -1;
  return box;
}

// The sampling geometry of a box: its grids, windows and divisor.
template <typename T>
PSROI_HD RoiGeometry<T> geometry_of_box(const RoiBox<T>& box, const CallShape& shape,
                                        const BoxRule& rule, int64_t sampling_ratio) {
  RoiGeometry<T> geometry;
  geometry.image = box.image;
  geometry.x.start = box.start_x;
  geometry.y.start = box.start_y;
  geometry.x.bin_size = box.bin_w;
  geometry.y.bin_size = box.bin_h;
  geometry.x.first_bin = 0;
  geometry.y.first_bin = shape.first_bin_row;
  geometry.x.whole_pixels = geometry.y.whole_pixels = rule.whole_pixels;
  geometry.x.reaches_last = geometry.y.reaches_last = rule.inclusive_corners;
  const int parameter = static_cast<int>(rule.derivative);  // 1, 2: x; 3, 4: y
  const bool sampled = !rule.whole_pixels;
  geometry.x.derivative = static_cast<int8_t>(sampled && parameter >= 1 && parameter <= 2
                                                  ? parameter : 0);
  geometry.y.derivative = static_cast<int8_t>(sampled && parameter >= 3 ? parameter - 2 : 0);
  // A window is never a grid of samples: grid 1 marks the axis non-empty.
  geometry.x.grid = rule.whole_pixels ? 1 : grid_size(geometry.x.bin_size, sampling_ratio);
  geometry.y.grid = rule.whole_pixels ? 1 : grid_size(geometry.y.bin_size, sampling_ratio);
  geometry.count = static_cast<T>(geometry.y.grid) * static_cast<T>(geometry.x.grid);
  return geometry;
}

template <typename T>
PSROI_HD RoiGeometry<T> roi_geometry(const T* rois, int64_t roi, const CallShape& shape,
                                     const BoxRule& rule, T spatial_scale, int64_t sampling_ratio) {
  return geometry_of_box(roi_box(rois, roi, shape, rule, spatial_scale), shape, rule,
                         sampling_ratio);
}

// Bilinear interpolation along one axis for coordinate `v` on an axis of
// `size` pixels, with torchvision's border rules.
template <typename T>
struct AxisTap {
  bool valid;
  int64_t low, high;
  T w_low, w_high;
};

template <typename T>
PSROI_HD AxisTap<T> axis_tap(T v, int64_t size) {
  AxisTap<T> t;
  // Written as !(in range) so NaN takes this branch.
  if (!(v >= static_cast<T>(-1) && v <= static_cast<T>(size))) {
    t.valid = false;
    t.low = t.high = 0;
    t.w_low = t.w_high = static_cast<T>(0);
    return t;
  }
  t.valid = true;
  if (v <= static_cast<T>(0)) v = static_cast<T>(0);
  t.low = static_cast<int64_t>(v);  // v is in [0, size]: the cast is defined
  if (t.low >= size - 1) {
    t.low = t.high = size - 1;
    v = static_cast<T>(t.low);
  } else {
    t.high = t.low + 1;
  }
  const T frac = v - static_cast<T>(t.low);
  t.w_high = frac;
  t.w_low = static_cast<T>(1) - frac;
  return t;
}

// The taps of sample i of bin `bin`: axis_tap's, whose weights are, when
// the axis is differentiated (RoiAxis::derivative), the derivatives of the
// bilinear weights with respect to the axis's start or bin size:
// -dv and +dv on the low and high pixel, dv the derivative of the sample's
// coordinate v (1, or (first_bin + bin) + (i + 0.5) / grid). Conventions
// where the weights are not differentiable: at an integer coordinate,
// the derivative of the piece to its right (the taps axis_tap picks there);
// a sample the border rule holds (v <= 0 reads pixel 0, v >= size - 1 the
// last pixel, outside [-1, size] nothing) has weights constant in v, so 0.
template <typename T>
PSROI_HD AxisTap<T> sample_tap(const RoiAxis<T>& axis, int64_t bin, int64_t i, int64_t size) {
  const T v = axis.sample(bin, i);
  AxisTap<T> t = axis_tap(v, size);
  if (axis.derivative == 0 || !t.valid) return t;
  const bool moves = v > static_cast<T>(0) && t.high != t.low;
  const T dv = axis.derivative == 1
                   ? static_cast<T>(1)
                   : static_cast<T>(axis.first_bin + bin) +
                         (static_cast<T>(i) + static_cast<T>(0.5)) / static_cast<T>(axis.grid);
  t.w_low = moves ? -dv : static_cast<T>(0);
  t.w_high = moves ? dv : static_cast<T>(0);
  return t;
}

// Range [begin, end) of sample indices of bin `bin` whose coordinate lies in
// [-1, size]. Sample coordinates are monotone in the index (increasing for a
// positive bin size, decreasing for a negative one), so the in-map samples are
// contiguous and two binary searches find them in O(log grid) evaluations.
struct SampleRange {
  int64_t begin, end;
};

// First index in [lo, hi) whose sample has reached `edge` in the direction of
// travel (inclusive: v >= edge / v <= edge; exclusive: v > edge / v < edge).
template <typename T>
PSROI_HD int64_t first_sample_reaching(const RoiAxis<T>& axis, int64_t bin,
                                       int64_t lo, int64_t hi, T edge,
                                       bool increasing, bool inclusive) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const T v = axis.sample(bin, mid);
    const bool reached = increasing ? (inclusive ? v >= edge : v > edge)
                                    : (inclusive ? v <= edge : v < edge);
    if (reached) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

template <typename T>
PSROI_HD SampleRange in_map_samples(const RoiAxis<T>& axis, int64_t bin,
                                    int64_t size) {
  const T lower = static_cast<T>(-1);
  const T upper = static_cast<T>(size);
  if (axis.grid <= 0) return SampleRange{0, 0};
  // Common case first: both end samples on the map, hence all of them.
  const T first_v = axis.sample(bin, 0);
  const T last_v = axis.sample(bin, axis.grid - 1);
  if (first_v >= lower && first_v <= upper && last_v >= lower &&
      last_v <= upper) {
    return SampleRange{0, axis.grid};
  }
  const bool increasing = axis.bin_size >= static_cast<T>(0);
  // Increasing: before the map while v < -1, inside, then past it once
  // v > size. Decreasing: the same with the edges swapped.
  SampleRange r;
  r.begin = first_sample_reaching(axis, bin, 0, axis.grid,
                                  increasing ? lower : upper, increasing,
                                  /*inclusive=*/true);
  r.end = first_sample_reaching(axis, bin, r.begin, axis.grid,
                                increasing ? upper : lower, increasing,
                                /*inclusive=*/false);
  return r;
}

// ---------------------------------------------------------------------------
// The samples a kernel visits.

// Grids of at most this many samples per axis are walked whole (axis_tap
// skips the samples off the map): cheaper than finding the in-map range.
constexpr int64_t kWalkWholeGrid = 4;

template <typename T>
PSROI_HD SampleRange samples_to_visit(const RoiAxis<T>& axis, int64_t bin, int64_t size) {
  if (axis.grid <= kWalkWholeGrid) return SampleRange{0, axis.grid};
  return in_map_samples(axis, bin, size);
}

// ---------------------------------------------------------------------------
// RoI Pool: the maximum of a bin's window (BoxRule::inclusive_corners) and
// the pixel it came from, which the gradient goes to. torchvision scans the
// window row by row from -FLT_MAX (0 for an empty window) and takes a value
// when it is strictly greater: the first maximum in row-major order among
// values above -FLT_MAX (NaN never), or -FLT_MAX and no pixel when there is
// none. Every RoI Pool kernel scans with these two functions.

template <typename T>
struct WindowMax {
  T value;
  int32_t pixel;  // y * W + x in the plane, -1 for none (the arg-max)
};

template <typename T>
PSROI_HD WindowMax<T> window_max_start(const AxisSpan& rows, const AxisSpan& cols) {
  const bool empty = rows.first > rows.last || cols.first > cols.last;
  // -FLT_MAX in every compute type, as torchvision's kernels start.
  return WindowMax<T>{empty ? static_cast<T>(0) : static_cast<T>(-3.40282346638528859812e+38F),
                      -1};
}

// One step of the scan: a value strictly greater replaces the maximum (NaN
// never does). Without a branch, which random data would mispredict, and
// which vectorizes over channels (the CPU's channels-last scan).
template <typename T>
PSROI_HD void fold_max(T& best, int32_t& pixel, T value, int32_t value_pixel) {
  // Both stores unconditional and the pixel chosen by a mask: GCC then
  // vectorizes the fold (with a select of the pixel, it does not).
  const T old_best = best;
  const int32_t old_pixel = pixel;
  const bool greater = value > old_best;
  const int32_t take = -static_cast<int32_t>(greater);
  best = greater ? value : old_best;
  pixel = (value_pixel & take) | (old_pixel & ~take);
}

template <typename T>
PSROI_HD void window_max_fold(WindowMax<T>& m, T value, int64_t pixel) {
  fold_max(m.value, m.pixel, value, static_cast<int32_t>(pixel));
}

// Maximum of the window rows x cols (a bin's: RoiAxis::window) in one input
// plane (features of the RoI's image, one channel, in `Layout`).
template <typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD WindowMax<T> window_max(const S* plane, const Layout& layout, const AxisSpan& rows,
                                 const AxisSpan& cols, const CallShape& shape) {
  WindowMax<T> m = window_max_start<T>(rows, cols);
  for (int64_t y = rows.first; y <= rows.last; ++y) {
    for (int64_t x = cols.first; x <= cols.last; ++x) {
      window_max_fold(m, Storage<S>::load(plane[layout.pixel_offset(y, x)]), y * shape.width + x);
    }
  }
  return m;
}

// The value of a plane at a recorded arg-max: what RoI Pool's output is as a
// function of the features, for its tangent. No pixel (or one off the
// plane, which no kernel records) gives 0.
template <typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD T value_at_pixel(const S* plane, const Layout& layout, const CallShape& shape,
                          int32_t pixel) {
  if (pixel < 0 || pixel >= shape.plane_size()) return static_cast<T>(0);
  const int64_t y = pixel / shape.width;
  return Storage<S>::load(plane[layout.pixel_offset(y, pixel - y * shape.width)]);
}

// ---------------------------------------------------------------------------
// Separable form of one bin, for kernels that reuse a bin's geometry across
// all output channels (the CPU kernels). Bilinear weights factor into a row
// part and a column part, and the in-map test is separable too, so a bin's
// value is  sum_r sum_c row_w[r] * col_w[c] * plane[r, c] / count,  where
// row_w[r] sums, over the bin's in-map row samples, the weight each gives row
// r. Only the rows (columns) a bin touches can weigh anything: tables of
// these weights need the span of touched_pixels, not the whole axis. A
// window of whole pixels is the same form with weights of 1 (and the
// window's area as the divisor, RoiGeometry::divisor).

// Pixels of an axis that bin `bin`'s samples touch (low and high taps
// included): sample coordinates, hence taps, are monotone in the sample
// index, so the two end samples of the in-map range bound them. A window of
// whole pixels touches itself. At most min(size, ceil(|bin size|) + 3)
// pixels: a bin's samples lie within its extent, and each reaches one pixel
// past where it falls.
template <typename T>
PSROI_HD AxisSpan touched_pixels(const RoiAxis<T>& axis, int64_t bin, int64_t size) {
  if (axis.whole_pixels) return axis.window(bin, size);
  AxisSpan span{size, -1};
  const SampleRange r = in_map_samples(axis, bin, size);
  if (r.begin >= r.end) return span;
  const AxisTap<T> a = axis_tap(axis.sample(bin, r.begin), size);
  const AxisTap<T> b = axis_tap(axis.sample(bin, r.end - 1), size);
  span.first = a.low < b.low ? a.low : b.low;
  span.last = a.high > b.high ? a.high : b.high;
  return span;
}

// Grids of more than this many samples per axis sum their samples' weights
// pixel by pixel in double before handing them over (for_each_axis_tap),
// and the CUDA forward sums their bins in the separable form
// (pooled_values). One by one in float32, the weights of millions of
// samples that fall in one pixel drift (0.5 added to a sum past 2^21 is
// rounded to a quarter), and a bin of 2^23 x 2^23 samples is out of reach
// for a GPU thread. Below it, at most 64 samples of a bin fall in one pixel
// (and at most 64 x 64 make one bin of the CUDA forward): torchvision's
// per-sample sums, unchanged, good to 64 roundings, 4e-6 relative. Only a
// fixed sampling ratio past it puts many samples in a pixel: an adaptive
// grid, ceil(bin size), puts at most two there.
constexpr int64_t kPerSampleGrid = 64;

// Whether the calls of `sampling_ratio` sum the samples of a grid past
// kPerSampleGrid pixel by pixel (kPixelSums below): only a fixed sampling
// ratio past it puts many samples in a pixel. Kernels instantiated for the
// others carry none of that code (fewer registers).
PSROI_HD bool pixel_sums(int64_t sampling_ratio) {
  return sampling_ratio > kPerSampleGrid;
}

// Calls add(pixel, weight) for the low and then the high tap of every sample
// of bin `bin` on the map, in sample order: the weights a bin's samples give
// the pixels of one axis, as torchvision sums them.
template <typename T, typename Add>
PSROI_HD void for_each_sample_tap(const RoiAxis<T>& axis, int64_t bin, int64_t size, Add add) {
  const SampleRange r = samples_to_visit(axis, bin, size);
  for (int64_t i = r.begin; i < r.end; ++i) {
    const AxisTap<T> t = sample_tap(axis, bin, i, size);
    if (!t.valid) continue;
    add(t.low, t.w_low);
    add(t.high, t.w_high);
  }
}

// Calls add(pixel, weight) once for every pixel that the samples of bin
// `bin` on the map reach, with the weights of all its taps summed in double,
// in the order the samples reach the pixels: the large grids' part of
// for_each_axis_tap.
template <typename T, typename Add>
PSROI_HD void for_each_pixel_weight(const RoiAxis<T>& axis, int64_t bin, int64_t size,
                                    Add add) {
  // Coordinates are monotone in the sample index, so the samples come in
  // runs with the same two taps: each run's weights are summed per tap,
  // and handed to the pixel (in the direction of travel, so that the pixel
  // two runs share gets both of their sums before it is handed over).
  const bool increasing = axis.bin_size >= static_cast<T>(0);
  int64_t pixel = -1;
  double pixel_weight = 0;
  auto give = [&](int64_t p, double weight) {
    if (p != pixel) {
      if (pixel >= 0) add(pixel, static_cast<T>(pixel_weight));
      pixel = p;
      pixel_weight = 0;
    }
    pixel_weight += weight;
  };
  int64_t low = -1, high = -1;
  double w_low = 0, w_high = 0;
  auto end_run = [&] {
    if (low < 0) return;
    if (increasing) {
      give(low, w_low);
      give(high, w_high);
    } else {
      give(high, w_high);
      give(low, w_low);
    }
  };
  const SampleRange r = samples_to_visit(axis, bin, size);
  for (int64_t i = r.begin; i < r.end; ++i) {
    const AxisTap<T> t = sample_tap(axis, bin, i, size);
    if (!t.valid) continue;
    if (t.low != low) {
      end_run();
      low = t.low;
      high = t.high;
      w_low = w_high = 0;
    }
    w_low += t.w_low;
    w_high += t.w_high;
  }
  end_run();
  if (pixel >= 0) add(pixel, static_cast<T>(pixel_weight));
}

// Calls add(pixel, weight) with the weights that bin `bin`'s samples on the
// map give the pixels of one axis (or with weight 1 for every pixel of a
// window), which the callers sum; every pixel lies in touched_pixels(axis,
// bin, size). Grids of at most kPerSampleGrid samples: for_each_sample_tap;
// larger ones: for_each_pixel_weight, unless kPixelSums is false (CUDA
// kernels of calls whose grids put few samples in a pixel, which carry no
// code of the other: gpu_schedule.h, pixel_sums).
template <bool kPixelSums = true, typename T, typename Add>
PSROI_HD void for_each_axis_tap(const RoiAxis<T>& axis, int64_t bin, int64_t size, Add add) {
  if (axis.whole_pixels) {
    const AxisSpan w = axis.window(bin, size);
    for (int64_t pixel = w.first; pixel <= w.last; ++pixel) add(pixel, static_cast<T>(1));
    return;
  }
  if constexpr (kPixelSums) {
    if (axis.grid > kPerSampleGrid) {
      for_each_pixel_weight(axis, bin, size, add);
      return;
    }
  }
  for_each_sample_tap(axis, bin, size, add);
}

// ---------------------------------------------------------------------------
// Pooled values, as the CUDA forward computes them (gpu_schedule.h).

// Calls visit(ty, tx) for every sample of bin (ph, pw) that lies on the
// map, in torchvision's order (rows outer, columns inner).
template <typename T, typename Visit>
PSROI_HD void for_each_sample_on_map(const RoiGeometry<T>& geometry, const CallShape& shape,
                                     int64_t ph, int64_t pw, Visit& visit) {
  const SampleRange ry = samples_to_visit(geometry.y, ph, shape.height);
  const SampleRange rx = samples_to_visit(geometry.x, pw, shape.width);
  for (int64_t iy = ry.begin; iy < ry.end; ++iy) {
    const AxisTap<T> ty = sample_tap(geometry.y, ph, iy, shape.height);
    if (!ty.valid) continue;
    for (int64_t ix = rx.begin; ix < rx.end; ++ix) {
      const AxisTap<T> tx = sample_tap(geometry.x, pw, ix, shape.width);
      if (tx.valid) visit(ty, tx);
    }
  }
}

// Adds one sample, its taps `ty` and `tx`, to values[0, planes) of
// `planes` (<= kPlanes) planes, the first at `plane` and each next
// `plane_step` elements further, in pooled_values' order of operations
// (the GPU forward's ways of finding the taps all sum through it, so they
// give the same bits).
template <int kPlanes, typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD void add_sample(const S* plane, int64_t plane_step, int64_t planes, const Layout& layout,
                         const AxisTap<T>& ty, const AxisTap<T>& tx, T (&values)[kPlanes]) {
  const T w1 = ty.w_low * tx.w_low, w2 = ty.w_low * tx.w_high;
  const T w3 = ty.w_high * tx.w_low, w4 = ty.w_high * tx.w_high;
  const int64_t o1 = layout.pixel_offset(ty.low, tx.low);
  const int64_t o2 = layout.pixel_offset(ty.low, tx.high);
  const int64_t o3 = layout.pixel_offset(ty.high, tx.low);
  const int64_t o4 = layout.pixel_offset(ty.high, tx.high);
  auto at = [&](int k, int64_t offset) {
    return Storage<S>::load(plane[k * plane_step + offset]);
  };
  for (int k = 0; k < kPlanes; ++k) {
    if (k < planes) {
      values[k] += w1 * at(k, o1) + w2 * at(k, o2) + w3 * at(k, o3) + w4 * at(k, o4);
    }
  }
}

// Pooled values of bin (ph, pw) of a non-empty RoI of `geometry` in
// `planes` (<= kPlanes) input planes, the first at `plane` and each next
// `plane_step` elements further (the input channels consecutive output
// channels of the bin read; pixel (y, x) of a plane at
// layout.pixel_offset(y, x)), into values[0, planes) in the compute type T
// of storage type S (the caller stores them). The taps are found once for
// all planes; each value is summed as for a plane alone. kPixelSums: as
// for_each_axis_tap; grids past kPerSampleGrid are then summed in the
// separable form, each row's summed weight times each column's (sample by
// sample, a bin at the cap holds 2^46 samples).
template <int kPlanes, bool kPixelSums, typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD void pooled_values(const S* plane, int64_t plane_step, int64_t planes,
                            const Layout& layout, const RoiGeometry<T>& geometry,
                            const CallShape& shape, int64_t ph, int64_t pw, T (&values)[kPlanes]) {
  for (int k = 0; k < kPlanes; ++k) values[k] = static_cast<T>(0);
  auto at = [&](int k, int64_t offset) {
    return Storage<S>::load(plane[k * plane_step + offset]);
  };
  if (geometry.y.whole_pixels) {  // torchvision's sum, row by row, over the window
    const AxisSpan rows = geometry.y.window(ph, shape.height),
                   cols = geometry.x.window(pw, shape.width);
    for (int64_t y = rows.first; y <= rows.last; ++y) {
      for (int64_t x = cols.first; x <= cols.last; ++x) {
        const int64_t offset = layout.pixel_offset(y, x);
        for (int k = 0; k < kPlanes; ++k) {
          if (k < planes) values[k] += at(k, offset);
        }
      }
    }
    const T divisor = geometry.divisor(ph, pw, shape);
    for (int k = 0; k < kPlanes; ++k) {
      values[k] = divisor > static_cast<T>(0) ? values[k] / divisor : static_cast<T>(0);
    }
    return;
  }
  auto visit_sample = [&](const AxisTap<T>& ty, const AxisTap<T>& tx) {
    add_sample<kPlanes, S>(plane, plane_step, planes, layout, ty, tx, values);
  };
  bool separable = false;
  if constexpr (kPixelSums)
    separable = geometry.y.grid > kPerSampleGrid || geometry.x.grid > kPerSampleGrid;
  if (separable) {
    for_each_axis_tap(geometry.y, ph, shape.height, [&](int64_t y, T w_y) {
      for_each_axis_tap(geometry.x, pw, shape.width, [&](int64_t x, T w_x) {
        const T w = w_y * w_x;
        const int64_t offset = layout.pixel_offset(y, x);
        for (int k = 0; k < kPlanes; ++k) {
          if (k < planes) values[k] += w * at(k, offset);
        }
      });
    });
  } else {
    for_each_sample_on_map(geometry, shape, ph, pw, visit_sample);
  }
  for (int k = 0; k < kPlanes; ++k) values[k] /= geometry.count;
}

}  // namespace jax_psroi

#endif  // JAX_PSROI_ROI_MATH_H_
