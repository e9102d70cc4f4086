// The CUDA kernels' schedule: who owns which outputs, in which order RoIs are
// visited, what a block keeps in shared memory. Written once over an
// executor `Exec` that stands for a thread block, so that the CUDA kernels
// (lib/cuda/kernels.cuh, Exec = the real block) and the CPU's
// test-only copy of them (lib/testing/gpu_schedule_handlers.cc, Exec = a serial
// loop) run the same code, and the CPU tests check every index and every
// ordering rule the GPU uses.
//
// An Exec offers, each followed by a barrier of the block:
//   each(n, f)        f(i) for every i in [0, n), spread over threads
//   sum(n, f)         the sum of f(i) over i in [0, n) (n <= threads)
//   scan(n, f, base, g)
//                     g(i, base + the sum of f(j) over j < i) for every i in
//                     [0, n) (n <= threads); returns the sum of all f(i)
//   compact(n, pred, base, limit, f)
//                     the number of i in [0, n) (n <= threads) that satisfy
//                     pred; and if base plus that number is at most limit,
//                     f(i, base + rank) for each of them, rank counting in
//                     increasing i
//   single(f)         f() on one thread
// and `threads`, its number of threads. Values written by one step are seen
// by every thread in the next.
//
// Three stages, all deterministic (no atomics on floats, every sum in a
// fixed order):
//   1. Buckets (four small launches: per-RoI facts, then count, start and
//      place over (bucket, segment of 1,024 RoIs) blocks). Each RoI's box
//      (start and bin size per axis) is computed once and kept. For the
//      forward, RoIs are sorted stably by the image they read and, within
//      it, by the band of rows their box starts in (the last bucket holds
//      those that read nothing: bad batch index, non-finite geometry, empty
//      grid). For the backward, each (image, row of tiles) lists in order
//      the RoIs whose box touches it, and each RoI's pixel span per bin row
//      and bin column is kept.
//   2. Forward. A block owns a chunk of one image's RoIs and a group of
//      input channels (in NCHW, the planes of up to 8 output channels of one
//      bin, a thread summing all of them for its RoI from taps it finds
//      once; in NHWC, 32 consecutive channels, read as one contiguous run
//      per tap). Its threads walk the chunk's RoIs, so the RoIs of one image
//      read the same planes while they sit in L1/L2, and each output element
//      is written by exactly one thread. Images are split into chunks only
//      as far as it takes to fill the GPU.
//   2'. RoI Pool's forward (and its tangent): a block owns a run of one
//      RoI's outputs, whose geometry it computes once (roi_pool_block); a
//      thread per output element; no buckets.
//   3. Backward. A block owns one image, one tile of kTileRows x kTileCols
//      pixels and one bin, that is every gradient element of those pixels
//      in the bin's C_out channels (with shared channels, roi_align's, every
//      bin feeds the same C_out channels: the block owns them and sums its
//      bins in turn, as passes); it writes each of them once (zeros
//      included, so no memset). It lists, in RoI order, the RoIs of its
//      bucket whose bin window meets the tile, with their row and column
//      weights on the tile; every pixel then keeps the list entries that
//      cover it (up to kCoverPerPixel; beyond, the element re-reads the
//      list); every element sums cotangent x weight over its pixel's
//      entries in list order (RoI Pool: the cotangents of the entries whose
//      recorded maximum is that pixel; backward_block's Term). A tile met
//      by more RoIs than a list holds is done in passes over the RoIs in
//      order, the running sums kept in the gradient (or in the float32
//      accumulator of a 16-bit gradient) between passes, so every element
//      is one sum in RoI order whatever the tile and list sizes.
// The sizes (threads, tiles, lists, channels a thread or block takes) are a
// Tuning (below), a template parameter of every step.
#ifndef JAX_PSROI_GPU_SCHEDULE_H_
#define JAX_PSROI_GPU_SCHEDULE_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "roi_math.h"

namespace jax_psroi {
namespace gpu_schedule {

// The schedule's compile-time choices, one type per set of them. The shipped
// kernels use DefaultTuning; the GPU driver (benchmarks/gpu_driver.cu)
// instantiates others beside it to time them on a GPU and runs each
// serially on the host against the default's outputs, so a variant is
// checked before a GPU minute is spent on it.
//   Threads                threads of every block of every kernel
//   TileRows               backward tile rows; its columns fill the block
//                          (one thread per pixel)
//   CoverPerPixel          list entries a pixel keeps in shared memory;
//                          more are re-read from the list
//   ForwardPlanes          NCHW forward: output channels a thread sums
//   NhwcChannelGroup       NHWC forward: consecutive channels per block
//                          group, read as contiguous runs per tap
//   NhwcPlanes             0: that; else the NHWC forward takes NCHW's
//                          form, a thread summing up to NhwcPlanes output
//                          channels of one bin from taps it finds once
//                          (bin-major: a contiguous run of channels)
//   ForwardMinBlocks       forward blocks wanted at least (images split into
//                          chunks of RoIs until there are)
//   ForwardBlocksPerSm,    __launch_bounds__ minimum blocks per SM of the
//   BackwardBlocksPerSm    forward and backward kernels (register budget)
//   ListCapacity           entries of a backward tile's RoI list in float32
//                          and 16-bit (float64: half)
template <int Threads, int TileRows, int CoverPerPixel, int ForwardPlanes,
          int NhwcChannelGroup, int NhwcPlanes, int ForwardMinBlocks,
          int ForwardBlocksPerSm, int BackwardBlocksPerSm, int ListCapacity>
struct Tuning {
  static constexpr int kThreads = Threads;
  static constexpr int kTileRows = TileRows;
  static constexpr int kTileCols = Threads / TileRows;
  static constexpr int kTilePixels = kTileRows * kTileCols;
  static constexpr int kCoverPerPixel = CoverPerPixel;
  static constexpr int kForwardPlanes = ForwardPlanes;
  static constexpr int kNhwcChannelGroup = NhwcChannelGroup;
  static constexpr int kNhwcPlanes = NhwcPlanes;
  static constexpr int64_t kForwardMinBlocks = ForwardMinBlocks;
  static constexpr int kForwardBlocksPerSm = ForwardBlocksPerSm;
  static constexpr int kBackwardBlocksPerSm = BackwardBlocksPerSm;
  // RoI Pool's forward: outputs of one RoI a block owns.
  static constexpr int64_t kRoiPoolBlockOutputs = 4 * int64_t{Threads};
  // Whether the launchers carry the kernels of sampling ratios past
  // kPerSampleGrid (pixel_sums). The shipped kernels do; a tuning that only
  // the GPU driver times may leave them out (its launches of such a ratio
  // then fail) to halve its build.
  static constexpr bool kLargeGrids = true;
  // NHWC forward with channel groups: 0, each thread finds its RoI's taps
  // itself; else the block stages the taps of this many RoIs at a time
  // (ForwardStage), which their channels' threads then read.
  static constexpr int kStageRois = 0;

  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps, at most 1,024 threads");
  static_assert(kTilePixels == Threads, "the cover step gives each pixel a thread");
  static_assert(kTileRows <= 127 && kTileCols <= 127, "tile coordinates are int8");
  static_assert(ForwardPlanes >= 1 && NhwcChannelGroup >= 1 && CoverPerPixel >= 1 &&
                    NhwcPlanes >= 0,
                "positive counts");

  // Whether a forward in `Layout` gives each thread a run of output channels
  // of one bin (else each a channel of a group, NHWC), and how many at most.
  template <typename Layout>
  static PSROI_HD constexpr bool forward_runs_planes() {
    return !Layout::kChannelsLast || NhwcPlanes > 0;
  }
  template <typename Layout>
  static PSROI_HD constexpr int forward_planes() {
    return Layout::kChannelsLast && NhwcPlanes > 0 ? NhwcPlanes : ForwardPlanes;
  }

  // Entries of a backward tile's RoI list (shared memory: 4 + 4 + sizeof(T)
  // * (kTileRows + kTileCols) bytes an entry); RoIs are examined list_chunk
  // at a time, and a chunk that no longer fits ends the pass.
  template <typename T>
  static PSROI_HD constexpr int list_capacity() {
    return sizeof(T) == 8 ? ListCapacity / 2 : ListCapacity;
  }
  template <typename T>
  static PSROI_HD constexpr int list_chunk() {
    return list_capacity<T>() < kThreads ? list_capacity<T>() : kThreads;
  }
};

// 16 entries a pixel: dense detection batches cover many pixels more than 8
// times but almost none more than 16, and an element of a pixel past its
// entries re-reads the whole list while its warp waits.
// Launch bounds: the NCHW forward's threads keep the sums of up to 8
// planes, and ptxas left unbounded spends registers until few blocks fit an
// SM; 5 blocks keeps it near 96 registers with few spills. The backward at
// 7 (72 registers) spills at most 16 bytes, and float32 shared memory (32 KB
// a block) allows 7; float64's, 5 (cuda/kernels.cuh, backward_blocks_per_sm).
using DefaultTuning = Tuning</*Threads=*/128, /*TileRows=*/4, /*CoverPerPixel=*/16,
                             /*ForwardPlanes=*/8, /*NhwcChannelGroup=*/32, /*NhwcPlanes=*/0,
                             /*ForwardMinBlocks=*/2048, /*ForwardBlocksPerSm=*/5,
                             /*BackwardBlocksPerSm=*/7, /*ListCapacity=*/128>;

// --- Workspace --------------------------------------------------------------
// One int32 buffer that XLA allocates as a further result of each CUDA call,
// of workspace_elements(shape, backward) elements (jax_psroi._averaging asks
// the CPU module, which compiles this header, for the number).
//   forward:  boxes [K, kBoxWords] | image [K] | band [K] | order [K] |
//             offsets [B + 1] | counts [B * S]
//   backward: boxes [K, kBoxWords] | image [K] | tile_rows [K, 2] |
//             spans [PH + PW, K, 2] | offsets [B + 1] | counts [B * S] |
//             lists [K * TY]
// B buckets: for the forward an (image, band of rows) and, last, the RoIs
// that read nothing (B = N * kForwardBands + 1); for the backward an (image,
// tile row) holding every RoI whose box touches that row of tiles (B = N *
// TY, TY the map's tile rows). S: segments of kBucketSegment RoIs, bucketed
// by blocks of their own.
struct Workspace {
  int32_t* boxes;      // [K, kBoxWords]: each RoI's RoiBox values, in T
  int32_t* image;      // [K]: the image an RoI reads, N if none
  int32_t* band;       // forward: [K], the band of rows an RoI starts in
  int32_t* order;      // the buckets' RoIs, bucket after bucket
  int32_t* offsets;    // bucket b is order[offsets[b], offsets[b + 1])
  int32_t* counts;     // [B, S]: RoIs of segment s in bucket b, then where
                       // they start in `order`
  int32_t* tile_rows;  // backward: first and last tile row of each RoI
  int32_t* spans;      // backward: first and last pixel each bin row
                       // (axis < PH) or column of each RoI touches
};

// RoIs a bucketing block examines.
constexpr int64_t kBucketSegment = 1024;

// The forward's buckets split each image's RoIs by the band of map rows
// their box starts in (kForwardBands bands of equal height, the last
// shorter): an image's buckets are consecutive in `order`, so a forward
// block that walks them walks the image's RoIs top to bottom, and the
// windows of neighbouring boxes meet in L1/L2.
constexpr int64_t kForwardBands = 8;

PSROI_HD int64_t band_rows_of(const CallShape& shape) {
  const int64_t rows = (shape.height + kForwardBands - 1) / kForwardBands;
  return rows > 0 ? rows : 1;
}

// Words of an RoI's box in the workspace: RoiBox's four values, room for
// float64 (first in the buffer, so 8-byte aligned). Computed once per RoI
// (roi_info), so that no kernel recomputes a box per element or per tile.
constexpr int64_t kBoxWords = 4 * sizeof(double) / sizeof(int32_t);

template <typename T>
PSROI_HD void store_box(const Workspace& views, int64_t roi, const RoiBox<T>& box) {
  const T values[4] = {box.start_y, box.start_x, box.bin_h, box.bin_w};
  memcpy(views.boxes + kBoxWords * roi, values, sizeof(values));
}

// The geometry of RoI `roi`, which reads image `image` (its bucket's).
template <typename T>
PSROI_HD RoiGeometry<T> stored_geometry(const Workspace& views, int64_t roi, int64_t image,
                                        const CallShape& shape, const BoxRule& rule,
                                        int64_t sampling_ratio) {
  T values[4];
  memcpy(values, views.boxes + kBoxWords * roi, sizeof(values));
  return geometry_of_box(RoiBox<T>{image, values[0], values[1], values[2], values[3]}, shape, rule,
                         sampling_ratio);
}

template <typename Tune>
PSROI_HD int64_t tile_rows_of(const CallShape& shape) {
  return (shape.height + Tune::kTileRows - 1) / Tune::kTileRows;
}

template <typename Tune>
PSROI_HD int64_t buckets_of(const CallShape& shape, bool backward) {
  return backward ? shape.num_images * tile_rows_of<Tune>(shape)
                  : shape.num_images * kForwardBands + 1;
}

PSROI_HD int64_t segments_of(const CallShape& shape) {
  const int64_t s = (shape.num_rois + kBucketSegment - 1) / kBucketSegment;
  return s > 0 ? s : 1;
}

template <typename Tune>
PSROI_HD Workspace workspace_views(int32_t* views, const CallShape& shape, bool backward) {
  const int64_t K = shape.num_rois;
  const int64_t buckets = buckets_of<Tune>(shape, backward);
  Workspace w{};
  w.boxes = views;
  w.image = views + kBoxWords * K;
  int32_t* next = w.image + K;
  if (backward) {
    w.tile_rows = next;
    w.spans = w.tile_rows + 2 * K;
    next = w.spans + 2 * K * (shape.pooled_h + shape.pooled_w);
  } else {
    w.band = next;
    next += K;
  }
  w.offsets = next;
  w.counts = w.offsets + buckets + 1;
  w.order = w.counts + buckets * segments_of(shape);
  return w;
}

template <typename Tune>
PSROI_HD int64_t workspace_elements(const CallShape& shape, bool backward) {
  const int64_t K = shape.num_rois;
  const int64_t fixed =
      kBoxWords * K + buckets_of<Tune>(shape, backward) * (1 + segments_of(shape)) + 1;
  if (!backward) return 3 * K + fixed;
  return 3 * K + 2 * K * (shape.pooled_h + shape.pooled_w) + fixed + K * tile_rows_of<Tune>(shape);
}

// The forward and backward blocks of calls that sum pixel by pixel
// (pixel_sums, roi_math.h) are instantiated apart, so that the others carry
// none of their code.
using ::jax_psroi::pixel_sums;

// --- 1. Buckets -------------------------------------------------------------

// What the kernels need of RoI `roi`: its box, its image and, for the
// backward, the pixels each bin row and column touches and the tile rows
// its box touches.
template <typename Tune, typename T>
PSROI_HD void roi_info(const T* rois, const CallShape& shape, const BoxRule& rule, T spatial_scale,
                       int64_t sampling_ratio, int64_t roi, bool backward, const Workspace& views) {
  const RoiBox<T> box = roi_box(rois, roi, shape, rule, spatial_scale);
  store_box(views, roi, box);
  const RoiGeometry<T> geometry = geometry_of_box(box, shape, rule, sampling_ratio);
  views.image[roi] = static_cast<int32_t>(geometry.empty() ? shape.num_images : geometry.image);
  if (!backward) {
    // The row the box starts at, clipped to the map (in T first: it may be
    // huge; RoIs that read nothing, NaN included, take band 0 unused).
    T top = box.start_y;
    const T last_row = static_cast<T>(shape.height - 1);
    if (!(top > static_cast<T>(0))) top = static_cast<T>(0);
    if (top > last_row) top = last_row;
    views.band[roi] = static_cast<int32_t>(static_cast<int64_t>(top) / band_rows_of(shape));
    return;
  }
  int64_t first_row = shape.height, last_row = -1;
  for (int64_t a = 0; a < shape.pooled_h + shape.pooled_w; ++a) {
    AxisSpan s{0, -1};
    if (!geometry.empty()) {
      s = a < shape.pooled_h ? touched_pixels(geometry.y, a, shape.height)
                             : touched_pixels(geometry.x, a - shape.pooled_h, shape.width);
    }
    int32_t* span = views.spans + 2 * (a * shape.num_rois + roi);
    span[0] = static_cast<int32_t>(s.first);
    span[1] = static_cast<int32_t>(s.last);
    if (a < shape.pooled_h && s.first <= s.last) {
      if (s.first < first_row) first_row = s.first;
      if (s.last > last_row) last_row = s.last;
    }
  }
  const bool touches = first_row <= last_row;
  views.tile_rows[2 * roi] = static_cast<int32_t>(touches ? first_row / Tune::kTileRows : 0);
  views.tile_rows[2 * roi + 1] = static_cast<int32_t>(touches ? last_row / Tune::kTileRows : -1);
}

// Is RoI k in bucket b? roi_info must be complete for every RoI.
template <typename Tune>
PSROI_HD bool in_bucket(const CallShape& shape, const Workspace& views, bool backward, int64_t k,
                        int64_t b) {
  if (!backward) {
    const int64_t n = b / kForwardBands;  // N: the last bucket
    return views.image[k] == n && (n == shape.num_images || views.band[k] == b - n * kForwardBands);
  }
  const int64_t rows = tile_rows_of<Tune>(shape);
  const int64_t n = b / rows, t = b - n * rows;
  return views.image[k] == n && views.tile_rows[2 * k] <= t && t <= views.tile_rows[2 * k + 1];
}

// Bucketing, in three launches over blocks (bucket b, segment s), block
// = b * S + s, each examining RoIs [s * kBucketSegment, ...) in order:
//   count:  counts[block] = how many of them are in b;
//   start:  (one block) counts become where each block's RoIs start in
//           `order` (an exclusive scan in block order), offsets[b] where
//           bucket b starts, offsets[B] the end of all;
//   place:  the block's RoIs in b written from there, in RoI order.
// So every bucket lists its RoIs in increasing RoI order, whatever the
// number of blocks.
template <typename Exec, typename F>
PSROI_HD int64_t for_segment_chunks(Exec& ex, const CallShape& shape, int64_t segment, F f) {
  const int64_t begin = segment * kBucketSegment;
  int64_t end = begin + kBucketSegment;
  if (end > shape.num_rois) end = shape.num_rois;
  int64_t total = 0;
  for (int64_t k0 = begin; k0 < end; k0 += ex.threads) {
    total += f(k0, end - k0 < ex.threads ? end - k0 : ex.threads);
  }
  return total;
}

template <typename Tune, typename Exec>
PSROI_HD void count_block(Exec& ex, const CallShape& shape, const Workspace& views, bool backward,
                          int64_t block) {
  const int64_t b = block / segments_of(shape), segment = block % segments_of(shape);
  const int64_t members = for_segment_chunks(ex, shape, segment, [&](int64_t k0, int64_t n) {
    return ex.sum(
        n, [&](int64_t i) { return in_bucket<Tune>(shape, views, backward, k0 + i, b) ? 1 : 0; });
  });
  ex.single([&] { views.counts[block] = static_cast<int32_t>(members); });
}

template <typename Tune, typename Exec>
PSROI_HD void start_block(Exec& ex, const CallShape& shape, const Workspace& views, bool backward) {
  const int64_t segments = segments_of(shape);
  const int64_t blocks = buckets_of<Tune>(shape, backward) * segments;
  int64_t start = 0;
  for (int64_t i0 = 0; i0 < blocks; i0 += ex.threads) {
    const int64_t n = blocks - i0 < ex.threads ? blocks - i0 : ex.threads;
    start += ex.scan(
        n, [&](int64_t i) { return views.counts[i0 + i]; }, start,
        [&](int64_t i, int64_t at) {
          views.counts[i0 + i] = static_cast<int32_t>(at);
          if ((i0 + i) % segments == 0)
            views.offsets[(i0 + i) / segments] = static_cast<int32_t>(at);
        });
  }
  ex.single(
      [&] { views.offsets[buckets_of<Tune>(shape, backward)] = static_cast<int32_t>(start); });
}

template <typename Tune, typename Exec>
PSROI_HD void place_block(Exec& ex, const CallShape& shape, const Workspace& views, bool backward,
                          int64_t block) {
  const int64_t b = block / segments_of(shape), segment = block % segments_of(shape);
  int64_t placed = views.counts[block];
  for_segment_chunks(ex, shape, segment, [&](int64_t k0, int64_t n) {
    const int64_t members = ex.compact(
        n, [&](int64_t i) { return in_bucket<Tune>(shape, views, backward, k0 + i, b); }, placed,
        INT64_MAX, [&](int64_t i, int64_t at) { views.order[at] = static_cast<int32_t>(k0 + i); });
    placed += members;
    return members;
  });
}

// --- 2. Forward -------------------------------------------------------------

// The forward wants at least Tune::kForwardMinBlocks blocks: an image's RoIs
// are split into chunks until it has them, so that a few images of few
// channel groups still fill the GPU (a map of a few hundred channels in
// NHWC gives a few blocks per image unsplit, a fraction of one wave).
//
// NCHW: a forward thread computes one RoI's bin in up to kForwardPlanes
// planes, those of consecutive output channels of that bin, and its box's
// taps once for all of them (with one plane a thread, geometry and taps are
// most of an output's instructions, and the kernel is instruction-bound).
// A block takes forward_planes(shape) output channels of
// one bin: C_out split evenly into as few runs of at most kForwardPlanes as
// it takes. NHWC: a block takes kNhwcChannelGroup consecutive channels
// (pairs, as channel_bin numbers them), which a warp reads as one
// contiguous run per tap; or, with Tune::kNhwcPlanes, NCHW's form, where a
// thread's planes are a contiguous run of channels in bin-major order.

// The runs of output channels a bin's C_out is split into, and their length
// (the last may be shorter), where threads take runs (NCHW; NHWC with
// Tune::kNhwcPlanes).
template <typename Tune, typename Layout>
PSROI_HD int64_t forward_runs(const CallShape& shape) {
  constexpr int kPlanes = Tune::template forward_planes<Layout>();
  return (shape.channels_out + kPlanes - 1) / kPlanes;
}
template <typename Tune, typename Layout>
PSROI_HD int64_t forward_planes(const CallShape& shape) {
  const int64_t runs = forward_runs<Tune, Layout>(shape);
  return runs > 0 ? (shape.channels_out + runs - 1) / runs : 1;
}

// Groups of (output channel, bin) pairs the forward splits its blocks by:
// (bin, run of forward_planes output channels), the run fastest; or NHWC
// runs of kNhwcChannelGroup pairs.
template <typename Tune, typename Layout>
PSROI_HD int64_t forward_channel_groups(const CallShape& shape) {
  if (!Tune::template forward_runs_planes<Layout>()) {
    return (shape.channel_bins() + Tune::kNhwcChannelGroup - 1) / Tune::kNhwcChannelGroup;
  }
  return shape.bins() * forward_runs<Tune, Layout>(shape);
}

// Chunks each image's RoIs (and those that read nothing) are split into:
// enough for kForwardMinBlocks blocks, but no more than one per kThreads
// RoIs of an average image.
template <typename Tune, typename Layout>
PSROI_HD int64_t forward_chunks(const CallShape& shape) {
  const int64_t images = shape.num_images > 0 ? shape.num_images : 1;
  const int64_t per_image = (shape.num_rois + images - 1) / images;
  const int64_t by_rois = (per_image + Tune::kThreads - 1) / Tune::kThreads;
  const int64_t others = (shape.num_images + 1) * forward_channel_groups<Tune, Layout>(shape);
  if (others == 0) return 1;  // no output channels: no blocks
  const int64_t wanted = (Tune::kForwardMinBlocks + others - 1) / others;
  const int64_t chunks = by_rois < wanted ? by_rois : wanted;
  return chunks > 0 ? chunks : 1;
}

// Blocks of the forward: (image or N, chunk, channel group), the group
// fastest, so that the blocks in flight share one image's RoIs.
template <typename Tune, typename Layout>
PSROI_HD int64_t forward_blocks(const CallShape& shape) {
  return (shape.num_images + 1) * forward_chunks<Tune, Layout>(shape) *
         forward_channel_groups<Tune, Layout>(shape);
}

// Output channel and bin of pair `c` (< channel_bins()): in the
// position-sensitive orders, those input channel `c` feeds; with shared
// channels, numbered bin-major (C_out consecutive pairs read one pixel's
// consecutive channels). In 32 bits: these divisions run per element, and
// 64-bit ones cost several times more on a GPU (the CUDA handlers reject
// 2^31 pairs or more).
struct ChannelBin {
  int32_t c_out, bin, ph, pw;
};

PSROI_HD ChannelBin channel_bin(const CallShape& shape, int64_t c) {
  const int32_t channel = static_cast<int32_t>(c);
  const int32_t bins = static_cast<int32_t>(shape.bins());
  const int32_t channels_out = static_cast<int32_t>(shape.channels_out);
  const int32_t pooled_w = static_cast<int32_t>(shape.pooled_w);
  ChannelBin cb;
  if (shape.channel_order == ChannelOrder::kTorchvision) {
    cb.c_out = channel / bins;
    cb.bin = channel - cb.c_out * bins;
  } else {
    cb.bin = channel / channels_out;
    cb.c_out = channel - cb.bin * channels_out;
  }
  cb.ph = cb.bin / pooled_w;
  cb.pw = cb.bin - cb.ph * pooled_w;
  return cb;
}

// NHWC forward, Tune::kStageRois > 0: with channel groups, the 32 threads
// of a warp share one RoI, and each finding its taps itself (the box's
// geometry, two binary searches, a division per sample) is most of their
// instructions. So the block stages, kStageRois RoIs at a time, the taps of
// every bin row and column of each (kStageBins at most per axis, each of at
// most kStageSamples samples on the map; a larger bin's threads find its
// taps themselves), and every channel's thread sums from them through
// add_sample, the per-thread path's arithmetic: the same bits.
constexpr int kStageBins = 16;
constexpr int kStageSamples = 4;

template <typename T>
struct StagedTap {
  int32_t low, high;  // low < 0: the sample reads nothing (AxisTap::valid)
  T w_low, w_high;
};

template <typename Tune, typename T>
struct ForwardStage {
  static constexpr int kRois = Tune::kStageRois;
  T count[kRois];                                // samples per bin (the divisor)
  int32_t samples[kRois][2][kStageBins];         // per axis (y, x) and bin
  StagedTap<T> taps[kRois][2][kStageBins][kStageSamples];
};
struct NoStage {};

// What a forward block keeps in shared memory: the stage, if its tuning has one.
template <typename Tune, typename T>
using ForwardShared =
    typename std::conditional<(Tune::kStageRois > 0), ForwardStage<Tune, T>, NoStage>::type;

// Whether a call's NHWC forward stages taps, where its tuning has a stage:
// samples, not windows or pixel sums, and bins and map axes that the
// stage's sizes hold.
template <bool kPixelSums>
PSROI_HD bool stages_taps(const CallShape& shape, const BoxRule& rule) {
  return !kPixelSums && !rule.whole_pixels &&
         shape.pooled_h <= kStageBins && shape.pooled_w <= kStageBins &&
         shape.height <= INT32_MAX && shape.width <= INT32_MAX;
}

// The channel-group forward of the chunk's RoIs order[begin, end) of
// `image` for pairs [c0, c0 + kNhwcChannelGroup), its taps staged.
template <typename Tune, typename Exec, typename S, typename Layout, typename T, typename Plane>
PSROI_HD void staged_forward(Exec& ex, ForwardStage<Tune, T>& stage, const CallShape& shape,
                             const BoxRule& rule, int64_t sampling_ratio, const Workspace& views,
                             int64_t image, int64_t begin, int64_t end, int64_t c0,
                             const Layout& layout, Plane plane_of, S* output) {
  constexpr int kGroup = Tune::kNhwcChannelGroup, kRois = Tune::kStageRois;
  const int64_t axis_bins = shape.pooled_h + shape.pooled_w;
  for (int64_t first = begin; first < end; first += kRois) {
    const int64_t rois = end - first < kRois ? end - first : kRois;
    // Item (r, j): RoI r's bin row j, or its bin column j - PH.
    ex.each(rois * axis_bins, [&](int64_t item) {
      const int64_t r = item / axis_bins, j = item - r * axis_bins;
      const RoiGeometry<T> geometry =
          stored_geometry<T>(views, views.order[first + r], image, shape, rule, sampling_ratio);
      const int a = j < shape.pooled_h ? 0 : 1;
      const int64_t bin = a == 0 ? j : j - shape.pooled_h;
      // A copy: a reference chosen at run time would keep the geometry in
      // local memory.
      const RoiAxis<T> axis = a == 0 ? geometry.y : geometry.x;
      const int64_t size = a == 0 ? shape.height : shape.width;
      const SampleRange range = samples_to_visit(axis, bin, size);
      const int64_t samples = range.end - range.begin;  // <= grid <= 2^23
      stage.samples[r][a][bin] = static_cast<int32_t>(samples);
      if (j == 0) stage.count[r] = geometry.count;
      for (int64_t i = 0; i < samples && i < kStageSamples; ++i) {
        const AxisTap<T> t = sample_tap(axis, bin, range.begin + i, size);
        stage.taps[r][a][bin][i] = StagedTap<T>{t.valid ? static_cast<int32_t>(t.low) : -1,
                                                static_cast<int32_t>(t.high), t.w_low, t.w_high};
      }
    });
    // Element i: RoI i / kGroup of these, pair c0 + i % kGroup.
    ex.each(rois * kGroup, [&](int64_t i) {
      const int64_t c = c0 + i % kGroup;
      if (c >= shape.channel_bins()) return;
      const int64_t r = i / kGroup;
      const ChannelBin cb = channel_bin(shape, c);
      const int32_t rows = stage.samples[r][0][cb.ph], cols = stage.samples[r][1][cb.pw];
      T value[1] = {static_cast<T>(0)};
      const S* plane = plane_of(cb.c_out, cb.bin);
      if (rows <= kStageSamples && cols <= kStageSamples) {
        auto tap = [](const StagedTap<T>& t) {
          return AxisTap<T>{t.low >= 0, t.low, t.high, t.w_low, t.w_high};
        };
        for (int32_t iy = 0; iy < rows; ++iy) {
          const AxisTap<T> ty = tap(stage.taps[r][0][cb.ph][iy]);
          if (!ty.valid) continue;
          for (int32_t ix = 0; ix < cols; ++ix) {
            const AxisTap<T> tx = tap(stage.taps[r][1][cb.pw][ix]);
            if (tx.valid) add_sample<1, S>(plane, 0, 1, layout, ty, tx, value);
          }
        }
        value[0] /= stage.count[r];
      } else {  // a bin of many samples: its taps found here
        const RoiGeometry<T> geometry =
            stored_geometry<T>(views, views.order[first + r], image, shape, rule, sampling_ratio);
        pooled_values<1, false>(plane, 0, 1, layout, geometry, shape, cb.ph, cb.pw, value);
      }
      output[Layout::pooled_offset(shape, views.order[first + r], cb.c_out, cb.bin)] =
          Storage<S>::store(value[0]);
    });
  }
}

template <typename Tune, typename Exec, typename S, typename Layout, bool kPixelSums,
          typename T = ComputeType<S>>
PSROI_HD void forward_block(Exec& ex, ForwardShared<Tune, T>& shared, const S* input,
                            const CallShape& shape, const BoxRule& rule, int64_t sampling_ratio,
                            const Workspace& views, int64_t block, bool skip_empty_rois,
                            S* output) {
  constexpr int kNhwcChannelGroup = Tune::kNhwcChannelGroup;
  constexpr int kForwardPlanes = Tune::template forward_planes<Layout>();
  const int64_t groups = forward_channel_groups<Tune, Layout>(shape);
  const int64_t chunks = forward_chunks<Tune, Layout>(shape);
  const int64_t group = block % groups;
  const int64_t chunk = (block / groups) % chunks;
  const int64_t image = block / (groups * chunks);  // N: the RoIs that read nothing
  // RoIs that read nothing: zeros, or left as they were (the whole block).
  if (image == shape.num_images && skip_empty_rois) return;
  // Chunk `chunk` of the image's RoIs, its buckets (bands) one after
  // another in `order` (some chunks of a small image are empty).
  const int64_t first_bucket = image * kForwardBands;
  const int64_t last_bucket =
      image < shape.num_images ? first_bucket + kForwardBands - 1 : first_bucket;
  const int64_t image_begin = views.offsets[first_bucket];
  const int64_t image_size = views.offsets[last_bucket + 1] - image_begin;
  const int64_t begin = image_begin + image_size * chunk / chunks;
  const int64_t end = image_begin + image_size * (chunk + 1) / chunks;
  const Layout layout = Layout::of(shape);
  // The plane (channels-last: the first channel) output channel c_out of
  // bin `bin` reads; the next output channel's is plane_step further.
  auto plane_of = [&](int64_t c_out, int64_t bin) {
    return input +
           layout.plane_offset(image, shape.first_channel(bin) + c_out * shape.channel_step());
  };
  const int64_t plane_step = shape.channel_step() * layout.channel_stride();

  if constexpr (!Tune::template forward_runs_planes<Layout>()) {
    // Element i: RoI i / kNhwcChannelGroup of the chunk, pair c0 + i %
    // kNhwcChannelGroup.
    const int64_t c0 = group * kNhwcChannelGroup;
    if constexpr (Tune::kStageRois > 0) {
      if (image < shape.num_images && stages_taps<kPixelSums>(shape, rule)) {
        staged_forward<Tune>(ex, shared, shape, rule, sampling_ratio, views, image, begin, end,
                             c0, layout, plane_of, output);
        return;
      }
    }
    ex.each((end - begin) * kNhwcChannelGroup, [&](int64_t i) {
      const int64_t c = c0 + i % kNhwcChannelGroup;
      if (c >= shape.channel_bins()) return;
      const int64_t roi = views.order[begin + i / kNhwcChannelGroup];
      const ChannelBin cb = channel_bin(shape, c);
      T value[1] = {static_cast<T>(0)};
      if (image < shape.num_images) {
        const RoiGeometry<T> geometry =
            stored_geometry<T>(views, roi, image, shape, rule, sampling_ratio);
        pooled_values<1, kPixelSums>(plane_of(cb.c_out, cb.bin), plane_step, 1, layout, geometry,
                                     shape, cb.ph, cb.pw, value);
      }
      output[Layout::pooled_offset(shape, roi, cb.c_out, cb.bin)] = Storage<S>::store(value[0]);
    });
  } else {
    // Thread i: RoI i of the chunk, bin `bin` in output channels [c_out0,
    // c_out0 + planes).
    const int64_t runs = forward_runs<Tune, Layout>(shape);
    const int64_t run_planes = forward_planes<Tune, Layout>(shape);
    const int64_t bin = group / runs;
    const int64_t c_out0 = (group - bin * runs) * run_planes;
    const int64_t left = shape.channels_out - c_out0;
    const int64_t planes = left < run_planes ? left : run_planes;
    const int64_t ph = bin / shape.pooled_w, pw = bin % shape.pooled_w;
    ex.each(end - begin, [&](int64_t i) {
      const int64_t roi = views.order[begin + i];
      T values[kForwardPlanes] = {};
      if (image < shape.num_images) {
        const RoiGeometry<T> geometry =
            stored_geometry<T>(views, roi, image, shape, rule, sampling_ratio);
        pooled_values<kForwardPlanes, kPixelSums>(plane_of(c_out0, bin), plane_step, planes, layout,
                                                  geometry, shape, ph, pw, values);
      }
      for (int k = 0; k < kForwardPlanes; ++k) {
        if (k < planes) {
          output[Layout::pooled_offset(shape, roi, c_out0 + k, bin)] = Storage<S>::store(values[k]);
        }
      }
    });
  }
}

// RoI Pool's forward blocks: a block owns kRoiPoolBlockOutputs consecutive
// outputs of one RoI (in the pooled tensor's memory order, all of one RoI's
// outputs are consecutive), so the RoI's geometry is computed once per
// block, not per element. Consecutive threads take consecutive outputs:
// neighbouring bins of a plane in NCHW, consecutive channels of one pixel
// channels-last.
template <typename Tune>
PSROI_HD int64_t roi_pool_chunks(const CallShape& shape) {
  return (shape.channels * shape.bins() + Tune::kRoiPoolBlockOutputs - 1) /
         Tune::kRoiPoolBlockOutputs;
}

template <typename Tune>
PSROI_HD int64_t roi_pool_blocks(const CallShape& shape) {
  return shape.num_rois * roi_pool_chunks<Tune>(shape);
}

template <typename T>
struct RoiPoolShared {
  RoiGeometry<T> geometry;
};

// RoI Pool's forward element i (in the pooled tensor's memory order), output
// `rest` of an RoI of `geometry`: the maximum of its window and its pixel,
// or with `recorded` the input at the recorded pixel (then `pixels`, aliased
// to it, is not written).
template <typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD void roi_pool_element(const S* input, const RoiGeometry<T>& geometry,
                               const CallShape& shape, const int32_t* recorded, int64_t i,
                               int64_t rest, S* output, int32_t* pixels) {
  // Pooled layouts: [K, C, PH, PW] or [K, PH, PW, C].
  int64_t c, bin;
  if (Layout::kChannelsLast) {
    bin = rest / shape.channels;
    c = rest - bin * shape.channels;
  } else {
    c = rest / shape.bins();
    bin = rest - c * shape.bins();
  }
  if (geometry.empty()) {
    output[i] = Storage<S>::store(static_cast<T>(0));
    if (!recorded) pixels[i] = -1;
    return;
  }
  const Layout layout = Layout::of(shape);
  const S* plane = input + layout.plane_offset(geometry.image, c);
  if (recorded) {
    output[i] = Storage<S>::store(value_at_pixel(plane, layout, shape, recorded[i]));
    return;
  }
  const WindowMax<T> m =
      window_max(plane, layout, geometry.y.window(bin / shape.pooled_w, shape.height),
                 geometry.x.window(bin % shape.pooled_w, shape.width), shape);
  output[i] = Storage<S>::store(m.value);
  pixels[i] = m.pixel;
}

template <typename Tune, typename Exec, typename S, typename Layout, typename T = ComputeType<S>>
PSROI_HD void roi_pool_block(Exec& ex, RoiPoolShared<T>& shared, const S* input, const T* rois,
                             const CallShape& shape, const BoxRule& rule, T spatial_scale,
                             const int32_t* recorded, int64_t block, S* output, int32_t* pixels) {
  constexpr int64_t kRoiPoolBlockOutputs = Tune::kRoiPoolBlockOutputs;
  const int64_t chunks = roi_pool_chunks<Tune>(shape);
  const int64_t roi = block / chunks;
  const int64_t per_roi = shape.channels * shape.bins();
  // Outputs [first, end) of the RoI's.
  const int64_t first = (block % chunks) * kRoiPoolBlockOutputs;
  const int64_t end = first + kRoiPoolBlockOutputs < per_roi ? first + kRoiPoolBlockOutputs
                                                             : per_roi;
  ex.single([&] { shared.geometry = roi_geometry(rois, roi, shape, rule, spatial_scale, 0); });
  const RoiGeometry<T> geometry = shared.geometry;
  ex.each(end - first, [&](int64_t j) {
    roi_pool_element<S, Layout>(input, geometry, shape, recorded, roi * per_roi + first + j,
                                first + j, output, pixels);
  });
}

// --- 3. Backward ------------------------------------------------------------

template <typename Tune>
struct BackwardTiling {
  int64_t tiles_y, tiles_x;

  static PSROI_HD BackwardTiling of(const CallShape& shape) {
    return BackwardTiling{(shape.height + Tune::kTileRows - 1) / Tune::kTileRows,
                          (shape.width + Tune::kTileCols - 1) / Tune::kTileCols};
  }
  // Blocks: (image, tile, bin), the bin fastest, so that the blocks in
  // flight write neighbouring channels of the same pixels (one cache line
  // per NHWC pixel in torchvision order) and read neighbouring cotangents.
  // With shared channels every bin feeds the same elements: (image, tile),
  // each block summing its bins in turn.
  PSROI_HD int64_t blocks(const CallShape& shape) const {
    return shape.num_images * tiles_y * tiles_x * block_bins(shape);
  }
  static PSROI_HD int64_t block_bins(const CallShape& shape) {
    return shape.shared_channels() ? 1 : shape.bins();
  }
};

// What a backward block keeps in shared memory.
template <typename Tune, typename T>
struct BackwardShared {
  static constexpr int kCapacity = Tune::template list_capacity<T>();
  static constexpr int kTileRows = Tune::kTileRows;
  static constexpr int kTileCols = Tune::kTileCols;
  static constexpr int kTilePixels = Tune::kTilePixels;
  static constexpr int kCoverPerPixel = Tune::kCoverPerPixel;
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
template <bool kPixelSums, typename Tune, typename T>
PSROI_HD void make_entry(const Workspace& views, const CallShape& shape, const BoxRule& rule,
                         int64_t sampling_ratio, const int32_t* row_spans, const int32_t* col_spans,
                         int64_t roi, int64_t image, int64_t bin, int64_t y0, int64_t x0,
                         int64_t entry, BackwardShared<Tune, T>& block_shared) {
  constexpr int kTileRows = Tune::kTileRows, kTileCols = Tune::kTileCols;
  const int64_t ph = bin / shape.pooled_w, pw = bin % shape.pooled_w;
  const int32_t* row = row_spans + 2 * roi;
  const int32_t* col = col_spans + 2 * roi;
  const int64_t r0 = row[0] > y0 ? row[0] : y0;
  const int64_t r1 = row[1] < y0 + kTileRows - 1 ? row[1] : y0 + kTileRows - 1;
  const int64_t c0 = col[0] > x0 ? col[0] : x0;
  const int64_t c1 = col[1] < x0 + kTileCols - 1 ? col[1] : x0 + kTileCols - 1;
  block_shared.roi[entry] = static_cast<int32_t>(roi);
  block_shared.row_first[entry] = static_cast<int8_t>(r0 - y0);
  block_shared.row_last[entry] = static_cast<int8_t>(r1 - y0);
  block_shared.col_first[entry] = static_cast<int8_t>(c0 - x0);
  block_shared.col_last[entry] = static_cast<int8_t>(c1 - x0);

  const RoiGeometry<T> geometry =
      stored_geometry<T>(views, roi, image, shape, rule, sampling_ratio);
  T* wy = block_shared.row_weight[entry];
  T* wx = block_shared.col_weight[entry];
  for (int r = 0; r < kTileRows; ++r) wy[r] = static_cast<T>(0);
  for (int c = 0; c < kTileCols; ++c) wx[c] = static_cast<T>(0);
  // The weights the bin gives the tile's rows and columns (its separable
  // form, as the CPU's RoiWeights sums it over a bin's span).
  for_each_axis_tap<kPixelSums>(geometry.y, ph, shape.height, [&](int64_t y, T weight) {
    if (y >= y0 && y < y0 + kTileRows) wy[y - y0] += weight;
  });
  for_each_axis_tap<kPixelSums>(geometry.x, pw, shape.width, [&](int64_t x, T weight) {
    if (x >= x0 && x < x0 + kTileCols) wx[x - x0] += weight;
  });
  const T divisor = geometry.divisor(ph, pw, shape);
  for (int r = 0; r < kTileRows; ++r) wy[r] /= divisor;
}

template <typename Tune, typename T>
PSROI_HD bool entry_covers(const BackwardShared<Tune, T>& block_shared, int64_t entry, int64_t py,
                           int64_t px) {
  return py >= block_shared.row_first[entry] && py <= block_shared.row_last[entry] &&
         px >= block_shared.col_first[entry] && px <= block_shared.col_last[entry];
}

// Element i of a block: pixel and output channel, in the order that makes
// neighbouring threads write neighbouring addresses (NCHW: pixels of a row
// of the plane; NHWC: channels of a pixel).
template <typename Tune, typename Layout>
PSROI_HD void tile_element(int32_t channels_out, int32_t i, int32_t* pixel, int32_t* c_out) {
  constexpr int kTilePixels = Tune::kTilePixels;
  if (Layout::kChannelsLast) {
    *pixel = i / channels_out;
    *c_out = i - *pixel * channels_out;
  } else {
    *pixel = i % kTilePixels;
    *c_out = i / kTilePixels;
  }
}

// What a list entry covering a gradient element adds to it: term(roi,
// c_out, bin, y, x, weight) for bin `bin` of RoI `roi` (its output channel
// c_out) at pixel (y, x), to which the bin gives `weight`.
// The averaging operations: the cotangent times the weight.
template <typename S, typename Layout, typename T = ComputeType<S>>
struct WeightedCotangent {
  const S* cotangent;
  CallShape shape;
  PSROI_HD T operator()(int64_t roi, int32_t c_out, int64_t bin, int64_t, int64_t,
                        T weight) const {
    return Storage<S>::load(cotangent[Layout::pooled_offset(shape, roi, c_out, bin)]) * weight;
  }
};

// RoI Pool: the cotangent where the bin's recorded maximum is the pixel.
template <typename S, typename Layout, typename T = ComputeType<S>>
struct CotangentAtMaximum {
  const S* cotangent;
  const int32_t* pixels;
  CallShape shape;
  PSROI_HD T operator()(int64_t roi, int32_t c_out, int64_t bin, int64_t y, int64_t x,
                        T) const {
    const int64_t at = Layout::pooled_offset(shape, roi, c_out, bin);
    return pixels[at] == y * shape.width + x ? Storage<S>::load(cotangent[at]) : static_cast<T>(0);
  }
};

// `sums` is the gradient itself when S is the compute type, else the
// compute-type accumulator; it carries partial sums between passes only.
template <typename Tune, typename Exec, typename S, typename Layout, bool kPixelSums, typename Term,
          typename T = ComputeType<S>>
PSROI_HD void backward_block(Exec& ex, BackwardShared<Tune, T>& block_shared, const Term& term,
                             const CallShape& shape, const BoxRule& rule, int64_t sampling_ratio,
                             const Workspace& views, int64_t block, T* sums, S* grad) {
  constexpr int kTileRows = Tune::kTileRows, kTileCols = Tune::kTileCols;
  constexpr int kTilePixels = Tune::kTilePixels, kCoverPerPixel = Tune::kCoverPerPixel;
  const BackwardTiling<Tune> tiling = BackwardTiling<Tune>::of(shape);
  const int64_t block_bins = BackwardTiling<Tune>::block_bins(shape);
  const int64_t tile = (block / block_bins) % (tiling.tiles_y * tiling.tiles_x);
  const int64_t image = block / (block_bins * tiling.tiles_y * tiling.tiles_x);
  const int64_t y0 = (tile / tiling.tiles_x) * kTileRows;
  const int64_t x0 = (tile % tiling.tiles_x) * kTileCols;
  const int64_t bucket = image * tiling.tiles_y + tile / tiling.tiles_x;  // see in_bucket
  const int64_t begin = views.offsets[bucket], end = views.offsets[bucket + 1];
  const Layout layout = Layout::of(shape);
  constexpr int kCapacity = BackwardShared<Tune, T>::kCapacity;
  constexpr int kChunk = Tune::template list_chunk<T>();
  // The block's bins: its own; with shared channels, every bin in turn, the
  // partial sums carried between them as between passes.
  const int64_t bin_begin = shape.shared_channels() ? 0 : block % block_bins;
  const int64_t bin_end = shape.shared_channels() ? shape.bins() : bin_begin + 1;

  bool first_pass = true;
  for (int64_t bin = bin_begin; bin < bin_end; ++bin) {
    const int64_t ph = bin / shape.pooled_w, pw = bin % shape.pooled_w;
    const int32_t* row_spans = views.spans + 2 * ph * shape.num_rois;
    const int32_t* col_spans = views.spans + 2 * (shape.pooled_h + pw) * shape.num_rois;

    // Does bin (ph, pw) of RoI `roi` touch the tile?
    auto meets_tile = [&](int64_t roi) {
      const int32_t* row = row_spans + 2 * roi;
      const int32_t* col = col_spans + 2 * roi;
      return row[0] <= y0 + kTileRows - 1 && row[1] >= y0 &&
             col[0] <= x0 + kTileCols - 1 && col[1] >= x0;
    };

    ex.single([&] { block_shared.next = begin; });
    for (;;) {
      // List the RoIs that meet the tile, from block_shared.next on, chunk by chunk,
      // until the bucket ends or a chunk would overflow the list.
      ex.single([&] { block_shared.listed = 0; });
      for (;;) {
        const int64_t k0 = block_shared.next;
        if (k0 >= end) break;
        const int64_t n = end - k0 < kChunk ? end - k0 : kChunk;
        const int64_t listed = block_shared.listed;
        const int64_t hits = ex.compact(
            n, [&](int64_t i) { return meets_tile(views.order[k0 + i]); }, listed, kCapacity,
            [&](int64_t i, int64_t at) {
              make_entry<kPixelSums>(views, shape, rule, sampling_ratio, row_spans, col_spans,
                                     views.order[k0 + i], image, bin, y0, x0, at, block_shared);
            });
        if (listed + hits > kCapacity) break;
        ex.single([&] {
          block_shared.listed = static_cast<int32_t>(listed + hits);
          block_shared.next = k0 + n;
        });
      }
      const bool last_pass = block_shared.next >= end && bin + 1 == bin_end;
      const bool bin_done = block_shared.next >= end;
      const int64_t listed = block_shared.listed;

      // Each pixel keeps the entries that cover it, in list order.
      ex.each(kTilePixels, [&](int64_t pixel) {
        const int32_t p = static_cast<int32_t>(pixel);
        const int32_t py = p / kTileCols, px = p % kTileCols;
        int kept = 0;
        int resume = static_cast<int>(listed);
        int covering = 0;
        for (int e = 0; e < listed; ++e) {
          if (!entry_covers(block_shared, e, py, px)) continue;
          ++covering;
          if (kept < kCoverPerPixel) {
            block_shared.cover_entry[kept][p] = static_cast<int16_t>(e);
            block_shared.cover_weight[kept][p] =
                block_shared.row_weight[e][py] * block_shared.col_weight[e][px];
            ++kept;
            resume = e + 1;
          }
        }
        block_shared.cover_count[p] = static_cast<int16_t>(covering);
        block_shared.cover_resume[p] = static_cast<int16_t>(resume);
      });

      // Every element of the block: its sum over the entries covering its
      // pixel, in list order, then written once per pass.
      ex.each(kTilePixels * shape.channels_out, [&](int64_t i) {
        int32_t p, c_out;
        tile_element<Tune, Layout>(static_cast<int32_t>(shape.channels_out),
                                   static_cast<int32_t>(i), &p, &c_out);
        const int32_t py = p / kTileCols, px = p % kTileCols;
        const int64_t y = y0 + py, x = x0 + px;
        if (y >= shape.height || x >= shape.width) return;
        const int64_t at =
            layout.plane_offset(image, shape.first_channel(bin) + c_out * shape.channel_step()) +
            layout.pixel_offset(y, x);
        // One running sum in list order across passes (the partial sum of
        // earlier passes first), so the result does not depend on where
        // passes end: every tuning sums alike.
        T sum = first_pass ? static_cast<T>(0) : sums[at];
        const int covering = block_shared.cover_count[p];
        const int kept = covering < kCoverPerPixel ? covering : kCoverPerPixel;
        for (int m = 0; m < kept; ++m) {
          sum += term(block_shared.roi[block_shared.cover_entry[m][p]], c_out, bin, y, x,
                      block_shared.cover_weight[m][p]);
        }
        if (covering > kept) {
          for (int e = block_shared.cover_resume[p]; e < listed; ++e) {
            if (entry_covers(block_shared, e, py, px)) {
              sum += term(block_shared.roi[e], c_out, bin, y, x,
                          block_shared.row_weight[e][py] * block_shared.col_weight[e][px]);
            }
          }
        }
        if (last_pass) {
          grad[at] = Storage<S>::store(sum);
        } else {
          sums[at] = sum;
        }
      });
      first_pass = false;
      if (bin_done) break;
    }
  }
}

}  // namespace gpu_schedule
}  // namespace jax_psroi

#endif  // JAX_PSROI_GPU_SCHEDULE_H_
