"""The JAX rules every operator's primitives share: typing a result,
registering a lowering per platform, and folding a ``jax.vmap`` axis into a
call's images and RoIs.

A call's operands are a map (the features, or a pooled cotangent), the RoIs
[K, 5] and, for some, further operands shaped like the pooled tensor (RoI
Pool's recorded pixels) or like the RoIs (a pyramid's levels of the RoIs).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from jax_psroi import _arguments, _image_groups, _partitioning

# The platforms with native kernels; every other lowers to the XLA path.
NATIVE_PLATFORMS = ("cpu", "cuda")


def _varying(aval) -> frozenset:
    return getattr(getattr(aval, "mat", None), "varying", frozenset())


def varying_alike(*operands):
    """`operands` cast to vary over every manual mesh axis (inside
    ``shard_map``) any of them varies over, as JAX's own binary operations
    cast theirs: the call's results then vary over all of them, and the
    transpose of the cast sums a less varying operand's cotangent over the
    axes it lacked (features replicated over RoIs split across shards get
    their gradient summed). Outside ``shard_map`` a no-op."""
    avals = [jax.typeof(x) for x in operands]
    union = frozenset().union(*map(_varying, avals))
    return tuple(x if _varying(aval) >= union
                 else jax.lax.pcast(x, tuple(sorted(union - _varying(aval))), to="varying")
                 for x, aval in zip(operands, avals, strict=True))


def image_blocks(operand_or_shape, rois, image_groups, data_format) -> _image_groups.Blocks:
    """_partitioning's blocks of images (and the period of the image groups)
    of a call with features (or their shape) `operand_or_shape` and `rois`
    [K, 5]."""
    shape = getattr(operand_or_shape, "shape", operand_or_shape)
    num_images = shape[_arguments.LAYOUT_AXES[data_format][0]]
    return _image_groups.blocks(image_groups, rois.shape[0], num_images)


def typed_result(direction: str, operand, rois, shape, *, data_format: str,
                 channel_order: str, image_groups):
    """The abstract result of shape `shape` of a call of `direction` on
    `operand` (features forward, a pooled cotangent backward): typed like
    the operand, so that inside ``shard_map`` it varies over the manual mesh
    axes its operands vary over (the public calls cast them alike:
    ``varying_alike``), and under explicit mesh axes with the split the
    partitioning gives it."""
    result = operand.update(shape=tuple(shape), weak_type=False)
    features = operand.shape if direction == "forward" else shape
    return _partitioning.typed_result(
        direction, operand, rois, result, data_format=data_format, channel_order=channel_order,
        image_blocks=image_blocks(features, rois, image_groups, data_format))


def register_lowerings(primitive, lowering: Callable, *, with_devices: bool = True) -> None:
    """Registers ``lowering(platform, ctx, *operands, **params)`` for
    `primitive`: the native platforms' own, and platform None for every
    other. `with_devices`: lowered with the program's devices in hand, which
    its sharding rules need (_partitioning.lower_with_devices)."""
    if with_devices:
        _partitioning.lower_with_devices(primitive)
    mlir.register_lowering(primitive, partial(lowering, None))
    for platform in NATIVE_PLATFORMS:
        mlir.register_lowering(primitive, partial(lowering, platform), platform=platform)


def features_shape_of(direction: str, ctx) -> tuple:
    """The features' shape of a call being lowered: its first operand's
    forward, its result's backward."""
    return (ctx.avals_out if direction == "backward" else ctx.avals_in)[0].shape


# --- Folding a mapped axis ----------------------------------------------------
# A mapped axis of size B over N images becomes B * N images and B * K RoIs
# in the same image groups (_image_groups.py: element b's RoIs read element
# b's images by integer arithmetic in the kernels; batch indices are left as
# they are). Unmapped operands are broadcast, except features, which are
# never copied: with only the RoIs mapped, the B RoI sets are concatenated
# over one image set.

def mapped_size(args, dims) -> int:
    """The size of the mapped axis: that of the first mapped operand."""
    return next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)


def to_front(x, dim, size):
    """`x` with its mapped axis `dim` first (broadcast to `size` if None)."""
    if dim is None:
        return jnp.broadcast_to(x, (size, *x.shape))
    return jnp.moveaxis(x, dim, 0)


def fold_maps(maps, map_dims, rois, rois_dim, size, image_groups):
    """A forward's maps (features, or a pyramid's levels) and RoIs folded
    over a mapped axis of `size`: (maps [B * N, ...], or unmapped ones,
    rois [B * K, 5] in the folded call's order, and the folding, which
    says how many copies of the groups that order puts first;
    _image_groups.fold)."""
    rois = to_front(rois, rois_dim, size)
    if all(dim is None for dim in map_dims):
        # The B RoI sets read the same images: copies of the groups, in order.
        return (list(maps), _image_groups.fold(rois, 1),
                _image_groups.Folding(size, rois.shape[1], 1))
    maps = [to_front(x, dim, size) for x, dim in zip(maps, map_dims, strict=True)]
    copies = _image_groups.copies(image_groups, rois.shape[1], maps[0].shape[1])
    # Explicit sizes: with a zero-size axis, -1 is ambiguous.
    maps = [x.reshape((size * x.shape[1], *x.shape[2:])) for x in maps]
    return (maps, _image_groups.fold(rois, copies),
            _image_groups.Folding(size, rois.shape[1], copies))


def fold_backward(cotangent, cotangent_dim, rois, rois_dim, size, image_groups,
                  num_images):
    """A backward's pooled-like cotangent and RoIs folded over a mapped axis
    of `size` (the gradient is per element: its images are always folded),
    and the folding."""
    rois = to_front(rois, rois_dim, size)
    copies = _image_groups.copies(image_groups, rois.shape[1], num_images)
    return (_image_groups.fold(to_front(cotangent, cotangent_dim, size), copies),
            _image_groups.fold(rois, copies),
            _image_groups.Folding(size, rois.shape[1], copies))


def fold_like_rois(x, dim, folding):
    """A further operand shaped like the RoIs or the pooled tensor, folded
    as the RoIs were."""
    return _image_groups.fold(to_front(x, dim, folding.size), folding.copies)


def folded_input_shape(size: int, input_shape) -> tuple:
    """A backward's features shape with the mapped axis folded into the images."""
    return (size * input_shape[0], *input_shape[1:])
