// The CUDA kernels' schedule: who owns which outputs, in which order RoIs are
// visited, what a block keeps in shared memory. Written once over an
// executor `Exec` that stands for a thread block, so that the CUDA kernels
// (lib/cuda/psroi_cuda_kernels.cuh, Exec = the real block) and the CPU's
// test-only copy of them (lib/cpu/gpu_schedule_handlers.cc, Exec = a serial
// loop) run the same code, and the CPU tests check every index and every
// ordering rule the GPU uses.
//
// An Exec offers, each followed by a barrier of the block:
//   each(n, f)                 f(i) for every i in [0, n), spread over threads
//   count(n, pred)             how many i in [0, n) satisfy pred (n <= threads)
//   compact(n, pred, base, f)  f(i, base + rank) for the i in [0, n) that
//                              satisfy pred, rank counting in increasing i
//   single(f)                  f() on one thread
// and `threads`, its number of threads. Values written by one step are seen
// by every thread in the next.
//
// Three kernels, all deterministic (no atomics on floats, every sum in a
// fixed order):
//   1. Buckets. RoIs are sorted stably by the image they read (bucket
//      N holds those that read nothing: bad batch index, non-finite
//      geometry, empty grid), and, for the backward, each RoI's pixel span
//      per bin row and bin column is kept.
//   2. Forward. A block owns one bucket and a group of input channels (one
//      plane in NCHW; 32 consecutive channels in NHWC, read as one
//      contiguous run per tap). Its threads walk the bucket's RoIs, so the
//      RoIs of one image read one plane (group) while it sits in L1/L2, and
//      each output element is written by exactly one thread.
//   3. Backward. A block owns one image, one tile of kTileRows x kTileCols
//      pixels and one bin, that is every gradient element of those pixels
//      in the bin's C_out channels; it writes each of them once (zeros
//      included, so no memset). It lists, in RoI order, the RoIs of the
//      image whose bin window meets the tile, with their row and column
//      weights on the tile; every pixel then keeps the list entries that
//      cover it; every element sums cotangent x weight over its pixel's
//      entries in list order. A tile met by more RoIs than a list holds is
//      done in passes over the RoIs in order, summing into the gradient (or
//      into the float32 accumulator of a 16-bit gradient) between passes.
#ifndef JAX_PSROI_GPU_SCHEDULE_H_
#define JAX_PSROI_GPU_SCHEDULE_H_

#include <cstdint>

#include "psroi_math.h"

namespace jax_psroi {
namespace gpu_schedule {

// Threads of every block of the three kernels.
constexpr int kThreads = 128;
// Backward tile: rows x columns of pixels; one thread per pixel.
constexpr int kTileRows = 4;
constexpr int kTileCols = 32;
constexpr int kTilePixels = kTileRows * kTileCols;
static_assert(kTilePixels == kThreads, "the cover step gives each pixel a thread");
// List entries a pixel keeps in shared memory; more are re-read from the list.
constexpr int kCoverPerPixel = 8;
// NHWC forward: consecutive channels a warp reads per tap.
constexpr int kNhwcChannelGroup = 32;

// Entries of a backward tile's RoI list (shared memory: 164 bytes per entry
// in float32, 292 in float64); RoIs are examined kListChunk at a time, and a
// chunk that no longer fits ends the pass.
template <typename T>
constexpr int list_capacity() {
  return sizeof(T) == 8 ? 64 : 128;
}
template <typename T>
constexpr int list_chunk() {
  return list_capacity<T>() < kThreads ? list_capacity<T>() : kThreads;
}

// --- Workspace --------------------------------------------------------------
// One int32 buffer that XLA allocates as a further result of each CUDA call.
// Its size is computed by `workspace_elements` here and by
// jax_psroi._primitives._cuda_workspace_size, which must agree.
struct Workspace {
  int32_t* bucket;   // [K]: the bucket of each RoI (an image, or N)
  int32_t* order;    // [K]: RoI indices, stably sorted by bucket
  int32_t* offsets;  // [N + 2]: bucket b is order[offsets[b], offsets[b + 1])
  int32_t* spans;    // [K, PH + PW, 2] (backward only): first, last pixel
                     // touched by each bin row, then each bin column
};

PSROI_HD int64_t workspace_elements(const PsRoiDims& d, bool backward) {
  const int64_t base = 2 * d.num_rois + d.num_images + 2;
  return backward ? base + 2 * d.num_rois * (d.pooled_h + d.pooled_w) : base;
}

PSROI_HD Workspace workspace_views(int32_t* ws, const PsRoiDims& d) {
  Workspace w;
  w.bucket = ws;
  w.order = ws + d.num_rois;
  w.offsets = ws + 2 * d.num_rois;
  w.spans = ws + 2 * d.num_rois + d.num_images + 2;
  return w;
}

// --- 1. Buckets -------------------------------------------------------------

template <typename T>
PSROI_HD int32_t roi_bucket(const T* rois, const PsRoiDims& d, T spatial_scale,
                            int64_t sampling_ratio, int64_t roi) {
  const RoiGeometry<T> g = roi_geometry(rois + 5 * roi, d, spatial_scale, sampling_ratio);
  return static_cast<int32_t>(g.empty() ? d.num_images : g.image);
}

// Pixels of an axis that bin `bin`'s samples touch (low and high taps
// included): sample coordinates, hence taps, are monotone in the sample
// index, so the two end samples of the in-map range bound them.
template <typename T>
PSROI_HD AxisSpan touched_pixels(const RoiAxis<T>& axis, int64_t bin, int64_t size) {
  AxisSpan span{size, -1};
  const SampleRange r = in_map_samples(axis, bin, size);
  if (r.begin >= r.end) return span;
  const AxisTap<T> a = axis_tap(axis.sample(bin, r.begin), size);
  const AxisTap<T> b = axis_tap(axis.sample(bin, r.end - 1), size);
  span.first = a.low < b.low ? a.low : b.low;
  span.last = a.high > b.high ? a.high : b.high;
  return span;
}

// Element `i` of the spans array: RoI i / (PH + PW), then a bin row
// (< PH) or a bin column.
template <typename T>
PSROI_HD void write_span(const T* rois, const PsRoiDims& d, T spatial_scale,
                         int64_t sampling_ratio, int64_t i, int32_t* spans) {
  const int64_t axes = d.pooled_h + d.pooled_w;
  const int64_t roi = i / axes, a = i % axes;
  const RoiGeometry<T> g = roi_geometry(rois + 5 * roi, d, spatial_scale, sampling_ratio);
  AxisSpan s{0, -1};
  if (!g.empty()) {
    s = a < d.pooled_h ? touched_pixels(g.y, a, d.height)
                       : touched_pixels(g.x, a - d.pooled_h, d.width);
  }
  spans[2 * i] = static_cast<int32_t>(s.first);
  spans[2 * i + 1] = static_cast<int32_t>(s.last);
}

// Block `b` in [0, N]: writes offsets[b] and the RoIs of bucket b, in
// increasing RoI order, to order[offsets[b] ...); block N also writes
// offsets[N + 1] = K. `bucket` must be complete before any block starts.
template <typename Exec>
PSROI_HD void bucket_block(Exec& ex, const PsRoiDims& d, const int32_t* bucket,
                           int32_t* order, int32_t* offsets, int64_t b) {
  const int64_t K = d.num_rois;
  int64_t before = 0;
  for (int64_t k0 = 0; k0 < K; k0 += ex.threads) {
    const int64_t n = K - k0 < ex.threads ? K - k0 : ex.threads;
    before += ex.count(n, [&](int64_t i) { return bucket[k0 + i] < b; });
  }
  int64_t placed = before;
  for (int64_t k0 = 0; k0 < K; k0 += ex.threads) {
    const int64_t n = K - k0 < ex.threads ? K - k0 : ex.threads;
    placed += ex.compact(
        n, [&](int64_t i) { return bucket[k0 + i] == b; }, placed,
        [&](int64_t i, int64_t at) { order[at] = static_cast<int32_t>(k0 + i); });
  }
  ex.single([&] {
    offsets[b] = static_cast<int32_t>(before);
    if (b == d.num_images) offsets[b + 1] = static_cast<int32_t>(K);
  });
}

// --- 2. Forward -------------------------------------------------------------

template <typename Layout>
PSROI_HD int64_t forward_channel_group() {
  return Layout::kChannelsLast ? kNhwcChannelGroup : 1;
}

// Blocks of the forward: (bucket, channel group), the group fastest, so
// that the blocks in flight share one image's RoIs.
template <typename Layout>
PSROI_HD int64_t forward_blocks(const PsRoiDims& d) {
  const int64_t g = forward_channel_group<Layout>();
  return (d.num_images + 1) * ((d.channels + g - 1) / g);
}

// Output channel and bin that input channel `c` feeds.
PSROI_HD void channel_bin(const PsRoiDims& d, int64_t c, int64_t* c_out, int64_t* bin) {
  if (d.channel_order == ChannelOrder::kTorchvision) {
    *c_out = c / d.bins();
    *bin = c % d.bins();
  } else {
    *c_out = c % d.channels_out;
    *bin = c / d.channels_out;
  }
}

template <typename Exec, typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD void forward_block(Exec& ex, const S* input, const T* rois, const PsRoiDims& d,
                            T spatial_scale, int64_t sampling_ratio, const Workspace& ws,
                            int64_t block, S* output) {
  const int64_t group = forward_channel_group<Layout>();
  const int64_t groups = (d.channels + group - 1) / group;
  const int64_t bucket = block / groups;
  const int64_t c0 = (block % groups) * group;
  const int64_t begin = ws.offsets[bucket], end = ws.offsets[bucket + 1];
  const Layout layout = Layout::of(d);
  // Element i: RoI i / group of the bucket, channel c0 + i % group.
  ex.each((end - begin) * group, [&](int64_t i) {
    const int64_t c = c0 + i % group;
    if (c >= d.channels) return;
    const int64_t roi = ws.order[begin + i / group];
    int64_t c_out, bin;
    channel_bin(d, c, &c_out, &bin);
    const int64_t ph = bin / d.pooled_w, pw = bin % d.pooled_w;
    const T value = bucket == d.num_images
                        ? static_cast<T>(0)
                        : pooled_value(input, rois, d, layout, spatial_scale,
                                       sampling_ratio, roi, c_out, ph, pw);
    output[Layout::pooled_offset(d, roi, c_out, bin)] = Storage<S>::store(value);
  });
}

// --- 3. Backward ------------------------------------------------------------

struct BackwardTiling {
  int64_t tiles_y, tiles_x;

  static PSROI_HD BackwardTiling of(const PsRoiDims& d) {
    return BackwardTiling{(d.height + kTileRows - 1) / kTileRows,
                          (d.width + kTileCols - 1) / kTileCols};
  }
  // Blocks: (image, tile, bin), the bin fastest, so that the blocks in
  // flight write neighbouring channels of the same pixels (one cache line
  // per NHWC pixel in torchvision order) and read neighbouring cotangents.
  PSROI_HD int64_t blocks(const PsRoiDims& d) const {
    return d.num_images * tiles_y * tiles_x * d.bins();
  }
};

// What a backward block keeps in shared memory.
template <typename T>
struct BackwardShared {
  static constexpr int kCapacity = list_capacity<T>();
  // The tile's RoI list: RoI, its touched rows and columns on the tile
  // (inclusive, tile coordinates), its row weights divided by the sample
  // count, and its column weights.
  int32_t roi[kCapacity];
  int8_t row_first[kCapacity], row_last[kCapacity];
  int8_t col_first[kCapacity], col_last[kCapacity];
  T row_weight[kCapacity][kTileRows];
  T col_weight[kCapacity][kTileCols];
  // Per pixel: the first kCoverPerPixel entries covering it (entry, weight),
  // how many cover it in all, and the list position after the last kept.
  int16_t cover_entry[kCoverPerPixel][kTilePixels];
  T cover_weight[kCoverPerPixel][kTilePixels];
  int16_t cover_count[kTilePixels];
  int16_t cover_resume[kTilePixels];
  // Pass control, written by one thread.
  int32_t listed;       // entries in the list
  int64_t next;         // the next RoI of the bucket to examine
};

// Adds bin `bin` of RoI `roi` to the list at `entry`, for the tile at
// (y0, x0).
template <typename T>
PSROI_HD void make_entry(const T* rois, const PsRoiDims& d, T spatial_scale,
                         int64_t sampling_ratio, const int32_t* spans, int64_t roi,
                         int64_t bin, int64_t y0, int64_t x0, int64_t entry,
                         BackwardShared<T>& sh) {
  const int64_t ph = bin / d.pooled_w, pw = bin % d.pooled_w;
  const int32_t* row = spans + 2 * (roi * (d.pooled_h + d.pooled_w) + ph);
  const int32_t* col = spans + 2 * (roi * (d.pooled_h + d.pooled_w) + d.pooled_h + pw);
  const int64_t r0 = row[0] > y0 ? row[0] : y0;
  const int64_t r1 = row[1] < y0 + kTileRows - 1 ? row[1] : y0 + kTileRows - 1;
  const int64_t c0 = col[0] > x0 ? col[0] : x0;
  const int64_t c1 = col[1] < x0 + kTileCols - 1 ? col[1] : x0 + kTileCols - 1;
  sh.roi[entry] = static_cast<int32_t>(roi);
  sh.row_first[entry] = static_cast<int8_t>(r0 - y0);
  sh.row_last[entry] = static_cast<int8_t>(r1 - y0);
  sh.col_first[entry] = static_cast<int8_t>(c0 - x0);
  sh.col_last[entry] = static_cast<int8_t>(c1 - x0);

  const RoiGeometry<T> g = roi_geometry(rois + 5 * roi, d, spatial_scale, sampling_ratio);
  T* wy = sh.row_weight[entry];
  T* wx = sh.col_weight[entry];
  for (int r = 0; r < kTileRows; ++r) wy[r] = static_cast<T>(0);
  for (int c = 0; c < kTileCols; ++c) wx[c] = static_cast<T>(0);
  // Sums over the bin's in-map samples of the weight each gives a pixel of
  // the tile (the separable form of the bin, see accumulate_axis_weights).
  auto add_axis = [](const RoiAxis<T>& axis, int64_t b, int64_t size, int64_t origin,
                     int extent, T* w) {
    const SampleRange s = in_map_samples(axis, b, size);
    for (int64_t i = s.begin; i < s.end; ++i) {
      const AxisTap<T> t = axis_tap(axis.sample(b, i), size);
      if (!t.valid) continue;
      if (t.low >= origin && t.low < origin + extent) w[t.low - origin] += t.w_low;
      if (t.high >= origin && t.high < origin + extent) w[t.high - origin] += t.w_high;
    }
  };
  add_axis(g.y, ph, d.height, y0, kTileRows, wy);
  add_axis(g.x, pw, d.width, x0, kTileCols, wx);
  for (int r = 0; r < kTileRows; ++r) wy[r] /= g.count;
}

template <typename T>
PSROI_HD bool entry_covers(const BackwardShared<T>& sh, int64_t entry, int64_t py,
                           int64_t px) {
  return py >= sh.row_first[entry] && py <= sh.row_last[entry] &&
         px >= sh.col_first[entry] && px <= sh.col_last[entry];
}

// Element i of a block: pixel and output channel, in the order that makes
// neighbouring threads write neighbouring addresses (NCHW: pixels of a row
// of the plane; NHWC: channels of a pixel).
template <typename Layout>
PSROI_HD void tile_element(const PsRoiDims& d, int64_t i, int64_t* pixel, int64_t* c_out) {
  if (Layout::kChannelsLast) {
    *pixel = i / d.channels_out;
    *c_out = i % d.channels_out;
  } else {
    *pixel = i % kTilePixels;
    *c_out = i / kTilePixels;
  }
}

// `sums` is the gradient itself when S is the compute type, else the
// compute-type accumulator; it carries partial sums between passes only.
template <typename Exec, typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD void backward_block(Exec& ex, BackwardShared<T>& sh, const S* cotangent,
                             const T* rois, const PsRoiDims& d, T spatial_scale,
                             int64_t sampling_ratio, const Workspace& ws, int64_t block,
                             T* sums, S* grad) {
  const BackwardTiling tiling = BackwardTiling::of(d);
  const int64_t bin = block % d.bins();
  const int64_t tile = (block / d.bins()) % (tiling.tiles_y * tiling.tiles_x);
  const int64_t image = block / (d.bins() * tiling.tiles_y * tiling.tiles_x);
  const int64_t y0 = (tile / tiling.tiles_x) * kTileRows;
  const int64_t x0 = (tile % tiling.tiles_x) * kTileCols;
  const int64_t ph = bin / d.pooled_w, pw = bin % d.pooled_w;
  const int64_t begin = ws.offsets[image], end = ws.offsets[image + 1];
  const int64_t axes = d.pooled_h + d.pooled_w;
  const Layout layout = Layout::of(d);
  constexpr int kCapacity = BackwardShared<T>::kCapacity;
  constexpr int kChunk = list_chunk<T>();

  // Does bin (ph, pw) of RoI `roi` touch the tile?
  auto meets_tile = [&](int64_t roi) {
    const int32_t* row = ws.spans + 2 * (roi * axes + ph);
    const int32_t* col = ws.spans + 2 * (roi * axes + d.pooled_h + pw);
    return row[0] <= y0 + kTileRows - 1 && row[1] >= y0 &&
           col[0] <= x0 + kTileCols - 1 && col[1] >= x0;
  };

  ex.single([&] { sh.next = begin; });
  bool first_pass = true;
  for (;;) {
    // List the RoIs that meet the tile, from sh.next on, chunk by chunk,
    // until the bucket ends or a chunk would overflow the list.
    ex.single([&] { sh.listed = 0; });
    for (;;) {
      const int64_t k0 = sh.next;
      if (k0 >= end) break;
      const int64_t n = end - k0 < kChunk ? end - k0 : kChunk;
      auto hit = [&](int64_t i) { return meets_tile(ws.order[k0 + i]); };
      const int64_t hits = ex.count(n, hit);
      const int64_t listed = sh.listed;
      if (listed + hits > kCapacity) break;
      ex.compact(n, hit, listed, [&](int64_t i, int64_t at) {
        make_entry(rois, d, spatial_scale, sampling_ratio, ws.spans, ws.order[k0 + i], bin,
                   y0, x0, at, sh);
      });
      ex.single([&] {
        sh.listed = static_cast<int32_t>(listed + hits);
        sh.next = k0 + n;
      });
    }
    const bool last_pass = sh.next >= end;
    const int64_t listed = sh.listed;

    // Each pixel keeps the entries that cover it, in list order.
    ex.each(kTilePixels, [&](int64_t p) {
      const int64_t py = p / kTileCols, px = p % kTileCols;
      int kept = 0;
      int resume = static_cast<int>(listed);
      int covering = 0;
      for (int e = 0; e < listed; ++e) {
        if (!entry_covers(sh, e, py, px)) continue;
        ++covering;
        if (kept < kCoverPerPixel) {
          sh.cover_entry[kept][p] = static_cast<int16_t>(e);
          sh.cover_weight[kept][p] = sh.row_weight[e][py] * sh.col_weight[e][px];
          ++kept;
          resume = e + 1;
        }
      }
      sh.cover_count[p] = static_cast<int16_t>(covering);
      sh.cover_resume[p] = static_cast<int16_t>(resume);
    });

    // Every element of the block: its sum over the entries covering its
    // pixel, in list order, then written once per pass.
    ex.each(kTilePixels * d.channels_out, [&](int64_t i) {
      int64_t p, c_out;
      tile_element<Layout>(d, i, &p, &c_out);
      const int64_t py = p / kTileCols, px = p % kTileCols;
      const int64_t y = y0 + py, x = x0 + px;
      if (y >= d.height || x >= d.width) return;
      auto cot = [&](int64_t roi) {
        return Storage<S>::load(cotangent[Layout::pooled_offset(d, roi, c_out, bin)]);
      };
      T sum = static_cast<T>(0);
      const int covering = sh.cover_count[p];
      const int kept = covering < kCoverPerPixel ? covering : kCoverPerPixel;
      for (int m = 0; m < kept; ++m) {
        sum += cot(sh.roi[sh.cover_entry[m][p]]) * sh.cover_weight[m][p];
      }
      if (covering > kept) {
        for (int e = sh.cover_resume[p]; e < listed; ++e) {
          if (entry_covers(sh, e, py, px)) {
            sum += cot(sh.roi[e]) * (sh.row_weight[e][py] * sh.col_weight[e][px]);
          }
        }
      }
      const int64_t at = layout.plane_offset(image, d.first_channel(bin) +
                                                        c_out * d.channel_step()) +
                         layout.pixel_offset(y, x);
      if (!first_pass) sum += sums[at];
      if (last_pass) {
        grad[at] = Storage<S>::store(sum);
      } else {
        sums[at] = sum;
      }
    });
    if (last_pass) break;
    first_pass = false;
  }
}

}  // namespace gpu_schedule
}  // namespace jax_psroi

#endif  // JAX_PSROI_GPU_SCHEDULE_H_
