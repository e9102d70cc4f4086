// Inner loops of the CPU kernels: one bin's weighted window applied to the
// same window of many channel planes (the planes that share the bin's
// geometry, `plane_stride` elements apart).
//
// A bin's window is a few rows by a few columns. It is applied as a tile:
// rows of 16-byte vectors holding row_w[r] * col_w[c] / count, so each plane
// costs one vector load and multiply-add per tile vector (gather; the lane
// sums of several planes share one transpose), or one load, multiply-add and
// store per vector (scatter). The column part of a tile is built once per
// RoI and bin column; the rows scale it in registers. With the tile's size
// as template parameters the loops unroll completely. Windows too large for a
// tile take the generic loops.
#ifndef JAX_PSROI_CPU_WINDOW_TILES_H_
#define JAX_PSROI_CPU_WINDOW_TILES_H_

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "roi_math.h"

namespace jax_psroi {
namespace cpu {

// Largest tile: rows x vectors per row.
constexpr int kMaxTileRows = 8;
constexpr int kMaxTileVectors = 3;

// A 16-byte vector of T (GCC/Clang vector extension: SSE2 on x86-64, NEON on
// AArch64, scalar code elsewhere); all vector loads go through memcpy, so
// nothing needs to be aligned.
template <typename T>
struct Lanes {
  static constexpr int kCount = 16 / sizeof(T);
  typedef T Vec __attribute__((vector_size(16)));
};

// The column weights of one bin column as the vectors of a tile: `vectors`
// 16-byte vectors read from column `first_col`, which is the span's first
// column moved left at the right border so that every load stays inside its
// row (the columns moved in get weight 0). vectors == 0 when the span is too
// wide for a tile (or the map narrower than one). An RoI's column tiles are
// built once and serve all its bin rows.
template <typename T>
struct ColumnTile {
  T w[kMaxTileVectors * Lanes<T>::kCount];
  int64_t first_col;
  int64_t vectors;
};

// Builds the column tile of weights col_w[0..cols), whose first column is
// first_col, on rows of `width` pixels.
template <typename T>
void make_column_tile(const T* col_w, int64_t first_col, int64_t cols,
                      int64_t width, ColumnTile<T>* t) {
  constexpr int64_t L = Lanes<T>::kCount;
  const int64_t vectors = (cols + L - 1) / L;
  const int64_t padded = vectors * L;
  if (vectors > kMaxTileVectors || padded > width) {
    t->vectors = 0;
    return;
  }
  t->vectors = vectors;
  t->first_col = first_col + padded <= width ? first_col : width - padded;
  const int64_t shift = first_col - t->first_col;
  for (int64_t c = 0; c < padded; ++c) {
    const int64_t j = c - shift;
    t->w[c] = (j >= 0 && j < cols) ? col_w[j] : T(0);
  }
}

// A bin's window: `rows` x `cols` pixels from (first_row, first_col), with
// their row and column weights and the column tile.
template <typename T>
struct Window {
  int64_t first_row, first_col;
  int64_t rows, cols;
  int64_t width;  // row stride of a plane
  const T* row_w;
  const T* col_w;
  const ColumnTile<T>* col_tile;

  bool fits_tile() const { return rows <= kMaxTileRows && col_tile->vectors > 0; }
};

template <typename T>
inline typename Lanes<T>::Vec load_vec(const T* p) {
  typename Lanes<T>::Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store_vec(T* p, typename Lanes<T>::Vec v) {
  std::memcpy(p, &v, sizeof(v));
}

// A vector of compute type T from storage type S. bfloat16 is the top half
// of a float, so its lanes widen with one shift; float16 converts lane by
// lane.
template <typename T, typename S>
inline typename Lanes<T>::Vec load_vec_from(const S* p) {
  using Vec = typename Lanes<T>::Vec;
  if constexpr (std::is_same_v<T, S>) {
    return load_vec(p);
  } else if constexpr (std::is_same_v<S, BFloat16> && std::is_same_v<T, float>) {
    typedef uint16_t Halves __attribute__((vector_size(8)));
    typedef uint32_t Words __attribute__((vector_size(16)));
    Halves halves;
    std::memcpy(&halves, p, sizeof(halves));
    const Words words = __builtin_convertvector(halves, Words) << 16;
    Vec v;
    std::memcpy(&v, &words, sizeof(v));
    return v;
  } else {
    Vec v;
    for (int i = 0; i < Lanes<T>::kCount; ++i) v[i] = Storage<S>::load(p[i]);
    return v;
  }
}

// The window's weights row_w[r] / count * col_w[c] as R x V vectors, held
// in registers by the loops below: one multiply per vector, so a tile costs
// nothing to set up beyond what the planes amortise.
template <typename T, int R, int V>
void build_tile(const Window<T>& window, T count,
                typename Lanes<T>::Vec (&w)[R][V]) {
  using Vec = typename Lanes<T>::Vec;
  const T inv_count = T(1) / count;
  Vec cols[V];
  for (int v = 0; v < V; ++v) cols[v] = load_vec(window.col_tile->w + v * Lanes<T>::kCount);
  for (int r = 0; r < R; ++r) {
    const T scale = window.row_w[r] * inv_count;
    for (int v = 0; v < V; ++v) w[r][v] = scale * cols[v];
  }
}

// Sum of a vector's lanes, pairing lanes in the order lane_sums uses, so a
// plane's value does not depend on whether it was summed alone or in a group.
template <typename T>
inline T lane_sum(typename Lanes<T>::Vec v) {
  if constexpr (Lanes<T>::kCount == 4) {
    return (v[0] + v[1]) + (v[2] + v[3]);
  } else {
    static_assert(Lanes<T>::kCount == 2, "16-byte vectors of float or double");
    return v[0] + v[1];
  }
}

// The lane sums of kCount vectors as one vector: a transpose by shuffles
// instead of a horizontal sum per vector (half the instructions).
template <typename T>
inline typename Lanes<T>::Vec lane_sums(const typename Lanes<T>::Vec (&a)[Lanes<T>::kCount]) {
  if constexpr (Lanes<T>::kCount == 4) {
    // [a0+a1, a2+a3, b0+b1, b2+b3], then [(a0+a1)+(a2+a3), (b0+b1)+(b2+b3), ...]
    const auto ab = __builtin_shufflevector(a[0], a[1], 0, 2, 4, 6) +
                    __builtin_shufflevector(a[0], a[1], 1, 3, 5, 7);
    const auto cd = __builtin_shufflevector(a[2], a[3], 0, 2, 4, 6) +
                    __builtin_shufflevector(a[2], a[3], 1, 3, 5, 7);
    return __builtin_shufflevector(ab, cd, 0, 2, 4, 6) +
           __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
  } else {
    return __builtin_shufflevector(a[0], a[1], 0, 2) +
           __builtin_shufflevector(a[0], a[1], 1, 3);
  }
}

// out[i * out_stride] = sum(tile * window of planes[i * plane_stride]);
// `planes` points at the tile's first pixel of the first plane. Planes go
// kCount at a time so that their lane sums share one transpose. Planes and
// out are in storage type S, everything else in compute type T.
template <typename T, typename S, int R, int V>
void gather_tile(const Window<T>& window, T count, const S* planes,
                 int64_t plane_stride, int64_t num_planes, S* out,
                 int64_t out_stride) {
  using Vec = typename Lanes<T>::Vec;
  constexpr int L = Lanes<T>::kCount;
  const int64_t width = window.width;
  Vec w[R][V];
  build_tile(window, count, w);
  auto products = [&](const S* p) {
    Vec acc = w[0][0] * load_vec_from<T>(p);
    for (int r = 0; r < R; ++r)
      for (int v = (r == 0 ? 1 : 0); v < V; ++v)
        acc += w[r][v] * load_vec_from<T>(p + r * width + v * L);
    return acc;
  };
  int64_t i = 0;
  for (; i + L <= num_planes; i += L) {
    Vec acc[L];
    for (int j = 0; j < L; ++j) acc[j] = products(planes + (i + j) * plane_stride);
    const Vec sums = lane_sums<T>(acc);
    for (int j = 0; j < L; ++j) out[(i + j) * out_stride] = Storage<S>::store(sums[j]);
  }
  for (; i < num_planes; ++i) {
    out[i * out_stride] = Storage<S>::store(lane_sum<T>(products(planes + i * plane_stride)));
  }
}

// window of planes[i * plane_stride] += cot[i * cot_stride] * tile. Zero
// weights add +0, which leaves every value but -0 unchanged.
template <typename T, int R, int V>
void scatter_tile(const Window<T>& window, T count, T* planes,
                  int64_t plane_stride, int64_t num_planes, const T* cot,
                  int64_t cot_stride) {
  using Vec = typename Lanes<T>::Vec;
  constexpr int L = Lanes<T>::kCount;
  const int64_t width = window.width;
  Vec w[R][V];
  build_tile(window, count, w);
  for (int64_t i = 0; i < num_planes; ++i) {
    T* p = planes + i * plane_stride;
    const T g = cot[i * cot_stride];
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        T* at = p + r * width + v * L;
        store_vec(at, load_vec(at) + w[r][v] * g);
      }
    }
  }
}

// The pixels of a window's rows or columns that carry weight, in order. A
// window too large for a tile is mostly a fixed sampling grid spread over a
// large bin: a sample's two taps per axis weigh, the span between them does
// not (sampling ratio 2 on a bin of 18 pixels: 4 of 18 rows and columns).
// Only those are visited: the sums are the same, less the +0 terms.
template <typename T>
struct Weighted {
  std::vector<int64_t> at;
  std::vector<T> weight;

  void of(const T* weights, int64_t n) {
    at.clear();
    weight.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (weights[i] != T(0)) {
        at.push_back(i);
        weight.push_back(weights[i]);
      }
    }
  }
  size_t size() const { return at.size(); }
};

// Windows that do not fit a tile: plain loops over the weighted rows and
// columns of the separable weights.
template <typename T, typename S>
void gather_generic(const Window<T>& w, const S* planes, int64_t plane_stride,
                    int64_t num_planes, T count, S* out, int64_t out_stride) {
  thread_local Weighted<T> rows, cols;
  rows.of(w.row_w, w.rows);
  cols.of(w.col_w, w.cols);
  for (int64_t i = 0; i < num_planes; ++i) {
    const S* p = planes + i * plane_stride;
    T sum = T(0);
    for (size_t r = 0; r < rows.size(); ++r) {
      const S* row = p + rows.at[r] * w.width;
      T line = T(0);
      for (size_t c = 0; c < cols.size(); ++c) {
        line += cols.weight[c] * Storage<S>::load(row[cols.at[c]]);
      }
      sum += rows.weight[r] * line;
    }
    out[i * out_stride] = Storage<S>::store(sum / count);
  }
}

template <typename T>
void scatter_generic(const Window<T>& w, T* planes, int64_t plane_stride,
                     int64_t num_planes, T count, const T* cot,
                     int64_t cot_stride) {
  thread_local Weighted<T> rows, cols;
  rows.of(w.row_w, w.rows);
  cols.of(w.col_w, w.cols);
  for (int64_t i = 0; i < num_planes; ++i) {
    T* p = planes + i * plane_stride;
    const T scaled = cot[i * cot_stride] / count;
    for (size_t r = 0; r < rows.size(); ++r) {
      T* row = p + rows.at[r] * w.width;
      const T row_scaled = scaled * rows.weight[r];
      for (size_t c = 0; c < cols.size(); ++c) row[cols.at[c]] += row_scaled * cols.weight[c];
    }
  }
}

template <typename T, typename S>
using GatherTileFn = void (*)(const Window<T>&, T, const S*, int64_t, int64_t, S*, int64_t);
template <typename T>
using ScatterTileFn = void (*)(const Window<T>&, T, T*, int64_t, int64_t, const T*, int64_t);

// Tables indexed by (rows - 1) * kMaxTileVectors + (vectors - 1).
template <typename T, typename S, size_t... I>
constexpr std::array<GatherTileFn<T, S>, sizeof...(I)> gather_table(std::index_sequence<I...>) {
  return {{&gather_tile<T, S, I / kMaxTileVectors + 1, I % kMaxTileVectors + 1>...}};
}
template <typename T, size_t... I>
constexpr std::array<ScatterTileFn<T>, sizeof...(I)> scatter_table(std::index_sequence<I...>) {
  return {{&scatter_tile<T, I / kMaxTileVectors + 1, I % kMaxTileVectors + 1>...}};
}

constexpr size_t kTileShapes = kMaxTileRows * kMaxTileVectors;

// Applies bin window `w`, whose first pixel in the first plane is `first`,
// through its tile when it fits one, else through the generic loop.
template <typename T, typename Table, typename Generic, typename Plane,
          typename Values>
void apply_window(const Table& table, Generic generic, const Window<T>& w,
                  Plane* first, int64_t plane_stride, int64_t num_planes,
                  T count, Values* values, int64_t values_stride) {
  if (w.fits_tile()) {
    table[(w.rows - 1) * kMaxTileVectors + (w.col_tile->vectors - 1)](
        w, count, first + (w.col_tile->first_col - w.first_col), plane_stride,
        num_planes, values, values_stride);
  } else {
    generic(w, first, plane_stride, num_planes, count, values, values_stride);
  }
}

// The forward's weighted average of window `w` of num_planes planes.
template <typename T, typename S>
void gather_window(const Window<T>& w, const S* first, int64_t plane_stride,
                   int64_t num_planes, T count, S* out, int64_t out_stride) {
  static constexpr auto table = gather_table<T, S>(std::make_index_sequence<kTileShapes>());
  apply_window(table, &gather_generic<T, S>, w, first, plane_stride, num_planes,
               count, out, out_stride);
}

// Its adjoint: adds each cotangent's share to its plane's window.
template <typename T>
void scatter_window(const Window<T>& w, T* first, int64_t plane_stride,
                    int64_t num_planes, T count, const T* cot,
                    int64_t cot_stride) {
  static constexpr auto table = scatter_table<T>(std::make_index_sequence<kTileShapes>());
  apply_window(table, &scatter_generic<T>, w, first, plane_stride, num_planes,
               count, cot, cot_stride);
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_WINDOW_TILES_H_
