"""The XLA path: every operator, forward and backward, in plain XLA
operations (gathers, scatter-adds and loops), for every platform without
native kernels (TPU, ROCm, a CUDA machine whose install lacks jax_psroi's
CUDA kernels, any machine without the compiled module) and wherever
``JAX_PSROI_IMPLEMENTATION=xla`` asks for it (_implementation.py).

A bin's value is separable, as in the CPU kernels (lib/roi_math.h): the
sum over the bin's row taps r and column taps c of weight_y[r] * weight_x[c]
* plane[r, c], over the divisor (samples, or a window's pixels). Each axis
of every bin is a list of taps (``_Taps``): a pixel and a weight per RoI and
bin, tap j read by ``at(j)``. A loop over the row taps and, inside it, the
column taps gathers one value per output element per step and adds it with
its weight: the memory is a few pooled tensors, whatever the grid; the
backward (the transpose, written directly) scatter-adds the same weighted
cotangents in the same loop. The tap lists:

* a fixed grid of at most ``_SAMPLE_TAPS_GRID`` samples per axis: the low
  and high tap of every sample, computed in the loop (torchvision's
  per-sample taps; a static count, whatever the RoI's size);
* adaptive sampling (ceil(bin size) samples, known at run time) and larger
  fixed grids: the weight of every pixel of the axis summed over the bin's
  samples on the map, a table [K, bins, size] built by a loop over chunks
  of samples (the in-map ones alone with adaptive grids, found by binary
  search, so huge boxes cost no more than the map; chunk sums added with
  Kahan's compensation, so that millions of samples in a pixel do not drift
  in float32), read over the run-time span of pixels the bins touch;
* windows of whole pixels (the pools): the window's pixels, weight 1.

Deformable RoI Align's bins each start where their offsets move them: each
bin has taps of its own on both axes (``_Bins.per_bin``).

A loop runs as many steps as the widest bin among the RoIs it serves, and a
table holds every RoI's bins; so where the tap counts are known only at run
time (tables, windows), a call's RoIs run in up to 16 equal blocks sorted
by their cost, costliest first, in one loop (``_RoiBlocks``): a box
spanning the map takes its steps with the RoIs of its block, not with every
RoI, and the tables' memory is bounded by a budget per block.

RoI Pool's maxima scan each window row by row with the same loop, keeping
the first strictly greater value and its pixel as torchvision does; its
tangent gathers at the recorded pixels and its gradient scatter-adds there.

Summation order: the forward adds the taps' products one tap pair at a time
(the kernels add a sample's four taps, or in the separable form a row's
columns, before the next), so float32 results differ from the kernels' in
the last bits, within the tests' tolerances; 16-bit maps are gathered in
16 bits and summed in float32, as the kernels do. RoIs that read nothing
(bad batch index, non-finite geometry, an empty adaptive grid) give exactly
0 and send exactly 0 to the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_psroi import _arguments, _image_groups, _levels, reference_deformable
from jax_psroi._operators import ROI_ALIGN, ROI_POOL, BoxRule
from jax_psroi.reference import (
    MAX_GRID_PER_AXIS,
    axis_taps,
    box_geometry,
    first_in_map_sample,
    first_sample_where,
    grid_size,
    sample_coordinates,
)
from jax_psroi.reference_pools import bin_windows

# Fixed grids up to this many samples per axis read their samples' taps
# directly: (2 * ratio)^2 gathers per bin whatever its size, where a table
# of pixels costs the square of the widest bin's span.
_SAMPLE_TAPS_GRID = 4
# Samples per step of a table's loop: adaptive grids hold a few samples per
# bin axis (ceil of the bin size); large fixed grids up to 2^23.
_ADAPTIVE_CHUNK = 16
_FIXED_CHUNK = 256
# RoIs whose taps are counted at run time run in equal blocks, costliest
# first (_RoiBlocks): at most _MOST_BLOCKS, of at least _SMALLEST_BLOCK
# RoIs, unless a block's weight tables would exceed _TABLE_BUDGET bytes.
_MOST_BLOCKS = 16
_SMALLEST_BLOCK = 64
_TABLE_BUDGET = 32 << 20
# torchvision's -FLT_MAX: where RoI Pool's scan starts.
_LOWEST = float(-np.finfo(np.float32).max)


class _Taps(NamedTuple):
    """One axis of every bin of every RoI as a list of taps: ``count`` (a
    Python int or an int32 scalar known at run time) taps, ``at(j)`` giving
    tap j's pixels [K, P] (int32, on the axis) and weights [K, P] (0 for a
    tap past a bin's own list)."""
    count: int | jax.Array
    at: Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _run_time_count(counts, valid):
    """The largest of `counts` [K, P] over valid RoIs `valid` [K]: a loop's
    trip count, which RoIs that read nothing do not lengthen."""
    return jnp.max(jnp.where(valid[:, None], counts, 0), initial=0).astype(jnp.int32)


def _sample_taps(bin_start, bin_size, ratio, size) -> _Taps:
    """The taps of a fixed grid of `ratio` samples per bin: for bin_start
    [K, P] and bin_size [K, 1], the low and then the high tap of each
    sample (weight 0 off the map)."""
    grid = jnp.full(bin_start.shape, ratio, jnp.int32)

    def at(j):
        index = jnp.broadcast_to(j // 2, bin_start.shape).astype(jnp.int32)
        coord = sample_coordinates(bin_start, bin_size, grid, index)
        low, high, w_low, w_high = axis_taps(coord, (coord >= -1) & (coord <= size), size)
        high_tap = j % 2 == 1
        return jnp.where(high_tap, high, low), jnp.where(high_tap, w_high, w_low)

    return _Taps(2 * ratio, at)


def _fixed_grid_on_map(bin_start, bin_size, ratio, size):
    """The first sample of each bin of a fixed grid of `ratio` samples whose
    coordinate lies in [-1, size], and how many follow it there ([K, P]
    int32 each), by binary searches: the coordinates run monotonically with
    the index (downwards in an inverted box of aligned roi_align), so the
    samples on the map are one run, which may be a few of millions."""
    grid = jnp.full(bin_start.shape, ratio, jnp.int32)
    rising = jnp.broadcast_to(bin_size >= 0, bin_start.shape)

    def first_where(holds):  # NaN coordinates never hold: an empty run
        return first_sample_where(bin_start, bin_size, grid, holds, most=ratio)

    first = first_where(lambda c: jnp.where(rising, c >= -1, c <= size))
    end = first_where(lambda c: jnp.where(rising, c > size, c < -1))
    return first, jnp.maximum(end - first, 0)


def _pixel_weights(bin_start, bin_size, grid, ratio, size, valid):
    """The table of each bin's pixels along the axis: [K, P, size] weights,
    summed over the bin's samples on the map (those of a fixed grid, found
    by _fixed_grid_on_map; from the first on the map, at most 2 * size + 3
    of an adaptive one, as the reference visits them), and [K, P] int32,
    the first and the last pixel those samples tap, whatever its weight
    (size and -1: none)."""
    num_rois, bins = bin_start.shape
    if ratio > 0:
        first, samples = _fixed_grid_on_map(bin_start, bin_size, ratio, size)
        chunk = min(ratio, _FIXED_CHUNK)
    else:
        first = first_in_map_sample(bin_start, bin_size, grid)
        samples = jnp.minimum(grid - first, min(2 * size + 3, MAX_GRID_PER_AXIS))
        chunk = _ADAPTIVE_CHUNK
    samples = jnp.where(valid[:, None], samples, 0)
    steps = (_run_time_count(samples, valid) + chunk - 1) // chunk
    roi = jnp.arange(num_rois)[:, None, None]
    bin_index = jnp.arange(bins)[None, :, None]
    zeros = jnp.zeros((num_rois, bins, size), bin_start.dtype)

    def add_chunk(step, carry):
        total, compensation, first_tap, last_tap = carry
        offset = step * chunk + jnp.arange(chunk, dtype=jnp.int32)
        index = first[..., None] + offset
        coord = sample_coordinates(bin_start[..., None], bin_size[..., None],
                                    grid[..., None], index)
        inside = (offset < samples[..., None]) & (coord >= -1) & (coord <= size)
        low, high, w_low, w_high = axis_taps(coord, inside, size)
        part = zeros.at[roi, bin_index, low].add(w_low).at[roi, bin_index, high].add(w_high)
        first_tap = jnp.minimum(first_tap, jnp.min(jnp.where(inside, low, size), axis=-1))
        last_tap = jnp.maximum(last_tap, jnp.max(jnp.where(inside, high, -1), axis=-1))
        # Kahan's compensated sum of the chunks.
        addend = part - compensation
        summed = total + addend
        return summed, (summed - total) - addend, first_tap, last_tap

    none = jnp.full(bin_start.shape, size, jnp.int32), jnp.full(bin_start.shape, -1, jnp.int32)
    weights, _, first_tap, last_tap = lax.fori_loop(0, steps, add_chunk, (zeros, zeros, *none))
    return weights, first_tap, last_tap


def _table_taps(table, valid) -> _Taps:
    """The taps of a table of pixels (_pixel_weights): the span from the
    first to the last pixel a sample taps. Not the last of nonzero weight: a
    sample on a whole pixel gives its high tap weight 0 but a derivative
    (the box directions differentiate these weights), and it multiplies its
    pixel as the kernels' taps and torchvision's do (0 times an infinite
    feature is NaN)."""
    weights, first, last = table
    size = weights.shape[-1]
    span = jnp.maximum(last - first + 1, 0)

    def at(j):
        pixel = jnp.minimum(first + j, size - 1)
        weight = jnp.take_along_axis(weights, pixel[..., None], axis=-1)[..., 0]
        return pixel, jnp.where(j < span, weight, 0)

    return _Taps(_run_time_count(span, valid), at)


def _window_taps(first, stop, size, valid, dtype) -> _Taps:
    """The taps of windows of whole pixels [first, stop) (float [K, P],
    clipped to the axis): each pixel once, weight 1."""
    length = jnp.maximum(stop - first, 0).astype(jnp.int32)
    first = first.astype(jnp.int32)

    def at(j):
        return jnp.minimum(first + j, size - 1), (j < length).astype(dtype)

    return _Taps(_run_time_count(length, valid), at)


def _sample_taps_suffice(ratio) -> bool:
    """Whether a grid of `ratio` samples per bin axis reads its samples'
    taps (a static count, no tables): fixed grids of at most
    _SAMPLE_TAPS_GRID samples."""
    return 0 < ratio <= _SAMPLE_TAPS_GRID


def _align_taps(start, bin_size, grid, ratio, bins, size, valid) -> _Taps:
    """The taps of one axis of RoI Align's bins: start, bin_size [K], grid
    [K] int32 samples per bin."""
    bin_start = (jnp.arange(bins, dtype=start.dtype)[None, :] * bin_size[:, None]
                 + start[:, None])
    if _sample_taps_suffice(ratio):
        return _sample_taps(bin_start, bin_size[:, None], ratio, size)
    grid = jnp.broadcast_to(grid[:, None], bin_start.shape)
    return _table_taps(_pixel_weights(bin_start, bin_size[:, None], grid, ratio, size, valid),
                       valid)


class _Bins(NamedTuple):
    """What a call's bins read: the taps of each axis, the divisor of each
    bin's sum ([K, PH, PW, 1] or broadcastable to it; 0 gives 0) and which
    RoIs read anything ([K]). The taps of a row of bins are those of its
    every bin ([K, PH] rows, [K, PW] columns), unless `per_bin`: bins that
    start where they like (deformable), whose taps are each bin's own
    ([K, PH * PW] on both axes)."""
    rows: _Taps
    columns: _Taps
    divisor: jax.Array
    valid: jax.Array
    per_bin: bool = False


def _bins(box_rule: BoxRule, rois, pooled_size, map_size, spatial_scale, sampling_ratio,
          batch_ok) -> _Bins:
    (pooled_h, pooled_w), (height, width) = pooled_size, map_size
    dtype = rois.dtype
    if box_rule.whole_pixels:
        scale = jnp.asarray(spatial_scale, dtype)
        inclusive = box_rule.inclusive_corners
        first_y, stop_y, finite_y = bin_windows(rois, scale, pooled_h, height, 2,
                                                inclusive_end=inclusive,
                                                last=height if inclusive else height - 1)
        first_x, stop_x, finite_x = bin_windows(rois, scale, pooled_w, width, 1,
                                                inclusive_end=inclusive,
                                                last=width if inclusive else width - 1)
        valid = batch_ok & finite_y & finite_x
        rows = jnp.maximum(stop_y - first_y, 0)
        cols = jnp.maximum(stop_x - first_x, 0)
        area = (rows[:, :, None] * cols[:, None, :])[..., None]
        return _Bins(_window_taps(first_y, stop_y, height, valid, dtype),
                     _window_taps(first_x, stop_x, width, valid, dtype), area, valid)
    aligned = box_rule.aligned
    start_h, start_w, bin_h, bin_w, finite = box_geometry(
        rois, pooled_size, spatial_scale, offset=0.5 if aligned else 0.0, clamp=not aligned)
    grid_h = grid_size(bin_h, sampling_ratio)
    grid_w = grid_size(bin_w, sampling_ratio)
    valid = batch_ok & finite & (grid_h > 0) & (grid_w > 0)
    count = (grid_h.astype(dtype) * grid_w.astype(dtype))[:, None, None, None]
    return _Bins(_align_taps(start_h, bin_h, grid_h, sampling_ratio, pooled_h, height, valid),
                 _align_taps(start_w, bin_w, grid_w, sampling_ratio, pooled_w, width, valid),
                 count, valid)


# --- RoI blocks ------------------------------------------------------------------
# A loop over taps runs as many steps as the widest bin of the RoIs it
# serves, and a table holds every RoI's bins: one box spanning the map
# would make every RoI of a call take its steps. So where the tap counts are
# known only at run time (tables, windows), a call's RoIs run in equal
# blocks sorted by their estimated steps, costliest first: up to
# _MOST_BLOCKS blocks of at least _SMALLEST_BLOCK RoIs (more, smaller ones
# where the tables' budget asks), all in one loop, so that the program holds
# one copy of the taps' loops (each further copy, as blocks of another size
# would need, costs seconds of compilation). A block's steps are at most
# those of any RoI of the block before it: all blocks together take at most
# a block's size times the costliest RoI's steps, plus the steps the RoIs
# need each.

def _roi_cost(bin_h, bin_w, map_size, valid):
    """[K] each RoI's estimated steps, for bin sizes bin_h, bin_w [K] on
    the map: its bins' spans of pixels (the bin's size, at most the map,
    and a tap either side) multiplied, 0 where it reads nothing (`valid`
    False; there the sizes may not be finite)."""
    (height, width) = map_size
    span_h = jnp.minimum(jnp.abs(bin_h), height) + 2
    span_w = jnp.minimum(jnp.abs(bin_w), width) + 2
    return jnp.where(valid, span_h * span_w, 0)


class _RoiBlocks(NamedTuple):
    """How a call's K RoIs run: ``order`` [count * size] the RoIs by cost,
    costliest first, the last repeated to fill the blocks (None: one block,
    in their order), in ``count`` blocks of ``size``."""
    order: jax.Array | None
    count: int
    size: int

    @classmethod
    def of(cls, cost, largest):
        """Blocks for RoIs of `cost` [K] (None: their taps are counted
        statically, so one block), none larger than `largest` RoIs."""
        num_rois = cost.shape[0] if cost is not None else 0
        largest = max(largest, 1)
        if cost is None or num_rois <= min(_SMALLEST_BLOCK, largest):
            return cls(None, 1, num_rois)
        count = max(min(_MOST_BLOCKS, -(-num_rois // _SMALLEST_BLOCK)),
                    -(-num_rois // largest))
        size = -(-num_rois // count)
        order = jnp.argsort(-lax.stop_gradient(cost), stable=True)
        filler = jnp.full((count * size - num_rois,), order[-1], order.dtype)
        return cls(jnp.concatenate([order, filler]), count, size)

    def _split(self, per_roi):
        """`per_roi` (arrays [K, ...]) in blocks: [count, size, ...]."""
        return [x[self.order].reshape(self.count, self.size, *x.shape[1:]) for x in per_roi]

    def each(self, block, per_roi):
        """block(*per_roi_block) -> arrays [B, ...], for every block of the
        RoIs of `per_roi` (arrays [K, ...]): their results [K, ...], in the
        RoIs' order."""
        if self.order is None:
            return block(*per_roi)
        num_rois = per_roi[0].shape[0]
        results = lax.map(lambda xs: block(*xs), self._split(per_roi))
        inverse = jnp.zeros(num_rois, self.order.dtype).at[self.order[:num_rois]].set(
            jnp.arange(num_rois, dtype=self.order.dtype))
        return jax.tree.map(lambda r: r.reshape(-1, *r.shape[2:])[inverse], results)

    def accumulate(self, block, total, per_roi):
        """block(total, present, *per_roi_block) -> total, for every block
        in turn; `present` [B] bool is False for the fillers, which must add
        nothing."""
        num_rois = per_roi[0].shape[0]
        if self.order is None:
            return block(total, jnp.ones(num_rois, bool), *per_roi)
        present = (jnp.arange(self.count * self.size) < num_rois).reshape(self.count, self.size)
        return lax.scan(lambda t, xs: (block(t, *xs), None), total,
                        [present, *self._split(per_roi)])[0]


def _largest_block(table_entries, dtype) -> int:
    """The most RoIs whose weight tables, `table_entries` values per RoI
    (0: none), fit _TABLE_BUDGET, counting the table, its compensation and
    a chunk's part."""
    if not table_entries:
        return 2**62
    return _TABLE_BUDGET // (3 * table_entries * np.dtype(dtype).itemsize)


# --- Layouts -------------------------------------------------------------------
# Every layout and channel order as a 5-d view of the map in which the C_out
# channels one output element's bin reads are one axis: a gather at (image,
# bin, row, column) then reads [K, PH, PW, C_out], the pooled tensor with
# its channels last (NHWC's own order).

def _map_view(shape, data_format, channel_order, pooled_size):
    """(the view's shape, index(image, bin, y, x) -> its index tuple) of a
    map of `shape`. Shared channels (roi_align, roi_pool) are one bin."""
    n, c, h, w = (shape[a] for a in _arguments.LAYOUT_AXES[data_format])
    bins = 1 if channel_order == "shared" else pooled_size[0] * pooled_size[1]
    c_out = c // bins
    every = slice(None)
    if data_format == "NCHW":
        if channel_order == "bin_major":
            return (n, bins, c_out, h, w), lambda i, b, y, x: (i, b, every, y, x)
        return (n, c_out, bins, h, w), lambda i, b, y, x: (i, every, b, y, x)
    if channel_order == "bin_major":
        return (n, h, w, bins, c_out), lambda i, b, y, x: (i, y, x, b, every)
    return (n, h, w, c_out, bins), lambda i, b, y, x: (i, y, x, every, b)


def _channels_last_shape(shape, data_format):
    """The shape [K, PH, PW, C_out] of a pooled tensor of `shape` in
    `data_format` with its channels last."""
    k, c_out, pooled_h, pooled_w = (shape[a] for a in _arguments.LAYOUT_AXES[data_format])
    return (k, pooled_h, pooled_w, c_out)


def _channels_last(pooled, data_format):
    """[K, C_out, PH, PW] (NCHW) or [K, PH, PW, C_out] -> [K, PH, PW, C_out]."""
    return pooled.transpose(0, 2, 3, 1) if data_format == "NCHW" else pooled


def _in_layout(pooled, data_format):
    """The inverse of ``_channels_last``."""
    return pooled.transpose(0, 3, 1, 2) if data_format == "NCHW" else pooled


class _Call(NamedTuple):
    """One call's geometry: the map's view and index, the RoIs' images and
    bins, the bin of each pooled element ([PH, PW], or 0 when shared) and
    the grid (PH, PW)."""
    view_shape: tuple
    index: Callable
    image: jax.Array
    bins: _Bins
    bin_index: jax.Array | int
    pooled_size: tuple


def _in_blocks(box_rule, features_shape, rois, pooled_size, *, spatial_scale, sampling_ratio,
               data_format, channel_order, image_groups):
    """A call of RoIs [K, 5] in blocks: (the _RoiBlocks, call_of(rois, image,
    batch_ok) -> the _Call of a block's RoIs, those three per RoI [K, ...]).
    Fixed grids of at most _SAMPLE_TAPS_GRID samples have static tap counts
    and no tables: one block."""
    n, _, h, w = (features_shape[a] for a in _arguments.LAYOUT_AXES[data_format])
    image, batch_ok = _image_groups.images(rois, image_groups, n)

    def call_of(rois, image, batch_ok):
        bins = _bins(box_rule, rois, pooled_size, (h, w), spatial_scale, sampling_ratio,
                     batch_ok)
        return _call_of_bins(features_shape, image, bins, pooled_size, data_format,
                             channel_order)

    windows = box_rule.whole_pixels
    if not windows and _sample_taps_suffice(sampling_ratio):
        return _RoiBlocks.of(None, 0), call_of, (rois, image, batch_ok)
    (pooled_h, pooled_w) = pooled_size
    tables = 0 if windows else pooled_h * h + pooled_w * w
    _, _, bin_h, bin_w, finite = box_geometry(rois, pooled_size, spatial_scale, offset=0.0,
                                              clamp=False)
    cost = _roi_cost(bin_h, bin_w, (h, w), batch_ok & finite)
    return (_RoiBlocks.of(cost, _largest_block(tables, rois.dtype)), call_of,
            (rois, image, batch_ok))


def _call_of_bins(features_shape, image, bins, pooled_size, data_format,
                  channel_order) -> _Call:
    view_shape, index = _map_view(features_shape, data_format, channel_order, pooled_size)
    pooled_h, pooled_w = pooled_size
    bin_index = 0 if channel_order == "shared" else (
        jnp.arange(pooled_h)[:, None] * pooled_w + jnp.arange(pooled_w)[None, :])
    return _Call(view_shape, index, image, bins, bin_index, tuple(pooled_size))


def _for_each_tap_pair(call: _Call, step, carry):
    """Runs step(index, pixel, weight, carry) -> carry over every pair of a
    row tap and a column tap, rows outer: `index` into the map's view,
    `pixel` = (y [K, PH, 1], x [K, 1, PW]; both [K, PH, PW] when the taps
    are each bin's own) and `weight` [K, PH, PW, 1]."""
    rows, columns = call.bins.rows, call.bins.columns
    if call.bins.per_bin:
        grid = (call.image.shape[0], *call.pooled_size)
        row_grid = column_grid = lambda taps: taps.reshape(grid)
    else:
        row_grid, column_grid = (lambda taps: taps[:, :, None]), (lambda taps: taps[:, None, :])

    def row(j_y, carry):
        y, w_y = map(row_grid, rows.at(j_y))

        def column(j_x, carry):
            x, w_x = map(column_grid, columns.at(j_x))
            index = call.index(call.image[:, None, None], call.bin_index, y, x)
            return step(index, (y, x), (w_y * w_x)[..., None], carry)

        return lax.fori_loop(0, columns.count, column, carry)

    return lax.fori_loop(0, rows.count, row, carry)


def _empty(features_shape, pooled_shape) -> bool:
    """Whether a call reads or writes nothing (no image, pixel, channel or
    RoI): its result is zeros."""
    return 0 in features_shape or 0 in pooled_shape


def pool(direction, operand, rois, result_shape, *, spatial_scale, sampling_ratio,
         data_format, channel_order, box_rule, image_groups):
    """One call of an averaging operator's forward (features -> pooled) or backward
    (pooled cotangent -> feature gradient) of ps_roi_align, roi_align or
    ps_roi_pool: `operand` and the result as the primitives take them
    (_averaging.py), rois [K, 5]."""
    features_shape, pooled_shape = _arguments.features_and_pooled(direction, operand.shape,
                                                                  result_shape)
    if _empty(features_shape, pooled_shape):
        return jnp.zeros(result_shape, operand.dtype)
    pooled_size = _arguments.pooled_size_of(pooled_shape, data_format)
    blocks, call_of, per_roi = _in_blocks(
        box_rule, features_shape, rois.astype(_arguments.compute_dtype(operand.dtype)),
        pooled_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
        data_format=data_format, channel_order=channel_order, image_groups=image_groups)
    return _pool_call(direction, operand, blocks, call_of, per_roi, features_shape,
                      pooled_shape, data_format)


def _pool_call(direction, operand, blocks: _RoiBlocks, call_of, per_roi, features_shape,
               pooled_shape, data_format):
    """The averages of the bins of every block's call, call_of(*the block's
    `per_roi`) (forward), or their transpose (backward)."""
    dtype = operand.dtype
    compute = _arguments.compute_dtype(dtype)

    def divisor_of(call):  # where the bins keep their sums, and their divisor there
        keep = call.bins.valid[:, None, None, None] & (call.bins.divisor > 0)
        return keep, jnp.where(keep, call.bins.divisor, 1)

    if direction == "forward":
        channels_last = _channels_last_shape(pooled_shape, data_format)[1:]

        def pool_block(*roi_block):
            call = call_of(*roi_block)
            view = operand.reshape(call.view_shape)

            def gather(index, _, weight, sums):
                values = view.at[index].get(mode="promise_in_bounds")
                return sums + weight * values.astype(compute)

            sums = _for_each_tap_pair(call, gather, jnp.zeros(
                (call.image.shape[0], *channels_last), compute))
            keep, divisor = divisor_of(call)
            return _in_layout(jnp.where(keep, sums / divisor, 0).astype(dtype), data_format)

        return blocks.each(pool_block, per_roi)

    def transpose_block(grad, present, cotangent, *roi_block):
        call = call_of(*roi_block)
        keep, divisor = divisor_of(call)
        keep = keep & present[:, None, None, None]
        cotangent = jnp.where(keep, cotangent.astype(compute) / divisor, 0)

        def scatter(index, _, weight, grad):
            return grad.at[index].add(weight * cotangent, mode="promise_in_bounds")

        return _for_each_tap_pair(call, scatter, grad.reshape(call.view_shape)).reshape(
            features_shape)

    grad = blocks.accumulate(transpose_block, jnp.zeros(features_shape, compute),
                             (_channels_last(operand, data_format), *per_roi))
    return grad.astype(dtype)


def box_derivative(box_parameter, direction, operand, rois, result_shape, *, spatial_scale,
                   data_format, **settings):
    """The box rows' call on the XLA path (_box_derivatives.py): the
    derivative of :func:`pool`'s forward (or backward, whose derivative is
    the transpose of the forward's) with respect to one sampling parameter
    of every RoI, in forward mode through its taps, along a tangent of the
    corners that moves that parameter alone: both corners of an axis for
    its start, the far one for its bin size (where aligned=False clamps the
    size, nothing moves, and the JVP's parameter tangent is 0 too)."""
    _, pooled_shape = _arguments.features_and_pooled(direction, operand.shape, result_shape)
    pooled_h, pooled_w = _arguments.pooled_size_of(pooled_shape, data_format)
    first, last, bins = {1: (1, 3, pooled_w), 2: (1, 3, pooled_w),
                         3: (2, 4, pooled_h), 4: (2, 4, pooled_h)}[box_parameter]
    step = (1.0 if box_parameter in (1, 3) else bins) / spatial_scale
    tangent = jnp.zeros_like(rois).at[:, last].set(step)
    if box_parameter in (1, 3):
        tangent = tangent.at[:, first].set(step)
    return jax.jvp(lambda r: pool(direction, operand, r, result_shape,
                                  spatial_scale=spatial_scale, data_format=data_format,
                                  **settings), (rois,), (tangent,))[1]


# --- Deformable RoI Align -------------------------------------------------------

def deformable(direction, operand, rois, offset, result_shape, *, spatial_scale,
               sampling_ratio, gamma, data_format, channel_order, image_groups,
               box_parameter=0):
    """One call of a deformable operator's forward or backward (_deformable.py;
    channel_order "shared" for deform_roi_align): RoI Align's averages over
    bins each starting where its offset moves it, with taps of their own.

    With `box_parameter` j (1 to 4: x start, bin width, y start, bin
    height), the deformable rows' box call instead: the derivative of that
    forward (or backward) with respect to sampling parameter j of every bin
    at once, the grids and validity held: forward mode through the taps,
    linear in the operand like the kernels' derivative directions."""
    features_shape, pooled_shape = _arguments.features_and_pooled(direction, operand.shape,
                                                                  result_shape)
    if _empty(features_shape, pooled_shape):
        return jnp.zeros(result_shape, operand.dtype)
    compute = _arguments.compute_dtype(operand.dtype)
    pooled_size = _arguments.pooled_size_of(pooled_shape, data_format)
    n, _, height, width = (features_shape[a] for a in _arguments.LAYOUT_AXES[data_format])
    rois = rois.astype(compute)
    # The bins' sampling parameters (reference_deformable.sampling_parameters:
    # the kernels' geometry), the grids and validity they give.
    *parameters, finite, moved = reference_deformable.sampling_parameters(
        rois, offset.astype(compute), pooled_size, spatial_scale, gamma)
    image, batch_ok = _image_groups.images(rois, image_groups, n)
    grid_h = grid_size(parameters[3], sampling_ratio)
    grid_w = grid_size(parameters[1], sampling_ratio)
    valid = batch_ok & finite & (grid_h > 0) & (grid_w > 0)
    pooled_h, pooled_w = pooled_size
    sample_taps = _sample_taps_suffice(sampling_ratio)
    # The bins move, their sizes do not: the RoI's cost is the plain one's.
    blocks = _RoiBlocks.of(
        None if sample_taps else _roi_cost(parameters[3], parameters[1], (height, width), valid),
        _largest_block(pooled_h * pooled_w * (height + width), compute))

    def taps(start, bin_size, grid, index, size, moved, valid):
        # Bins whose moved start is not finite read nothing (divisor 0):
        # their taps start from 0, as the reference's do.
        bin_start = (index.astype(compute) * bin_size[:, None, None]
                     + jnp.where(moved, start, 0)).reshape(start.shape[0], -1)
        if sample_taps:
            return _sample_taps(bin_start, bin_size[:, None], sampling_ratio, size)
        grid = jnp.broadcast_to(grid[:, None], bin_start.shape)
        return _table_taps(_pixel_weights(bin_start, bin_size[:, None], grid, sampling_ratio,
                                          size, valid), valid)

    def call_of(start_x, bin_w, start_y, bin_h, image, grid_h, grid_w, moved, valid):
        count = (grid_h.astype(compute) * grid_w.astype(compute))[:, None, None]
        bins = _Bins(taps(start_y, bin_h, grid_h, jnp.arange(pooled_h)[None, :, None], height,
                          moved, valid),
                     taps(start_x, bin_w, grid_w, jnp.arange(pooled_w)[None, None, :], width,
                          moved, valid),
                     jnp.where(moved, count, 0)[..., None], valid, per_bin=True)
        return _call_of_bins(features_shape, image, bins, pooled_size, data_format,
                             channel_order)

    def pooled_at(*parameters):
        return _pool_call(direction, operand, blocks, call_of,
                          (*parameters, image, grid_h, grid_w, moved, valid), features_shape,
                          pooled_shape, data_format)

    if not box_parameter:
        return pooled_at(*parameters)
    directions = [jnp.zeros_like(p) for p in parameters]
    directions[box_parameter - 1] = jnp.ones_like(parameters[box_parameter - 1])
    return jax.jvp(pooled_at, tuple(parameters), tuple(directions))[1]


# --- RoI Pool ------------------------------------------------------------------

def roi_pool(features, rois, pixels=None, *, result_shape, spatial_scale, data_format,
             image_groups):
    """``roi_pool_p``'s call: the maxima [K, C, PH, PW] (or [K, PH, PW, C])
    of each bin's window and their int32 pixels y * W + x (-1: none); or,
    given `pixels`, ``gather_p``'s: the features at them."""
    if pixels is not None:
        return _at_pixels(features, rois, pixels, data_format, image_groups)
    dtype = features.dtype
    if _empty(features.shape, result_shape):
        return jnp.zeros(result_shape, dtype), jnp.full(result_shape, -1, jnp.int32)
    compute = _arguments.compute_dtype(dtype)
    width = features.shape[_arguments.LAYOUT_AXES[data_format][3]]
    blocks, call_of, per_roi = _in_blocks(
        ROI_POOL.box_rule({}), features.shape, rois.astype(compute),
        _arguments.pooled_size_of(result_shape, data_format), spatial_scale=spatial_scale,
        sampling_ratio=0, data_format=data_format, channel_order="shared",
        image_groups=image_groups)
    channels_last = _channels_last_shape(result_shape, data_format)[1:]

    def pool_block(*roi_block):
        call = call_of(*roi_block)
        view = features.reshape(call.view_shape)

        def scan(index, pixel, inside, carry):
            # torchvision's scan: a value strictly greater replaces the
            # maximum (NaN never does), row by row, so the first maximum wins.
            best, at = carry
            values = view.at[index].get(mode="promise_in_bounds").astype(compute)
            better = (inside > 0) & (values > best)
            y, x = pixel
            return (jnp.where(better, values, best),
                    jnp.where(better, (y * width + x)[..., None], at))

        shape = (call.image.shape[0], *channels_last)
        best, pixel = _for_each_tap_pair(call, scan, (jnp.full(shape, _LOWEST, compute),
                                                      jnp.full(shape, -1, jnp.int32)))
        valid = call.bins.valid[:, None, None, None]
        empty = call.bins.divisor == 0
        # No value above -FLT_MAX gives -FLT_MAX, an empty window 0.
        pooled = jnp.where(pixel >= 0, best, jnp.where(empty, 0, _LOWEST).astype(compute))
        return (_in_layout(jnp.where(valid, pooled, 0).astype(dtype), data_format),
                _in_layout(jnp.where(valid, pixel, -1), data_format))

    return blocks.each(pool_block, per_roi)


def _pixel_index(shape, rois, pixels, data_format, image_groups):
    """The index of the map element each recorded pixel reads, and whether
    one is recorded there ([K, C, PH, PW] or [K, PH, PW, C])."""
    axes = _arguments.LAYOUT_AXES[data_format]
    n, c, h, w = (shape[a] for a in axes)
    image, batch_ok = _image_groups.images(rois, image_groups, n)
    found = (pixels >= 0) & (pixels < h * w) & batch_ok[:, None, None, None]
    safe = jnp.where(found, pixels, 0)
    channel = jnp.arange(c).reshape([-1 if a == axes[1] else 1 for a in range(4)])
    by_axis = {axes[0]: image[:, None, None, None], axes[1]: channel,
               axes[2]: safe // w, axes[3]: safe % w}
    return tuple(by_axis[a] for a in range(4)), found


def _at_pixels(features, rois, pixels, data_format, image_groups):
    if _empty(features.shape, pixels.shape):
        return jnp.zeros(pixels.shape, features.dtype)
    index, found = _pixel_index(features.shape, rois, pixels, data_format, image_groups)
    values = features.at[index].get(mode="promise_in_bounds")
    return jnp.where(found, values, jnp.zeros((), features.dtype))


def roi_pool_scatter(cotangent, rois, pixels, *, result_shape, spatial_scale, data_format,
                     image_groups):
    """``scatter_p``'s call: the cotangent added at the recorded pixels (in
    float32 for 16-bit maps), the transpose of the gather."""
    del spatial_scale  # the pixels say where
    dtype = cotangent.dtype
    if _empty(result_shape, pixels.shape):
        return jnp.zeros(result_shape, dtype)
    compute = _arguments.compute_dtype(dtype)
    index, found = _pixel_index(result_shape, rois, pixels, data_format, image_groups)
    grad = jnp.zeros(result_shape, compute).at[index].add(
        jnp.where(found, cotangent.astype(compute), 0), mode="promise_in_bounds")
    return grad.astype(dtype)


# --- Multi-scale RoI Align -------------------------------------------------------

def multi_scale(*operands, result_shape, spatial_scales, sampling_ratio, data_format,
                image_groups):
    """``multi_scale_p``'s call: each RoI pooled by roi_align from its own
    level (the RoIs of other levels read nothing there and give exactly 0,
    so the levels' results add up to it)."""
    *maps, rois, levels = operands
    pooled = jnp.zeros(result_shape, maps[0].dtype)
    for level, (features, scale) in enumerate(zip(maps, spatial_scales, strict=True)):
        pooled = pooled + pool(
            "forward", features, _levels.level_rois(rois, levels, level), result_shape,
            spatial_scale=scale, data_format=data_format, image_groups=image_groups,
            **ROI_ALIGN.settings(dict(sampling_ratio=sampling_ratio, aligned=False)))
    return pooled
