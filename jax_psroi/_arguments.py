"""The rules for the arguments of ``ps_roi_align`` and its reference, in one place.

Each check runs at trace time and raises ``TypeError`` (wrong kind of value)
or ``ValueError`` (right kind, wrong value) with a message that names the
argument, says what was expected and shows what was given.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

# The public API's argument types. torchvision's two forms of `boxes`: a
# [K, 5] array, or one [L_i, 4] array per image.
Boxes = ArrayLike | Sequence[ArrayLike]
OutputSize = int | tuple[int, int]
DataFormat = Literal["NCHW", "NHWC"]
ChannelOrder = Literal["torchvision", "bin_major"]

# Samples per bin axis are capped here, as in the kernels (kMaxGridPerAxis in
# lib/roi_math.h): beyond 2**23, float32's i + 0.5 is no longer exact.
MAX_GRID_PER_AXIS = 2**23
# sampling_ratio is a 64-bit FFI attribute; any value <= 0 means adaptive.
MIN_SAMPLING_RATIO = -(2**63)
# Bins per axis: the CUDA schedule indexes a pooled row in int32
# (lib/gpu_schedule.h), so each pooled size must fit one.
MAX_OUTPUT_SIZE = 2**31 - 1
# Image sizes and canonical_scale are pixels, canonical_level a pyramid level:
# bounded like the pooled sizes, far beyond any image, to int32, which is what
# JAX makes of the Python ints eq. 1 adds and divides by (without x64, 2**70
# overflowed there).
MAX_PIXELS = 2**31 - 1
MAX_LEVEL = 2**31 - 1

# `call`'s sampling ratio for the operators that take none (the pools): a
# marker no caller can pass by mistake, as None could be.
NO_SAMPLING_RATIO = object()

# Each data format: the positions of N, C, H, W in a feature map's shape,
# which are also those of K, C_out, PH, PW in a pooled tensor's (kAxes of the
# layouts in lib/roi_math.h).
LAYOUT_AXES = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 3, 1, 2)}
DATA_FORMATS = tuple(LAYOUT_AXES)
# In the order of the kernels' ChannelOrder (lib/roi_math.h): the index is
# the FFI attribute.
CHANNEL_ORDERS = ("torchvision", "bin_major")

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


def _sizes(name: str, value, expected: str, largest: int, unit: str) -> tuple[int, int]:
    """A pair of positive ints at most `largest`, or an int taken for both."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be {expected}, got {value!r} ({len(value)} entries)")
        size = tuple(_static_int(name, v, expected) for v in value)
    else:
        size = (_static_int(name, value, expected),) * 2
    if min(size) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if max(size) > largest:
        raise ValueError(f"{name} must be at most {largest} {unit}, got {value!r}")
    return size


def output_size(value) -> tuple[int, int]:
    """``output_size``: an int or a pair (h, w) of ints in [1, MAX_OUTPUT_SIZE]."""
    return _sizes("output_size", value, "an int or a pair of ints (h, w)", MAX_OUTPUT_SIZE,
                  "bins per axis (the kernels index a row of bins in 32 bits)")


def image_size(value, name: str = "image_size") -> tuple[int, int]:
    """``image_size`` of multi_scale_roi_align (or an entry of the Flax
    modules' ``image_shapes``, `name`): a pair (height, width) of ints in
    [1, MAX_PIXELS]."""
    expected = "a pair of ints (height, width)"
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be {expected}, got {_given(value)}")
    return _sizes(name, value, expected, MAX_PIXELS, "pixels a side")


def canonical(scale, level) -> tuple[int, int]:
    """``canonical_scale`` (an int in [1, MAX_PIXELS]) and ``canonical_level``
    (an int in [-MAX_LEVEL, MAX_LEVEL]) of multi_scale_roi_align: the FPN
    paper's 224 and k0 = 4."""
    scale = _static_int("canonical_scale", scale, "a positive int")
    if scale <= 0:
        raise ValueError(f"canonical_scale must be positive, got {scale}")
    if scale > MAX_PIXELS:
        raise ValueError(f"canonical_scale must be at most {MAX_PIXELS} pixels, got {scale}")
    level = _static_int("canonical_level", level, "an int")
    if abs(level) > MAX_LEVEL:
        raise ValueError(f"canonical_level must be between {-MAX_LEVEL} and {MAX_LEVEL}, "
                         f"got {level}")
    return scale, level


def sampling_ratio(value) -> int:
    """``sampling_ratio``: an int in [MIN_SAMPLING_RATIO, MAX_GRID_PER_AXIS]
    (<= 0: adaptive)."""
    ratio = _static_int("sampling_ratio", value, "an int")
    if ratio > MAX_GRID_PER_AXIS:
        raise ValueError(
            f"sampling_ratio must be at most {MAX_GRID_PER_AXIS} samples per "
            f"bin axis (or <= 0 for adaptive sampling), got {ratio}")
    if ratio < MIN_SAMPLING_RATIO:
        raise ValueError(
            f"sampling_ratio must be at least {MIN_SAMPLING_RATIO} (a 64-bit attribute of "
            f"the kernels; any value <= 0 is adaptive sampling), got {ratio}")
    return ratio


def _real_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def _is_real_number(value) -> bool:
    """A real number or a 0-d array of one (concrete or traced); bools,
    complex numbers and strings are not."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    dtype = getattr(value, "dtype", None)
    return getattr(value, "shape", None) == () and dtype is not None and _real_dtype(dtype)


def static_real(name: str, value) -> float:
    """Argument `name`: a real number known at trace time (a Python or NumPy
    int or float, or a concrete 0-d array of one), as a Python float (inf
    for an int beyond every float); else a TypeError naming it."""
    expected = "a real number"
    if not _is_real_number(value):
        raise TypeError(f"{name} must be {expected}, got {_given(value)}")
    try:
        return float(value)
    except _TRACED:
        raise TypeError(
            f"{name} must be {expected} known at trace time, got a traced value: pass "
            "it as a Python float (a static argument under jax.jit)") from None
    except OverflowError:
        return math.inf


def spatial_scale(value) -> float:
    """``spatial_scale``: a finite positive real number known at trace time,
    as a Python float."""
    scale = static_real("spatial_scale", value)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError("spatial_scale must be finite and positive (box coordinates times "
                         "it are feature-map pixels: 1/16 for a stride of 16), got "
                         f"{value!r}")
    return scale


def spatial_scale_in(scale: float, dtype) -> float:
    """`scale` as the kernels take it, in `dtype` (the compute dtype): in
    float32 (that of float32 and 16-bit maps) it must neither overflow to
    inf nor round below the smallest normal number: XLA's CPU runtime
    flushes subnormals to 0, which the kernels refuse at run time (and
    which would pool every RoI to nothing)."""
    finfo = jnp.finfo(dtype)
    if scale > float(finfo.max) or np.asarray(scale, dtype) < finfo.tiny:
        raise ValueError(
            f"spatial_scale must be a normal number in {finfo.dtype.name}, the dtype the "
            f"kernels compute in for this input ({float(finfo.tiny):g} to "
            f"{float(finfo.max):g}), got {scale!r}")
    return scale


def data_format(value) -> str:
    """``data_format``: "NCHW" or "NHWC"."""
    if value not in DATA_FORMATS:
        raise ValueError(f"data_format must be 'NCHW' or 'NHWC', got {_given(value)}")
    return value


def channel_order(value) -> str:
    """``channel_order``: "torchvision" or "bin_major"."""
    if value not in CHANNEL_ORDERS:
        raise ValueError(
            f"channel_order must be 'torchvision' or 'bin_major', got {_given(value)}")
    return value


def aligned(value) -> bool:
    """``aligned`` of roi_align: a Python bool (it selects the geometry at
    trace time)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"aligned must be a Python bool, got {_given(value)}")
    return bool(value)


def channel_axis(data_format: str) -> int:
    return LAYOUT_AXES[data_format][1]


def pooled_shape(num_rois, channels_out, pooled_size, data_format) -> tuple:
    """The pooled tensor's shape: [K, C_out, PH, PW] or [K, PH, PW, C_out]."""
    shape = [0] * 4
    sizes = (num_rois, channels_out, *pooled_size)
    for axis, size in zip(LAYOUT_AXES[data_format], sizes, strict=True):
        shape[axis] = size
    return tuple(shape)


def features_and_pooled(direction: str, operand_shape, result_shape) -> tuple:
    """(features shape, pooled shape) of one call of a primitive: the
    forward maps features to pooled values, the backward pooled cotangents
    to feature gradients."""
    if direction == "forward":
        return operand_shape, result_shape
    return result_shape, operand_shape


def pooled_size_of(pooled, data_format) -> tuple[int, int]:
    """(PH, PW) of a pooled tensor's shape."""
    axes = LAYOUT_AXES[data_format]
    return (pooled[axes[2]], pooled[axes[3]])


def features(value, pooled_size: tuple[int, int], data_format: str = "NCHW",
             dtypes=None, position_sensitive: bool = True, name: str = "input"):
    """``input`` (or the map `name`): a 4-d float map in `data_format`; for
    the position-sensitive operators, one whose channel count is a multiple
    of h * w.

    `dtypes`, when given, are the dtypes with native kernels; otherwise any
    floating dtype is accepted (the jax.numpy reference).
    """
    shape_name = "[N, C, H, W]" if data_format == "NCHW" else "[N, H, W, C]"
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 4-d floating-point array {shape_name}, got "
                        f"{_given(value)}") from None
    if array.ndim != 4:
        raise ValueError(f"{name} must be a 4-d feature map {shape_name} "
                         f"(data_format={data_format!r}), got shape {array.shape}")
    if dtypes is not None and array.dtype not in dtypes:
        names = [jnp.dtype(d).name for d in dtypes]
        expected = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise TypeError(f"{name} must be {expected}, got {array.dtype}")
    if dtypes is None and not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got {array.dtype}")
    ph, pw = pooled_size
    bins = ph * pw
    axis = channel_axis(data_format)
    channels = array.shape[axis]
    if position_sensitive and channels % bins:
        message = (f"{name} channels (axis {axis} of {shape_name}) must be a "
                   f"multiple of output_size h * w = {ph} * {pw} = {bins}; got "
                   f"shape {array.shape}, so C = {channels}")
        other_format = "NHWC" if data_format == "NCHW" else "NCHW"
        other_axis = channel_axis(other_format)
        other = array.shape[other_axis]
        if other % bins == 0 and other > 0:
            layout = ("a channels-last [N, H, W, C] map (as Flax convolutions "
                      "produce)" if other_format == "NHWC" else "an [N, C, H, W] map")
            message += (f". Its axis {other_axis} ({other}) is a multiple of {bins}: "
                        f"if this is {layout}, pass data_format={other_format!r}")
        raise ValueError(message)
    return array


def pyramid(value, pooled_size: tuple[int, int], data_format: str, dtypes=None) -> list:
    """``features`` of multi_scale_roi_align (and its reference): a list or
    tuple of maps, each checked as ``features`` checks ``input``, of one
    dtype and with the same images and channels. Whether they form a
    pyramid that can be pooled is for _levels.level_scales to say."""
    expected = "a list or tuple of feature maps, the finest first"
    if isinstance(value, Mapping):
        raise TypeError(
            f"features must be {expected}, got a mapping (torchvision's dict of named "
            "levels): pass its maps as a list, or use jax_psroi.flax's MultiScaleRoIAlign, "
            "which takes the mapping and featmap_names as torchvision's module does")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"features must be {expected}, got {_given(value)}")
    if not value:
        raise ValueError("features must hold at least one level")
    maps = [features(level, pooled_size, data_format, dtypes, position_sensitive=False,
                     name=f"features[{index}]") for index, level in enumerate(value)]
    axes = LAYOUT_AXES[data_format]
    first = maps[0]
    for index, level in enumerate(maps[1:], start=1):
        if (level.dtype != first.dtype or level.shape[axes[0]] != first.shape[axes[0]]
                or level.shape[axes[1]] != first.shape[axes[1]]):
            message = (f"every level of features must have the dtype, images and channels "
                       f"of level 0 ({first.dtype}, shape {first.shape}); level {index} is "
                       f"{level.dtype}, shape {level.shape}")
            other_format = "NHWC" if data_format == "NCHW" else "NCHW"
            other_axis = channel_axis(other_format)
            if (level.dtype == first.dtype and level.shape[axes[0]] == first.shape[axes[0]]
                    and level.shape[other_axis] == first.shape[other_axis]):
                shape_name = "[N, C, H, W]" if other_format == "NCHW" else "[N, H, W, C]"
                message += (f". Their axis {other_axis} agrees: if the maps are "
                            f"{shape_name}, pass data_format={other_format!r}")
            raise ValueError(message)
    return maps


def call(input, boxes, size, scale, ratio, layout, order, dtypes=None,
         position_sensitive=True):
    """Every argument of a call of ``ps_roi_align`` (or, without `dtypes`, of
    its reference), checked.

    Returns (features, rois [K, 5] in the compute dtype, params), params
    being the static parameters the primitives and the reference's ``pool``
    take: pooled_size, spatial_scale, sampling_ratio (not for the pools,
    whose callers pass NO_SAMPLING_RATIO), data_format and channel_order.
    """
    pooled_size = output_size(size)
    layout = data_format(layout)
    checked = features(input, pooled_size, layout, dtypes, position_sensitive)
    dtype = compute_dtype(checked.dtype)
    rois = rois_from_boxes(boxes, dtype)
    params = dict(pooled_size=pooled_size,
                  spatial_scale=spatial_scale_in(spatial_scale(scale), dtype),
                  data_format=layout, channel_order=channel_order(order))
    if ratio is not NO_SAMPLING_RATIO:
        params["sampling_ratio"] = sampling_ratio(ratio)
    return checked, rois, params


def compute_dtype(dtype):
    """The dtype the kernels compute in for features of `dtype`: float32 for
    the 16-bit types (box coordinates are never rounded to 16 bits), the
    dtype itself otherwise. Boxes are cast to it."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _box_array(value, dtype, what):
    """`value`, an array of real numbers (floats or ints), cast to `dtype`."""
    expected = "a real floating-point or integer array"
    try:
        # The dtype it holds, read before any cast: converting it with jnp
        # alone would narrow int64 to int32 in JAX's default 32-bit mode,
        # wrapping large coordinates.
        held = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
    except jax.errors.TracerArrayConversionError:  # a list holding traced values
        held = jnp.asarray(value).dtype
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be {expected}, got {_given(value)}") from None
    if not _real_dtype(held):
        given = (f"an array of dtype {held}" if isinstance(value, (list, tuple))
                 or hasattr(value, "dtype") else _given(value))
        raise TypeError(f"{what} must be {expected}, got {given}")
    return jnp.asarray(value, dtype)


def rois_from_boxes(boxes: Boxes, dtype: DTypeLike) -> jax.Array:
    """``boxes`` in either of torchvision's forms as [K, 5] RoIs
    (batch_index, x1, y1, x2, y2) of `dtype`.

    A list/tuple of [L_i, 4] arrays gives image i's boxes batch index i, as
    torchvision's ``convert_boxes_to_roi_format`` does.
    """
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            b = _box_array(b, dtype, f"boxes[{i}]")
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError("boxes given as a list must hold [L, 4] "
                                 f"arrays; element {i} is {b.shape}")
            parts.append(jnp.concatenate([jnp.full((b.shape[0], 1), i, dtype), b], axis=1))
        if not parts:
            return jnp.zeros((0, 5), dtype)
        return jnp.concatenate(parts, axis=0)
    rois = _box_array(boxes, dtype, "boxes")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError("boxes must be a [K, 5] array (batch_index, x1, y1, "
                         f"x2, y2) or a list of [L, 4] arrays, got {rois.shape}")
    return rois
