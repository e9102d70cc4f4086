"""Pure ``jax.numpy`` references of the RoI pools: Position-Sensitive RoI
Pool (window averages) and RoI Pool (window maxima).

Both pool windows of whole pixels: box corners are rounded (half away from
zero, as C's ``round``), bin p of an axis covers pixels
[floor(p * bin_size), ceil((p + 1) * bin_size)) past the rounded start, and
windows are clipped to the map. They are the oracles of the native kernels
and of the XLA path (which takes its windows from ``bin_windows``); like the
RoI Align references they are not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jax_psroi import _arguments, _rounding
from jax_psroi._arguments import Boxes, ChannelOrder, DataFormat, OutputSize
from jax_psroi.reference import (
    _contract,
    from_nchw,
    image_of,
    one_program,
    to_nchw_torchvision_order,
)


def ps_roi_pool_reference(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
                          spatial_scale: float = 1.0, *, data_format: DataFormat = "NCHW",
                          channel_order: ChannelOrder = "torchvision") -> jax.Array:
    """Position-Sensitive RoI Pool in ``jax.numpy``: the arguments and
    forward of ``torchvision.ops.ps_roi_pool`` (the average of each bin's
    window of whole pixels), with the channel orders and layouts of
    ``ps_roi_align`` and its safe deviations (a batch index outside [0, N)
    once truncated toward zero, or non-finite coordinates, give 0). Its
    gradient is the adjoint of this forward, which torchvision's is not
    (docs/guides/torchvision.md).

    Args:
      input: [N, C, H, W] (or [N, H, W, C] with ``data_format="NHWC"``)
        floating array, C = C_out * h * w.
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2), or a list of
        [L_i, 4] arrays of (x1, y1, x2, y2), one per image.
      output_size: int or (h, w).
      spatial_scale: box coordinates to feature-map pixels.
      data_format: "NCHW" or "NHWC".
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).

    Returns:
      [K, C_out, h, w] (or [K, h, w, C_out]) array of the input's dtype.
    """
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, _arguments.NO_SAMPLING_RATIO, data_format,
        channel_order)
    return one_program(pool_ps_roi_pool, features, rois, **params)


def pool_ps_roi_pool(features, rois, pooled_size, spatial_scale, *, data_format="NCHW",
                     channel_order="torchvision", image_groups=None):
    """``ps_roi_pool_reference`` on checked arguments: features
    [N, C, H, W] (or [N, H, W, C]), rois [K, 5] of the features' compute
    dtype; returns [K, C_out, PH, PW] (or [K, PH, PW, C_out]) of the
    features' dtype."""
    nchw = to_nchw_torchvision_order(features, pooled_size, data_format, channel_order)
    pooled = _ps_roi_pool_nchw(nchw, rois.astype(nchw.dtype), pooled_size, spatial_scale,
                               image_groups)
    return from_nchw(pooled.astype(features.dtype), data_format)


def roi_pool_reference(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
                       spatial_scale: float = 1.0, *,
                       data_format: DataFormat = "NCHW") -> jax.Array:
    """RoI Pool in ``jax.numpy``: the arguments and semantics of
    ``torchvision.ops.roi_pool`` (the maximum of each bin's window of whole
    pixels; an empty window gives 0), with the layouts of ``ps_roi_align``
    and its safe deviations (a batch index outside [0, N) once truncated
    toward zero, or non-finite coordinates, give 0). The gradient of each
    output goes to its window's first maximum in row-major order, as
    torchvision records it: the operator is piecewise linear, and
    differentiable to any order.

    Args:
      input: [N, C, H, W] (or [N, H, W, C] with ``data_format="NHWC"``)
        floating array.
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2), or a list of
        [L_i, 4] arrays of (x1, y1, x2, y2), one per image.
      output_size: int or (h, w).
      spatial_scale: box coordinates to feature-map pixels.
      data_format: "NCHW" or "NHWC".

    Returns:
      [K, C, h, w] (or [K, h, w, C]) array of the input's dtype.
    """
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, _arguments.NO_SAMPLING_RATIO, data_format,
        "torchvision", position_sensitive=False)
    return one_program(pool_roi_pool, features, rois, pooled_size=params["pooled_size"],
                       spatial_scale=params["spatial_scale"], data_format=data_format)[0]


def pool_roi_pool(features, rois, pooled_size, spatial_scale, *, data_format="NCHW",
                  image_groups=None):
    """``roi_pool_reference`` on checked arguments: features [N, C, H, W]
    (or [N, H, W, C]), rois [K, 5] of the features' compute dtype; returns
    the pooled tensor [K, C, PH, PW] (or [K, PH, PW, C]) of the features'
    dtype and, shaped like it, the int32 pixel y * W + x of each maximum
    (-1 for none), as the native kernels record them."""
    nchw = to_nchw_torchvision_order(features, pooled_size, data_format, "torchvision")
    pooled, pixels = _roi_pool_nchw(nchw, rois.astype(nchw.dtype), pooled_size,
                                    spatial_scale, image_groups)
    return (from_nchw(pooled.astype(features.dtype), data_format),
            from_nchw(pixels, data_format))


def values_at_pixels(features, rois, pixels, *, data_format="NCHW", image_groups=None):
    """RoI Pool's output as a function of the features at recorded pixels
    (see ``pool_roi_pool``): [K, C, PH, PW] (or [K, PH, PW, C]), 0 where no
    pixel was recorded. Linear in the features."""
    nchw = features.transpose(0, 3, 1, 2) if data_format == "NHWC" else features
    if data_format == "NHWC":
        pixels = pixels.transpose(0, 3, 1, 2)
    n, c, h, w = nchw.shape
    if n * h * w == 0:  # no pixel was recorded
        return from_nchw(jnp.zeros(pixels.shape, nchw.dtype), data_format)
    image, batch_ok = image_of(rois, nchw.shape, image_groups)
    found = (pixels >= 0) & (pixels < h * w) & batch_ok[:, None, None, None]
    safe = jnp.where(found, pixels, 0)
    channel = jnp.arange(c)[None, :, None, None]
    values = nchw[image[:, None, None, None], channel, safe // w, safe % w]
    return from_nchw(jnp.where(found, values, jnp.zeros((), nchw.dtype)), data_format)


def _c_round(x):
    """C's round(): halves away from zero (jnp.round takes them to even).
    x - trunc(x) is exact, so no sum rounds a value across the half."""
    whole = jnp.trunc(x)
    return jnp.where(jnp.abs(x - whole) >= 0.5, whole + jnp.sign(x), whole)


def inclusive_extent(start, end):
    """end - start + 1 for whole-number corners, rounded once, as
    torchvision's int arithmetic and its conversion give it (two roundings
    lose the 1 past 2^24 pixels in float32): the difference's rounding
    error, a whole number a two-sum recovers exactly, is added back with
    the 1. A non-finite difference stays as the plain sum gives it.
    lib/roi_math.h, inclusive_extent, is the same computation."""
    one = jnp.ones((), start.dtype)
    difference = end - start
    end_part = difference + start
    start_part = difference - end_part
    error = (end - end_part) + (-start - start_part)
    return jnp.where(jnp.isfinite(difference), difference + (error + one), difference + one)


def bin_windows(rois, scale, pooled, size, axis, *, inclusive_end, last):
    """First and end pixel [K, pooled] of each bin's window along one axis.

    axis: 1 for x (columns), 2 for y (rows) in the RoIs' (b, x1, y1, x2, y2).
    inclusive_end: the RoI spans end - start + 1 pixels (roi_pool) rather
      than end - start (ps_roi_pool); at least 1 either way.
    last: the largest first or end pixel (size for roi_pool; size - 1 for
      ps_roi_pool's forward, which so never reads the last row or column).

    Also returns [K] bool: are the RoI's coordinates finite.
    """
    start = _c_round(rois[:, axis] * scale)
    end = _c_round(rois[:, axis + 2] * scale)
    extent = inclusive_extent(start, end) if inclusive_end else end - start
    # std::max(extent, 1); a NaN extent stays NaN and the RoI gives 0.
    extent = jnp.where(extent < 1, jnp.ones_like(extent), extent)
    bin_size = _rounding.divide(extent, pooled)
    finite = jnp.isfinite(start) & jnp.isfinite(bin_size)
    start, bin_size = jnp.where(finite, start, 0), jnp.where(finite, bin_size, 0)
    bins = jnp.arange(pooled, dtype=start.dtype)[None, :]
    first = jnp.clip(jnp.floor(bins * bin_size[:, None]) + start[:, None], 0, last)
    stop = jnp.clip(jnp.ceil((bins + 1) * bin_size[:, None]) + start[:, None], 0, last)
    return first, stop, finite


def _ps_roi_pool_nchw(features, rois, pooled_size, spatial_scale, image_groups):
    """[K, C_out, PH, PW] window averages of an NCHW map in torchvision's
    channel order, in its compute dtype."""
    pooled_h, pooled_w = pooled_size
    h, w = features.shape[2:]
    dtype = features.dtype
    scale = jnp.asarray(spatial_scale, dtype)
    first_y, stop_y, finite_y = bin_windows(rois, scale, pooled_h, h, 2, inclusive_end=False,
                                         last=h - 1)
    first_x, stop_x, finite_x = bin_windows(rois, scale, pooled_w, w, 1, inclusive_end=False,
                                         last=w - 1)
    image, batch_ok = image_of(rois, features.shape, image_groups)
    valid = (batch_ok & finite_y & finite_x).astype(dtype)

    def weights(first, stop, size):  # [K, P, size]: 1 on the window's pixels
        pixel = jnp.arange(size, dtype=dtype)
        return ((pixel >= first[..., None]) & (pixel < stop[..., None])).astype(dtype)

    row_w = weights(first_y, stop_y, h) * valid[:, None, None]
    col_w = weights(first_x, stop_x, w)
    rows = jnp.maximum(stop_y - first_y, 0)
    cols = jnp.maximum(stop_x - first_x, 0)
    area = (rows[:, :, None] * cols[:, None, :])[:, None]  # [K, 1, PH, PW]
    sums = _contract(features, image, row_w, col_w, position_sensitive=True)
    # An empty window gives 0, as in torchvision.
    return jnp.where(area > 0, sums / jnp.where(area > 0, area, 1), 0)


def _roi_pool_nchw(features, rois, pooled_size, spatial_scale, image_groups):
    """[K, C, PH, PW] window maxima of an NCHW map, in its compute dtype, and
    [K, C, PH, PW] int32 pixels y * W + x they came from (-1: none).

    torchvision scans a window row by row from maxval = -FLT_MAX, taking a
    value when it is strictly greater: the first maximum in row-major order
    among values above -FLT_MAX (NaNs never), or -FLT_MAX with no arg-max
    when there is none. Here a scan over columns finds each row's first
    maximum within each bin's columns, then a scan over rows the first row
    holding the window's maximum: the same element. The result is gathered
    at that element, so the gradient flows to it alone.
    """
    pooled_h, pooled_w = pooled_size
    num_rois = rois.shape[0]
    n, c, h, w = features.shape
    dtype = features.dtype
    if n * h * w == 0:  # nothing to read: every RoI gives 0 and records no pixel
        shape = (num_rois, c, pooled_h, pooled_w)
        return jnp.zeros(shape, dtype), jnp.full(shape, -1, jnp.int32)
    scale = jnp.asarray(spatial_scale, dtype)
    first_y, stop_y, finite_y = bin_windows(rois, scale, pooled_h, h, 2, inclusive_end=True,
                                         last=h)
    first_x, stop_x, finite_x = bin_windows(rois, scale, pooled_w, w, 1, inclusive_end=True,
                                         last=w)
    image, batch_ok = image_of(rois, features.shape, image_groups)
    valid = batch_ok & finite_y & finite_x
    # The arg-max search sees no gradient; the result is a gather below.
    values = lax.stop_gradient(features)
    lowest = jnp.asarray(-np.finfo(np.float32).max, dtype)  # torchvision's -FLT_MAX

    def column_step(carry, x):  # carry: [K, PW, C, H] best value, its column
        best, at = carry
        column = values[image, :, :, x]  # [K, C, H]
        inside = (x >= first_x) & (x < stop_x)  # [K, PW]
        better = inside[:, :, None, None] & (column[:, None] > best)
        return (jnp.where(better, column[:, None], best), jnp.where(better, x, at)), None

    (row_best, row_at), _ = lax.scan(
        column_step, (jnp.full((num_rois, pooled_w, c, h), lowest, dtype),
                      jnp.full((num_rois, pooled_w, c, h), -1, jnp.int32)),
        jnp.arange(w, dtype=jnp.int32))

    def row_step(carry, y):  # carry: [K, PH, PW, C] best value, its pixel
        best, at = carry
        inside = (y >= first_y) & (y < stop_y)  # [K, PH]
        # Row y's first maximum in each bin's columns: [K, 1, PW, C].
        candidate = row_best[:, None, :, :, y]
        column = row_at[:, None, :, :, y]
        better = inside[:, :, None, None] & (column >= 0) & (candidate > best)
        return (jnp.where(better, candidate, best),
                jnp.where(better, y * w + column, at)), None

    (_, pixel), _ = lax.scan(
        row_step, (jnp.full((num_rois, pooled_h, pooled_w, c), lowest, dtype),
                   jnp.full((num_rois, pooled_h, pooled_w, c), -1, jnp.int32)),
        jnp.arange(h, dtype=jnp.int32))
    pixel = pixel.transpose(0, 3, 1, 2)  # [K, C, PH, PW]

    valid = valid[:, None, None, None]
    pixel = jnp.where(valid, pixel, -1)  # an RoI that reads nothing records none
    found = pixel >= 0
    safe = jnp.where(found, pixel, 0)
    channel = jnp.arange(c)[None, :, None, None]
    gathered = features[image[:, None, None, None], channel, safe // w, safe % w]
    rows = stop_y - first_y
    cols = stop_x - first_x
    empty = ((rows[:, :, None] <= 0) | (cols[:, None, :] <= 0))[:, None]  # [K, 1, PH, PW]
    # A window with nothing above -FLT_MAX gives -FLT_MAX, an empty one 0.
    out = jnp.where(found, gathered, jnp.where(empty, 0, lowest).astype(dtype))
    return jnp.where(valid, out, 0), pixel
