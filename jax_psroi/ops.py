"""Public API: ``ps_roi_align``, ``roi_align``, ``ps_roi_pool``, ``roi_pool``
and ``multi_scale_roi_align``, with torchvision's signatures and semantics."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.typing import ArrayLike

from jax_psroi import (
    _arguments,
    _averaging,
    _deformable,
    _extension,
    _image_groups,
    _implementation,
    _levels,
    _multi_scale,
    _operators,
    _roi_pool,
    _rules,
)
from jax_psroi._arguments import Boxes, ChannelOrder, DataFormat, OutputSize

# The package exports every name listed here (jax_psroi/__init__.py).
__all__ = ["deform_ps_roi_align", "deform_roi_align", "multi_scale_roi_align", "ps_roi_align",
           "ps_roi_pool", "roi_align", "roi_pool"]


def ps_roi_align(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
                 spatial_scale: float = 1.0, sampling_ratio: int = -1, *,
                 data_format: DataFormat = "NCHW",
                 channel_order: ChannelOrder = "torchvision") -> jax.Array:
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
        RoIs come out in list order. Floating-point or integer (bool and
        complex boxes raise); cast to float32 for 16-bit input (never
        rounded to 16 bits), to the input's dtype otherwise.
      output_size: int or (h, w): bins per RoI.
      spatial_scale: maps box coordinates to feature-map pixels. For a
        backbone of stride 16 applied to an 800 x 1344 image the features
        are [N, C, 50, 84] and ``spatial_scale=1/16``: the box
        (x1, y1, x2, y2) = (160, 320, 480, 640) covers feature pixels 10 to
        30 horizontally and 20 to 40 vertically (minus torchvision's half
        pixel offset, applied always). A real number, finite and positive,
        and within float32's range unless the input is float64 (the
        kernels compute in float32 for float32 and 16-bit input).
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
    Unlike torchvision's, ``boxes`` have exact first derivatives (through
    every sample's bilinear weights; the batch index column gets 0), on the
    native kernels too; conventions where the output is not differentiable
    in a box, and the orders, in docs/guides/differentiation.md. Write
    ``jax.lax.stop_gradient(boxes)`` to detach them, as torchvision-style
    training does.

    Differences from torchvision, all where torchvision returns NaN, reads
    out of bounds or never returns: an RoI whose batch index, truncated
    toward zero as torchvision truncates it, is outside [0, N) (-0.5 reads
    image 0, -1 nothing), or is NaN, whose coordinates are not finite, or
    whose adaptive grid is empty (zero-size or inverted box) gives 0;
    samples outside the feature map are skipped without being visited, so
    huge boxes cost no more than the map; the grid is capped at 2**23
    samples per bin axis.

    Per image under ``jax.vmap``::

        jax.vmap(lambda f, b: ps_roi_align(f[None], [b], 7, 1 / 16, 2))(
            features,  # [B, C, H, W]
            boxes)     # [B, L, 4]  ->  [B, L, C // 49, 7, 7]
    """
    return _averaging.apply(_operators.PS_ROI_ALIGN, input, boxes, output_size, spatial_scale,
                            data_format, sampling_ratio=sampling_ratio,
                            channel_order=channel_order)


def roi_align(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False, *,
              data_format: DataFormat = "NCHW") -> jax.Array:
    """RoI Align (Mask R-CNN, Faster R-CNN with RoI Align heads).

    Same signature and semantics as ``torchvision.ops.roi_align``, on the
    native kernels of ``ps_roi_align`` (with every bin of output channel c
    reading input channel c): ``jax.jit``, ``jax.vmap`` and every mode and
    order of differentiation, exact first derivatives in ``boxes`` included
    (see ``ps_roi_align``).

    Args:
      input: [N, C, H, W] feature map (or [N, H, W, C] with
        ``data_format="NHWC"``), float32, float64, bfloat16 or float16 (the
        16-bit types computed in float32 and rounded once).
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2) or a list/tuple of
        N arrays [L_i, 4] of (x1, y1, x2, y2), one per image, in input-image
        coordinates.
      output_size: int or (h, w): bins per RoI.
      spatial_scale: maps box coordinates to feature-map pixels; finite and
        positive (and within float32 for all but float64 input).
      sampling_ratio: samples per bin along each axis; <= 0 uses
        ``ceil(roi_size / output_size)`` per RoI (adaptive).
      aligned: torchvision's ``aligned``. False (its default): no half-pixel
        shift, RoI sizes clamped to at least one pixel; True: coordinates
        shifted by -0.5 pixel (Detectron2's ROIAlignV2), no clamp.
      data_format: "NCHW" or "NHWC", keyword-only; both native.

    Returns:
      [K, C, h, w] (NCHW) or [K, h, w, C] (NHWC), the input's dtype.

    Differences from torchvision, as for ``ps_roi_align``: an RoI whose batch
    index (truncated toward zero) is outside [0, N) or NaN, or whose
    coordinates are not finite, gives 0; huge boxes cost no more than the
    map; the grid is capped at 2**23 samples per bin axis. (An empty box
    gives 0 with adaptive sampling and ``aligned=True``, as in torchvision;
    ``aligned=False`` clamps its size to 1 pixel, as torchvision does.)
    """
    return _averaging.apply(_operators.ROI_ALIGN, input, boxes, output_size, spatial_scale,
                            data_format, sampling_ratio=sampling_ratio, aligned=aligned)


def ps_roi_pool(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
                spatial_scale: float = 1.0, *, data_format: DataFormat = "NCHW",
                channel_order: ChannelOrder = "torchvision") -> jax.Array:
    """Position-Sensitive RoI Pool (R-FCN's original head).

    Same signature and forward as ``torchvision.ops.ps_roi_pool``, on the
    native kernels of ``ps_roi_align`` with bins that average windows of
    whole pixels instead of bilinear samples: ``jax.jit``, ``jax.vmap`` and
    every mode and order of differentiation.

    Box corners are rounded to whole pixels (halves away from zero), RoI
    sizes clamped to at least one pixel, and bin (i, j) averages the pixels
    [floor(i * bin_h), ceil((i + 1) * bin_h)) x [floor(j * bin_w),
    ceil((j + 1) * bin_w)) past the rounded corner, clipped to
    [0, H - 1] x [0, W - 1] as torchvision's forward clips them (so no window
    reaches the last row or column); an empty window gives 0. Output channel
    c of bin (i, j) reads the input channel of ``ps_roi_align``'s
    ``channel_order``.

    Args:
      input: [N, C, H, W] (or [N, H, W, C] with ``data_format="NHWC"``),
        float32, float64, bfloat16 or float16, C = C_out * h * w.
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2) or a list/tuple of
        N arrays [L_i, 4] of (x1, y1, x2, y2), one per image.
      output_size: int or (h, w): bins per RoI.
      spatial_scale: maps box coordinates to feature-map pixels; finite and
        positive (and within float32 for all but float64 input).
      data_format: "NCHW" or "NHWC", keyword-only; both native.
      channel_order: "torchvision" or "bin_major", keyword-only (see
        ``ps_roi_align``).

    Returns:
      [K, C_out, h, w] (NCHW) or [K, h, w, C_out] (NHWC), the input's dtype.

    Gradient: the adjoint of this forward. torchvision's backward clips
    windows to [0, H] x [0, W] instead, so where a window ends at the last
    row or column its gradient is not its forward's; ours is. Bad batch
    indices and non-finite coordinates give 0, as for ``ps_roi_align``.
    """
    return _averaging.apply(_operators.PS_ROI_POOL, input, boxes, output_size, spatial_scale,
                            data_format, channel_order=channel_order)


def roi_pool(input: ArrayLike, boxes: Boxes, output_size: OutputSize,
             spatial_scale: float = 1.0, *, data_format: DataFormat = "NCHW") -> jax.Array:
    """RoI Pool (Fast and Faster R-CNN): the maximum of each bin's window.

    Same signature and semantics as ``torchvision.ops.roi_pool``, as a JAX
    operation with native CPU and CUDA kernels: ``jax.jit``, ``jax.vmap``
    and every mode and order of differentiation.

    Box corners are rounded to whole pixels (halves away from zero); an RoI
    spans both corner pixels (end - start + 1, at least 1), and bin (i, j)
    is the maximum over the pixels [floor(i * bin_h), ceil((i + 1) * bin_h))
    x [floor(j * bin_w), ceil((j + 1) * bin_w)) past the rounded corner,
    clipped to [0, H] x [0, W]. As in torchvision, the scan starts from
    -FLT_MAX and takes a value only when it is strictly greater: the first
    maximum in row-major order wins ties, NaN is never taken, a window with
    nothing above -FLT_MAX gives -FLT_MAX, and an empty window gives 0.

    Args:
      input: [N, C, H, W] (or [N, H, W, C] with ``data_format="NHWC"``),
        float32, float64, bfloat16 or float16 (16-bit maxima are exact).
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2) or a list/tuple of
        N arrays [L_i, 4] of (x1, y1, x2, y2), one per image.
      output_size: int or (h, w): bins per RoI.
      spatial_scale: maps box coordinates to feature-map pixels; finite and
        positive (and within float32 for all but float64 input).
      data_format: "NCHW" or "NHWC", keyword-only; both native.

    Returns:
      [K, C, h, w] (NCHW) or [K, h, w, C] (NHWC), the input's dtype.

    Differentiation: piecewise linear. The forward records each maximum's
    pixel (as torchvision's arg-max); the tangent is the input tangent at
    those pixels and the gradient the cotangent added at them (a native,
    deterministic scatter), so ``jax.grad``, ``jax.jvp`` and their
    compositions all run on the native kernels. ``boxes`` get a zero
    gradient. Bad batch indices and non-finite coordinates give 0 (and no
    gradient), as for ``ps_roi_align``.
    """
    return _roi_pool.apply(input, boxes, output_size, spatial_scale, data_format)


def multi_scale_roi_align(features: Sequence[ArrayLike], boxes: Boxes, output_size: OutputSize,
                          sampling_ratio: int, image_size: tuple[int, int], *,
                          canonical_scale: int = 224, canonical_level: int = 4,
                          data_format: DataFormat = "NCHW") -> jax.Array:
    """Multi-scale RoI Align over a feature pyramid (FPN heads: Faster and
    Mask R-CNN), what ``torchvision.ops.MultiScaleRoIAlign`` computes, each
    RoI pooled from its own level only, on the native kernels of
    ``roi_align``: ``jax.jit``, ``jax.vmap`` and every mode and order of
    differentiation, exact first derivatives in ``boxes`` included (each
    RoI's through its level's geometry; its level, piecewise constant in the
    box, contributes none).

    Each level's spatial scale is inferred from its height, as torchvision
    infers it: 2 to the rounded log2 of (level height / image height). RoI
    k goes to level floor(canonical_level + log2(sqrt(area_k) /
    canonical_scale) + 1e-6), clamped to the pyramid (the FPN paper's eq. 1),
    and is pooled there by ``roi_align`` with ``aligned=False``. A box of
    negative area or with non-finite coordinates has no level and gives 0,
    as in torchvision. With one level every RoI is pooled from it (as
    torchvision does, without the mapping).

    The mapping assumes, as torchvision's does without checking it, that
    level i has scale 2**-(k_min + i): the levels come finest first, each
    half the scale of the one before. Any other pyramid (levels out of
    order, two of one scale, a level missing between two, a level of height
    0) raises a ``ValueError`` naming the level, where torchvision pools
    some RoIs to 0 or from the wrong level.

    Args:
      features: list or tuple of L feature maps [N, C, H_l, W_l] (or
        [N, H_l, W_l, C] with ``data_format="NHWC"``), the finest first, of
        one dtype (float32, float64, bfloat16 or float16) and the same N and C:
        torchvision's ``x`` dict's values for ``featmap_names``, in the
        dict's order (the Flax modules take the dict).
      boxes: [K, 5] array of (batch_index, x1, y1, x2, y2) or a list/tuple of
        N arrays [L_i, 4], in image pixels.
      output_size: int or (h, w).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      image_size: (height, width) of the (padded) input images:
        torchvision's maximum over ``image_shapes``, from which the scales
        are inferred.
      canonical_scale, canonical_level: eq. 1's 224 and k0 = 4.
      data_format: "NCHW" or "NHWC", keyword-only.

    Returns:
      [K, C, h, w] (or [K, h, w, C]) of the maps' dtype.

    The levels are computed with ``jax.numpy`` (a few operations on [K]);
    the pooling is one native call per level, which visits only that level's
    RoIs and writes into one result. Over a device mesh it splits as
    ``roi_align`` does (images, RoIs, channels; every level alike).
    """
    pooled_size = _arguments.output_size(output_size)
    layout = _arguments.data_format(data_format)
    maps = _arguments.pyramid(features, pooled_size, layout, _extension.SUPPORTED_DTYPES)
    first = maps[0]
    ratio = _arguments.sampling_ratio(sampling_ratio)
    canonical_scale, canonical_level = _arguments.canonical(canonical_scale, canonical_level)
    scales = _levels.level_scales([level.shape for level in maps], image_size, layout)
    if len(maps) == 1:
        return roi_align(first, boxes, pooled_size, scales[0], ratio, False, data_format=layout)
    rois = _arguments.rois_from_boxes(boxes, _arguments.compute_dtype(first.dtype))
    levels = _levels.roi_levels(rois, scales, canonical_scale, canonical_level)
    rois, groups = _image_groups.of_call(boxes, rois,
                                         first.shape[_arguments.LAYOUT_AXES[layout][0]])
    *maps, rois, levels = _rules.varying_alike(*maps, rois, levels)
    return _multi_scale.multi_scale_p.bind(*maps, rois, levels, image_groups=groups,
                                           pooled_size=pooled_size,
                                           spatial_scales=scales, sampling_ratio=ratio,
                                           data_format=layout,
                                           implementation=_implementation.requested())


def deform_roi_align(input: ArrayLike, boxes: Boxes, offset: ArrayLike | None,
                     output_size: OutputSize, spatial_scale: float = 1.0,
                     sampling_ratio: int = -1, gamma: float = 0.1, *,
                     data_format: DataFormat = "NCHW") -> jax.Array:
    """Deformable RoI Align (Dai et al., "Deformable Convolutional Networks",
    2017): mmcv's ``deform_roi_pool``, with native CPU and CUDA kernels.

    Bin ``(i, j)`` of RoI k samples as ``roi_align(..., aligned=True)``'s
    (a -0.5 pixel offset, no clamp of the RoI size, the same adaptive grid)
    from a start moved by ``gamma * roi_width * offset[k, 0, i, j]`` along x
    and ``gamma * roi_height * offset[k, 1, i, j]`` along y (roi sizes on
    the feature map). With ``offset`` zero (or None) the result is
    ``roi_align(input, boxes, output_size, spatial_scale, sampling_ratio,
    aligned=True)`` bit for bit. Differentiable in ``input``, ``boxes`` and
    ``offset`` (first order in the last two; the conventions where it is
    not differentiable are roi_align's: docs/guides/differentiation.md),
    under ``jit`` and ``vmap``; deterministic.

    Args:
      input: [N, C, H, W] (or [N, H, W, C] with ``data_format="NHWC"``),
        float32, float64, bfloat16 or float16.
      boxes: [K, 5] (batch_index, x1, y1, x2, y2), or a list of [L_i, 4]
        arrays, one per image (as ``ps_roi_align``).
      offset: [K, 2, h, w] real array, x offsets then y offsets per bin, in
        units of ``gamma`` times the RoI's size; None for zeros. Cast to
        the boxes' dtype (float32 for 16-bit input).
      output_size: int or (h, w).
      spatial_scale: box coordinates to feature-map pixels.
      sampling_ratio: samples per bin axis; <= 0 is adaptive
        (``ceil(roi_size / output_size)``, of the RoI before any offset).
      gamma: the offsets' scale (mmcv's default 0.1), finite in the compute dtype
        (float32 for 16- and 32-bit maps).
      data_format: "NCHW" or "NHWC", keyword-only.

    Returns:
      [K, C, h, w] (or [K, h, w, C]) array of the input's dtype.
    """
    return _deformable.apply("deform_roi_align", input, boxes, offset, output_size,
                             spatial_scale, sampling_ratio, gamma, data_format, "shared")


def deform_ps_roi_align(input: ArrayLike, boxes: Boxes, offset: ArrayLike | None,
                        output_size: OutputSize, spatial_scale: float = 1.0,
                        sampling_ratio: int = -1, gamma: float = 0.1, *,
                        data_format: DataFormat = "NCHW",
                        channel_order: ChannelOrder = "torchvision") -> jax.Array:
    """Deformable Position-Sensitive RoI Align: a PS-RoI Align analogue of
    the Deformable R-FCN head's pooling (whose own sampling differs:
    rounded corners, no half-pixel sample offsets, in-map samples only).
    ``ps_roi_align``'s channels and bins, each bin's start moved
    by its offset as in :func:`deform_roi_align`; with ``offset`` zero (or
    None), ``ps_roi_align`` bit for bit.

    Args:
      input: [N, C, H, W] (or [N, H, W, C]), C = C_out * h * w.
      boxes: as in :func:`deform_roi_align`.
      offset: [K, 2, h, w], or None (as in :func:`deform_roi_align`).
      output_size: int or (h, w).
      spatial_scale: box coordinates to feature-map pixels.
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      gamma: the offsets' scale, finite in the compute dtype.
      data_format: "NCHW" or "NHWC", keyword-only.
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).

    Returns:
      [K, C_out, h, w] (or [K, h, w, C_out]) array of the input's dtype.
    """
    return _deformable.apply("deform_ps_roi_align", input, boxes, offset, output_size,
                             spatial_scale, sampling_ratio, gamma, data_format,
                             _arguments.channel_order(channel_order))
