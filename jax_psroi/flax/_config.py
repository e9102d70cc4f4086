"""What both Flax modules share: the checked configuration, the call and the
message when Flax is missing."""

from __future__ import annotations

import dataclasses

import jax

from jax_psroi import _arguments
from jax_psroi.ops import ps_roi_align, ps_roi_pool, roi_align

FLAX_MISSING = ("jax_psroi.flax needs Flax, which is not installed: "
                "pip install 'jax_psroi[flax]' (or pip install flax)")


def import_flax(module: str):
    """Imports ``flax.<module>`` or raises an ImportError naming the extra."""
    try:
        return __import__(f"flax.{module}", fromlist=[module])
    except ImportError as error:
        raise ImportError(FLAX_MISSING) from error


@dataclasses.dataclass(frozen=True)
class PSRoIAlignConfig:
    """A PS-RoI Align layer's settings, checked when made (as
    ``ps_roi_align`` checks them at trace time).

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      data_format: "NHWC" (Flax's) or "NCHW".
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).
    """

    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    data_format: str = "NHWC"
    channel_order: str = "torchvision"

    @classmethod
    def make(cls, output_size, spatial_scale=1.0, sampling_ratio=-1,
             data_format="NHWC", channel_order="torchvision") -> PSRoIAlignConfig:
        return cls(_arguments.output_size(output_size),
                   _arguments.spatial_scale(spatial_scale),
                   _arguments.sampling_ratio(sampling_ratio),
                   _arguments.data_format(data_format),
                   _arguments.channel_order(channel_order))

    def __call__(self, features, boxes) -> jax.Array:
        return ps_roi_align(features, boxes, self.output_size, self.spatial_scale,
                            self.sampling_ratio, data_format=self.data_format,
                            channel_order=self.channel_order)

    def describe(self, name: str) -> str:
        """torchvision's repr, with the layout."""
        h, w = self.output_size
        size = h if h == w else (h, w)
        return (f"{name}(output_size={size}, spatial_scale={self.spatial_scale:g}, "
                f"sampling_ratio={self.sampling_ratio}, data_format={self.data_format!r}, "
                f"channel_order={self.channel_order!r})")


@dataclasses.dataclass(frozen=True)
class RoIAlignConfig:
    """A RoI Align layer's settings, checked when made (as ``roi_align``
    checks them at trace time).

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      aligned: torchvision's ``aligned`` (see ``roi_align``).
      data_format: "NHWC" (Flax's) or "NCHW".
    """

    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    aligned: bool = False
    data_format: str = "NHWC"

    @classmethod
    def make(cls, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
             data_format="NHWC") -> RoIAlignConfig:
        return cls(_arguments.output_size(output_size),
                   _arguments.spatial_scale(spatial_scale),
                   _arguments.sampling_ratio(sampling_ratio),
                   _arguments.aligned(aligned),
                   _arguments.data_format(data_format))

    def __call__(self, features, boxes) -> jax.Array:
        return roi_align(features, boxes, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned, data_format=self.data_format)

    def describe(self, name: str) -> str:
        """torchvision's repr, with the layout."""
        h, w = self.output_size
        size = h if h == w else (h, w)
        return (f"{name}(output_size={size}, spatial_scale={self.spatial_scale:g}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
                f"data_format={self.data_format!r})")


@dataclasses.dataclass(frozen=True)
class PSRoIPoolConfig:
    """A PS-RoI Pool layer's settings, checked when made (as ``ps_roi_pool``
    checks them at trace time).

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      data_format: "NHWC" (Flax's) or "NCHW".
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).
    """

    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"
    channel_order: str = "torchvision"

    @classmethod
    def make(cls, output_size, spatial_scale=1.0, data_format="NHWC",
             channel_order="torchvision") -> PSRoIPoolConfig:
        return cls(_arguments.output_size(output_size),
                   _arguments.spatial_scale(spatial_scale),
                   _arguments.data_format(data_format),
                   _arguments.channel_order(channel_order))

    def __call__(self, features, boxes) -> jax.Array:
        return ps_roi_pool(features, boxes, self.output_size, self.spatial_scale,
                           data_format=self.data_format, channel_order=self.channel_order)

    def describe(self, name: str) -> str:
        """torchvision's repr, with the layout."""
        h, w = self.output_size
        size = h if h == w else (h, w)
        return (f"{name}(output_size={size}, spatial_scale={self.spatial_scale:g}, "
                f"data_format={self.data_format!r}, channel_order={self.channel_order!r})")
