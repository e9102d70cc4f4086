"""Derivatives of the averaging operators with respect to their boxes.

An operator of samples (ps_roi_align, roi_align) sees a box through four
sampling parameters per RoI (lib/roi_math.h, roi_box), each a piecewise
linear function of its corners:

    start_x = x1 * scale - offset      bin_w = size_w / PW
    start_y = y1 * scale - offset      bin_h = size_h / PH

with size = (x2 - x1) * scale, or max(that, 1) for roi_align's
aligned=False (offset 0.5 when aligned, else 0). The native kernels'
box directions compute the pooled tensor's derivative with respect to one
parameter of every RoI at once (``box_parameter`` 1 to 4, in that order;
kernel_table.h), linear in the features like the forward. The JVP of the
forward is then

    pooled_dot = forward(features_dot) + sum_j D_j(features) * theta_dot_j

with theta_dot_j [K] the parameters' tangents (:func:`parameter_tangents`,
linear in the boxes' tangents) scaled onto each RoI's outputs; the
backward's is the same with the cotangent scaled per RoI. Everything but
the D_j is jax.numpy, linear in the tangents, so reverse mode transposes it
and the D_j transpose to the box-backward kernels.

Where the pooled tensor is not differentiable in the boxes, the derivative
is one-sided or zero (lib/roi_math.h, sample_tap): the piece to the right
at integer sample coordinates, zero for a sample the border rule holds,
the current piece where the adaptive grid's ceil or aligned=False's size
clamp changes (at a size of exactly 1 the clamp is off: derivative of the
unclamped piece). The batch index column's derivative is zero.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_psroi import _arguments

# The kernels' BoxParameter values (lib/roi_math.h): x start, bin width,
# y start, bin height.
PARAMETERS = (1, 2, 3, 4)


def parameter_tangents(rois, rois_dot, *, spatial_scale: float, pooled_size, aligned: bool):
    """The tangents [K, 4] of every RoI's sampling parameters (x start, bin
    width, y start, bin height) for the tangents `rois_dot` [K, 5] of
    `rois` [K, 5] (batch index, x1, y1, x2, y2)."""
    ph, pw = pooled_size
    scale = jnp.asarray(spatial_scale, rois.dtype)
    offset = jnp.asarray(0.5 if aligned else 0.0, rois.dtype)
    tangents = []
    for first, last, bins in ((1, 3, pw), (2, 4, ph)):
        start = rois[:, first] * scale - offset
        size = (rois[:, last] * scale - offset) - start
        start_dot = rois_dot[:, first] * scale
        size_dot = (rois_dot[:, last] - rois_dot[:, first]) * scale
        if not aligned:  # size < 1 is clamped to 1: constant there
            size_dot = jnp.where(size < 1, jnp.zeros_like(size_dot), size_dot)
        tangents += [start_dot, size_dot / bins]
    return jnp.stack(tangents, axis=1)


def per_roi(values, pooled):
    """`values` [K] shaped to broadcast against `pooled` [K, ...] (either
    layout: RoIs come first)."""
    return values.reshape((-1,) + (1,) * (pooled.ndim - 1))


def scaled(x, factors):
    """`x` times `factors` (broadcast against it), multiplied in x's compute
    type (_arguments.compute_dtype) and rounded to x's dtype once: in
    reverse mode the product's transpose, the factors' cotangent, sums a
    RoI's C_out * PH * PW terms, which 16 bits cannot (float16 overflows,
    bfloat16 cancels the box gradient away)."""
    compute = _arguments.compute_dtype(x.dtype)
    return (x.astype(compute) * factors.astype(compute)).astype(x.dtype)
