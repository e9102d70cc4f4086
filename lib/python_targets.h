// FFI targets as the Python side reads them (jax_psroi/_extension.py): a list
// of (name, operation, direction, layout, dtype, capsule) tuples.
#ifndef JAX_PSROI_PYTHON_TARGETS_H_
#define JAX_PSROI_PYTHON_TARGETS_H_

#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "ffi_common.h"

namespace jax_psroi {

inline nanobind::list python_targets(const std::vector<FfiTarget>& targets) {
  namespace nb = nanobind;
  nb::list rows;
  for (const FfiTarget& t : targets) {
    rows.append(nb::make_tuple(t.name, t.operation, t.direction, t.layout, t.dtype,
                               nb::capsule(reinterpret_cast<void*>(t.handler))));
  }
  return rows;
}

}  // namespace jax_psroi

#endif  // JAX_PSROI_PYTHON_TARGETS_H_
