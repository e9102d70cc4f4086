"""Non-maximum suppression with static shapes and torchvision's semantics
(``torchvision.ops.nms`` and ``batched_nms``), native on the CPU and on
NVIDIA GPUs (the same kept indices on both: the GPU computes every IoU
as the CPU rounds it; deterministic).

Semantics, exactly those of torchvision's CPU kernel:

* boxes are visited in descending score; equal scores in index order (the
  stable sort torchvision uses); NaN scores first (torch orders NaN above
  every number), -inf last;
* integer or bool scores (torchvision takes float scores only) order and
  tie exactly as the integers do, not as their rounding to the boxes'
  float would;
* a visited box is kept unless a kept box overlaps it by an IoU strictly
  greater than ``iou_threshold``; every box that survives is kept, whatever
  its score, up to ``max_output_size``;
* the IoU is ``inter / (area1 + area2 - inter)`` with ``area = (x2 - x1) *
  (y2 - y1)`` (not clamped) and the intersection's sides clamped at 0,
  computed in float32 for float32, bfloat16 and float16 boxes and in
  float64 for float64 ones, compared with the threshold as float64;
* a degenerate box (x2 <= x1 or y2 <= y1) intersects nothing: its IoUs are
  0, or NaN where both areas sum to 0, so it neither suppresses nor is
  suppressed, and is kept where its score ranks it. A box with a NaN
  coordinate has NaN IoUs and behaves the same way;
* on the CPU, XLA runs with subnormal numbers flushed to zero, so an IoU
  or an area smaller in magnitude than the smallest normal float counts as
  0 there (torchvision keeps them; the GPU may too): only boxes whose
  sides or overlaps are near 1e-19 (float32) are decided differently. A
  negative threshold above the smallest negative normal float is taken
  as that float on every platform, which decides every IoU that is not
  itself subnormal as torchvision does (flushed to 0, it would keep boxes
  of IoU 0).

The results are padded: ``indices`` [max_output_size] int32, the kept boxes
best first and then -1, and ``count``, how many are kept (the convention of
TensorFlow's ``non_max_suppression_padded``).

Gradients: the results are integers, so nothing flows through them; the
boxes and scores enter as constants. Gather with the indices to keep the
scores' gradients: ``jnp.where(indices >= 0, scores[indices], 0)`` (the
``where`` matters: ``scores[-1]`` is the last score, not a pad).
"""

from __future__ import annotations

import math
import numbers
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_psroi import _extension, _implementation, _nms, _rules

__all__ = ["batched_nms", "nms"]


# What converting a traced value to a Python number raises.
_TRACED = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError)


def _static_threshold(iou_threshold) -> float:
    # A 0-d array counts (np.float32(0.5) is a Real already); strings and
    # bools, which float() would take, do not.
    if isinstance(iou_threshold, str | bytes | bool) or not (
            isinstance(iou_threshold, numbers.Real) or np.shape(iou_threshold) == ()):
        raise TypeError(f"iou_threshold must be a real number, got {iou_threshold!r}")
    try:
        value = float(iou_threshold)
    except _TRACED:
        raise TypeError("iou_threshold must be a static Python number (it selects the "
                        "compiled program), got a traced value; mark it static in "
                        "jax.jit") from None
    if math.isnan(value):
        raise ValueError("iou_threshold must not be NaN")
    return value


def _static_size(max_output_size, num_boxes: int) -> int:
    if max_output_size is None:
        return num_boxes
    if isinstance(max_output_size, bool | np.bool_):  # operator.index takes True as 1
        raise TypeError(f"max_output_size must be an int, got {max_output_size!r}")
    try:
        size = operator.index(max_output_size)
    except _TRACED:
        raise TypeError("max_output_size must be a static Python int (it is the result's "
                        "shape), got a traced value; mark it static in jax.jit") from None
    except TypeError:
        raise TypeError(f"max_output_size must be an int, got {max_output_size!r}") from None
    if size < 0:
        raise ValueError(f"max_output_size must be >= 0, got {size}")
    return size


def _host_ranked(values):
    """`values`, or where they are NumPy (or Python) 64-bit integers and
    jax_enable_x64 is off, their ranks among their distinct values, int32:
    jnp.asarray would wrap them to int32, 2**32 onto 0. (Traced values are
    JAX's already: under jit, it converts 64-bit arguments itself.)"""
    if jax.config.jax_enable_x64 or not isinstance(values, list | tuple | np.ndarray):
        return values
    array = np.asarray(values)
    if array.dtype.kind not in "iu" or array.dtype.itemsize < 8:
        return values
    return np.unique(array, return_inverse=True)[1].reshape(array.shape).astype(np.int32)


def _check(boxes, scores):
    boxes, scores = jnp.asarray(boxes), jnp.asarray(_host_ranked(scores))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {boxes.shape}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape [N] = {boxes.shape[:1]} like the boxes, "
                         f"got {scores.shape}")
    ranked = jnp.issubdtype(scores.dtype, jnp.integer) or scores.dtype == jnp.bool_
    if ranked and jnp.issubdtype(boxes.dtype, jnp.floating):
        # Integer scores enter as their ranks, which order and tie them as
        # the integers do: promoted to the boxes' float, 2**24 and 2**24 + 1
        # would tie (float16: 2049 and 2050). float32 at least: 16-bit boxes'
        # IoUs are float32 anyway, so their decisions are unchanged.
        dtype = jnp.result_type(boxes.dtype, jnp.float32)
        scores = _dense_ranks(scores)
    else:
        dtype = jnp.result_type(boxes, scores)
    if dtype not in _extension.SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in _extension.SUPPORTED_DTYPES)
        raise TypeError(f"boxes and scores must be floating point ({names}), got "
                        f"{boxes.dtype} and {scores.dtype}")
    # Integer results: nothing to differentiate (see the module's docstring).
    return (lax.stop_gradient(boxes.astype(dtype)), lax.stop_gradient(scores.astype(dtype)))


def _suppress(boxes, scores, categories, iou_threshold, max_output_size):
    threshold = _static_threshold(iou_threshold)
    size = _static_size(max_output_size, boxes.shape[0])
    boxes, scores, categories = _rules.varying_alike(boxes, scores, categories)
    indices, counts = _nms.nms_p.bind(
        boxes[None], scores[None], categories[None], iou_threshold=threshold,
        max_output_size=size, implementation=_implementation.requested())
    return indices[0], counts[0]


def nms(boxes, scores, iou_threshold: float, max_output_size: int | None = None):
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``.

    Args:
      boxes: [N, 4] (x1, y1, x2, y2), float32, float64, bfloat16 or float16.
      scores: [N], a float dtype (boxes and scores are promoted together),
        or integers or bools, ranked exactly (not rounded to the boxes'
        float; boxes then in float32 at least), up to 2**24 distinct
        values (float64 boxes: 2**53); 64-bit ones as ``idxs`` of
        :func:`batched_nms` are.
      iou_threshold: static float; a box is suppressed by a kept box whose
        IoU with it is strictly greater.
      max_output_size: static int M >= 0, the most boxes kept (None: N).

    Returns:
      (indices [M] int32, the kept boxes' indices best first, then -1;
      count int32 scalar, how many were kept).

    Under ``jax.vmap`` over images, a batch is one native call. Ties, NaN
    scores, degenerate boxes and gradients: the docstring of the module
    ``jax_psroi.nms`` (``sys.modules["jax_psroi.nms"]``, which this function
    shadows as an attribute; the API reference shows it).
    """
    boxes, scores = _check(boxes, scores)
    categories = jnp.zeros(scores.shape, jnp.int32)
    return _suppress(boxes, scores, categories, iou_threshold, max_output_size)


def batched_nms(boxes, scores, idxs, iou_threshold: float, max_output_size: int | None = None):
    """Non-maximum suppression per category, as ``torchvision.ops.batched_nms``:
    boxes of different ``idxs`` never suppress each other; the kept boxes of
    every category come together, best first.

    Args:
      boxes: [N, 4] (x1, y1, x2, y2), a float dtype as for :func:`nms`.
      scores: [N].
      idxs: [N] integer categories (64-bit ones ranked into int32: every
        distinct value its own category; NumPy ones on the host when
        jax_enable_x64 is off, else JAX would wrap them to 32 bits first,
        as it does to 64-bit arguments of a jitted caller).
      iou_threshold: static float.
      max_output_size: static int M >= 0 (None: N).

    Returns:
      (indices [M] int32 best first, then -1; count int32 scalar).

    The suppression is exact per category: IoUs of the boxes as given.
    torchvision's CPU version offsets each category's boxes by a multiple of
    the largest coordinate plus 1. That rounds large coordinates, so IoUs
    within a hair of the threshold may be decided differently there; and
    with negative coordinates the offsets need not separate the categories,
    so there a box may suppress an overlapping box of another category.
    """
    boxes, scores = _check(boxes, scores)
    idxs = jnp.asarray(_host_ranked(idxs))
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape [N] = {scores.shape} like the scores, got "
                         f"{idxs.shape}")
    if not jnp.issubdtype(idxs.dtype, jnp.integer):
        raise TypeError(f"idxs must be integers, got {idxs.dtype}")
    return _suppress(boxes, scores, _categories(idxs), iou_threshold, max_output_size)


def _categories(idxs) -> jax.Array:
    """`idxs` [N] as int32 categories, distinct where they are: a cast for
    32 bits and fewer (one to one), the rank among the distinct values for
    64-bit ids (a cast would wrap 2^32 onto 0)."""
    if idxs.dtype.itemsize <= 4:
        return idxs.astype(jnp.int32)
    return _dense_ranks(idxs)


def _dense_ranks(values) -> jax.Array:
    """int32 [N]: the rank of each of `values` [N] (integers or bools) among
    their distinct values, ascending, so equal values share a rank."""
    order = jnp.argsort(values)
    ordered = values[order]
    new = jnp.concatenate([jnp.zeros(1, jnp.int32),
                           (ordered[1:] != ordered[:-1]).astype(jnp.int32)])[:values.shape[0]]
    return jnp.zeros(values.shape, jnp.int32).at[order].set(jnp.cumsum(new, dtype=jnp.int32))
