// Python module `jax_psroi._cpu`: the CPU handlers as FFI capsules.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

extern "C" {
XLA_FFI_Error* JaxPsroiForwardCpuF32(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiForwardCpuF64(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiBackwardCpuF32(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiBackwardCpuF64(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiForwardElementwiseCpuF32(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiForwardElementwiseCpuF64(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiBackwardElementwiseCpuF32(XLA_FFI_CallFrame*);
XLA_FFI_Error* JaxPsroiBackwardElementwiseCpuF64(XLA_FFI_CallFrame*);
}

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_cpu, m) {
  m.doc() = "jax_psroi CPU kernels as XLA FFI handlers.";
  m.attr("ffi_api_version") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  // Target names are ABI: exported programs refer to them.
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_psroi_forward_f32"] = capsule(JaxPsroiForwardCpuF32);
    targets["jax_psroi_forward_f64"] = capsule(JaxPsroiForwardCpuF64);
    targets["jax_psroi_backward_f32"] = capsule(JaxPsroiBackwardCpuF32);
    targets["jax_psroi_backward_f64"] = capsule(JaxPsroiBackwardCpuF64);
    targets["jax_psroi_forward_elementwise_f32"] =
        capsule(JaxPsroiForwardElementwiseCpuF32);
    targets["jax_psroi_forward_elementwise_f64"] =
        capsule(JaxPsroiForwardElementwiseCpuF64);
    targets["jax_psroi_backward_elementwise_f32"] =
        capsule(JaxPsroiBackwardElementwiseCpuF32);
    targets["jax_psroi_backward_elementwise_f64"] =
        capsule(JaxPsroiBackwardElementwiseCpuF64);
    return targets;
  });
}
