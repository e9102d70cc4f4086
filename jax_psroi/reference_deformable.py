"""Deformable RoI Align and PS-RoI Align in ``jax.numpy``: the oracle of the
native kernels (lib/deformable.h) and of the XLA path (_xla_path.py), whose
sampling parameters are this module's.

Each bin (ph, pw) of RoI k samples as the plain operator's (reference.py:
-0.5 pixel, no size clamp, the adaptive grid of its RoI's bin size) from a
start moved by ``gamma * size * offset[k, :, ph, pw]`` (x, then y; size the
RoI's extent on the map). Its rows and columns get dense weight vectors over
the map (the sum of its samples' bilinear weights, reference.py's
``axis_taps``), contracted with the features. Differentiable in the
features, the boxes and the offsets, with the kernels' conventions where
it is not (the piece to the right at integer sample coordinates, zero at
the border rules).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jax_psroi import _arguments, reference
from jax_psroi._arguments import MAX_GRID_PER_AXIS, Boxes, ChannelOrder, DataFormat, OutputSize

_EXACT = lax.Precision.HIGHEST


def _bin_weights(bin_start, bin_size, grid, size, sampling_ratio):
    """[M, size]: each bin's weight of every row (or column) of an axis of
    `size` pixels, for bins starting at `bin_start` [M] with sizes
    `bin_size` [M] and grids `grid` [M] int32."""
    if size == 0:  # as reference._axis_weights: no scatter into an empty axis
        return jnp.zeros((bin_start.shape[0], 0), bin_start.dtype)
    if sampling_ratio > 0:
        index = jnp.broadcast_to(jnp.arange(sampling_ratio, dtype=jnp.int32),
                                 (*bin_start.shape, sampling_ratio))
    else:
        span = min(2 * size + 3, MAX_GRID_PER_AXIS)  # in-map adaptive samples
        first = reference.first_in_map_sample(bin_start, bin_size, grid)
        index = first[:, None] + jnp.arange(span, dtype=jnp.int32)
    coord = reference.sample_coordinates(bin_start[:, None], bin_size[:, None], grid[:, None],
                                         index)
    inside = (index < grid[:, None]) & (coord >= -1) & (coord <= size)
    low, high, w_low, w_high = reference.axis_taps(coord, inside, size)
    rows = jnp.arange(bin_start.shape[0])[:, None]
    weights = jnp.zeros((bin_start.shape[0], size), bin_start.dtype)
    return weights.at[rows, low].add(w_low).at[rows, high].add(w_high)


def sampling_parameters(rois, offset, pooled_size, spatial_scale, gamma):
    """Every bin's start (x, y: [K, PH, PW]), every RoI's bin sizes (x, y:
    [K]), in the RoIs' dtype: what the kernels' derivative directions
    differentiate (box_parameter 1 to 4: x start, bin width, y start, bin
    height); and where they are finite: [K] for the RoI's own geometry,
    [K, PH, PW] for each bin's moved start. A bin whose moved start is not
    finite reads nothing; its start is computed from a zero offset, so that
    no derivative multiplies an infinity by 0."""
    start_y, start_x, bin_h, bin_w, finite = reference.box_geometry(
        rois, pooled_size, spatial_scale, offset=0.5, clamp=False)
    scale = jnp.asarray(spatial_scale, rois.dtype)
    half = jnp.asarray(0.5, rois.dtype)
    size_w = (rois[:, 3] * scale - half) - (rois[:, 1] * scale - half)
    size_h = (rois[:, 4] * scale - half) - (rois[:, 2] * scale - half)
    gamma = jnp.asarray(gamma, rois.dtype)
    offset = offset.astype(rois.dtype)
    starts, moved = [], finite[:, None, None]
    for start, size, bin_offset in ((start_x, size_w, offset[:, 0]),
                                    (start_y, size_h, offset[:, 1])):
        size = jnp.where(finite, size, 0)[:, None, None]
        ok = jnp.isfinite(start[:, None, None] + gamma * size * bin_offset)
        starts.append(start[:, None, None] + gamma * size * jnp.where(ok, bin_offset, 0))
        moved = moved & ok
    return starts[0], bin_w, starts[1], bin_h, finite, moved


def pool_nchw(features, rois, offset, pooled_size, spatial_scale, sampling_ratio, gamma, *,
              position_sensitive, image_groups=None):
    """Pooled [K, C_out, PH, PW] of an NCHW map in torchvision's channel
    order and its compute dtype."""
    n, c, height, width = features.shape
    pooled_h, pooled_w = pooled_size
    num_rois = rois.shape[0]
    dtype = features.dtype
    start_x, bin_w, start_y, bin_h, _, moved = sampling_parameters(
        rois, offset, pooled_size, spatial_scale, gamma)
    grid_h = reference.grid_size(bin_h, sampling_ratio)
    grid_w = reference.grid_size(bin_w, sampling_ratio)
    image, batch_ok = reference.image_of(rois, features.shape, image_groups)
    valid = (batch_ok & (grid_h > 0) & (grid_w > 0))[:, None, None] & moved  # [K, PH, PW]
    bins = pooled_h * pooled_w

    def per_bin(values):
        return jnp.broadcast_to(values[:, None, None], (num_rois, pooled_h, pooled_w))

    def axis(start, bin_size, grid, index, size):
        bin_start = index.astype(dtype) * per_bin(bin_size) + jnp.where(valid, start, 0)
        return _bin_weights(bin_start.reshape(-1), per_bin(bin_size).reshape(-1),
                            per_bin(grid).reshape(-1), size, sampling_ratio)

    ph_index = jnp.arange(pooled_h)[None, :, None]
    pw_index = jnp.arange(pooled_w)[None, None, :]
    count = grid_h.astype(dtype) * grid_w.astype(dtype)  # int32 would overflow
    scale = jnp.where(valid, (1 / jnp.where(count > 0, count, 1))[:, None, None], 0)
    row_w = (axis(start_y.astype(dtype), bin_h.astype(dtype), grid_h, ph_index, height)
             * scale.reshape(-1, 1)).reshape(num_rois, bins, height)
    col_w = axis(start_x.astype(dtype), bin_w.astype(dtype), grid_w, pw_index,
                 width).reshape(num_rois, bins, width)
    select = jax.nn.one_hot(image, n, dtype=dtype)
    image_col_w = jnp.einsum("kn,kbx->knbx", select, col_w, precision=_EXACT)
    if position_sensitive:
        x = features.reshape(n, c // bins, bins, height, width)
        by_row = jnp.einsum("knbx,nobyx->koby", image_col_w, x, precision=_EXACT)
    else:
        by_row = jnp.einsum("knbx,ncyx->kcby", image_col_w, features, precision=_EXACT)
    pooled = jnp.einsum("koby,kby->kob", by_row, row_w, precision=_EXACT)
    return pooled.reshape(num_rois, pooled.shape[1], pooled_h, pooled_w)  # K may be 0


def pool(features, rois, offset, *, pooled_size, spatial_scale, sampling_ratio, gamma,
         data_format, channel_order, image_groups=None):
    """The reference on checked arguments: features [N, C, H, W] (or
    [N, H, W, C]), rois [K, 5] and offsets [K, 2, PH, PW] in the compute
    dtype; channel_order "shared" (deform_roi_align) or a position-sensitive
    order. Returns [K, C_out, PH, PW] (or [K, PH, PW, C_out]) in the
    features' dtype."""
    position_sensitive = channel_order != "shared"
    nchw = reference.to_nchw_torchvision_order(
        features, pooled_size, data_format,
        channel_order if position_sensitive else "torchvision")
    pooled = pool_nchw(nchw, rois.astype(nchw.dtype), offset.astype(nchw.dtype), pooled_size,
                       spatial_scale, sampling_ratio, gamma,
                       position_sensitive=position_sensitive, image_groups=image_groups)
    return reference.from_nchw(pooled.astype(features.dtype), data_format)


def _call(input, boxes, offset, output_size, spatial_scale, sampling_ratio, gamma,
          data_format, channel_order):
    position_sensitive = channel_order != "shared"
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, sampling_ratio, data_format,
        channel_order if position_sensitive else "torchvision",
        position_sensitive=position_sensitive)
    params["channel_order"] = channel_order
    shape = (rois.shape[0], 2, *params["pooled_size"])
    offset = jnp.zeros(shape, rois.dtype) if offset is None else jnp.asarray(offset, rois.dtype)
    if offset.shape != shape:
        raise ValueError(f"offset must be [K, 2, h, w] = {list(shape)}, got {list(offset.shape)}")
    return reference.one_program(pool, features, rois, offset, gamma=float(gamma), **params)


def deform_roi_align_reference(input: ArrayLike, boxes: Boxes, offset: ArrayLike | None,
                               output_size: OutputSize, spatial_scale: float = 1.0,
                               sampling_ratio: int = -1, gamma: float = 0.1, *,
                               data_format: DataFormat = "NCHW") -> jax.Array:
    """``jax_psroi.deform_roi_align`` in ``jax.numpy``: the same arguments,
    semantics and result ([K, C, h, w], or [K, h, w, C]), differentiable in
    the features, boxes and offsets."""
    return _call(input, boxes, offset, output_size, spatial_scale, sampling_ratio, gamma,
                 data_format, "shared")


def deform_ps_roi_align_reference(input: ArrayLike, boxes: Boxes, offset: ArrayLike | None,
                                  output_size: OutputSize, spatial_scale: float = 1.0,
                                  sampling_ratio: int = -1, gamma: float = 0.1, *,
                                  data_format: DataFormat = "NCHW",
                                  channel_order: ChannelOrder = "torchvision") -> jax.Array:
    """``jax_psroi.deform_ps_roi_align`` in ``jax.numpy`` ([K, C_out, h, w],
    or [K, h, w, C_out])."""
    return _call(input, boxes, offset, output_size, spatial_scale, sampling_ratio, gamma,
                 data_format, _arguments.channel_order(channel_order))
