"""Box utilities in ``jax.numpy`` with torchvision's semantics and names
(``torchvision.ops.boxes``), with static shapes: what would select boxes
returns a boolean mask instead.

Boxes are ``[..., 4]``; ``xyxy`` is (x1, y1, x2, y2), ``xywh`` (x1, y1,
width, height), ``cxcywh`` (centre x, centre y, width, height).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

__all__ = ["box_area", "box_convert", "box_iou", "clip_boxes_to_image", "remove_small_boxes"]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def _check_boxes(boxes, name: str = "boxes") -> jax.Array:
    boxes = jnp.asarray(boxes)
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {boxes.shape}")
    return boxes


def _upcast(values) -> jax.Array:
    """`values` widened as torchvision's box arithmetic widens them: 16-bit
    floats to float32, integers narrower than 32 bits to int32 (a 300 x 300
    box's area is past float16's range)."""
    if jnp.issubdtype(values.dtype, jnp.floating):
        return values.astype(jnp.promote_types(values.dtype, jnp.float32))
    if jnp.issubdtype(values.dtype, jnp.integer) and values.dtype.itemsize < 4:
        return values.astype(jnp.int32)
    return values


def box_area(boxes) -> jax.Array:
    """Areas ``(x2 - x1) * (y2 - y1)`` of `boxes` [..., 4] (xyxy): [...],
    in float32 for 16-bit floats and int32 for narrower integers (as
    torchvision's, widened first).

    Not clamped, as torchvision's: a box with x2 < x1 (or y2 < y1) has a
    negative area, one with both a positive area."""
    boxes = _upcast(_check_boxes(boxes))
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2) -> jax.Array:
    """Pairwise intersection over union of `boxes1` [N, 4] and `boxes2`
    [M, 4] (xyxy): [N, M].

    ``inter / (area1 + area2 - inter)`` with the intersection's sides
    clamped at 0 and the areas of :func:`box_area`; two empty boxes give
    0 / 0 = NaN, as in torchvision. As there, the sides are differences in
    the boxes' dtype, widened before they multiply (16-bit floats to
    float32)."""
    boxes1, boxes2 = _check_boxes(boxes1, "boxes1"), _check_boxes(boxes2, "boxes2")
    if boxes1.ndim != 2 or boxes2.ndim != 2:
        raise ValueError(f"box_iou takes boxes [N, 4] and [M, 4], got {boxes1.shape} and "
                         f"{boxes2.shape}")
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    sides = jnp.maximum(_upcast(bottom_right - top_left), 0)
    inter = sides[..., 0] * sides[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def box_convert(boxes, in_fmt: str, out_fmt: str) -> jax.Array:
    """`boxes` [..., 4] from format `in_fmt` to `out_fmt` (each "xyxy",
    "xywh" or "cxcywh"): [..., 4]."""
    boxes = _check_boxes(boxes)
    for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"{name} must be one of {BOX_FORMATS}, got {fmt!r}")
    if in_fmt == out_fmt:
        return boxes
    a, b, c, d = (boxes[..., k] for k in range(4))
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        # / 2, not 0.5 *: integer boxes then give a float that is not weakly
        # typed (a later bfloat16 operand would round it), as for xyxy below.
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    # (a, b, c, d) is xyxy now.
    if out_fmt == "xywh":
        a, b, c, d = a, b, c - a, d - b
    elif out_fmt == "cxcywh":
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    return jnp.stack([a, b, c, d], axis=-1)


def clip_boxes_to_image(boxes, size) -> jax.Array:
    """`boxes` [..., 4] (xyxy) with x clamped to [0, width] and y to
    [0, height], `size` being (height, width) as in torchvision: [..., 4]."""
    boxes = _check_boxes(boxes)
    height, width = (_bound(value, boxes.dtype) for value in size)
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def _bound(value, dtype):
    """An image side `value` as a bound for boxes of `dtype`: an integer
    dtype's largest value caps a Python int (jnp.clip would convert it with
    wraparound: 70000 is -25536 in int16); every box of the dtype is inside."""
    if jnp.issubdtype(dtype, jnp.integer) and isinstance(value, numbers.Integral):
        return min(int(value), int(jnp.iinfo(dtype).max))
    return value


def remove_small_boxes(boxes, min_size: float) -> jax.Array:
    """Which of `boxes` [..., 4] (xyxy) are at least `min_size` wide and
    tall: a boolean mask [...] (torchvision returns the indices of these;
    a mask keeps shapes static). A low score does not remove a box from
    :func:`jax_psroi.nms` (the best survivors come first, but every
    survivor is kept), so drop small boxes from its result with the mask:
    ``keep[jnp.maximum(indices, 0)] & (indices >= 0)``."""
    boxes = _check_boxes(boxes)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size)
