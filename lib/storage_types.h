// Storage types of the kernels and the one type each computes in.
//
// float and double compute in themselves. bfloat16 and float16 are storage
// only: features, outputs and gradients are read and written in them, while
// box coordinates, sample positions, bilinear weights and every sum are
// float32, and a result is rounded to 16 bits once. The 16-bit types are
// plain bit containers with conversions written out (round to nearest even),
// the same on the host and the device, so the CUDA kernels need no
// cuda_bf16.h / cuda_fp16.h and the CPU no compiler extension.
#ifndef JAX_PSROI_STORAGE_TYPES_H_
#define JAX_PSROI_STORAGE_TYPES_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PSROI_HD __host__ __device__ __forceinline__
#else
#define PSROI_HD inline
#endif

namespace jax_psroi {

struct BFloat16 {
  uint16_t bits;
};

struct Float16 {
  uint16_t bits;
};

PSROI_HD uint32_t float_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

PSROI_HD float bits_float(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Storage<S>: the compute type of storage type S and the conversions.
template <typename S>
struct Storage {
  using Compute = S;
  static PSROI_HD Compute load(S v) { return v; }
  static PSROI_HD S store(Compute v) { return v; }
};

template <>
struct Storage<BFloat16> {
  using Compute = float;
  static PSROI_HD float load(BFloat16 v) { return bits_float(uint32_t{v.bits} << 16); }
  // Branch-free, so that loops of it vectorize.
  static PSROI_HD BFloat16 store(float v) {
    const uint32_t bits = float_bits(v);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;  // stays NaN, sign kept
    return BFloat16{static_cast<uint16_t>(nan ? ((bits >> 16) & 0x8000u) | 0x7fc0u : rounded)};
  }
};

template <>
struct Storage<Float16> {
  using Compute = float;
  static PSROI_HD float load(Float16 v) {
    const uint32_t sign = uint32_t{static_cast<uint32_t>(v.bits) & 0x8000u} << 16;
    const uint32_t exponent = (v.bits >> 10) & 0x1fu;
    const uint32_t mantissa = v.bits & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  static PSROI_HD Float16 store(float v) {
    const uint32_t bits = float_bits(v);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return Float16{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
    if (magnitude >= 0x477ff000u) return Float16{static_cast<uint16_t>(sign | 0x7c00u)};  // to inf
    if (magnitude < 0x38800000u) {
      // Subnormal (or zero) half: round magnitude / 2^-24 to an integer, to
      // nearest even; adding 0.5f moves the value into a float whose last
      // bits are the rounded mantissa.
      const float scaled = bits_float(magnitude) + 0.5f;
      return Float16{static_cast<uint16_t>(sign | (float_bits(scaled) - 0x3f000000u))};
    }
    // Normal: rebias the exponent and round the 13 dropped mantissa bits.
    const uint32_t rebiased = magnitude - 0x38000000u;
    const uint32_t rounded = rebiased + 0xfffu + ((rebiased >> 13) & 1u);
    return Float16{static_cast<uint16_t>(sign | (rounded >> 13))};
  }
};

template <typename S>
using ComputeType = typename Storage<S>::Compute;

}  // namespace jax_psroi

#endif  // JAX_PSROI_STORAGE_TYPES_H_
