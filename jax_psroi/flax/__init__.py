"""Flax modules around ``jax_psroi.ps_roi_align``.

``jax_psroi.flax.linen.PSRoIAlign`` (a ``flax.linen.Module``) and
``jax_psroi.flax.nnx.PSRoIAlign`` (a ``flax.nnx.Module``) are configured
like ``torchvision.ops.PSRoIAlign(output_size, spatial_scale,
sampling_ratio)``, plus ``data_format`` (default ``"NHWC"``, Flax's) and
``channel_order``, and called as ``module(features, boxes)``. They hold no
parameters. Flax is optional: ``pip install "jax_psroi[flax]"``.
"""

from jax_psroi.flax._config import PSRoIAlignConfig

__all__ = ["PSRoIAlignConfig"]
