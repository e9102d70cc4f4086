"""Which level of a feature pyramid pools each RoI, as torchvision's
``MultiScaleRoIAlign`` decides it: shared by ``multi_scale_roi_align`` and its
reference."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jax_psroi import _arguments, _rounding


def level_scales(level_shapes, image_size, data_format: str) -> tuple[float, ...]:
    """Each level's spatial scale, as torchvision infers it: 2 to the rounded
    log2 of (level height / image height) in float32, from heights alone
    (rounded halves to even, as ``torch.round`` does). Python floats.

    torchvision's level mapping assumes what it does not check: that the
    levels come finest first at consecutive powers of two, level i at scale
    2**-(k_min + i) (it clamps eq. 1 to [k_min, k_max], read off the first
    and last levels, and indexes the levels by k - k_min). Any other pyramid
    pools some RoIs from no level, or from the wrong one, so it raises here,
    naming the level and the reason.
    """
    image_height, _ = _arguments.image_size(image_size)
    height_axis = _arguments.LAYOUT_AXES[data_format][2]
    heights = [shape[height_axis] for shape in level_shapes]
    exponents = []
    for index, height in enumerate(heights):
        if height == 0:
            raise ValueError(
                f"features[{index}] has height 0 (shape {tuple(level_shapes[index])}): a "
                "level's scale is inferred from its height, 2**round(log2(H / image "
                "height)), so every level needs H >= 1")
        # In float32, as torchvision takes it (torch.tensor of the ratio):
        # float64 would round ratios within an ulp of 2**(k + 1/2) otherwise.
        exponents.append(int(np.round(np.log2(np.float32(height / image_height)))))
    for index in range(1, len(exponents)):
        step = exponents[index - 1] - exponents[index]
        if step == 1:
            continue
        if step == 0:
            why = f"level {index} has the scale of level {index - 1}"
        elif step < 0:
            why = f"level {index} is finer than level {index - 1}"
        else:
            why = (f"level {index} is {2**step} times coarser than level {index - 1}: a "
                   "level between them is missing")
        raise ValueError(
            "features must be the levels of a pyramid, the finest first, each half the "
            "scale of the one before (torchvision's level mapping assumes it: it pools "
            "level i at scale 2**-(k_min + i)); got levels of heights "
            f"{', '.join(map(str, heights))} for image height {image_height}, so of scales "
            f"{', '.join(f'2**{e}' for e in exponents)} (2**round(log2(H / image height))): "
            f"{why}")
    return tuple(2.0 ** e for e in exponents)


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
    # Divided correctly rounded, as torchvision divides: XLA would multiply
    # by the reciprocal (under jit, or for more than one box), which moves a
    # box within an ulp of a boundary to the next level. XLA's log2 may
    # still be an ulp off there.
    target = jnp.floor(canonical_level + jnp.log2(_rounding.divide(size, canonical_scale))
                       + jnp.asarray(1e-6, size.dtype))
    level = jnp.clip(target, k_min, k_max)
    return jnp.where(jnp.isnan(level), -1, level - k_min).astype(np.int32)


def level_rois(rois, levels, level: int):
    """[K, 5] `rois` with the batch index of every RoI not of `level` set to
    -1: to the kernels and the reference an RoI that reads nothing."""
    return rois.at[:, 0].set(jnp.where(levels == level, rois[:, 0], -1))
