"""The primitive of non-maximum suppression:

``nms``: (boxes [B, N, 4], scores [B, N], categories [B, N] int32)
         -> (indices [B, M] int32, counts [B] int32)

boxes and scores in one of the supported float dtypes, M =
``max_output_size``. Image b keeps ``counts[b]`` boxes, their indices best
first in ``indices[b]``, -1 after them. Boxes of different categories never
suppress each other (plain NMS passes one category).

Parameters, all static: ``iou_threshold`` (a python float: an F64 FFI
attribute), ``max_output_size`` and ``implementation`` ("native" or "xla",
_implementation.py). The CPU lowers to its native kernel
(lib/cpu/nms_kernels.h), which sorts as it goes; CUDA to XLA's sort of each
image's scores (:func:`visiting_order`) and then the native kernels of
lib/nms_schedule.h on the boxes in that order (:func:`sorted_call`, which
the tests also run on the CPU test rig); every other platform, and
``implementation="xla"``, to :func:`suppress_image` under vmap. All give
the same indices. A vmap axis folds into the images: one kernel call. Over
a device mesh, each device suppresses its own images
(_partitioning.lower_nms): no communication. Not differentiable: the
outputs are integers.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, xla

from jax_psroi import _arguments, _extension, _implementation, _partitioning, _rules

nms_p = Primitive("nms")
nms_p.multiple_results = True


def threshold_in(iou_threshold: float, dtype) -> np.generic:
    """The largest `dtype` value not above `iou_threshold`: for IoUs in
    `dtype`, ``iou > it`` is ``iou > iou_threshold`` in float64, the
    comparison torchvision makes (lib/cpu/nms_kernels.h, threshold_in).

    Except that a threshold between the smallest negative normal number and
    0 becomes that normal number: XLA's CPU runtime flushes subnormals, so
    it would compare as 0 and keep boxes of IoU 0, which any negative
    threshold suppresses. For every IoU that is not itself subnormal the
    decision is the same. Every lowering takes its threshold from here, so
    all platforms agree."""
    dtype = np.dtype(dtype)
    threshold = dtype.type(iou_threshold)
    if float(threshold) > iou_threshold:
        threshold = np.nextafter(threshold, dtype.type(-np.inf))
    smallest_normal = np.finfo(dtype).tiny
    if -smallest_normal < threshold < 0:
        threshold = -smallest_normal
    return threshold


def visiting_order(scores) -> jax.Array:
    """Indices [N] int32 of `scores` [N] in the order NMS visits them: NaN
    scores first, then descending score, ties in index order (torchvision
    sorts with a stable sort; torch orders NaN above every number)."""
    not_nan = (~jnp.isnan(scores)).astype(jnp.int32)
    # +0 for both zeros: -0.0 and 0.0 tie, in index order.
    descending = jnp.where((scores == 0) | jnp.isnan(scores), 0, -scores)
    iota = lax.iota(jnp.int32, scores.shape[0])
    return lax.sort((not_nan, descending, iota), num_keys=3)[2]


def suppress_image(boxes, scores, categories, *, iou_threshold: float, max_output_size: int):
    """One image's NMS in jax.numpy, the native kernel's semantics: `boxes`
    [N, 4], `scores` [N], `categories` [N] -> (indices [M] int32, count int32).

    One loop step per kept box: its IoUs with every box (a vector, no
    [N, N] matrix) remove the later boxes it overlaps, and the next box
    still alive is the next kept."""
    n, m = boxes.shape[0], max_output_size
    compute = _arguments.compute_dtype(boxes.dtype)
    if n == 0 or m == 0:
        return jnp.full((m,), -1, jnp.int32), jnp.int32(0)
    order = visiting_order(scores.astype(compute))
    boxes = boxes.astype(compute)[order]
    categories = categories[order]
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    area = (x2 - x1) * (y2 - y1)
    threshold = threshold_in(iou_threshold, compute)
    positions = lax.iota(jnp.int32, n)

    def keep_next(state):
        i, removed, indices, count = state
        # jnp.maximum and minimum propagate NaN, as the kernel's max_nan.
        w = jnp.maximum(0, jnp.minimum(x2[i], x2) - jnp.maximum(x1[i], x1))
        h = jnp.maximum(0, jnp.minimum(y2[i], y2) - jnp.maximum(y1[i], y1))
        inter = w * h
        iou = inter / (area[i] + area - inter)
        removed = removed | ((iou > threshold) & (categories == categories[i]) & (positions > i))
        indices = indices.at[count].set(order[i])
        alive = ~removed & (positions > i)
        following = jnp.where(jnp.any(alive), jnp.argmax(alive).astype(jnp.int32), n)
        return following, removed, indices, count + 1

    def more(state):
        i, _, _, count = state
        return (i < n) & (count < m)

    state = (jnp.int32(0), jnp.zeros((n,), bool), jnp.full((m,), -1, jnp.int32), jnp.int32(0))
    _, _, indices, count = lax.while_loop(more, keep_next, state)
    return indices, count


def _native_call(boxes, scores, categories, *, iou_threshold, max_output_size):
    images = boxes.shape[0]
    name = _extension.NMS_TARGETS["cpu"][jnp.dtype(boxes.dtype)]
    results = (jax.ShapeDtypeStruct((images, max_output_size), jnp.int32),
               jax.ShapeDtypeStruct((images,), jnp.int32))
    return jax.ffi.ffi_call(name, results)(boxes, scores, categories,
                                          iou_threshold=float(iou_threshold))


def workspace_halves(images: int, n: int) -> int:
    """uint32 elements of a sorted call's workspace of 64-bit words
    (lib/nms_schedule.h, image_words), two per word (without jax_enable_x64
    JAX has no uint64 arrays): per image, the upper triangle of a bitmask in
    blocks of 64 boxes, then one word per block."""
    words = -(-n // 64)
    return 2 * images * (64 * words * (words + 1) // 2 + words)


def sorted_call(target: str, boxes, scores, categories, *, iou_threshold, max_output_size):
    """The call of a kernel of lib/nms_schedule.h, FFI target `target` (the
    CUDA kernels, or the CPU test rig's copy of their schedule): each image's
    boxes and categories put in visiting order by XLA's sort, with the order
    itself, which maps the kernel's positions back to box indices."""
    images, n = scores.shape
    order = jax.vmap(visiting_order)(scores.astype(_arguments.compute_dtype(scores.dtype)))
    sorted_boxes = jnp.take_along_axis(boxes, order[:, :, None], axis=1)
    sorted_categories = jnp.take_along_axis(categories, order, axis=1)
    results = (jax.ShapeDtypeStruct((images, max_output_size), jnp.int32),
               jax.ShapeDtypeStruct((images,), jnp.int32),
               jax.ShapeDtypeStruct((workspace_halves(images, n),), jnp.uint32))
    indices, counts, _ = jax.ffi.ffi_call(target, results)(
        sorted_boxes, order, sorted_categories, iou_threshold=float(iou_threshold))
    return indices, counts


def _xla_call(boxes, scores, categories, *, iou_threshold, max_output_size):
    return jax.vmap(partial(suppress_image, iou_threshold=iou_threshold,
                            max_output_size=max_output_size))(boxes, scores, categories)


def _abstract_eval(boxes, scores, categories, *, iou_threshold, max_output_size,
                   implementation):
    del scores, categories, iou_threshold, implementation
    images = boxes.shape[0]
    shardings = _partitioning.nms_result_shardings(boxes)
    return (boxes.update(shape=(images, max_output_size), dtype=jnp.dtype(jnp.int32),
                         weak_type=False, **shardings["indices"]),
            boxes.update(shape=(images,), dtype=jnp.dtype(jnp.int32), weak_type=False,
                         **shardings["counts"]))


def _lowering(platform, ctx, boxes, scores, categories, *, iou_threshold, max_output_size,
              implementation):
    if not _implementation.native(platform, implementation, _extension.NMS_TARGETS):
        call = _xla_call
    elif platform == "cuda":
        call = partial(sorted_call, _extension.NMS_TARGETS["cuda"][ctx.avals_in[0].dtype])
    else:
        call = _native_call
    # In the boxes' compute dtype already, negative subnormals lifted
    # (threshold_in), whichever call takes it.
    threshold = float(threshold_in(iou_threshold,
                                   _arguments.compute_dtype(ctx.avals_in[0].dtype)))
    return _partitioning.lower_nms(ctx, boxes, scores, categories,
                                   local_call=partial(call, iou_threshold=threshold,
                                                      max_output_size=max_output_size))


def _batch(args, dims, **params):
    # The mapped axis folds into the images: [S, B, ...] -> [S * B, ...].
    size = _rules.mapped_size(args, dims)
    folded = [_rules.to_front(x, d, size) for x, d in zip(args, dims, strict=True)]
    images = folded[0].shape[1]
    folded = [x.reshape((size * images, *x.shape[2:])) for x in folded]
    indices, counts = nms_p.bind(*folded, **params)
    return ((indices.reshape((size, images, indices.shape[-1])),
             counts.reshape((size, images))), (0, 0))


nms_p.def_impl(partial(xla.apply_primitive, nms_p))
nms_p.def_abstract_eval(_abstract_eval)
_rules.register_lowerings(nms_p, _lowering)
batching.primitive_batchers[nms_p] = _batch
