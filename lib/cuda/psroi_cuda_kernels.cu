// CUDA kernels of PS-RoI Align. All arithmetic on boxes, samples and weights
// is in psroi_math.h, shared with the CPU kernels; this file only maps
// threads to output elements.
#include <algorithm>
#include <cstdint>

#include "cuda/psroi_cuda_kernels.h"
#include "psroi_math.h"

namespace jax_psroi {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU; the grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

int blocks_for(int64_t elements) {
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

template <typename T>
__global__ void forward_kernel(const T* __restrict__ input,
                               const T* __restrict__ rois, PsRoiDims dims,
                               T spatial_scale, int64_t sampling_ratio,
                               T* __restrict__ output) {
  const NchwLayout layout{dims.channels, dims.height, dims.width};
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

template <typename T>
__global__ void backward_kernel(const T* __restrict__ cotangent,
                                const T* __restrict__ rois, PsRoiDims dims,
                                T spatial_scale, int64_t sampling_ratio,
                                T* grad_input) {
  const NchwLayout layout{dims.channels, dims.height, dims.width};
  const int64_t total = dims.outputs();
  for (int64_t i = first_index(); i < total; i += stride()) {
    backward_element(cotangent, rois, dims, layout, spatial_scale,
                     sampling_ratio, i, grad_input, AtomicAdd{});
  }
}

}  // namespace

template <typename T>
cudaError_t launch_forward(cudaStream_t stream, const T* input, const T* rois,
                           const PsRoiDims& dims, T spatial_scale,
                           int64_t sampling_ratio, T* output) {
  const int64_t total = dims.outputs();
  if (total == 0) return cudaSuccess;
  forward_kernel<T><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
      input, rois, dims, spatial_scale, sampling_ratio, output);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(cudaStream_t stream, const T* cotangent,
                            const T* rois, const PsRoiDims& dims,
                            T spatial_scale, int64_t sampling_ratio,
                            T* grad_input) {
  const int64_t grad_elements = dims.num_images * dims.channels * dims.plane_size();
  cudaError_t err = cudaMemsetAsync(grad_input, 0, grad_elements * sizeof(T), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = dims.outputs();
  if (total == 0) return cudaSuccess;
  backward_kernel<T><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
      cotangent, rois, dims, spatial_scale, sampling_ratio, grad_input);
  return cudaGetLastError();
}

template cudaError_t launch_forward<float>(cudaStream_t, const float*, const float*,
                                           const PsRoiDims&, float, int64_t, float*);
template cudaError_t launch_forward<double>(cudaStream_t, const double*, const double*,
                                            const PsRoiDims&, double, int64_t, double*);
template cudaError_t launch_backward<float>(cudaStream_t, const float*, const float*,
                                            const PsRoiDims&, float, int64_t, float*);
template cudaError_t launch_backward<double>(cudaStream_t, const double*, const double*,
                                             const PsRoiDims&, double, int64_t, double*);

}  // namespace cuda
}  // namespace jax_psroi
