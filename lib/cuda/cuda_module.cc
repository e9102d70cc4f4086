// Python module `jax_psroi._cuda`: the CUDA handlers as FFI capsules. It
// links the CUDA runtime statically and touches no device at import, so it
// imports on machines without a GPU (where jax.export for cuda still works).
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

extern "C" {
XLA_FFI_Error* JaxPsroiForwardCudaF32(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiForwardCudaF64(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiBackwardCudaF32(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiBackwardCudaF64(XLA_FFI_CallFrame*);
}

namespace nb = nanobind;

NB_MODULE(_cuda, m) {
  m.doc() = "jax_psroi CUDA kernels as XLA FFI handlers.";
  m.attr("ffi_api_version") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  // Same target names as the CPU handlers, registered for platform "CUDA".
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_psroi_forward_f32"] =
        nb::capsule(reinterpret_cast<void*>(JaxPsroiForwardCudaF32));
    targets["jax_psroi_forward_f64"] =
        nb::capsule(reinterpret_cast<void*>(JaxPsroiForwardCudaF64));
    targets["jax_psroi_backward_f32"] =
        nb::capsule(reinterpret_cast<void*>(JaxPsroiBackwardCudaF32));
    targets["jax_psroi_backward_f64"] =
        nb::capsule(reinterpret_cast<void*>(JaxPsroiBackwardCudaF64));
    return targets;
  });
  // CUDA runtime version compiled in (static runtime), e.g. 13000.
  m.def("cuda_runtime_version", []() { return CUDART_VERSION; });
}
