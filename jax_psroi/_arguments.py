"""The rules for the arguments of ``ps_roi_align`` and its reference, in one place.

Each check runs at trace time and raises ``TypeError`` (wrong kind of value)
or ``ValueError`` (right kind, wrong value) with a message that names the
argument, says what was expected and shows what was given.
"""

from __future__ import annotations

import operator

import jax
import numpy as np

# Samples per bin axis are capped here, as in the kernels (kMaxGridPerAxis in
# lib/psroi_math.h): beyond 2**23, float32's i + 0.5 is no longer exact.
MAX_GRID_PER_AXIS = 2**23

_TRACED = (jax.errors.TracerIntegerConversionError,
           jax.errors.ConcretizationTypeError)


def _given(value) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and getattr(value, "ndim", 0) > 0:
        return f"an array of shape {tuple(shape)}"
    return f"{value!r} ({type(value).__name__})"


def _static_int(name: str, value, expected: str) -> int:
    """`value` as a Python int known at trace time."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {_given(value)}")
    try:
        return operator.index(value)
    except _TRACED:
        raise TypeError(
            f"{name} must be {expected} known at trace time, got a traced "
            "value: it fixes the shapes and the sampling grid of the compiled "
            "program, so pass it as a Python int (a static argument under "
            "jax.jit)") from None
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {_given(value)}") from None


def output_size(value) -> tuple[int, int]:
    """``output_size``: an int or a pair (h, w) of positive ints."""
    expected = "an int or a pair of ints (h, w)"
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"output_size must be {expected}, got "
                             f"{value!r} ({len(value)} entries)")
        size = tuple(_static_int("output_size", v, expected) for v in value)
    else:
        size = (_static_int("output_size", value, expected),) * 2
    if min(size) <= 0:
        raise ValueError(f"output_size must be positive, got {value!r}")
    return size


def sampling_ratio(value) -> int:
    """``sampling_ratio``: an int, at most MAX_GRID_PER_AXIS (<= 0: adaptive)."""
    ratio = _static_int("sampling_ratio", value, "an int")
    if ratio > MAX_GRID_PER_AXIS:
        raise ValueError(
            f"sampling_ratio must be at most {MAX_GRID_PER_AXIS} samples per "
            f"bin axis (or <= 0 for adaptive sampling), got {ratio}")
    return ratio


def spatial_scale(value) -> float:
    """``spatial_scale``: a real number known at trace time, as a Python float."""
    if isinstance(value, (bool, np.bool_, complex, np.complexfloating)):
        raise TypeError(f"spatial_scale must be a real number, got {_given(value)}")
    try:
        return float(value)
    except _TRACED:
        raise TypeError(
            "spatial_scale must be a real number known at trace time, got a "
            "traced value: pass it as a Python float (a static argument under "
            "jax.jit)") from None
    except (TypeError, ValueError):
        raise TypeError(
            f"spatial_scale must be a real number, got {_given(value)}") from None


def features(value, pooled_size: tuple[int, int], dtypes=None):
    """``input``: a [N, C, H, W] float array with C a multiple of h * w.

    `dtypes`, when given, are the dtypes with native kernels; otherwise any
    floating dtype is accepted (the jax.numpy reference).
    """
    array = jax.numpy.asarray(value)
    if array.ndim != 4:
        raise ValueError(
            f"input must be a 4-d feature map [N, C, H, W], got shape {array.shape}")
    if dtypes is not None and array.dtype not in dtypes:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"input must be {names}, got {array.dtype}")
    if dtypes is None and not jax.numpy.issubdtype(array.dtype, jax.numpy.floating):
        raise TypeError(f"input must be a floating-point array, got {array.dtype}")
    ph, pw = pooled_size
    bins = ph * pw
    channels = array.shape[1]
    if channels % bins:
        message = (f"input channels (axis 1 of [N, C, H, W]) must be a multiple "
                   f"of output_size h * w = {ph} * {pw} = {bins}; got shape "
                   f"{array.shape}, so C = {channels}")
        if array.shape[3] % bins == 0 and array.shape[3] > 0:
            message += (f". Its last axis ({array.shape[3]}) is a multiple of "
                        f"{bins}: if this is a channels-last [N, H, W, C] map "
                        "(as Flax convolutions produce), pass it as "
                        "x.transpose(0, 3, 1, 2)")
        raise ValueError(message)
    return array
