// Inner loops of the CPU kernels for channels-last maps: one bin's weighted
// window applied to the bin's output channels at once.
//
// In a channels-last map the pixels of a window row are not contiguous, but
// at every pixel the bin's channels are a run: contiguous in bin-major
// channel order, `channel_step` apart in torchvision's. So the loops go tap by
// tap (pixel by pixel of the window, weight row_w[r] * col_w[c] / count) and,
// for each tap, along the run of channels: in bin-major order that is one
// contiguous multiply-add over C_out values, which the compiler vectorizes.
// (window_tiles.h holds the NCHW counterpart, vectors along a row of pixels.)
#ifndef JAX_PSROI_CPU_CHANNEL_WINDOWS_H_
#define JAX_PSROI_CPU_CHANNEL_WINDOWS_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/window_tiles.h"

namespace jax_psroi {
namespace cpu {

// Runs of at most this many channels have their length fixed at compile
// time (the forward) or are padded to whole vectors (the backward).
constexpr int64_t kMaxPaddedRun = 16;

// out[c * out_stride] = the weighted average of window `w` of channel run c,
// for c < num_channels (N when N > 0). `first` points at channel 0 of the
// window's first pixel; pixels are `pixel_stride` elements apart, rows
// `row_stride`, a run's channels `channel_step` (1 when kUnitStep). `acc` is
// scratch for num_channels values; with N > 0 the sums stay in registers
// instead and the loop over a run unrolls. The map and out are in storage
// type S, the rest in compute type T.
template <typename T, typename S, int N, bool kUnitStep>
void gather_runs(const Window<T>& w, const S* first, int64_t row_stride, int64_t pixel_stride,
                 int64_t channel_step, int64_t num_channels, T count, S* out,
                 int64_t out_stride, T* acc) {
  T fixed[N > 0 ? N : 1] = {};
  T* sums = N > 0 ? fixed : acc;
  const int64_t n = N > 0 ? N : num_channels;
  const int64_t step = kUnitStep ? 1 : channel_step;
  if constexpr (N == 0) std::fill(acc, acc + n, T(0));
  // Pixels that weigh 0 (between a large bin's samples) are skipped: their
  // runs would add +0.
  for (int64_t r = 0; r < w.rows; ++r) {
    if (w.row_w[r] == T(0)) continue;
    const T row_weight = w.row_w[r] / count;
    const S* row = first + r * row_stride;
    for (int64_t c = 0; c < w.cols; ++c) {
      if (w.col_w[c] == T(0)) continue;
      const T weight = row_weight * w.col_w[c];
      const S* run = row + c * pixel_stride;
      for (int64_t i = 0; i < n; ++i) sums[i] += weight * Storage<S>::load(run[i * step]);
    }
  }
  for (int64_t i = 0; i < n; ++i) out[i * out_stride] = Storage<S>::store(sums[i]);
}

template <typename T, typename S>
using GatherRunsFn = void (*)(const Window<T>&, const S*, int64_t, int64_t, int64_t, int64_t,
                              T, S*, int64_t, T*);

template <typename T, typename S, bool kUnitStep, size_t... I>
constexpr std::array<GatherRunsFn<T, S>, sizeof...(I)> gather_runs_table(
    std::index_sequence<I...>) {
  return {{&gather_runs<T, S, static_cast<int>(I), kUnitStep>...}};
}

// The forward's gather of one bin's window over its channel runs: runs of
// at most kMaxPaddedRun channels (Light-Head's 10) with their length fixed
// at compile time, longer ones (R-FCN's 81) walked as they are.
template <typename T, typename S>
void gather_channel_window(const Window<T>& w, const S* first, int64_t row_stride,
                           int64_t pixel_stride, int64_t channel_step,
                           int64_t num_channels, T count, S* out, int64_t out_stride,
                           T* acc) {
  constexpr auto kShort = std::make_index_sequence<kMaxPaddedRun + 1>();
  static constexpr auto unit_step = gather_runs_table<T, S, true>(kShort);
  static constexpr auto strided = gather_runs_table<T, S, false>(kShort);
  const int64_t fixed = num_channels <= kMaxPaddedRun ? num_channels : 0;
  (channel_step == 1 ? unit_step : strided)[fixed](w, first, row_stride, pixel_stride,
                                                   channel_step, num_channels, count, out,
                                                   out_stride, acc);
}

// Its adjoint: adds weight * cot[i] to channel i < run of each pixel of
// window `w` (pixels `pixel_stride` apart, rows `row_stride`, from `first`).
// Runs of at most kMaxPaddedRun channels are padded to whole vectors
// (padded_run), and windows small enough for the backward's tables take
// scatter_vector_runs: a fixed number of vectors per tap, and no test of
// zero weights (they add +0, which leaves every value but -0 unchanged), so
// no branch to mispredict. Larger windows, mostly weightless pixels between
// the samples of a large bin, and long runs (already vectors) take
// scatter_sparse_runs.
template <typename T>
constexpr int64_t padded_run(int64_t channels) {
  constexpr int64_t L = Lanes<T>::kCount;
  return channels <= kMaxPaddedRun ? (channels + L - 1) / L * L : channels;
}

template <typename T, int V>
inline void scatter_vector_runs(const Window<T>& w, T* first, int64_t row_stride,
                                int64_t pixel_stride, T count, const T* cot) {
  using Vec = typename Lanes<T>::Vec;
  constexpr int L = Lanes<T>::kCount;
  Vec g[V];
  for (int v = 0; v < V; ++v) g[v] = load_vec(cot + v * L);
  for (int64_t r = 0; r < w.rows; ++r) {
    const T row_weight = w.row_w[r] / count;
    T* row = first + r * row_stride;
    for (int64_t c = 0; c < w.cols; ++c) {
      const T weight = row_weight * w.col_w[c];
      T* at = row + c * pixel_stride;
      for (int v = 0; v < V; ++v) store_vec(at + v * L, load_vec(at + v * L) + weight * g[v]);
    }
  }
}

template <typename T>
void scatter_sparse_runs(const Window<T>& w, T* first, int64_t row_stride,
                         int64_t pixel_stride, int64_t run, T count, const T* cot) {
  for (int64_t r = 0; r < w.rows; ++r) {
    if (w.row_w[r] == T(0)) continue;
    const T row_weight = w.row_w[r] / count;
    T* row = first + r * row_stride;
    for (int64_t c = 0; c < w.cols; ++c) {
      if (w.col_w[c] == T(0)) continue;
      T* at = row + c * pixel_stride;
      const T weight = row_weight * w.col_w[c];
      for (int64_t i = 0; i < run; ++i) at[i] += weight * cot[i];
    }
  }
}

// A vector transpose: lane i of v[j] becomes lane j of v[i].
template <typename T>
inline void transpose(typename Lanes<T>::Vec (&v)[Lanes<T>::kCount]) {
  if constexpr (Lanes<T>::kCount == 4) {
    const auto ab_low = __builtin_shufflevector(v[0], v[1], 0, 4, 1, 5);
    const auto ab_high = __builtin_shufflevector(v[0], v[1], 2, 6, 3, 7);
    const auto cd_low = __builtin_shufflevector(v[2], v[3], 0, 4, 1, 5);
    const auto cd_high = __builtin_shufflevector(v[2], v[3], 2, 6, 3, 7);
    v[0] = __builtin_shufflevector(ab_low, cd_low, 0, 1, 4, 5);
    v[1] = __builtin_shufflevector(ab_low, cd_low, 2, 3, 6, 7);
    v[2] = __builtin_shufflevector(ab_high, cd_high, 0, 1, 4, 5);
    v[3] = __builtin_shufflevector(ab_high, cd_high, 2, 3, 6, 7);
  } else {
    static_assert(Lanes<T>::kCount == 2, "16-byte vectors of float or double");
    const auto low = __builtin_shufflevector(v[0], v[1], 0, 2);
    v[1] = __builtin_shufflevector(v[0], v[1], 1, 3);
    v[0] = low;
  }
}

// Calls f(std::integral_constant<int, v>()) for the runtime v in [0, kMost].
template <int kMost, int kV = 0, typename F>
void dispatch_vectors(int64_t v, F&& f) {
  if constexpr (kV < kMost) {
    if (v != kV) return dispatch_vectors<kMost, kV + 1>(v, f);
  }
  f(std::integral_constant<int, kV>());
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_CHANNEL_WINDOWS_H_
