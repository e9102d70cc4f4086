"""jax_psroi's PEP 517 build backend: scikit-build-core, plus NVIDIA's CUDA
compiler from pip when the build wants CUDA kernels and the machine has no
CUDA toolkit.

Why a backend of our own (a thin in-tree wrapper, ``backend-path`` in
pyproject.toml) rather than static build requirements: the CUDA toolchain
wheels are ~130 MB to download and ~350 MB installed, needed only by CUDA
builds, and only where no system nvcc exists. Static ``requires`` would make
every CPU, macOS and system-toolkit build download them; environment markers
cannot express "an NVIDIA driver is present"; scikit-build-core's dynamic
requirements see only the Python environment. A ``get_requires_for_build_*``
hook sees the machine, so it asks for the toolchain exactly when it is
used. Everything else is scikit-build-core's.

What the build does with CUDA (``JAX_PSROI_CUDA`` in the environment, or
``-Ccmake.define.JAX_PSROI_CUDA=...``; the environment wins, as in CMake):

- ``OFF``: CPU kernels only.
- ``ON``: CUDA kernels, with the system nvcc if there is one, else with the
  pip toolchain; CMake fails with what to do if neither works.
- ``AUTO`` (default): ``ON`` on a GPU machine (a system nvcc, or an NVIDIA
  driver), ``OFF`` elsewhere.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from scikit_build_core import build as _scikit_build
from scikit_build_core.build import (
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

# NVIDIA's CUDA 13 compiler as wheels (all install under
# site-packages/nvidia/cu13): nvcc, ptxas, fatbinary and nvlink; cicc; the
# compiler's runtime headers; cudart's headers and libcudart_static.a; CCCL.
# CUDA 13 is what jax[cuda13] runs; a minor version newer than the driver's
# is fine for SASS (CUDA minor-version compatibility).
CUDA_TOOLCHAIN = [
    "nvidia-cuda-nvcc>=13,<14",
    "nvidia-nvvm>=13,<14",
    "nvidia-cuda-crt>=13,<14",
    "nvidia-cuda-runtime>=13,<14",
    "nvidia-cuda-cccl>=13,<14",
]

_SETTING = "JAX_PSROI_CUDA"


def _requested(config_settings) -> str:
    value = os.environ.get(_SETTING) or (config_settings or {}).get(
        f"cmake.define.{_SETTING}") or "AUTO"
    value = str(value).upper()
    if value not in ("AUTO", "ON", "OFF"):
        raise ValueError(f"{_SETTING}={value!r}: expected AUTO, ON or OFF")
    return value


def system_nvcc() -> str | None:
    """The nvcc CMake would find on its own: CUDACXX, PATH, /usr/local/cuda."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvidia_driver() -> bool:
    """Whether this machine has an NVIDIA driver (so, presumably, a GPU)."""
    return (pathlib.Path("/proc/driver/nvidia/version").exists()
            or pathlib.Path("/dev/nvidiactl").exists()
            or shutil.which("nvidia-smi") is not None)


def cuda_build(config_settings=None) -> tuple[str, list[str]]:
    """(ON or OFF, the extra build requirements) for this build."""
    requested = _requested(config_settings)
    if requested == "OFF":
        return "OFF", []
    nvcc = system_nvcc()
    if requested == "AUTO" and nvcc is None and not nvidia_driver():
        return "OFF", []
    return "ON", [] if nvcc else list(CUDA_TOOLCHAIN)


def get_requires_for_build_wheel(config_settings=None):
    return (_scikit_build.get_requires_for_build_wheel(config_settings)
            + cuda_build(config_settings)[1])


def get_requires_for_build_editable(config_settings=None):
    return (_scikit_build.get_requires_for_build_editable(config_settings)
            + cuda_build(config_settings)[1])


def _resolved(config_settings):
    # CMake reads the environment (CMakeLists.txt); ON makes a missing
    # compiler an error rather than a silent CPU-only build.
    os.environ[_SETTING] = cuda_build(config_settings)[0]


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _resolved(config_settings)
    return _scikit_build.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _resolved(config_settings)
    return _scikit_build.build_editable(wheel_directory, config_settings, metadata_directory)
