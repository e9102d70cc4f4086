"""Flax modules around ``jax_psroi.ps_roi_align``, ``jax_psroi.roi_align`` and
``jax_psroi.ps_roi_pool``.

``jax_psroi.flax.linen.PSRoIAlign`` (a ``flax.linen.Module``) and
``jax_psroi.flax.nnx.PSRoIAlign`` (a ``flax.nnx.Module``) are configured
like ``torchvision.ops.PSRoIAlign(output_size, spatial_scale,
sampling_ratio)``, plus ``data_format`` (default ``"NHWC"``, Flax's) and
``channel_order``; ``RoIAlign`` in both like ``torchvision.ops.RoIAlign(
output_size, spatial_scale, sampling_ratio, aligned)`` plus ``data_format``;
``PSRoIPool`` like ``torchvision.ops.PSRoIPool(output_size, spatial_scale)``
plus ``data_format`` and ``channel_order``.
All are called as ``module(features, boxes)`` and hold no parameters. Flax
is optional: ``pip install "jax_psroi[flax]"``.
"""

from jax_psroi.flax._config import PSRoIAlignConfig, PSRoIPoolConfig, RoIAlignConfig

__all__ = ["PSRoIAlignConfig", "PSRoIPoolConfig", "RoIAlignConfig"]
