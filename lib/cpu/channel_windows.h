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
#include <cstdint>

#include "cpu/window_tiles.h"

namespace jax_psroi {
namespace cpu {

// Adds weight * run[c * step] to acc[c] for c < n; the unit step separately,
// so that it vectorizes. The run is in storage type S.
template <typename T, typename S>
inline void add_run(T* acc, const S* run, int64_t step, int64_t n, T weight) {
  if (step == 1) {
    for (int64_t c = 0; c < n; ++c) acc[c] += weight * Storage<S>::load(run[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) acc[c] += weight * Storage<S>::load(run[c * step]);
  }
}


// out[c * out_stride] = the weighted average of window `w` of channel run c,
// for c < num_channels. `first` points at channel 0 of the window's first
// pixel; pixels are `pixel_stride` elements apart, rows `row_stride`;
// `acc` is scratch for num_channels values. The map and out are in storage
// type S, the rest in compute type T.
template <typename T, typename S>
void gather_channel_window(const Window<T>& w, const S* first, int64_t row_stride,
                           int64_t pixel_stride, int64_t channel_step,
                           int64_t num_channels, T count, S* out, int64_t out_stride,
                           T* acc) {
  std::fill(acc, acc + num_channels, T(0));
  // Pixels that weigh 0 (between a large bin's samples) are skipped: their
  // runs would add +0.
  for (int64_t r = 0; r < w.rows; ++r) {
    if (w.row_w[r] == T(0)) continue;
    const T row_weight = w.row_w[r] / count;
    const S* row = first + r * row_stride;
    for (int64_t c = 0; c < w.cols; ++c) {
      if (w.col_w[c] == T(0)) continue;
      add_run(acc, row + c * pixel_stride, channel_step, num_channels,
              row_weight * w.col_w[c]);
    }
  }
  for (int64_t c = 0; c < num_channels; ++c) out[c * out_stride] = Storage<S>::store(acc[c]);
}

// Its adjoint, for channel runs that are contiguous (the backward sums in
// bin-major order): adds weight * cot[c] to each pixel's run.
template <typename T>
void scatter_channel_window(const Window<T>& w, T* first, int64_t row_stride,
                            int64_t pixel_stride, int64_t num_channels, T count,
                            const T* cot) {
  for (int64_t r = 0; r < w.rows; ++r) {
    if (w.row_w[r] == T(0)) continue;
    const T row_weight = w.row_w[r] / count;
    T* row = first + r * row_stride;
    for (int64_t c = 0; c < w.cols; ++c) {
      if (w.col_w[c] == T(0)) continue;
      T* run = row + c * pixel_stride;
      const T weight = row_weight * w.col_w[c];
      for (int64_t i = 0; i < num_channels; ++i) run[i] += weight * cot[i];
    }
  }
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_CHANNEL_WINDOWS_H_
