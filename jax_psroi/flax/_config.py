"""What both Flax modules share: the checked configuration, the call and the
message when Flax is missing."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

import jax

from jax_psroi import _arguments, _deformable, _operators, ops

FLAX_MISSING = ("jax_psroi.flax needs Flax, which is not installed: "
                "pip install 'jax_psroi[flax]' (or pip install flax)")


def import_flax(module: str):
    """Imports ``flax.<module>`` or raises an ImportError naming the extra."""
    try:
        return __import__(f"flax.{module}", fromlist=[module])
    except ImportError as error:
        raise ImportError(FLAX_MISSING) from error


def _size_text(output_size) -> str:
    """An output size as torchvision's reprs show it: n for (n, n)."""
    h, w = output_size
    return str(h) if h == w else str((h, w))


# How each setting of a single-level layer is checked: the shared ones here,
# the operator's own by the registry (_operators.ATTRIBUTE_CHECKS).
_SHARED_CHECKS = {"output_size": _arguments.output_size,
                  "spatial_scale": _arguments.spatial_scale,
                  "data_format": _arguments.data_format}


class _OperatorConfig:
    """A single-level layer's settings: the dataclass fields of a subclass,
    in its operator's positional order, for the operator of its spec
    (``operator``). Made, called and shown from the registry."""

    operator: ClassVar[_operators.Operator]

    @classmethod
    def make(cls, *args, **kwargs):
        """The settings, each checked as the operator's function checks it
        at trace time (positional in the fields' order, as torchvision's
        modules take them)."""
        given = cls(*args, **kwargs)
        checks = {**_SHARED_CHECKS, **_operators.ATTRIBUTE_CHECKS}
        return cls(**{field.name: checks[field.name](getattr(given, field.name))
                      for field in dataclasses.fields(cls)})

    def __call__(self, features, boxes) -> jax.Array:
        function = getattr(ops, self.operator.name)
        return function(features, boxes, self.output_size, self.spatial_scale,
                        data_format=self.data_format,
                        **{name: getattr(self, name) for name in self.operator.attributes})

    def describe(self, name: str) -> str:
        """torchvision's repr, with the layout."""
        def shown(field):
            value = getattr(self, field.name)
            if field.name == "output_size":
                return _size_text(value)
            if field.name == "spatial_scale":
                return f"{value:g}"
            return repr(value) if isinstance(value, str) else str(value)
        settings = ", ".join(f"{field.name}={shown(field)}" for field in dataclasses.fields(self))
        return f"{name}({settings})"


@dataclasses.dataclass(frozen=True)
class PSRoIAlignConfig(_OperatorConfig):
    """A PS-RoI Align layer's settings, checked when made (as
    ``ps_roi_align`` checks them at trace time).

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      data_format: "NHWC" (Flax's) or "NCHW".
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).
    """

    operator: ClassVar[_operators.Operator] = _operators.PS_ROI_ALIGN
    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    data_format: str = "NHWC"
    channel_order: str = "torchvision"


@dataclasses.dataclass(frozen=True)
class RoIAlignConfig(_OperatorConfig):
    """A RoI Align layer's settings, checked when made (as ``roi_align``
    checks them at trace time).

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      aligned: torchvision's ``aligned`` (see ``roi_align``).
      data_format: "NHWC" (Flax's) or "NCHW".
    """

    operator: ClassVar[_operators.Operator] = _operators.ROI_ALIGN
    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    aligned: bool = False
    data_format: str = "NHWC"


@dataclasses.dataclass(frozen=True)
class PSRoIPoolConfig(_OperatorConfig):
    """A PS-RoI Pool layer's settings, checked when made (as ``ps_roi_pool``
    checks them at trace time).

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      data_format: "NHWC" (Flax's) or "NCHW".
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).
    """

    operator: ClassVar[_operators.Operator] = _operators.PS_ROI_POOL
    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"
    channel_order: str = "torchvision"


@dataclasses.dataclass(frozen=True)
class RoIPoolConfig(_OperatorConfig):
    """A RoI Pool layer's settings, checked when made (as ``roi_pool``
    checks them at trace time).

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      data_format: "NHWC" (Flax's) or "NCHW".
    """

    operator: ClassVar[_operators.Operator] = _operators.ROI_POOL
    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"


@dataclasses.dataclass(frozen=True)
class DeformRoIAlignConfig:
    """A deformable RoI Align layer's settings, checked when made (as
    ``deform_roi_align`` checks them at trace time), like mmcv's
    ``DeformRoIPool(output_size, spatial_scale, sampling_ratio, gamma)``.

    Attributes:
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      spatial_scale: box coordinates to feature-map pixels (1 / stride).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      gamma: the offsets' scale.
      data_format: "NHWC" (Flax's) or "NCHW".
    """

    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    gamma: float = 0.1
    data_format: str = "NHWC"

    @classmethod
    def make(cls, output_size, spatial_scale=1.0, sampling_ratio=-1, gamma=0.1,
             data_format="NHWC"):
        return cls(_arguments.output_size(output_size), _arguments.spatial_scale(spatial_scale),
                   _arguments.sampling_ratio(sampling_ratio), _deformable.checked_gamma(gamma),
                   _arguments.data_format(data_format))

    def __call__(self, features, boxes, offset=None) -> jax.Array:
        return ops.deform_roi_align(features, boxes, offset, self.output_size,
                                    self.spatial_scale, self.sampling_ratio, self.gamma,
                                    data_format=self.data_format)

    def describe(self, name: str) -> str:
        return (f"{name}(output_size={_size_text(self.output_size)}, "
                f"spatial_scale={self.spatial_scale:g}, sampling_ratio={self.sampling_ratio}, "
                f"gamma={self.gamma:g}, data_format={self.data_format!r})")


@dataclasses.dataclass(frozen=True)
class DeformPSRoIAlignConfig:
    """A deformable PS-RoI Align layer's settings (``deform_ps_roi_align``):
    DeformRoIAlignConfig's and the channel order.

    Attributes:
      output_size, spatial_scale, sampling_ratio, gamma, data_format: as in
        DeformRoIAlignConfig.
      channel_order: "torchvision" or "bin_major" (see ``ps_roi_align``).
    """

    output_size: tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    gamma: float = 0.1
    data_format: str = "NHWC"
    channel_order: str = "torchvision"

    @classmethod
    def make(cls, output_size, spatial_scale=1.0, sampling_ratio=-1, gamma=0.1,
             data_format="NHWC", channel_order="torchvision"):
        plain = DeformRoIAlignConfig.make(output_size, spatial_scale, sampling_ratio, gamma,
                                          data_format)
        return cls(*dataclasses.astuple(plain), _arguments.channel_order(channel_order))

    def __call__(self, features, boxes, offset=None) -> jax.Array:
        return ops.deform_ps_roi_align(features, boxes, offset, self.output_size,
                                       self.spatial_scale, self.sampling_ratio, self.gamma,
                                       data_format=self.data_format,
                                       channel_order=self.channel_order)

    def describe(self, name: str) -> str:
        plain = DeformRoIAlignConfig(*dataclasses.astuple(self)[:5]).describe(name)
        return f"{plain[:-1]}, channel_order={self.channel_order!r})"


@dataclasses.dataclass(frozen=True)
class MultiScaleRoIAlignConfig:
    """A multi-scale RoI Align layer's settings, checked when made, like
    ``torchvision.ops.MultiScaleRoIAlign(featmap_names, output_size,
    sampling_ratio, canonical_scale=224, canonical_level=4)``.

    Attributes:
      featmap_names: the names of the levels to pool from, looked up in the
        features mapping a call gets; the levels are taken in the mapping's
        order, as torchvision takes them, which must be finest first.
      output_size: (h, w) bins per RoI (an int is made (n, n)).
      sampling_ratio: samples per bin axis; <= 0 is adaptive.
      canonical_scale, canonical_level: the FPN paper's eq. 1 (224, 4).
      data_format: "NHWC" (Flax's) or "NCHW".
    """

    featmap_names: tuple[str, ...]
    output_size: tuple[int, int]
    sampling_ratio: int
    canonical_scale: int = 224
    canonical_level: int = 4
    data_format: str = "NHWC"

    @classmethod
    def make(cls, featmap_names, output_size, sampling_ratio, canonical_scale=224,
             canonical_level=4, data_format="NHWC") -> MultiScaleRoIAlignConfig:
        if (not isinstance(featmap_names, Sequence) or isinstance(featmap_names, str)
                or not featmap_names or not all(isinstance(name, str) for name in featmap_names)):
            raise TypeError("featmap_names must be a non-empty sequence of level names, got "
                            f"{featmap_names!r}")
        return cls(tuple(featmap_names), _arguments.output_size(output_size),
                   _arguments.sampling_ratio(sampling_ratio),
                   *_arguments.canonical(canonical_scale, canonical_level),
                   _arguments.data_format(data_format))

    def __call__(self, features: Mapping, boxes, image_shapes) -> jax.Array:
        """features: {name: [N, H, W, C] map} (or NCHW) holding every name of
        featmap_names, whose levels are pooled in the mapping's order (as
        torchvision's ``_filter_input`` takes them: finest first); boxes: a
        list of N [L_i, 4] arrays (or [K, 5]); image_shapes: the (height,
        width) of every image, whose maximum gives the level scales
        (torchvision's rule)."""
        if not isinstance(features, Mapping):
            raise TypeError("features must be a mapping from level name to feature map "
                            f"(torchvision's OrderedDict), got {type(features).__name__}")
        missing = [name for name in self.featmap_names if name not in features]
        if missing:
            raise ValueError(f"features must hold every level of featmap_names "
                             f"{list(self.featmap_names)}; it has no level named "
                             f"{missing[0]!r}, only {list(features)}")
        levels = [level for name, level in features.items() if name in self.featmap_names]
        if not isinstance(image_shapes, (list, tuple)):
            raise TypeError("image_shapes must be a list of the (height, width) of every "
                            f"image, got {type(image_shapes).__name__}")
        if not image_shapes:
            raise ValueError("image_shapes must hold the (height, width) of every image, "
                             "got an empty list")
        shapes = [_arguments.image_size(shape, f"image_shapes[{index}]")
                  for index, shape in enumerate(image_shapes)]
        image_size = (max(h for h, _ in shapes), max(w for _, w in shapes))
        return ops.multi_scale_roi_align(levels, boxes, self.output_size,
                                         self.sampling_ratio, image_size,
                                         canonical_scale=self.canonical_scale,
                                         canonical_level=self.canonical_level,
                                         data_format=self.data_format)

    def describe(self, name: str) -> str:
        """torchvision's repr, with the layout."""
        size = _size_text(self.output_size)
        return (f"{name}(featmap_names={list(self.featmap_names)}, output_size={size}, "
                f"sampling_ratio={self.sampling_ratio}, data_format={self.data_format!r})")
