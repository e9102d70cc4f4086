"""Loading of the compiled modules and registration of their FFI targets.

``_cpu`` is always built. ``_cuda`` exists when the package was built with
CUDA (see README, "Building"); its targets are registered for the CUDA
platform even on machines without a GPU, which is what ``jax.export`` for
``cuda`` needs.
"""

from __future__ import annotations

import jax

from jax_psroi import _build_info
from jax_psroi import _cpu

try:
    from jax_psroi import _cuda
except ImportError:  # built without CUDA
    _cuda = None

# Stable target names: exported programs refer to them, so they are ABI.
DTYPE_SUFFIX = {"float32": "f32", "float64": "f64"}


def target_name(direction: str, dtype) -> str:
    """FFI target of `direction` ('forward' or 'backward') for `dtype`."""
    return f"jax_psroi_{direction}_{DTYPE_SUFFIX[jax.numpy.dtype(dtype).name]}"


def _register(registrations, platform):
    for name, capsule in registrations.items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)


_register(_cpu.registrations(), "cpu")
if _cuda is not None:
    _register(_cuda.registrations(), "CUDA")

CUDA_BUILT = _cuda is not None

CUDA_MISSING_MESSAGE = (
    "jax_psroi was built without its CUDA kernels, so it cannot lower "
    "ps_roi_align for the 'cuda' platform. Reinstall with nvcc on PATH and "
    "CUDA forced on: JAX_PSROI_CUDA=ON pip install --no-cache-dir "
    "--force-reinstall . (see README, 'Building').")


def build_info() -> dict:
    """What this installation of jax_psroi was built with.

    Returns a dict with the JAX version whose FFI headers were used, the XLA
    FFI API version compiled in, and whether (and for which CUDA version and
    GPU architectures) the CUDA kernels were built.
    """
    info = {
        "jax_built_against": _build_info.JAX_VERSION,
        "jax_running": jax.__version__,
        "ffi_api_version": tuple(_cpu.ffi_api_version),
        "cuda_option": _build_info.CUDA_OPTION,
        "cuda_built": CUDA_BUILT,
        "cuda_version": _build_info.CUDA_VERSION or None,
        "cuda_architectures": (_build_info.CUDA_ARCHITECTURES.split(";")
                               if _build_info.CUDA_ARCHITECTURES else []),
    }
    if _cuda is not None:
        info["cuda_runtime_version"] = _cuda.cuda_runtime_version()
    return info
