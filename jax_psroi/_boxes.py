"""The two forms of torchvision's ``boxes`` argument, made one."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Boxes = jax.Array | np.ndarray | Sequence[jax.Array]


def rois_from_boxes(boxes: Boxes, dtype) -> jax.Array:
    """[K, 5] RoIs (batch_index, x1, y1, x2, y2) from either boxes form.

    A list/tuple of [L_i, 4] arrays gives image i's boxes batch index i, as
    torchvision's ``convert_boxes_to_roi_format`` does.
    """
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            b = jnp.asarray(b, dtype)
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError("boxes given as a list must hold [L, 4] "
                                 f"arrays; element {i} is {b.shape}")
            parts.append(jnp.concatenate(
                [jnp.full((b.shape[0], 1), i, dtype), b], axis=1))
        if not parts:
            return jnp.zeros((0, 5), dtype)
        return jnp.concatenate(parts, axis=0)
    rois = jnp.asarray(boxes, dtype)
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError("boxes must be a [K, 5] array (batch_index, x1, y1, "
                         f"x2, y2) or a list of [L, 4] arrays, got {rois.shape}")
    return rois
