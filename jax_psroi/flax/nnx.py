"""The RoI family as ``flax.nnx.Module``s: ``PSRoIAlign``, ``RoIAlign``,
``PSRoIPool``, ``RoIPool``, ``MultiScaleRoIAlign``, ``DeformRoIAlign`` and
``DeformPSRoIAlign``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.typing import ArrayLike

from jax_psroi._arguments import Boxes
from jax_psroi.flax._config import (
    DeformPSRoIAlignConfig,
    DeformRoIAlignConfig,
    MultiScaleRoIAlignConfig,
    PSRoIAlignConfig,
    PSRoIPoolConfig,
    RoIAlignConfig,
    RoIPoolConfig,
    import_flax,
)

nnx = import_flax("nnx")


class PSRoIAlign(nnx.Module):
    """Position-Sensitive RoI Align layer (no parameters), like
    ``torchvision.ops.PSRoIAlign`` with Flax's NHWC layout by default.

    ``PSRoIAlign(7, 1 / 16, 2)(features, boxes)`` with features
    [N, H, W, C] (or [N, C, H, W] with ``data_format="NCHW"``), C = C_out *
    h * w, and boxes [K, 5] (batch_index, x1, y1, x2, y2) or a list of N
    arrays [L_i, 4], returns [K, h, w, C_out] (or [K, C_out, h, w]). See
    ``jax_psroi.ps_roi_align`` for the semantics of every argument; bad
    arguments raise here.

    Args:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      data_format: "NHWC" (default) or "NCHW", keyword-only.
      channel_order: "torchvision" (default) or "bin_major", keyword-only.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1, *,
                 data_format: str = "NHWC", channel_order: str = "torchvision"):
        self.settings = PSRoIAlignConfig.make(output_size, spatial_scale, sampling_ratio,
                                              data_format, channel_order)

    def __call__(self, features: ArrayLike, boxes: Boxes) -> jax.Array:
        return self.settings(features, boxes)


class RoIAlign(nnx.Module):
    """RoI Align layer (no parameters), like ``torchvision.ops.RoIAlign``
    with Flax's NHWC layout by default.

    ``RoIAlign(7, 1 / 16, 2)(features, boxes)`` with features [N, H, W, C]
    (or [N, C, H, W] with ``data_format="NCHW"``) and boxes [K, 5] or a list
    of N arrays [L_i, 4], returns [K, h, w, C] (or [K, C, h, w]). See
    ``jax_psroi.roi_align``; bad arguments raise here.

    Args:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      aligned: torchvision's ``aligned`` (default False).
      data_format: "NHWC" (default) or "NCHW", keyword-only.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False, *, data_format: str = "NHWC"):
        self.settings = RoIAlignConfig.make(output_size, spatial_scale, sampling_ratio,
                                            aligned, data_format)

    def __call__(self, features: ArrayLike, boxes: Boxes) -> jax.Array:
        return self.settings(features, boxes)


class PSRoIPool(nnx.Module):
    """Position-Sensitive RoI Pool layer (no parameters), like
    ``torchvision.ops.PSRoIPool`` with Flax's NHWC layout by default.

    ``PSRoIPool(7, 1 / 16)(features, boxes)``: see ``linen.PSRoIPool`` for
    the shapes and ``jax_psroi.ps_roi_pool`` for the semantics; bad
    arguments raise here.

    Args:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      data_format: "NHWC" (default) or "NCHW", keyword-only.
      channel_order: "torchvision" (default) or "bin_major", keyword-only.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, *,
                 data_format: str = "NHWC", channel_order: str = "torchvision"):
        self.settings = PSRoIPoolConfig.make(output_size, spatial_scale, data_format,
                                             channel_order)

    def __call__(self, features: ArrayLike, boxes: Boxes) -> jax.Array:
        return self.settings(features, boxes)


class RoIPool(nnx.Module):
    """RoI Pool layer (no parameters), like ``torchvision.ops.RoIPool``
    with Flax's NHWC layout by default.

    ``RoIPool(7, 1 / 16)(features, boxes)``: see ``linen.RoIPool`` for the
    shapes and ``jax_psroi.roi_pool`` for the semantics; bad arguments raise
    here.

    Args:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      data_format: "NHWC" (default) or "NCHW", keyword-only.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, *,
                 data_format: str = "NHWC"):
        self.settings = RoIPoolConfig.make(output_size, spatial_scale, data_format)

    def __call__(self, features: ArrayLike, boxes: Boxes) -> jax.Array:
        return self.settings(features, boxes)


class MultiScaleRoIAlign(nnx.Module):
    """Multi-scale RoI Align layer (no parameters), like
    ``torchvision.ops.MultiScaleRoIAlign`` with Flax's NHWC layout by
    default: ``MultiScaleRoIAlign(["p2", "p3"], 7, 2)(features, boxes,
    image_shapes)``; see ``linen.MultiScaleRoIAlign`` for the shapes and
    ``jax_psroi.multi_scale_roi_align`` for the semantics. Bad arguments
    raise here.

    Args:
      featmap_names: the names of the levels to pool from, in any order: the
        levels are taken in the order of the features mapping, as torchvision
        takes them, and must come there finest first.
      output_size: int or (h, w), bins per RoI.
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      canonical_scale, canonical_level: eq. 1's 224 and 4, keyword-only.
      data_format: "NHWC" (default) or "NCHW", keyword-only.
    """

    def __init__(self, featmap_names, output_size, sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4,
                 data_format: str = "NHWC"):
        self.settings = MultiScaleRoIAlignConfig.make(featmap_names, output_size,
                                                      sampling_ratio, canonical_scale,
                                                      canonical_level, data_format)

    def __call__(self, features: Mapping[str, ArrayLike], boxes: Boxes,
                 image_shapes: Sequence[tuple[int, int]]) -> jax.Array:
        return self.settings(features, boxes, image_shapes)


class DeformRoIAlign(nnx.Module):
    """Deformable RoI Align layer (no parameters: the offsets are an
    input), like mmcv's ``DeformRoIPool`` with Flax's NHWC layout by
    default: ``DeformRoIAlign(7, 1 / 16, 2)(features, boxes, offset)``. See
    ``jax_psroi.deform_roi_align``; bad arguments raise here.

    Args:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      gamma: the offsets' scale (0.1).
      data_format: "NHWC" (default) or "NCHW", keyword-only.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 gamma: float = 0.1, *, data_format: str = "NHWC"):
        self.settings = DeformRoIAlignConfig.make(output_size, spatial_scale, sampling_ratio,
                                                  gamma, data_format)

    def __call__(self, features: ArrayLike, boxes: Boxes,
                 offset: ArrayLike | None = None) -> jax.Array:
        return self.settings(features, boxes, offset)


class DeformPSRoIAlign(nnx.Module):
    """Deformable Position-Sensitive RoI Align layer (no parameters), the
    Deformable R-FCN head's pooling. See ``jax_psroi.deform_ps_roi_align``.

    Args:
      output_size, spatial_scale, sampling_ratio, gamma: as DeformRoIAlign.
      data_format: "NHWC" (default) or "NCHW", keyword-only.
      channel_order: "torchvision" (default) or "bin_major", keyword-only.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 gamma: float = 0.1, *, data_format: str = "NHWC",
                 channel_order: str = "torchvision"):
        self.settings = DeformPSRoIAlignConfig.make(output_size, spatial_scale,
                                                    sampling_ratio, gamma, data_format,
                                                    channel_order)

    def __call__(self, features: ArrayLike, boxes: Boxes,
                 offset: ArrayLike | None = None) -> jax.Array:
        return self.settings(features, boxes, offset)
