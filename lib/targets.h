// The FFI targets each platform's handler file defines, one per row of the
// kernel table (kernel_table.h); the nanobind modules hand them to Python.
#ifndef JAX_PSROI_TARGETS_H_
#define JAX_PSROI_TARGETS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "ffi_common.h"

namespace jax_psroi {

// The product's CPU kernels (lib/cpu/cpu_handlers.cc).
std::vector<FfiTarget> cpu_targets();

// Non-maximum suppression on the CPU, one target per storage type
// (lib/cpu/nms_handlers.cc): operation "nms", direction "forward", no layout.
std::vector<FfiTarget> cpu_nms_targets();

// Deformable RoI Align and PS-RoI Align on the CPU
// (lib/cpu/deformable_handlers.cc): operations "deform_roi_align" and
// "deform_ps_roi_align", per direction, layout and dtype.
std::vector<FfiTarget> cpu_deform_targets();

// Bytes of the workspace that a CPU backward call of the kernel-table row
// (operation, layout, dtype), as KernelName spells them, takes as its
// further result, for the call's dims `shape` (channel_order: the call's
// attribute): what the lowering asks for, or with pass_rois >= 0 room for
// passes of that many RoIs (the tests'); 0 for rows that take none (RoI
// Pool's).
int64_t cpu_backward_workspace_bytes(const std::string& operation, const std::string& layout,
                                     const std::string& dtype, CallShape shape, int64_t pass_rois);

// Test-only: the most scratch, in bytes, that one task of the float32 CPU
// forward of the kernel-table row (operation, layout) holds while it pools
// `rois` ([K, 5], K = shape.num_rois) from a map of zeros (`attribute`: the
// operator's, as its calls take it): what bounds the
// forward's memory (lib/cpu/average_kernels.h, forward_rois).
int64_t cpu_forward_scratch_bytes(const std::string& operation, const std::string& layout,
                                  CallShape shape, int64_t attribute,
                                  const std::vector<float>& rois, double spatial_scale,
                                  int64_t sampling_ratio);

// The test rig: the CUDA kernels' schedule run serially on the CPU
// (lib/testing/gpu_schedule_handlers.cc), in the module
// _gpu_schedule_testing that only JAX_PSROI_TESTING=ON builds.
std::vector<FfiTarget> gpu_schedule_testing_targets();

// Non-maximum suppression's CUDA schedule run serially on the CPU
// (lib/testing/nms_schedule_handlers.cc), in the same module.
std::vector<FfiTarget> nms_schedule_testing_targets();

// Deformable RoI Align's CUDA kernels run serially on the CPU
// (lib/testing/deformable_schedule_handlers.cc), in the same module.
std::vector<FfiTarget> deform_schedule_testing_targets();

// The CUDA kernels (lib/cuda/cuda_handlers.cu).
std::vector<FfiTarget> cuda_targets();

// Non-maximum suppression on the GPU (lib/cuda/nms_handlers.cu), named as
// the CPU's targets.
std::vector<FfiTarget> cuda_nms_targets();

// Deformable RoI Align on the GPU (lib/cuda/deformable_handlers.cu), named
// as the CPU's targets.
std::vector<FfiTarget> cuda_deform_targets();

}  // namespace jax_psroi

#endif  // JAX_PSROI_TARGETS_H_
