"""Pure ``jax.numpy`` references of Position-Sensitive RoI Align and RoI Align.

``ps_roi_align_reference`` is the oracle of the tests of the native kernels
and of the XLA path (_xla_path.py, which shares its box geometry and
bilinear taps, ``box_geometry`` and ``axis_taps``, but sums by gathers).
``roi_align_reference`` is torchvision's
``roi_align`` on the same machinery, the oracle of ``roi_align``'s kernels;
the pools are in reference_pools.py.
It has the same semantics as the kernels, torchvision's plus the documented
safety deviations (docs/guides/torchvision.md), but is
written in a different shape so that the two check each other: instead of
visiting samples per output element, it builds, for every RoI and bin, dense
row and column weight vectors over the whole feature map (the sum of the
bilinear weights of the bin's samples) and contracts them with the features.
That contraction weighs every pixel of every image, so the references are
oracles for finite maps: one NaN or infinity anywhere makes every result NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jax_psroi import _arguments, _image_groups, _levels, _rounding
from jax_psroi._arguments import (
    MAX_GRID_PER_AXIS,
    Boxes,
    ChannelOrder,
    DataFormat,
    OutputSize,
)

# Every contraction at full precision: GPUs would otherwise run float32 ones
# in TF32 (10 mantissa bits), whatever the dtype the caller asked for.
_EXACT = lax.Precision.HIGHEST


def one_program(pool_fn, *arrays, **settings):
    """``pool_fn(*arrays, **settings)`` compiled as one program per shape and
    setting (settings: hashable Python values). Called eagerly, a reference
    would dispatch, and on every new shape compile, each of its dozens of
    ``jax.numpy`` operations, and its eager gradient each of theirs: seconds
    where one program takes a fraction of one. Inside a trace it is inlined
    like any ``jax.jit``."""
    return _one_program(pool_fn, tuple(sorted(settings.items())), *arrays)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_program(pool_fn, settings, *arrays):
    return pool_fn(*arrays, **dict(settings))


def grid_size(bin_size, sampling_ratio):
    """Samples per bin along one axis, int32 [K]: the ratio, or ceil(bin)."""
    if sampling_ratio > 0:
        return jnp.full(bin_size.shape, sampling_ratio, jnp.int32)
    g = jnp.ceil(bin_size)
    positive = g > 0  # False for NaN
    g = jnp.where(positive, jnp.minimum(g, MAX_GRID_PER_AXIS), 0)
    return g.astype(jnp.int32)


def sample_coordinates(bin_start, bin_size, grid, index):
    """Coordinate of sample ``index`` in torchvision's evaluation order (of
    no sample for an empty grid, whose coordinates are computed with a grid
    of 1 so that their discarded derivatives stay finite)."""
    dtype = bin_start.dtype
    grid = jnp.where(grid > 0, grid, 1)
    step = (index.astype(dtype) + 0.5) * bin_size
    return bin_start + _rounding.divide(step, grid.astype(dtype))


def first_sample_where(bin_start, bin_size, grid, holds, most=MAX_GRID_PER_AXIS):
    """First sample index (of grids of at most `most` samples) whose
    coordinate `holds` (a predicate on coordinates that, once true along a
    bin's samples, stays true), by binary search; the grid size where it
    holds for none."""
    lo = jnp.zeros(bin_start.shape, jnp.int32)
    hi = jnp.broadcast_to(grid, bin_start.shape)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        reached = holds(sample_coordinates(bin_start, bin_size, grid, mid))
        active = lo < hi
        return (jnp.where(active & ~reached, mid + 1, lo),
                jnp.where(active & reached, mid, hi))

    lo, _ = lax.fori_loop(0, most.bit_length(), step, (lo, hi))
    return lo


def first_in_map_sample(bin_start, bin_size, grid):
    """First sample index whose coordinate is >= -1, by binary search.

    Only used with adaptive sampling, where a bin holds at least one sample
    only if its size is positive, so coordinates increase with the index.
    """
    return first_sample_where(bin_start, bin_size, grid, lambda c: c >= -1)


def axis_taps(coord, inside, size):
    """The two bilinear taps of sample coordinates `coord` on an axis of
    `size` pixels, with torchvision's border rules (clamp to 0 below, to the
    last pixel above): int32 low and high pixels and their weights, all
    shaped like `coord`; weights 0 (and pixels 0) where `inside` is False."""
    # Not jnp.maximum: at a coordinate of exactly 0 its derivative is 1/2;
    # held at the border, the weights are constant (the kernels' convention).
    coord = jnp.where(inside & (coord > 0), coord, 0)
    low = jnp.floor(coord).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    frac = jnp.where(at_end, 0, coord - low.astype(coord.dtype))
    return low, high, jnp.where(inside, 1 - frac, 0), jnp.where(inside, frac, 0)


def _axis_weights(start, bin_size, grid, pooled, size, sampling_ratio):
    """Dense interpolation weights of every bin along one axis.

    Args:
      start, bin_size: [K] RoI start coordinate and bin size on this axis.
      grid: [K] int32 samples per bin on this axis.
      pooled: number of bins on this axis.
      size: feature map size on this axis.

    Returns:
      [K, pooled, size]: weight of each feature row (or column) in each bin,
      summed over the bin's samples that lie in [-1, size].
    """
    dtype = start.dtype
    num_rois = start.shape[0]
    if size == 0:
        # No pixel to weigh. Not the scatter below: differentiated, it
        # transposes to a gather of slices wider than the empty axis.
        return jnp.zeros((num_rois, pooled, 0), dtype)
    bins = jnp.arange(pooled, dtype=dtype)
    bin_start = bins[None, :] * bin_size[:, None] + start[:, None]  # [K, P]
    grid_kp = jnp.broadcast_to(grid[:, None], bin_start.shape)
    if sampling_ratio > 0:
        index = jnp.broadcast_to(jnp.arange(sampling_ratio, dtype=jnp.int32),
                                 (*bin_start.shape, sampling_ratio))
    else:
        # Consecutive adaptive samples are more than 0.5 apart (or alone in
        # their bin), so at most 2 * size + 3 of them fall in [-1, size].
        span = min(2 * size + 3, MAX_GRID_PER_AXIS)
        first = first_in_map_sample(bin_start, bin_size[:, None], grid_kp)
        index = first[..., None] + jnp.arange(span, dtype=jnp.int32)
    coord = sample_coordinates(bin_start[..., None], bin_size[:, None, None],
                                grid_kp[..., None], index)
    inside = (index < grid_kp[..., None]) & (coord >= -1) & (coord <= size)
    low, high, w_low, w_high = axis_taps(coord, inside, size)

    roi = jnp.arange(num_rois)[:, None, None]
    bin_index = jnp.arange(pooled)[None, :, None]
    weights = jnp.zeros((num_rois, pooled, size), dtype)
    weights = weights.at[roi, bin_index, low].add(w_low)
    return weights.at[roi, bin_index, high].add(w_high)


def ps_roi_align_reference(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
                           spatial_scale: float = 1.0, sampling_ratio: int = -1, *,
                           data_format: DataFormat = "NCHW",
                           channel_order: ChannelOrder = "torchvision") -> jax.Array:
    """PS-RoI Align in ``jax.numpy``: the same arguments, semantics and result
    as ``jax_psroi.ps_roi_align`` (torchvision's, with the documented safe
    deviations), for any floating dtype.

    Args:
      input: [N, C, H, W] (or [N, H, W, C] with ``data_format="NHWC"``)
        floating array, C = C_out * h * w.
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2), or a list of
        [L_i, 4] arrays of (x1, y1, x2, y2), one per image.
      output_size: int or (h, w).
      spatial_scale: box coordinates to feature-map pixels.
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      data_format: "NCHW" or "NHWC".
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).

    Returns:
      [K, C_out, h, w] (or [K, h, w, C_out]) array of the input's dtype.
    """
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, sampling_ratio, data_format,
        channel_order)
    return one_program(pool, features, rois, **params)


def roi_align_reference(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
                        spatial_scale: float = 1.0, sampling_ratio: int = -1,
                        aligned: bool = False, *,
                        data_format: DataFormat = "NCHW") -> jax.Array:
    """RoI Align in ``jax.numpy``: the arguments and semantics of
    ``torchvision.ops.roi_align``, with ps_roi_align's safe deviations (an
    RoI with a batch index outside [0, N) once truncated toward zero, or
    non-finite coordinates, gives 0),
    for any floating dtype. Differentiable (it is linear in ``input``, and
    JAX differentiates its boxes with the kernels' conventions).

    Args:
      input: [N, C, H, W] (or [N, H, W, C] with ``data_format="NHWC"``)
        floating array.
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2), or a list of
        [L_i, 4] arrays of (x1, y1, x2, y2), one per image.
      output_size: int or (h, w).
      spatial_scale: box coordinates to feature-map pixels.
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      aligned: False (torchvision's default): RoI sizes are clamped to at
        least 1 pixel and no half-pixel offset is applied; True: coordinates
        are shifted by -0.5 pixel and sizes are not clamped.
      data_format: "NCHW" or "NHWC".

    Returns:
      [K, C, h, w] (or [K, h, w, C]) array of the input's dtype.
    """
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, sampling_ratio, data_format,
        "torchvision", position_sensitive=False)
    del params["channel_order"]
    return one_program(pool_roi_align, features, rois, aligned=_arguments.aligned(aligned),
                       **params)


def pool(features, rois, pooled_size, spatial_scale, sampling_ratio, *,
         data_format="NCHW", channel_order="torchvision", image_groups=None):
    """The reference on checked arguments.

    Other layouts and channel orders are brought to NCHW and torchvision's
    order first: the oracle of those kernels is the permuted NCHW result.

    Args:
      features: [N, C, H, W] or [N, H, W, C], C = C_out * PH * PW.
      rois: [K, 5] of the features' compute dtype (float32 for 16-bit maps).
      pooled_size: (PH, PW) python ints.
      spatial_scale: python float.
      sampling_ratio: python int.
      data_format, channel_order: as in ``ps_roi_align_reference``.
      image_groups: which image each batch index counts from (the
        primitives' parameter, _image_groups.py); None: the index is the
        image.

    Returns:
      [K, C_out, PH, PW] (or [K, PH, PW, C_out]) array of the features' dtype.
    """
    nchw = to_nchw_torchvision_order(features, pooled_size, data_format, channel_order)
    pooled = _pool_nchw(nchw, rois.astype(nchw.dtype), pooled_size, spatial_scale,
                        sampling_ratio, offset=0.5, clamp=False, position_sensitive=True,
                        image_groups=image_groups)
    return from_nchw(pooled.astype(features.dtype), data_format)


def to_nchw_torchvision_order(features, pooled_size, data_format, channel_order):
    """The map in NCHW, torchvision's channel order and the compute dtype
    (16-bit maps are computed in float32 and rounded once, as the kernels
    do): the oracle of other layouts and orders is the permuted result."""
    features = features.astype(_arguments.compute_dtype(features.dtype))
    if data_format == "NHWC":
        features = features.transpose(0, 3, 1, 2)
    if channel_order == "bin_major":
        n, c, h, w = features.shape
        bins = pooled_size[0] * pooled_size[1]
        features = features.reshape(n, bins, c // bins, h, w).transpose(
            0, 2, 1, 3, 4).reshape(n, c, h, w)
    return features


def from_nchw(pooled, data_format):
    return pooled.transpose(0, 2, 3, 1) if data_format == "NHWC" else pooled


def pool_roi_align(features, rois, pooled_size, spatial_scale, sampling_ratio, aligned, *,
                   data_format="NCHW", image_groups=None):
    """``roi_align_reference`` on checked arguments: features [N, C, H, W]
    (or [N, H, W, C]), rois [K, 5] of the features' compute dtype (batch
    indices counting from their image group's first image, ``pool``);
    returns [K, C, PH, PW] (or [K, PH, PW, C]) of the features' dtype."""
    nchw = to_nchw_torchvision_order(features, pooled_size, data_format, "torchvision")
    pooled = _pool_nchw(nchw, rois.astype(nchw.dtype), pooled_size, spatial_scale,
                        sampling_ratio, offset=0.5 if aligned else 0.0, clamp=not aligned,
                        position_sensitive=False, image_groups=image_groups)
    return from_nchw(pooled.astype(features.dtype), data_format)


def _pool_nchw(features, rois, pooled_size, spatial_scale, sampling_ratio, *, offset,
               clamp, position_sensitive, image_groups):
    """Pooled [K, C_out, PH, PW] of an NCHW map in its compute dtype.

    offset: subtracted from every scaled coordinate (0.5 for ps_roi_align
      and aligned roi_align, 0 for torchvision's default roi_align).
    clamp: RoI sizes at least 1 pixel (roi_align with aligned=False).
    position_sensitive: bin (i, j) of output channel c reads input channel
      (c * PH + i) * PW + j (C_out = C / (PH * PW)); otherwise channel c.
    """
    pooled_h, pooled_w = pooled_size
    h, w = features.shape[2:]
    dtype = features.dtype
    start_h, start_w, bin_h, bin_w, finite = box_geometry(rois, pooled_size, spatial_scale,
                                                          offset=offset, clamp=clamp)
    grid_h = grid_size(bin_h, sampling_ratio)
    grid_w = grid_size(bin_w, sampling_ratio)

    image, batch_ok = image_of(rois, features.shape, image_groups)
    valid = batch_ok & finite & (grid_h > 0) & (grid_w > 0)

    count = grid_h.astype(dtype) * grid_w.astype(dtype)
    row_w = _axis_weights(start_h, bin_h, grid_h, pooled_h, h, sampling_ratio)
    col_w = _axis_weights(start_w, bin_w, grid_w, pooled_w, w, sampling_ratio)
    # Fold the average and the RoI's validity into the row weights.
    row_w = row_w * jnp.where(valid, 1 / jnp.where(valid, count, 1), 0)[:, None, None]

    return _contract(features, image, row_w, col_w, position_sensitive)


def box_geometry(rois, pooled_size, spatial_scale, *, offset, clamp):
    """Where each RoI [K, 5] starts and its bin size, per axis, in the RoIs'
    dtype: (start_h, start_w, bin_h, bin_w, finite), each [K]; the four
    values are 0 where the RoI's geometry is not finite (``finite`` False),
    so that its discarded weights are computed from zeros. `offset` and
    `clamp` as in ``_pool_nchw``."""
    pooled_h, pooled_w = pooled_size
    scale = jnp.asarray(spatial_scale, rois.dtype)
    start_w = rois[:, 1] * scale - offset
    start_h = rois[:, 2] * scale - offset
    end_w = rois[:, 3] * scale - offset
    end_h = rois[:, 4] * scale - offset
    size_w, size_h = end_w - start_w, end_h - start_h
    if clamp:
        # torchvision's std::max(size, 1): a NaN size stays NaN (and gives 0).
        size_w = jnp.where(size_w < 1, jnp.ones_like(size_w), size_w)
        size_h = jnp.where(size_h < 1, jnp.ones_like(size_h), size_h)
    bin_w = _rounding.divide(size_w, pooled_w)
    bin_h = _rounding.divide(size_h, pooled_h)
    finite = (jnp.isfinite(start_w) & jnp.isfinite(start_h)
              & jnp.isfinite(bin_w) & jnp.isfinite(bin_h))
    start_h, start_w, bin_h, bin_w = (jnp.where(finite, v, 0)
                                      for v in (start_h, start_w, bin_h, bin_w))
    return start_h, start_w, bin_h, bin_w, finite


def image_of(rois, features_shape, image_groups=None):
    """[K] int32 image each RoI reads (0 where it reads none) and [K] bool:
    does it read one. torchvision truncates the batch index toward zero,
    accepting (-1, N) (N: of its image group); a map without images or
    pixels has nothing to read."""
    n, _, h, w = features_shape
    image, batch_ok = _image_groups.images(rois, image_groups, n)
    return image, batch_ok & (h > 0 and w > 0)


def _contract(features, image, row_w, col_w, position_sensitive):
    """[K, C_out, PH, PW]: sum over y, x of row_w[k, p, y] * col_w[k, q, x]
    times RoI k's image's channel for bin (p, q) (see _pool_nchw) at (y, x)."""
    n, c, h, w = features.shape
    pooled_h, pooled_w = row_w.shape[1], col_w.shape[1]
    # select[k, n] picks RoI k's image; the contraction over images and
    # columns comes first so the largest intermediate is [K, C, H].
    select = jax.nn.one_hot(image, n, dtype=features.dtype)
    image_col_w = jnp.einsum("kn,kqx->knqx", select, col_w, precision=_EXACT)
    if not position_sensitive:
        by_row = jnp.einsum("knqx,ncyx->kcqy", image_col_w, features, precision=_EXACT)
        return jnp.einsum("kcqy,kpy->kcpq", by_row, row_w, precision=_EXACT)
    x = features.reshape(n, c // (pooled_h * pooled_w), pooled_h, pooled_w, h, w)
    by_row = jnp.einsum("knqx,nopqyx->kopqy", image_col_w, x, precision=_EXACT)
    return jnp.einsum("kopqy,kpy->kopq", by_row, row_w, precision=_EXACT)


def multi_scale_roi_align_reference(features: Sequence[ArrayLike], boxes: Boxes,
                                    output_size: OutputSize, sampling_ratio: int,
                                    image_size: tuple[int, int], *, canonical_scale: int = 224,
                                    canonical_level: int = 4,
                                    data_format: DataFormat = "NCHW") -> jax.Array:
    """Multi-scale RoI Align over a feature pyramid in ``jax.numpy``: what
    ``torchvision.ops.MultiScaleRoIAlign`` computes.

    Each level's spatial scale is inferred as torchvision infers it, 2 to the
    rounded log2 of (level height / image height); each RoI is pooled from
    the level of the FPN paper's eq. 1, floor(canonical_level +
    log2(sqrt(area) / canonical_scale) + 1e-6) clamped to the pyramid, with
    ``roi_align`` (``aligned=False``); an RoI whose level is NaN (negative
    area, non-finite coordinates) gives 0, as in torchvision.

    Args:
      features: sequence of [N, C, H_l, W_l] (or [N, H_l, W_l, C]) maps, the
        finest first, of one dtype and channel count.
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2), or a list of
        [L_i, 4] arrays of (x1, y1, x2, y2), one per image, in image pixels.
      output_size: int or (h, w).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      image_size: (height, width) of the (padded) input images: torchvision's
        maximum over ``image_shapes``.
      canonical_scale, canonical_level: eq. 1's 224 and k0 = 4.
      data_format: "NCHW" or "NHWC".

    Returns:
      [K, C, h, w] (or [K, h, w, C]) array of the maps' dtype. The reference
      pools every RoI at every level and keeps its own level's result.
    """
    layout = _arguments.data_format(data_format)
    levels = _arguments.pyramid(features, _arguments.output_size(output_size), layout)
    scales = _levels.level_scales([level.shape for level in levels], image_size, layout)
    pooled = [roi_align_reference(level, boxes, output_size, scale, sampling_ratio,
                                  data_format=layout)
              for level, scale in zip(levels, scales, strict=True)]
    if len(levels) == 1:
        return pooled[0]
    rois = _arguments.rois_from_boxes(boxes, _arguments.compute_dtype(pooled[0].dtype))
    level_of = _levels.roi_levels(rois, scales, canonical_scale, canonical_level)  # [K]
    result = jnp.zeros_like(pooled[0])  # an RoI of no level gives 0
    for index, level_result in enumerate(pooled):
        chosen = (level_of == index).reshape(-1, 1, 1, 1)
        result = jnp.where(chosen, level_result, result)
    return result
