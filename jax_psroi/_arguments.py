"""The rules for the arguments of ``ps_roi_align`` and its reference, in one place.

Each check runs at trace time and raises ``TypeError`` (wrong kind of value)
or ``ValueError`` (right kind, wrong value) with a message that names the
argument, says what was expected and shows what was given.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's two forms of the `boxes` argument.
Boxes = jax.Array | np.ndarray | Sequence[jax.Array]

# Samples per bin axis are capped here, as in the kernels (kMaxGridPerAxis in
# lib/psroi_math.h): beyond 2**23, float32's i + 0.5 is no longer exact.
MAX_GRID_PER_AXIS = 2**23

# Each data format: the positions of N, C, H, W in a feature map's shape,
# which are also those of K, C_out, PH, PW in a pooled tensor's (kAxes of the
# layouts in lib/psroi_math.h).
LAYOUT_AXES = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 3, 1, 2)}
DATA_FORMATS = tuple(LAYOUT_AXES)
# In the order of the kernels' ChannelOrder (lib/psroi_math.h): the index is
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


def image_size(value) -> tuple[int, int]:
    """``image_size`` of multi_scale_roi_align: a pair (height, width) of
    positive ints."""
    expected = "a pair of ints (height, width)"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"image_size must be {expected}, got {_given(value)}")
    size = tuple(_static_int("image_size", v, expected) for v in value)
    if min(size) <= 0:
        raise ValueError(f"image_size must be positive, got {value!r}")
    return size


def canonical(scale, level) -> tuple[int, int]:
    """``canonical_scale`` (a positive int) and ``canonical_level`` (an int)
    of multi_scale_roi_align: the FPN paper's 224 and k0 = 4."""
    scale = _static_int("canonical_scale", scale, "a positive int")
    if scale <= 0:
        raise ValueError(f"canonical_scale must be positive, got {scale}")
    return scale, _static_int("canonical_level", level, "an int")


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
             dtypes=None, position_sensitive: bool = True):
    """``input``: a 4-d float map in `data_format`; for the position-sensitive
    operators, one whose channel count is a multiple of h * w.

    `dtypes`, when given, are the dtypes with native kernels; otherwise any
    floating dtype is accepted (the jax.numpy reference).
    """
    array = jax.numpy.asarray(value)
    shape_name = "[N, C, H, W]" if data_format == "NCHW" else "[N, H, W, C]"
    if array.ndim != 4:
        raise ValueError(f"input must be a 4-d feature map {shape_name} "
                         f"(data_format={data_format!r}), got shape {array.shape}")
    if dtypes is not None and array.dtype not in dtypes:
        names = [jnp.dtype(d).name for d in dtypes]
        expected = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise TypeError(f"input must be {expected}, got {array.dtype}")
    if dtypes is None and not jax.numpy.issubdtype(array.dtype, jax.numpy.floating):
        raise TypeError(f"input must be a floating-point array, got {array.dtype}")
    ph, pw = pooled_size
    bins = ph * pw
    axis = channel_axis(data_format)
    channels = array.shape[axis]
    if position_sensitive and channels % bins:
        message = (f"input channels (axis {axis} of {shape_name}) must be a "
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


def call(input, boxes, size, scale, ratio, layout, order, dtypes=None,
         position_sensitive=True):
    """Every argument of a call of ``ps_roi_align`` (or, without `dtypes`, of
    its reference), in its signature's order, checked.

    Returns (features, rois [K, 5] in the compute dtype, params), params
    being the static parameters the primitives and the reference's ``pool``
    take: pooled_size, spatial_scale, sampling_ratio (not for ratio=None,
    the pools), data_format and channel_order.
    """
    pooled_size = output_size(size)
    layout = data_format(layout)
    checked = features(input, pooled_size, layout, dtypes, position_sensitive)
    rois = rois_from_boxes(boxes, compute_dtype(checked.dtype))
    params = dict(pooled_size=pooled_size, spatial_scale=spatial_scale(scale),
                  data_format=layout, channel_order=channel_order(order))
    if ratio is not None:  # None: an operator without one (the pools)
        params["sampling_ratio"] = sampling_ratio(ratio)
    return checked, rois, params


def compute_dtype(dtype):
    """The dtype the kernels compute in for features of `dtype`: float32 for
    the 16-bit types (box coordinates are never rounded to 16 bits), the
    dtype itself otherwise. Boxes are cast to it."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _box_array(value, dtype, what):
    try:
        return jnp.asarray(value, dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be an array of numbers, got {_given(value)}") from error


def rois_from_boxes(boxes: Boxes, dtype) -> jax.Array:
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
