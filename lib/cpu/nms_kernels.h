// Greedy non-maximum suppression of one image on the CPU, with torchvision's
// semantics: boxes visited in descending score, ties in index order (a
// stable sort), NaN scores first; the IoU test is nms_math.h's.
//
// Only the rows of kept boxes are computed, when the scan reaches them, each
// one vectorisable loop over the later candidates, which drop the removed
// ones from time to time: the work is at most (boxes kept, at most
// max_output) x N IoUs, and the memory O(N).
#ifndef JAX_PSROI_CPU_NMS_KERNELS_H_
#define JAX_PSROI_CPU_NMS_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "nms_math.h"
#include "storage_types.h"

namespace jax_psroi {
namespace cpu {

// Box indices [0, n) in visiting order: NaN scores first, then descending
// score, ties in index order.
template <typename T>
void score_order(const T* scores, int64_t n, int64_t* order) {
  std::iota(order, order + n, int64_t{0});
  std::stable_sort(order, order + n, [scores](int64_t a, int64_t b) {
    const T sa = scores[a], sb = scores[b];
    const bool nan_a = std::isnan(sa), nan_b = std::isnan(sb);
    if (nan_a || nan_b) return nan_a && !nan_b;
    return sa > sb;
  });
}

// Suppression of one image: `boxes` [n, 4] (x1, y1, x2, y2) and `scores` [n]
// in storage type S, `categories` [n] (boxes of different categories never
// suppress each other). Writes the kept indices, best first, to
// indices[0, max_output), -1 after the last, and returns how many were kept.
constexpr int64_t kCompactEvery = 32;

template <typename S>
int64_t nms_image(const S* boxes, const S* scores, const int32_t* categories, int64_t n,
                  double iou_threshold, int64_t max_output, int32_t* indices) {
  using T = ComputeType<S>;
  std::vector<T> score(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) score[i] = Storage<S>::load(scores[i]);
  std::vector<int64_t> order(static_cast<size_t>(n));
  score_order(score.data(), n, order.data());
  // The candidates in visiting order, one array per coordinate: each row's
  // loop reads them contiguously.
  std::vector<T> x1(n), y1(n), x2(n), y2(n), area(n);
  std::vector<int32_t> category(n);
  std::vector<uint8_t> removed(n, 0);
  for (int64_t k = 0; k < n; ++k) {
    const S* box = boxes + 4 * order[k];
    x1[k] = Storage<S>::load(box[0]);
    y1[k] = Storage<S>::load(box[1]);
    x2[k] = Storage<S>::load(box[2]);
    y2[k] = Storage<S>::load(box[3]);
    area[k] = nms::box_area(x1[k], y1[k], x2[k], y2[k]);
    category[k] = categories[order[k]];
  }
  const T threshold = nms::threshold_in<T>(iou_threshold);
  int64_t kept = 0;
  int64_t end = n;  // candidates [0, end)
  for (int64_t i = 0; i < end && kept < max_output; ++i) {
    if (removed[i]) continue;
    indices[kept++] = static_cast<int32_t>(order[i]);
    const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
    const int32_t icategory = category[i];
    const T* jx1 = x1.data();
    const T* jy1 = y1.data();
    const T* jx2 = x2.data();
    const T* jy2 = y2.data();
    const T* jarea = area.data();
    const int32_t* jcategory = category.data();
    uint8_t* jremoved = removed.data();
    for (int64_t j = i + 1; j < end; ++j) {
      const bool overlap = nms::overlaps(ix1, iy1, ix2, iy2, iarea, jx1[j], jy1[j], jx2[j],
                                         jy2[j], jarea[j], threshold);
      jremoved[j] |= static_cast<uint8_t>(overlap & (jcategory[j] == icategory));
    }
    // Every kCompactEvery kept boxes, drop the removed candidates: later rows
    // then loop over live boxes only, as torchvision's skips them. Counting
    // removals in the row instead slows its loop down more than it saves.
    if (kept % kCompactEvery == 0) {
      int64_t live = i + 1;
      for (int64_t j = i + 1; j < end; ++j) {
        if (removed[j]) continue;
        x1[live] = x1[j];
        y1[live] = y1[j];
        x2[live] = x2[j];
        y2[live] = y2[j];
        area[live] = area[j];
        category[live] = category[j];
        order[live] = order[j];
        removed[live] = 0;
        ++live;
      }
      end = live;
    }
  }
  std::fill(indices + kept, indices + max_output, int32_t{-1});
  return kept;
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_NMS_KERNELS_H_
