// What the CPU and CUDA FFI handlers share: the argument binding (written once,
// instantiated per dtype and platform) and the shape checks that turn buffer
// dimensions into PsRoiDims or an ffi::Error.
#ifndef JAX_PSROI_FFI_COMMON_H_
#define JAX_PSROI_FFI_COMMON_H_

#include <cstdint>
#include <string>

#include "psroi_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {

namespace ffi = xla::ffi;

// Forward:  (input [N, C, H, W], rois [K, 5]) -> output [K, C_out, PH, PW].
// Backward: (cotangent [K, C_out, PH, PW], rois [K, 5]) -> grad [N, C, H, W].
// Both read the same two attributes, so one binding serves every handler.
#define JAX_PSROI_BIND_ARGS(dtype)                                   \
  .Arg<::xla::ffi::Buffer<dtype, 4>>()      /* input or cotangent */ \
      .Arg<::xla::ffi::Buffer<dtype, 2>>()  /* rois [K, 5] */        \
      .Ret<::xla::ffi::Buffer<dtype, 4>>()  /* output or grad */     \
      .Attr<double>("spatial_scale")                                 \
      .Attr<int64_t>("sampling_ratio")

inline std::string shape_string(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// Dims of a call from its feature map [N, C, H, W], rois [K, 5] and pooled
// tensor [K, C_out, PH, PW] (the forward's output, the backward's input).
inline ffi::ErrorOr<PsRoiDims> call_dims(ffi::Span<const int64_t> features,
                                         ffi::Span<const int64_t> rois,
                                         ffi::Span<const int64_t> pooled) {
  if (rois[1] != 5 || pooled[0] != rois[0]) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jax_psroi: rois must be [K, 5] and the pooled tensor [K, C_out, PH, "
        "PW]; got rois " + shape_string(rois) + ", pooled " +
        shape_string(pooled)));
  }
  PsRoiDims d;
  d.num_images = features[0];
  d.channels = features[1];
  d.height = features[2];
  d.width = features[3];
  d.num_rois = pooled[0];
  d.channels_out = pooled[1];
  d.pooled_h = pooled[2];
  d.pooled_w = pooled[3];
  if (d.pooled_h <= 0 || d.pooled_w <= 0 ||
      d.channels != d.channels_out * d.pooled_h * d.pooled_w) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        "jax_psroi: feature channels must equal C_out * PH * PW; got features " +
        shape_string(features) + ", pooled " + shape_string(pooled)));
  }
  return d;
}

}  // namespace jax_psroi

#endif  // JAX_PSROI_FFI_COMMON_H_
