// The arithmetic of non-maximum suppression, for the CPU kernel
// (lib/cpu/nms_kernels.h) and the CUDA kernels' schedule (nms_schedule.h)
// alike, with torchvision's semantics (torchvision/csrc/ops/cpu/nms_kernel.cpp):
//   area = (x2 - x1) * (y2 - y1)   (not clamped: a degenerate box's may be <= 0)
//   inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))
//   iou = inter / (area_i + area_j - inter)
// in the compute type (float32 for every 16-bit storage type); box j is
// suppressed by a kept box i of its category when iou > threshold. A
// degenerate box intersects nothing, so its IoU is 0 or NaN (0 / 0) and it
// neither suppresses nor is suppressed; a NaN coordinate makes every IoU of
// its box NaN (max and min propagate NaN here), with the same effect. The
// CUDA kernels are built without fused multiply-add (cmake/cuda.cmake), so
// the GPU rounds every step as the CPU does.
#ifndef JAX_PSROI_NMS_MATH_H_
#define JAX_PSROI_NMS_MATH_H_

#include <cmath>
#include <cstdint>
#include <limits>

#include "storage_types.h"

namespace jax_psroi {
namespace nms {

// The largest T not above `threshold`: for any T value v, `v > it` in T is
// `v > threshold` in double, which is how torchvision compares. Host only:
// the handlers convert the attribute once. The Python lowerings pass a value
// of T already (jax_psroi/_nms.py, threshold_in, which also lifts negative
// subnormals that XLA's CPU runtime would flush to 0).
template <typename T>
T threshold_in(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  }
  return t;
}

// max and min that return NaN when either operand is NaN (std::max does not),
// as jax.numpy's do: the XLA formulation gives the same IoUs.
template <typename T>
PSROI_HD T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
PSROI_HD T min_nan(T a, T b) {
  return (a < b || a != a) ? a : b;
}

template <typename T>
PSROI_HD T box_area(T x1, T y1, T x2, T y2) {
  return (x2 - x1) * (y2 - y1);
}

// Whether box j (coordinates and area) is suppressed by box i, when they are
// of one category: their IoU exceeds `threshold` (threshold_in's).
template <typename T>
PSROI_HD bool overlaps(T ix1, T iy1, T ix2, T iy2, T iarea, T jx1, T jy1, T jx2, T jy2, T jarea,
                       T threshold) {
  const T zero = T(0);
  const T w = max_nan(zero, min_nan(ix2, jx2) - max_nan(ix1, jx1));
  const T h = max_nan(zero, min_nan(iy2, jy2) - max_nan(iy1, jy1));
  const T inter = w * h;
  return inter / (iarea + jarea - inter) > threshold;
}

}  // namespace nms
}  // namespace jax_psroi

#endif  // JAX_PSROI_NMS_MATH_H_
