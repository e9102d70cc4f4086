// CUDA kernels of PS-RoI Align and their launchers. All arithmetic on boxes,
// samples and weights is in psroi_math.h, shared with the CPU kernels; this
// file only maps threads to output elements. No XLA types: the handlers in
// cuda_handlers.cu translate FFI buffers into these calls.
#ifndef JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_CUH_
#define JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_CUH_

#include <algorithm>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "psroi_math.h"

namespace jax_psroi {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU; the grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

inline int blocks_for(int64_t elements) {
  return static_cast<int>(std::min<int64_t>(
      kMaxBlocks, (elements + kThreadsPerBlock - 1) / kThreadsPerBlock));
}

// 64-bit grid-stride loop: index arithmetic never wraps for large outputs.
__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename T, typename Layout>
__global__ void forward_kernel(const T* __restrict__ input,
                               const T* __restrict__ rois, PsRoiDims dims,
                               T spatial_scale, int64_t sampling_ratio,
                               T* __restrict__ output) {
  const Layout layout = Layout::of(dims);
  const int64_t total = dims.outputs();
  for (int64_t i = first_index(); i < total; i += stride()) {
    output[i] = forward_element(input, rois, dims, layout, spatial_scale,
                                sampling_ratio, i);
  }
}

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* address, T value) const {
    atomicAdd(address, value);
  }
};

template <typename T, typename Layout>
__global__ void backward_kernel(const T* __restrict__ cotangent,
                                const T* __restrict__ rois, PsRoiDims dims,
                                T spatial_scale, int64_t sampling_ratio,
                                T* grad_input) {
  const Layout layout = Layout::of(dims);
  const int64_t total = dims.outputs();
  for (int64_t i = first_index(); i < total; i += stride()) {
    backward_element(cotangent, rois, dims, layout, spatial_scale,
                     sampling_ratio, i, grad_input, AtomicAdd{});
  }
}

// Enqueues the forward on `stream`: one thread per output element.
template <typename T, typename Layout>
cudaError_t launch_forward(cudaStream_t stream, const T* input, const T* rois,
                           const PsRoiDims& dims, T spatial_scale,
                           int64_t sampling_ratio, T* output) {
  const int64_t total = dims.outputs();
  if (total == 0) return cudaSuccess;
  forward_kernel<T, Layout><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
      input, rois, dims, spatial_scale, sampling_ratio, output);
  return cudaGetLastError();
}

// Enqueues the zeroing of `grad_input` and the backward on `stream`: one
// thread per cotangent element, scattering with atomicAdd, so the order of
// the additions (and the last bits of the result) varies run to run.
template <typename T, typename Layout>
cudaError_t launch_backward(cudaStream_t stream, const T* cotangent,
                            const T* rois, const PsRoiDims& dims,
                            T spatial_scale, int64_t sampling_ratio,
                            T* grad_input) {
  const int64_t grad_elements = dims.feature_elements();
  cudaError_t err = cudaMemsetAsync(grad_input, 0, grad_elements * sizeof(T), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = dims.outputs();
  if (total == 0) return cudaSuccess;
  backward_kernel<T, Layout><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
      cotangent, rois, dims, spatial_scale, sampling_ratio, grad_input);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace jax_psroi

#endif  // JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_CUH_
