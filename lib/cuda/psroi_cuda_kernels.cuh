// CUDA kernels of PS-RoI Align and their launchers. All arithmetic on boxes,
// samples and weights is in psroi_math.h, shared with the CPU kernels; this
// file only maps threads to output elements. No XLA types: the handlers in
// cuda_handlers.cu translate FFI buffers into these calls.
#ifndef JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_CUH_
#define JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_CUH_

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// Storage type S (features, output, cotangent, gradient); compute type T
// (RoIs, every sum).
template <typename S, typename Layout, typename T = ComputeType<S>>
__global__ void forward_kernel(const S* __restrict__ input,
                               const T* __restrict__ rois, PsRoiDims dims,
                               T spatial_scale, int64_t sampling_ratio,
                               S* __restrict__ output) {
  const Layout layout = Layout::of(dims);
  const int64_t total = dims.outputs();
  for (int64_t i = first_index(); i < total; i += stride()) {
    output[i] = Storage<S>::store(
        forward_element(input, rois, dims, layout, spatial_scale, sampling_ratio, i));
  }
}

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* address, T value) const {
    atomicAdd(address, value);
  }
};

template <typename S, typename Layout, typename T = ComputeType<S>>
__global__ void backward_kernel(const S* __restrict__ cotangent,
                                const T* __restrict__ rois, PsRoiDims dims,
                                T spatial_scale, int64_t sampling_ratio,
                                T* sums) {
  const Layout layout = Layout::of(dims);
  const int64_t total = dims.outputs();
  for (int64_t i = first_index(); i < total; i += stride()) {
    backward_element(cotangent, rois, dims, layout, spatial_scale,
                     sampling_ratio, i, sums, AtomicAdd{});
  }
}

// Rounds the compute-type sums into the storage-type gradient, once.
template <typename S, typename T = ComputeType<S>>
__global__ void store_kernel(const T* __restrict__ sums, int64_t count, S* __restrict__ grad) {
  for (int64_t i = first_index(); i < count; i += stride()) grad[i] = Storage<S>::store(sums[i]);
}

// Enqueues the forward on `stream`: one thread per output element.
template <typename S, typename Layout, typename T = ComputeType<S>>
cudaError_t launch_forward(cudaStream_t stream, const S* input, const T* rois,
                           const PsRoiDims& dims, T spatial_scale,
                           int64_t sampling_ratio, S* output) {
  const int64_t total = dims.outputs();
  if (total == 0) return cudaSuccess;
  forward_kernel<S, Layout><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
      input, rois, dims, spatial_scale, sampling_ratio, output);
  return cudaGetLastError();
}

// Enqueues the zeroing of `sums`, the backward and, when `sums` is a
// compute-type accumulator of a 16-bit gradient, its rounding into `grad`.
// One thread per cotangent element, scattering with atomicAdd, so the order
// of the additions (and the last bits of the result) varies run to run.
template <typename S, typename Layout, typename T = ComputeType<S>>
cudaError_t launch_backward(cudaStream_t stream, const S* cotangent,
                            const T* rois, const PsRoiDims& dims,
                            T spatial_scale, int64_t sampling_ratio,
                            T* sums, S* grad) {
  const int64_t grad_elements = dims.feature_elements();
  cudaError_t err = cudaMemsetAsync(sums, 0, grad_elements * sizeof(T), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = dims.outputs();
  if (total > 0) {
    backward_kernel<S, Layout><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
        cotangent, rois, dims, spatial_scale, sampling_ratio, sums);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (!std::is_same_v<S, T>) {
    if (grad_elements > 0) {
      store_kernel<S><<<blocks_for(grad_elements), kThreadsPerBlock, 0, stream>>>(
          sums, grad_elements, grad);
      err = cudaGetLastError();
    }
  }
  return err;
}

}  // namespace cuda
}  // namespace jax_psroi

#endif  // JAX_PSROI_CUDA_PSROI_CUDA_KERNELS_CUH_
