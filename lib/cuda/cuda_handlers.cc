// XLA FFI handlers for CUDA: decode buffers, check shapes, launch on XLA's
// stream. They never synchronize; launch errors come back as ffi::Error.
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "cuda/psroi_cuda_kernels.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cuda {
namespace {

ffi::Error cuda_error(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_psroi: ") + what + ": " +
                              cudaGetErrorString(err));
}

template <ffi::DataType dtype>
ffi::Error forward(cudaStream_t stream, ffi::Buffer<dtype, 4> input,
                   ffi::Buffer<dtype, 2> rois,
                   ffi::ResultBuffer<dtype, 4> output, double spatial_scale,
                   int64_t sampling_ratio) {
  using T = ffi::NativeType<dtype>;
  ffi::ErrorOr<PsRoiDims> dims =
      call_dims(input.dimensions(), rois.dimensions(), output->dimensions());
  if (dims.has_error()) return dims.error();
  const cudaError_t err = launch_forward<T>(
      stream, input.typed_data(), rois.typed_data(), dims.value(),
      static_cast<T>(spatial_scale), sampling_ratio, output->typed_data());
  return err == cudaSuccess ? ffi::Error::Success()
                            : cuda_error("forward kernel launch", err);
}

template <ffi::DataType dtype>
ffi::Error backward(cudaStream_t stream, ffi::Buffer<dtype, 4> cotangent,
                    ffi::Buffer<dtype, 2> rois,
                    ffi::ResultBuffer<dtype, 4> grad_input,
                    double spatial_scale, int64_t sampling_ratio) {
  using T = ffi::NativeType<dtype>;
  ffi::ErrorOr<PsRoiDims> dims = call_dims(
      grad_input->dimensions(), rois.dimensions(), cotangent.dimensions());
  if (dims.has_error()) return dims.error();
  const cudaError_t err = launch_backward<T>(
      stream, cotangent.typed_data(), rois.typed_data(), dims.value(),
      static_cast<T>(spatial_scale), sampling_ratio, grad_input->typed_data());
  return err == cudaSuccess ? ffi::Error::Success()
                            : cuda_error("backward kernel launch", err);
}

}  // namespace
}  // namespace cuda
}  // namespace jax_psroi

namespace ffi = ::xla::ffi;

// Stateless launches on the given stream: safe inside CUDA graphs.
#define JAX_PSROI_DEFINE_CUDA_HANDLERS(suffix, dtype)                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      JaxPsroiForwardCuda##suffix, jax_psroi::cuda::forward<dtype>,          \
      ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()              \
          JAX_PSROI_BIND_ARGS(dtype),                                        \
      {ffi::Traits::kCmdBufferCompatible});                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                             \
      JaxPsroiBackwardCuda##suffix, jax_psroi::cuda::backward<dtype>,        \
      ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()              \
          JAX_PSROI_BIND_ARGS(dtype),                                        \
      {ffi::Traits::kCmdBufferCompatible});

JAX_PSROI_DEFINE_CUDA_HANDLERS(F32, ffi::F32)
JAX_PSROI_DEFINE_CUDA_HANDLERS(F64, ffi::F64)
