// The FFI targets each platform's handler file defines, one per row of the
// kernel table (kernel_table.h); the nanobind modules hand them to Python.
#ifndef JAX_PSROI_TARGETS_H_
#define JAX_PSROI_TARGETS_H_

#include <vector>

#include "ffi_common.h"

namespace jax_psroi {

// The product's CPU kernels (lib/cpu/cpu_handlers.cc).
std::vector<FfiTarget> cpu_targets();

// Test-only: the CUDA kernels' schedule run serially on the CPU
// (lib/cpu/gpu_schedule_handlers.cc). Registered by the tests, never at import.
std::vector<FfiTarget> cpu_gpu_schedule_targets();

// The CUDA kernels (lib/cuda/cuda_handlers.cu).
std::vector<FfiTarget> cuda_targets();

}  // namespace jax_psroi

#endif  // JAX_PSROI_TARGETS_H_
