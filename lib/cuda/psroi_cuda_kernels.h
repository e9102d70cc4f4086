// Launchers of the CUDA kernels of PS-RoI Align. No XLA types: the handlers
// in cuda_handlers.cc translate FFI buffers into these calls.
#ifndef JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_H_
#define JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include "psroi_math.h"

namespace jax_psroi {
namespace cuda {

// Enqueues the forward on `stream`: one thread per output element.
template <typename T>
cudaError_t launch_forward(cudaStream_t stream, const T* input, const T* rois,
                           const PsRoiDims& dims, T spatial_scale,
                           int64_t sampling_ratio, T* output);

// Enqueues the zeroing of `grad_input` and the backward on `stream`: one
// thread per cotangent element, scattering with atomicAdd, so the order of
// the additions (and the last bits of the result) varies run to run.
template <typename T>
cudaError_t launch_backward(cudaStream_t stream, const T* cotangent,
                            const T* rois, const PsRoiDims& dims,
                            T spatial_scale, int64_t sampling_ratio,
                            T* grad_input);

}  // namespace cuda
}  // namespace jax_psroi

#endif  // JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_H_
