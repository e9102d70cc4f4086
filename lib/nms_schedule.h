// Non-maximum suppression's CUDA schedule: a bitmask of IoU tests in blocks
// of 64 boxes, then one scan per image. Written once over an executor `Exec`
// that stands for a thread block (gpu_schedule.h lists its steps; this uses
// `each` and `single`, each followed by a barrier), so that the CUDA kernels
// (lib/cuda/nms_handlers.cu) and the CPU test rig
// (lib/testing/nms_schedule_handlers.cc, a serial loop) run the same code.
//
// The boxes of each image come in visiting order (the caller sorts them:
// NaN scores first, then descending score, ties in index order), with
// their original indices (`order`) and categories. Then, deterministic and
// without atomics:
//   1. Mask. A tile (image, row block r, column block c >= r) is a block of
//      64 threads, thread l testing row box 64r + l against the tile's
//      column boxes (shared memory) with nms_math.h's overlaps: bit j of its
//      word is set when box 64c + j comes later in the order, is of the same
//      category and would be suppressed by it. Only the upper triangle of
//      blocks is stored (the scan never reads the rest): an image's mask is
//      64 W (W + 1) / 2 words for W = ceil(N / 64), N^2 / 128 bytes, not an
//      [N, N] matrix of IoUs.
//   2. Scan. A block per image walks the row blocks in order, keeping the
//      removed boxes as W bits words: one thread resolves a row block's 64
//      boxes against their diagonal words (in shared memory), in order,
//      stopping at max_output kept; the block then writes the kept boxes'
//      indices and ORs their rows into the later removed words, a thread per
//      word. The kept indices are in visiting order: best first.
#ifndef JAX_PSROI_NMS_SCHEDULE_H_
#define JAX_PSROI_NMS_SCHEDULE_H_

#include <cstdint>

#include "nms_math.h"
#include "storage_types.h"

namespace jax_psroi {
namespace nms {

// Boxes per mask word and per tile; a mask tile's threads.
constexpr int kWordBoxes = 64;
// A scan block's threads: its widest step ORs one removed word per thread.
constexpr int kScanThreads = 256;

PSROI_HD int64_t words_of(int64_t n) { return (n + kWordBoxes - 1) / kWordBoxes; }

// The first word of row block r in an image's mask of `words` words per
// full row: row block r' holds 64 rows of (words - r') words.
PSROI_HD int64_t row_block_offset(int64_t r, int64_t words) {
  return kWordBoxes * (r * words - r * (r - 1) / 2);
}

// The word of row box i for column block c >= i / 64.
PSROI_HD int64_t mask_word(int64_t i, int64_t c, int64_t words) {
  const int64_t r = i / kWordBoxes;
  return row_block_offset(r, words) + (i % kWordBoxes) * (words - r) + (c - r);
}

// An image's workspace: its mask, then its removed bits (one word per
// block of boxes). The lowering asks for images * image_words(n) words
// (jax_psroi/_nms.py: workspace_words).
PSROI_HD int64_t mask_words(int64_t n) { return row_block_offset(words_of(n), words_of(n)); }
PSROI_HD int64_t image_words(int64_t n) { return mask_words(n) + words_of(n); }

PSROI_HD int popcount(uint64_t word) {
#if defined(__CUDA_ARCH__)
  return __popcll(word);
#else
  return __builtin_popcountll(word);
#endif
}

PSROI_HD uint64_t bit(int64_t l) { return uint64_t{1} << l; }

// One call's operands (boxes [images, n, 4] in visiting order, their
// original indices and categories [images, n]) and results (indices
// [images, max_output], counts [images], the workspace).
template <typename S>
struct SortedCall {
  const S* boxes;
  const int32_t* order;
  const int32_t* categories;
  int64_t images, n, max_output;
  ComputeType<S> threshold;  // threshold_in's
  int32_t* indices;
  int32_t* counts;
  uint64_t* workspace;
};

template <typename T>
struct ColumnBoxes {
  T x1[kWordBoxes], y1[kWordBoxes], x2[kWordBoxes], y2[kWordBoxes], area[kWordBoxes];
  int32_t category[kWordBoxes];
};

// Mask tile `tile` of the call, in [0, images * W * W): (image, row block,
// column block), nothing below the diagonal. `column`: the block's shared
// memory.
template <typename S, typename Exec>
PSROI_HD void mask_tile(Exec& ex, const SortedCall<S>& call, int64_t tile,
                        ColumnBoxes<ComputeType<S>>& column) {
  using T = ComputeType<S>;
  const int64_t words = words_of(call.n);
  const int64_t b = tile / (words * words), r = tile / words % words, c = tile % words;
  if (c < r) return;  // the same for every thread of the block
  const S* boxes = call.boxes + b * call.n * 4;
  const int32_t* categories = call.categories + b * call.n;
  uint64_t* mask = call.workspace + b * image_words(call.n);
  const int64_t first_row = r * kWordBoxes, first_column = c * kWordBoxes;
  const int64_t rows = call.n - first_row < kWordBoxes ? call.n - first_row : kWordBoxes;
  const int64_t columns = call.n - first_column < kWordBoxes ? call.n - first_column : kWordBoxes;
  ex.each(columns, [&](int64_t j) {
    const S* box = boxes + (first_column + j) * 4;
    column.x1[j] = Storage<S>::load(box[0]);
    column.y1[j] = Storage<S>::load(box[1]);
    column.x2[j] = Storage<S>::load(box[2]);
    column.y2[j] = Storage<S>::load(box[3]);
    column.area[j] = box_area(column.x1[j], column.y1[j], column.x2[j], column.y2[j]);
    column.category[j] = categories[first_column + j];
  });
  ex.each(rows, [&](int64_t l) {
    const int64_t i = first_row + l;
    const S* box = boxes + i * 4;
    const T x1 = Storage<S>::load(box[0]), y1 = Storage<S>::load(box[1]);
    const T x2 = Storage<S>::load(box[2]), y2 = Storage<S>::load(box[3]);
    const T area = box_area(x1, y1, x2, y2);
    const int32_t category = categories[i];
    uint64_t word = 0;
    // On the diagonal, only the later boxes.
    for (int64_t j = c == r ? l + 1 : 0; j < columns; ++j) {
      if (column.category[j] == category &&
          overlaps(x1, y1, x2, y2, area, column.x1[j], column.y1[j], column.x2[j], column.y2[j],
                   column.area[j], call.threshold)) {
        word |= bit(j);
      }
    }
    mask[mask_word(i, c, words)] = word;
  });
}

// The scan block's shared memory.
struct ScanState {
  uint64_t diagonal[kWordBoxes];  // the current row block's own words
  uint64_t kept;                  // which of its boxes were kept
  int64_t count_before, count;    // boxes kept before it, and with it
};

// The scan of image b: its kept indices, -1 after them, and its count.
template <typename S, typename Exec>
PSROI_HD void scan_image(Exec& ex, const SortedCall<S>& call, int64_t b, ScanState& state) {
  const int64_t words = words_of(call.n), max_output = call.max_output;
  const uint64_t* mask = call.workspace + b * image_words(call.n);
  uint64_t* removed = call.workspace + b * image_words(call.n) + mask_words(call.n);
  const int32_t* order = call.order + b * call.n;
  int32_t* indices = call.indices + b * max_output;
  ex.each(words, [&](int64_t w) { removed[w] = 0; });
  ex.single([&] { state.count = 0; });
  for (int64_t r = 0; r < words && state.count < max_output; ++r) {
    const int64_t first = r * kWordBoxes;
    const int64_t rows = call.n - first < kWordBoxes ? call.n - first : kWordBoxes;
    ex.each(rows, [&](int64_t l) { state.diagonal[l] = mask[mask_word(first + l, r, words)]; });
    ex.single([&] {
      uint64_t gone = removed[r], kept = 0;
      int64_t count = state.count;
      state.count_before = count;
      for (int64_t l = 0; l < rows && count < max_output; ++l) {
        if (gone & bit(l)) continue;
        kept |= bit(l);
        ++count;
        gone |= state.diagonal[l];
      }
      state.kept = kept;
      state.count = count;
    });
    ex.each(rows, [&](int64_t l) {
      if (state.kept & bit(l)) {
        indices[state.count_before + popcount(state.kept & (bit(l) - 1))] = order[first + l];
      }
    });
    if (state.count >= max_output) break;  // no later box can be kept
    ex.each(words - r - 1, [&](int64_t t) {
      const int64_t w = r + 1 + t;
      uint64_t gone = removed[w];
      for (uint64_t kept = state.kept; kept != 0; kept &= kept - 1) {
        gone |= mask[mask_word(first + (popcount((kept & (~kept + 1)) - 1)), w, words)];
      }
      removed[w] = gone;
    });
  }
  ex.each(max_output - state.count, [&](int64_t t) { indices[state.count + t] = -1; });
  ex.single([&] { call.counts[b] = static_cast<int32_t>(state.count); });
}

}  // namespace nms
}  // namespace jax_psroi

#endif  // JAX_PSROI_NMS_SCHEDULE_H_
