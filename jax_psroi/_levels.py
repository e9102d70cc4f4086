"""Which level of a feature pyramid pools each RoI, as torchvision's
``MultiScaleRoIAlign`` decides it: shared by ``multi_scale_roi_align`` and its
reference."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jax_psroi import _arguments


def level_scales(level_shapes, image_size, data_format: str) -> tuple[float, ...]:
    """Each level's spatial scale: 2 to the rounded log2 of (level height /
    image height), from heights alone as torchvision infers it (``round``
    takes halves to even, as ``torch.round`` does). Python floats."""
    image_height, _ = _arguments.image_size(image_size)
    height_axis = _arguments.LAYOUT_AXES[data_format][2]
    return tuple(2.0 ** round(math.log2(shape[height_axis] / image_height))
                 for shape in level_shapes)


def roi_levels(rois, scales, canonical_scale, canonical_level):
    """int32 [K]: the level (index into `scales`, the finest first) of each
    RoI [K, 5], by the FPN paper's eq. 1: floor(canonical_level +
    log2(sqrt(area) / canonical_scale) + 1e-6), clamped to the pyramid.

    -1 (no level: the RoI pools to 0) where that is NaN, that is for a box
    of negative area (x2 < x1 or y2 < y1 but not both) or non-finite
    coordinates: torchvision converts the NaN to an integer no level
    matches, and leaves such an RoI's result at 0.
    """
    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    size = jnp.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    target = jnp.floor(canonical_level + jnp.log2(size / canonical_scale)
                       + jnp.asarray(1e-6, size.dtype))
    level = jnp.clip(target, k_min, k_max)
    return jnp.where(jnp.isnan(level), -1, level - k_min).astype(np.int32)


def level_rois(rois, levels, level: int):
    """[K, 5] `rois` with the batch index of every RoI not of `level` set to
    -1: to the kernels and the reference an RoI that reads nothing."""
    return rois.at[:, 0].set(jnp.where(levels == level, rois[:, 0], -1))
