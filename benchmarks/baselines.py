"""The strong jax.numpy baseline: what a skilled JAX user writes.

It first lays the map out as rows of C_out values, one row per (image, bin,
pixel), so that every bilinear tap of a bin is one contiguous row; then it
gathers the rows of each bin's taps and sums them with their weights. Its
gradient is XLA's scatter-add of the same rows. Same semantics as
jax_psroi.ps_roi_align (torchvision's, with the safe deviations) for a fixed
sampling_ratio > 0; bench.py checks it against the reference before timing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _axis_taps(start, bin_size, pooled, size, ratio):
    """Rows (or columns) and weights of every sample's two taps on one axis.

    Returns int32 indices and weights, both [K, pooled, 2 * ratio]: the low
    taps of the ratio samples, then their high taps, with torchvision's
    border rules (samples outside [-1, size] weigh 0).
    """
    bins = jnp.arange(pooled, dtype=start.dtype)[None, :, None]
    offsets = (jnp.arange(ratio, dtype=start.dtype) + 0.5)[None, None, :]
    coord = (start[:, None, None] + bins * bin_size[:, None, None]
             + offsets * bin_size[:, None, None] / ratio)
    inside = (coord >= -1) & (coord <= size)
    coord = jnp.where(inside, jnp.maximum(coord, 0), 0)
    low = jnp.floor(coord).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    frac = jnp.where(at_end, 0, coord - low.astype(coord.dtype))
    weights = jnp.concatenate([jnp.where(inside, 1 - frac, 0),
                               jnp.where(inside, frac, 0)], axis=-1)
    return jnp.concatenate([low, high], axis=-1), weights


def ps_roi_align_rows(features, rois, output_size, spatial_scale,
                      sampling_ratio, *, data_format="NCHW", channel_order="torchvision"):
    """PS-RoI Align by row relayout and row gather.

    Args:
      features: [N, C, H, W] or [N, H, W, C], C = C_out * PH * PW, any float
        dtype (16-bit maps are gathered in 16 bits and summed in float32).
      rois: [K, 5] (batch_index, x1, y1, x2, y2), float32 or the features'
        dtype if wider.
      output_size: int or (PH, PW).
      spatial_scale: python float.
      sampling_ratio: python int > 0 (adaptive grids vary per RoI, which
        this formulation cannot express with static shapes).
      data_format, channel_order: as in jax_psroi.ps_roi_align.

    Returns:
      [K, C_out, PH, PW] or [K, PH, PW, C_out] of the features' dtype.
    """
    if sampling_ratio <= 0:
        raise ValueError("the row-gather baseline needs sampling_ratio > 0")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    bins = ph * pw
    if data_format == "NCHW":
        n, c, h, w = features.shape
    else:
        n, h, w, c = features.shape
    c_out = c // bins
    # rows[...] = the C_out values of one bin at one pixel: one contiguous row
    # per tap. Channels-last bin-major maps already are such rows; the others
    # are laid out [N, bins, H, W, C_out] first.
    if data_format == "NHWC" and channel_order == "bin_major":
        rows = features.reshape(-1, c_out)
        def row_index(image, bin_index, y, x):
            return ((image * h + y) * w + x) * bins + bin_index
    else:
        split = {("NCHW", "torchvision"): ((n, c_out, bins, h, w), (0, 2, 3, 4, 1)),
                 ("NCHW", "bin_major"): ((n, bins, c_out, h, w), (0, 1, 3, 4, 2)),
                 ("NHWC", "torchvision"): ((n, h, w, c_out, bins), (0, 4, 1, 2, 3))}
        shape, order = split[(data_format, channel_order)]
        rows = features.reshape(shape).transpose(order).reshape(-1, c_out)
        def row_index(image, bin_index, y, x):
            return ((image * bins + bin_index) * h + y) * w + x

    compute = jnp.promote_types(features.dtype, jnp.float32)
    rois = rois.astype(compute)
    scale = jnp.asarray(spatial_scale, compute)
    start_w, start_h, end_w, end_h = (rois[:, i] * scale - 0.5 for i in (1, 2, 3, 4))
    bin_w = (end_w - start_w) / pw
    bin_h = (end_h - start_h) / ph
    finite = (jnp.isfinite(start_w) & jnp.isfinite(start_h)
              & jnp.isfinite(bin_w) & jnp.isfinite(bin_h))
    start_w, start_h, bin_w, bin_h = (jnp.where(finite, v, 0)
                                      for v in (start_w, start_h, bin_w, bin_h))
    batch = rois[:, 0]
    valid = finite & (batch > -1) & (batch < n)
    image = jnp.where(valid, batch, 0).astype(jnp.int32)

    y_index, y_weight = _axis_taps(start_h, bin_h, ph, h, sampling_ratio)
    x_index, x_weight = _axis_taps(start_w, bin_w, pw, w, sampling_ratio)
    bin_index = (jnp.arange(ph)[:, None] * pw + jnp.arange(pw)[None, :])[None]  # [1, PH, PW]
    index = row_index(image[:, None, None, None, None], bin_index[..., None, None],
                      y_index[:, :, None, :, None], x_index[:, None, :, None, :])
    scale_valid = jnp.where(valid, 1 / (sampling_ratio * sampling_ratio), 0)
    weight = (y_weight[:, :, None, :, None] * x_weight[:, None, :, None, :]
              * scale_valid[:, None, None, None, None].astype(compute))
    out = "kcij" if data_format == "NCHW" else "kijc"
    return jnp.einsum(f"kijab,kijabc->{out}", weight, rows[index],
                      precision=lax.Precision.HIGHEST,
                      preferred_element_type=compute).astype(features.dtype)
