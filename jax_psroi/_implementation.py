"""Which implementation an operator lowers to: the native kernels or the XLA
path (_xla_path.py).

``JAX_PSROI_IMPLEMENTATION`` is read when a call is traced and becomes the
primitives' ``implementation`` parameter, so a program keeps the path it was
traced with (jit's caches key on it):

* ``native`` (the default): the native kernels on the platforms that have
  them in this install (CPU; CUDA when built with it), the XLA path on every
  other (TPU, ROCm, a GPU whose install lacks the CUDA kernels, which warns
  once how to get them);
* ``xla``: the XLA path everywhere, the CPU included (how the tests check it
  against the reference).
"""

from __future__ import annotations

import os
import warnings

from jax_psroi import _extension

ENVIRONMENT_VARIABLE = "JAX_PSROI_IMPLEMENTATION"
IMPLEMENTATIONS = ("native", "xla")

# Whether a lowering for CUDA without the CUDA kernels has warned (once a process).
_warned_cuda: list[bool] = []


def requested() -> str:
    """The implementation ``JAX_PSROI_IMPLEMENTATION`` asks for now."""
    value = os.environ.get(ENVIRONMENT_VARIABLE) or "native"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be 'native' or 'xla' (or unset), "
                         f"got {value!r}")
    return value


def native(platform: str | None, implementation: str) -> bool:
    """Whether a call of `implementation` lowers to native kernels on
    `platform` (None: a platform without a lowering of its own)."""
    if implementation == "xla" or platform is None:
        return False
    if _extension.KERNELS[platform]:
        return True
    # A CPU without the compiled module warned at import.
    if platform == "cuda" and not _warned_cuda:
        _warned_cuda.append(True)
        warnings.warn(_extension.CUDA_MISSING_MESSAGE, RuntimeWarning, stacklevel=2)
    return False
