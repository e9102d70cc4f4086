"""Flax modules around the native operators of ``jax_psroi``.

``jax_psroi.flax.linen.PSRoIAlign`` (a ``flax.linen.Module``) and
``jax_psroi.flax.nnx.PSRoIAlign`` (a ``flax.nnx.Module``) are configured
like ``torchvision.ops.PSRoIAlign(output_size, spatial_scale,
sampling_ratio)``, plus ``data_format`` (default ``"NHWC"``, Flax's) and
``channel_order``; ``RoIAlign`` in both like ``torchvision.ops.RoIAlign(
output_size, spatial_scale, sampling_ratio, aligned)`` plus ``data_format``;
``PSRoIPool`` like ``torchvision.ops.PSRoIPool(output_size, spatial_scale)``
plus ``data_format`` and ``channel_order``; ``RoIPool`` like
``torchvision.ops.RoIPool(output_size, spatial_scale)`` plus ``data_format``;
``MultiScaleRoIAlign`` like
``torchvision.ops.MultiScaleRoIAlign(featmap_names, output_size,
sampling_ratio)``, called as ``module(features, boxes, image_shapes)``
with features a mapping of level names to maps; ``DeformRoIAlign`` and
``DeformPSRoIAlign`` like mmcv's ``DeformRoIPool(output_size,
spatial_scale, sampling_ratio, gamma)`` plus ``data_format`` (and
``channel_order``), called as ``module(features, boxes, offset)``. The others are called as
``module(features, boxes)``; none holds parameters. Flax is optional:
``pip install "jax_psroi[flax]"``.
"""

from jax_psroi.flax._config import (
    DeformPSRoIAlignConfig,
    DeformRoIAlignConfig,
    MultiScaleRoIAlignConfig,
    PSRoIAlignConfig,
    PSRoIPoolConfig,
    RoIAlignConfig,
    RoIPoolConfig,
)

__all__ = ["DeformPSRoIAlignConfig", "DeformRoIAlignConfig", "MultiScaleRoIAlignConfig",
           "PSRoIAlignConfig", "PSRoIPoolConfig", "RoIAlignConfig", "RoIPoolConfig"]
