"""The RoI family as ``flax.linen.Module``s: ``PSRoIAlign``, ``RoIAlign``,
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

nn = import_flax("linen")


class _Layer(nn.Module):
    """What every layer shares: its settings checked when it is made (the
    subclass's ``_settings()``), its call and repr those of the settings."""

    def __post_init__(self):
        self._settings()  # raises on a bad setting, here rather than at the first call
        # Lists (``RoIAlign([7, 7])``, the level names) as tuples: a module is
        # hashed where it is a static argument of jax.jit.
        for name in ("output_size", "featmap_names"):
            if isinstance(getattr(self, name, None), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()

    def __call__(self, features: ArrayLike, boxes: Boxes) -> jax.Array:
        return self._settings()(features, boxes)

    def __repr__(self) -> str:
        return self._settings().describe(type(self).__name__)


class PSRoIAlign(_Layer):
    """Position-Sensitive RoI Align layer (no parameters), like
    ``torchvision.ops.PSRoIAlign`` with Flax's NHWC layout by default.

    ``PSRoIAlign(7, 1 / 16, 2)(features, boxes)`` with features
    [N, H, W, C] (or [N, C, H, W] with ``data_format="NCHW"``), C = C_out *
    h * w, and boxes [K, 5] (batch_index, x1, y1, x2, y2) or a list of N
    arrays [L_i, 4], returns [K, h, w, C_out] (or [K, C_out, h, w]). See
    ``jax_psroi.ps_roi_align`` for the semantics of every setting; bad
    settings raise when the module is made.

    Attributes:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      data_format: "NHWC" (default) or "NCHW".
      channel_order: "torchvision" (default) or "bin_major".
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    data_format: str = "NHWC"
    channel_order: str = "torchvision"

    def _settings(self) -> PSRoIAlignConfig:
        return PSRoIAlignConfig.make(self.output_size, self.spatial_scale,
                                     self.sampling_ratio, self.data_format,
                                     self.channel_order)


class RoIAlign(_Layer):
    """RoI Align layer (no parameters), like ``torchvision.ops.RoIAlign``
    with Flax's NHWC layout by default.

    ``RoIAlign(7, 1 / 16, 2)(features, boxes)`` with features [N, H, W, C]
    (or [N, C, H, W] with ``data_format="NCHW"``) and boxes [K, 5]
    (batch_index, x1, y1, x2, y2) or a list of N arrays [L_i, 4], returns
    [K, h, w, C] (or [K, C, h, w]). See ``jax_psroi.roi_align``; bad
    settings raise when the module is made.

    Attributes:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      aligned: torchvision's ``aligned`` (default False).
      data_format: "NHWC" (default) or "NCHW".
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    aligned: bool = False
    data_format: str = "NHWC"

    def _settings(self) -> RoIAlignConfig:
        return RoIAlignConfig.make(self.output_size, self.spatial_scale, self.sampling_ratio,
                                   self.aligned, self.data_format)


class PSRoIPool(_Layer):
    """Position-Sensitive RoI Pool layer (no parameters), like
    ``torchvision.ops.PSRoIPool`` with Flax's NHWC layout by default.

    ``PSRoIPool(7, 1 / 16)(features, boxes)`` with features [N, H, W, C]
    (or [N, C, H, W] with ``data_format="NCHW"``), C = C_out * h * w, and
    boxes [K, 5] or a list of N arrays [L_i, 4], returns [K, h, w, C_out]
    (or [K, C_out, h, w]). See ``jax_psroi.ps_roi_pool``; bad settings raise
    when the module is made.

    Attributes:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      data_format: "NHWC" (default) or "NCHW".
      channel_order: "torchvision" (default) or "bin_major".
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"
    channel_order: str = "torchvision"

    def _settings(self) -> PSRoIPoolConfig:
        return PSRoIPoolConfig.make(self.output_size, self.spatial_scale, self.data_format,
                                    self.channel_order)


class RoIPool(_Layer):
    """RoI Pool layer (no parameters), like ``torchvision.ops.RoIPool``
    with Flax's NHWC layout by default.

    ``RoIPool(7, 1 / 16)(features, boxes)`` with features [N, H, W, C] (or
    [N, C, H, W] with ``data_format="NCHW"``) and boxes [K, 5] or a list of
    N arrays [L_i, 4], returns [K, h, w, C] (or [K, C, h, w]): the maximum
    of each bin's window. See ``jax_psroi.roi_pool``; bad settings raise
    when the module is made.

    Attributes:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      data_format: "NHWC" (default) or "NCHW".
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"

    def _settings(self) -> RoIPoolConfig:
        return RoIPoolConfig.make(self.output_size, self.spatial_scale, self.data_format)


class MultiScaleRoIAlign(_Layer):
    """Multi-scale RoI Align layer (no parameters), like
    ``torchvision.ops.MultiScaleRoIAlign`` with Flax's NHWC layout by
    default.

    ``MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)(features, boxes,
    image_shapes)`` with features a mapping of level name to [N, H_l, W_l, C]
    (or NCHW with ``data_format="NCHW"``), boxes a list of N arrays [L_i, 4]
    (or [K, 5]) in image pixels and image_shapes the (height, width) of every
    image returns [K, h, w, C] (or [K, C, h, w]). See
    ``jax_psroi.multi_scale_roi_align``; bad settings raise when the module
    is made. The levels are pooled in the mapping's order, which must be
    finest first: an ``OrderedDict`` keeps its order through ``jax.jit`` and
    ``jax.grad``, where a plain ``dict`` comes back with its keys sorted.

    Attributes:
      featmap_names: the names of the levels to pool from, in any order: the
        levels are taken in the order of the features mapping, as torchvision
        takes them, and must come there finest first.
      output_size: int or (h, w), bins per RoI.
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      canonical_scale, canonical_level: eq. 1's 224 and 4.
      data_format: "NHWC" (default) or "NCHW".
    """

    featmap_names: tuple[str, ...]
    output_size: int | tuple[int, int]
    sampling_ratio: int
    canonical_scale: int = 224
    canonical_level: int = 4
    data_format: str = "NHWC"

    def __call__(self, features: Mapping[str, ArrayLike], boxes: Boxes,
                 image_shapes: Sequence[tuple[int, int]]) -> jax.Array:
        return self._settings()(features, boxes, image_shapes)

    def _settings(self) -> MultiScaleRoIAlignConfig:
        return MultiScaleRoIAlignConfig.make(self.featmap_names, self.output_size,
                                             self.sampling_ratio, self.canonical_scale,
                                             self.canonical_level, self.data_format)


class DeformRoIAlign(_Layer):
    """Deformable RoI Align layer (no parameters: the offsets are an
    input, typically a head's prediction), like mmcv's ``DeformRoIPool``
    with Flax's NHWC layout by default.

    ``DeformRoIAlign(7, 1 / 16, 2)(features, boxes, offset)`` with features
    [N, H, W, C] (or [N, C, H, W]), boxes [K, 5] or a list of N arrays
    [L_i, 4] and offset [K, 2, h, w] (or None: roi_align with
    aligned=True) returns [K, h, w, C] (or [K, C, h, w]). See
    ``jax_psroi.deform_roi_align``; bad settings raise when the module is
    made.

    Attributes:
      output_size: int or (h, w), bins per RoI.
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      gamma: the offsets' scale (0.1).
      data_format: "NHWC" (default) or "NCHW".
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    gamma: float = 0.1
    data_format: str = "NHWC"

    def __call__(self, features: ArrayLike, boxes: Boxes,
                 offset: ArrayLike | None = None) -> jax.Array:
        return self._settings()(features, boxes, offset)

    def _settings(self) -> DeformRoIAlignConfig:
        return DeformRoIAlignConfig.make(self.output_size, self.spatial_scale,
                                         self.sampling_ratio, self.gamma, self.data_format)


class DeformPSRoIAlign(_Layer):
    """Deformable Position-Sensitive RoI Align layer (no parameters), the
    Deformable R-FCN head's pooling: ``DeformPSRoIAlign(7, 1 / 16, 2)(
    features, boxes, offset)`` with features [N, H, W, C], C = C_out * h *
    w, returns [K, h, w, C_out]. See ``jax_psroi.deform_ps_roi_align``.

    Attributes:
      output_size, spatial_scale, sampling_ratio, gamma, data_format: as
        in DeformRoIAlign.
      channel_order: "torchvision" (default) or "bin_major".
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    gamma: float = 0.1
    data_format: str = "NHWC"
    channel_order: str = "torchvision"

    def __call__(self, features: ArrayLike, boxes: Boxes,
                 offset: ArrayLike | None = None) -> jax.Array:
        return self._settings()(features, boxes, offset)

    def _settings(self) -> DeformPSRoIAlignConfig:
        return DeformPSRoIAlignConfig.make(self.output_size, self.spatial_scale,
                                           self.sampling_ratio, self.gamma, self.data_format,
                                           self.channel_order)
