"""Public API: ``ps_roi_align`` and ``roi_align``, with torchvision's
signatures and semantics."""

from __future__ import annotations

import jax

from jax_psroi import _arguments, _extension, _primitives


def ps_roi_align(input, boxes: _arguments.Boxes, output_size, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1, *, data_format: str = "NCHW",
                 channel_order: str = "torchvision") -> jax.Array:
    """Position-Sensitive RoI Align (R-FCN, Light-Head R-CNN).

    Same signature and semantics as ``torchvision.ops.ps_roi_align``, as a
    JAX operation with native CPU and CUDA kernels: it works under
    ``jax.jit``, ``jax.vmap`` and every mode and order of differentiation.

    Output channel ``c`` of bin ``(i, j)`` averages one input channel over a
    grid of bilinearly interpolated samples in that bin of the RoI: with
    ``channel_order="torchvision"``, input channel ``(c * h + i) * w + j``;
    with ``"bin_major"``, ``(i * w + j) * C_out + c``. For 2 output
    channels and 2 x 2 bins (C = 8):

        bin (i, j)           (0,0)  (0,1)  (1,0)  (1,1)
        torchvision  c = 0     0      1      2      3
                     c = 1     4      5      6      7
        bin_major    c = 0     0      2      4      6
                     c = 1     1      3      5      7

    "bin_major" is the grouping of the TF Object Detection API: the C_out
    channels of a bin are contiguous, so in NHWC every bilinear tap reads one
    contiguous run. A model trained from scratch may choose either; a model
    ported from torchvision keeps the default.

    Args:
      input: [N, C, H, W] feature map (or [N, H, W, C] with
        ``data_format="NHWC"``), float32, float64, bfloat16 or float16, with
        C = C_out * h * w. bfloat16 and float16 are computed in float32
        (sample positions, weights and sums) and the result is rounded once.
      boxes: the RoIs in input-image coordinates, either a [K, 5] array of
        (batch_index, x1, y1, x2, y2) or a list/tuple of N arrays [L_i, 4] of
        (x1, y1, x2, y2), one per image, in which case K = sum L_i and the
        RoIs come out in list order. Boxes are cast to float32 for 16-bit
        input (never rounded to 16 bits), to the input's dtype otherwise.
      output_size: int or (h, w): bins per RoI.
      spatial_scale: maps box coordinates to feature-map pixels. For a
        backbone of stride 16 applied to an 800 x 1344 image the features
        are [N, C, 50, 84] and ``spatial_scale=1/16``: the box
        (x1, y1, x2, y2) = (160, 320, 480, 640) covers feature pixels 10 to
        30 horizontally and 20 to 40 vertically (minus torchvision's half
        pixel offset, applied always).
      sampling_ratio: samples per bin along each axis; <= 0 uses
        ``ceil(roi_size / output_size)`` per RoI (adaptive).
      data_format: "NCHW" (torchvision's) or "NHWC" (Flax's), keyword-only.
        Both run native kernels; no transpose is added.
      channel_order: "torchvision" or "bin_major", keyword-only (above).

    Returns:
      [K, C_out, h, w] (NCHW) or [K, h, w, C_out] (NHWC), the input's dtype.

    Differentiation: the operation is linear in ``input``. Its transpose is
    the native backward kernel, and the backward's transpose is the forward,
    so reverse mode (``jax.grad``, ``jax.vjp``), forward mode (``jax.jvp``,
    ``jax.jacfwd``) and any mix and order of them (``jax.hessian``,
    Hessian-vector products, gradient penalties) run on the native kernels.
    ``boxes`` receive a zero gradient (and tangent), as in torchvision.

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
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, sampling_ratio, data_format,
        channel_order, _extension.SUPPORTED_DTYPES)
    blocks = _arguments.image_blocks(boxes, features.shape[0])
    return _primitives.forward_p.bind(features, rois, image_blocks=blocks, aligned=True,
                                      **params)


def roi_align(input, boxes: _arguments.Boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, *,
              data_format: str = "NCHW") -> jax.Array:
    """RoI Align (Mask R-CNN, Faster R-CNN with RoI Align heads).

    Same signature and semantics as ``torchvision.ops.roi_align``, on the
    native kernels of ``ps_roi_align`` (with every bin of output channel c
    reading input channel c): ``jax.jit``, ``jax.vmap`` and every mode and
    order of differentiation.

    Args:
      input: [N, C, H, W] feature map (or [N, H, W, C] with
        ``data_format="NHWC"``), float32, float64, bfloat16 or float16 (the
        16-bit types computed in float32 and rounded once).
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2) or a list/tuple of
        N arrays [L_i, 4] of (x1, y1, x2, y2), one per image, in input-image
        coordinates.
      output_size: int or (h, w): bins per RoI.
      spatial_scale: maps box coordinates to feature-map pixels.
      sampling_ratio: samples per bin along each axis; <= 0 uses
        ``ceil(roi_size / output_size)`` per RoI (adaptive).
      aligned: torchvision's ``aligned``. False (its default): no half-pixel
        shift, RoI sizes clamped to at least one pixel; True: coordinates
        shifted by -0.5 pixel (Detectron2's ROIAlignV2), no clamp.
      data_format: "NCHW" or "NHWC", keyword-only; both native.

    Returns:
      [K, C, h, w] (NCHW) or [K, h, w, C] (NHWC), the input's dtype.

    Differences from torchvision, as for ``ps_roi_align``: an RoI whose batch
    index is outside [0, N) or NaN, or whose coordinates are not finite,
    gives 0; huge boxes cost no more than the map; the grid is capped at
    2**23 samples per bin axis.
    """
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, sampling_ratio, data_format,
        "torchvision", _extension.SUPPORTED_DTYPES, position_sensitive=False)
    params["channel_order"] = "shared"
    blocks = _arguments.image_blocks(boxes, features.shape[0])
    return _primitives.forward_p.bind(features, rois, image_blocks=blocks,
                                      aligned=_arguments.aligned(aligned), **params)
