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

# The CUDA warnings a lowering has given (each once a process).
_warned_cuda: list[str] = []


def requested() -> str:
    """The implementation ``JAX_PSROI_IMPLEMENTATION`` asks for now."""
    value = os.environ.get(ENVIRONMENT_VARIABLE) or "native"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be 'native' or 'xla' (or unset), "
                         f"got {value!r}")
    return value


def native(platform: str | None, implementation: str, targets=None,
           cuda_missing: str | None = None) -> bool:
    """Whether a call of `implementation` lowers to native kernels on
    `platform` (None: a platform without a lowering of its own). `targets`:
    the operator's kernels by platform (the kernel table's by default);
    `cuda_missing`: the warning, once a process, for a CUDA platform
    without them (by default, how to build the CUDA kernels)."""
    if implementation == "xla" or platform is None:
        return False
    if (_extension.KERNELS if targets is None else targets).get(platform):
        return True
    # A CPU without the compiled module warned at import.
    message = cuda_missing or _extension.CUDA_MISSING_MESSAGE
    if platform == "cuda" and message not in _warned_cuda:
        _warned_cuda.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return False
