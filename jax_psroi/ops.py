"""Public API: ``ps_roi_align``, with torchvision's signature and semantics."""

from __future__ import annotations

import operator
from functools import partial
import jax
import jax.numpy as jnp
from jax_psroi import _primitives
from jax_psroi._boxes import Boxes, rois_from_boxes
from jax_psroi.reference import MAX_GRID_PER_AXIS

def _output_size(output_size) -> tuple[int, int]:
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError("output_size must be an int or a pair (h, w), "
                             f"got {output_size!r}")
        size = tuple(operator.index(s) for s in output_size)
    else:
        size = (operator.index(output_size),) * 2
    if min(size) <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return size


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _ps_roi_align(features, rois, pooled_size, spatial_scale, sampling_ratio):
    return _primitives.forward_p.bind(
        features, rois, pooled_size=pooled_size, spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio)


def _ps_roi_align_fwd(features, rois, pooled_size, spatial_scale,
                      sampling_ratio):
    out = _ps_roi_align(features, rois, pooled_size, spatial_scale,
                        sampling_ratio)
    # The backward needs only the features' shape; a zero-size slice carries
    # it as a residual without keeping the features alive.
    return out, (rois, jnp.zeros((0,) + features.shape, features.dtype))


def _ps_roi_align_bwd(pooled_size, spatial_scale, sampling_ratio, residuals,
                      cotangent):
    rois, shape_carrier = residuals
    grad = _primitives.backward_p.bind(
        cotangent, rois, input_shape=tuple(shape_carrier.shape[1:]),
        spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)
    return grad, jnp.zeros_like(rois)


_ps_roi_align.defvjp(_ps_roi_align_fwd, _ps_roi_align_bwd)


def ps_roi_align(input, boxes: Boxes, output_size, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> jax.Array:
    """Position-Sensitive RoI Align (R-FCN, Light-Head R-CNN).

    Same signature and semantics as ``torchvision.ops.ps_roi_align``, as a
    JAX operation with native CPU and CUDA kernels: it works under
    ``jax.jit``, ``jax.grad`` (any order) and ``jax.vmap``.

    Output channel ``c`` of bin ``(i, j)`` averages input channel
    ``(c * h + i) * w + j`` over a grid of bilinearly interpolated samples in
    that bin of the RoI.

    Args:
      input: [N, C, H, W] feature map, float32 or float64, with
        C = C_out * h * w.
      boxes: the RoIs in input-image coordinates, either a [K, 5] array of
        (batch_index, x1, y1, x2, y2) or a list/tuple of N arrays [L_i, 4] of
        (x1, y1, x2, y2), one per image, in which case K = sum L_i and the
        RoIs come out in list order. Boxes are cast to the input's dtype.
      output_size: int or (h, w): bins per RoI.
      spatial_scale: maps box coordinates to feature-map pixels. For a
        backbone of stride 16 applied to an 800 x 1344 image the features
        are [N, C, 50, 84] and ``spatial_scale=1/16``: the box
        (x1, y1, x2, y2) = (160, 320, 480, 640) covers feature pixels 10 to
        30 horizontally and 20 to 40 vertically (minus torchvision's half
        pixel offset, applied always).
      sampling_ratio: samples per bin along each axis; <= 0 uses
        ``ceil(roi_size / output_size)`` per RoI (adaptive).

    Returns:
      [K, C_out, h, w] array of the input's dtype.

    Gradients: with respect to ``input`` from a native backward kernel;
    ``boxes`` receive a zero gradient, as in torchvision. Higher orders work
    (the backward is linear and its adjoint is the forward).

    Differences from torchvision, all where torchvision returns NaN, reads
    out of bounds or never returns: an RoI whose batch index is outside
    [0, N) or NaN, whose coordinates are not finite, or whose adaptive grid
    is empty (zero-size or inverted box) gives 0; samples outside the
    feature map are skipped without being visited, so huge boxes cost no
    more than the map; the grid is capped at 2**23 samples per bin axis.

    Per image under ``jax.vmap``::

        jax.vmap(lambda f, b: ps_roi_align(f[None], [b], 7, 1 / 16, 2))(
            features,  # [B, C, H, W]
            boxes)     # [B, L, 4]  ->  [B, L, C // 49, 7, 7]
    """
    features = jnp.asarray(input)
    if features.ndim != 4:
        raise ValueError(f"input must be [N, C, H, W], got {features.shape}")
    if features.dtype not in _primitives.SUPPORTED_DTYPES:
        raise TypeError("input must be float32 or float64 (bfloat16 and "
                        f"float16 are not supported yet), got {features.dtype}")
    pooled_size = _output_size(output_size)
    if features.shape[1] % (pooled_size[0] * pooled_size[1]):
        raise ValueError(
            f"input channels ({features.shape[1]}) must be a multiple of "
            f"output_size h * w ({pooled_size[0]} * {pooled_size[1]})")
    try:
        scale = float(spatial_scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError("spatial_scale must be a python number known at trace "
                        f"time, got {spatial_scale!r}") from e
    ratio = operator.index(sampling_ratio)
    if ratio > MAX_GRID_PER_AXIS:
        raise ValueError(f"sampling_ratio must be at most {MAX_GRID_PER_AXIS} "
                         f"(samples per bin axis), got {ratio}")
    rois = rois_from_boxes(boxes, features.dtype)
    return _ps_roi_align(features, rois, pooled_size, scale, ratio)
