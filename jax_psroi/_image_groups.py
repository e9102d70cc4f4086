"""Which image each RoI reads, in integers: the primitives' ``image_groups``.

``image_groups = (rois_per_group, images_per_group)``: the K RoIs of a call
come in groups of ``rois_per_group``; RoI k's group reads the
``images_per_group`` images of image group ``(k // rois_per_group) % (N //
images_per_group)``, and its batch index counts from that group's first
image (the kernels' ``roi_image`` in lib/roi_math.h; ``images`` below for
the ``jax.numpy`` lowering). A call from the public functions is one group,
(K, N), whose batch indices are the images themselves, or, for a list of
equally many boxes per image, one group per image, (L, 1), every index 0.

``jax.vmap`` folds its mapped axis of size B into the images (B * N) and
the RoIs (B * K) and leaves the groups as they are: element b's RoIs then
read element b's images, an offset of whole groups computed in integers by
the kernels, so it is exact however many images a batch folds together (a
float32 batch index stops being exact past 2^24). The RoIs of a call always
number a multiple of ``rois_per_group * groups`` (groups = N //
images_per_group): ``copies`` that many times, the same RoI groups over the
same images (vmap over RoIs alone concatenates the B RoI sets over one set
of images). A vmap over the images of a call with several copies puts the
copies first in the folded RoI order (``fold``), so the groups still count
every image group once per copy; ``unfold`` puts the results back.

When there is one copy, the groups are blocks of RoIs that read only their
own block of images, which lets a partitioned program split the call over
images without communication (``blocks``; _partitioning.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ImageGroups = tuple[int, int]


def whole(num_rois: int, num_images: int) -> ImageGroups:
    """One group: every RoI's batch index is its image."""
    return max(num_rois, 1), num_images


def of_call(boxes, rois: jax.Array, num_images: int) -> tuple[jax.Array, ImageGroups]:
    """The RoIs [K, 5] of a public call with `boxes` (_arguments.Boxes) over
    `num_images` images, and their groups: for a list of equally many (L)
    boxes for each image, one group per image (every batch index 0), whose
    blocks a partitioned program can split; otherwise one group."""
    if (isinstance(boxes, (list, tuple)) and num_images > 1 and len(boxes) == num_images
            and len({np.shape(b)[0] for b in boxes}) == 1):
        return rois.at[:, 0].set(0), (max(rois.shape[0] // num_images, 1), 1)
    return rois, whole(rois.shape[0], num_images)


def _groups(image_groups: ImageGroups, num_images: int) -> int:
    return num_images // image_groups[1] if image_groups[1] > 0 else 0


def copies(image_groups: ImageGroups, num_rois: int, num_images: int) -> int:
    """How many times a call's RoI groups go over its image groups (1 when
    it has no images: then every arrangement reads nothing)."""
    groups = _groups(image_groups, num_images)
    if groups == 0 or num_rois == 0:
        return 1
    return num_rois // (groups * image_groups[0])


class Blocks(NamedTuple):
    """What a partitioned program may split of a call's RoIs and images.

    count: the number of equal consecutive blocks the RoIs and images come
      in, block b's RoIs reading only block b's images (1: none known).
    period: how many consecutive RoIs go once over every image group (1
      with one group). A device that holds whole periods of RoIs, and every
      image, computes the images they read as the whole call does (the
      group of a RoI is counted from the first RoI the device holds); any
      other run of RoIs would read other groups' images.
    """
    count: int
    period: int


def blocks(image_groups: ImageGroups, num_rois: int, num_images: int) -> Blocks:
    """The blocks of a call's RoIs and images, and the period of its groups."""
    groups = _groups(image_groups, num_images)
    if groups <= 1:
        return Blocks(1, 1)
    count = groups if num_rois == groups * image_groups[0] else 1
    return Blocks(count, groups * image_groups[0])


def fold(x: jax.Array, num_copies: int) -> jax.Array:
    """[B, K, ...] per-element RoIs (or pooled values) -> [B * K, ...] in the
    folded call's order: copies first, then B, then the RoI groups."""
    size, num_rois, rest = x.shape[0], x.shape[1], x.shape[2:]
    if num_copies > 1:
        x = x.reshape((size, num_copies, num_rois // num_copies, *rest)).swapaxes(0, 1)
    return x.reshape((size * num_rois, *rest))


class Folding(NamedTuple):
    """How a mapped axis was folded into a call: `size` elements of
    `num_rois` RoIs each, `copies` copies of the groups put first."""
    size: int
    num_rois: int
    copies: int


def unfold(x: jax.Array, folding: Folding) -> jax.Array:
    """The inverse of ``fold``: [B * K, ...] -> [B, K, ...] (K from the
    folding: with B = 0 the folded axis does not hold it)."""
    size, num_rois, num_copies = folding
    rest = x.shape[1:]
    if num_copies > 1:
        x = x.reshape((num_copies, size, num_rois // num_copies, *rest)).swapaxes(0, 1)
    return x.reshape((size, num_rois, *rest))


def images(rois: jax.Array, image_groups: ImageGroups | None, num_images: int):
    """[K] int32 image each RoI reads (0 where it reads none) and [K] bool:
    does it read one, as the kernels decide it. torchvision truncates the
    batch index toward zero, accepting (-1, images_per_group)."""
    if num_images >= 2**31:
        raise ValueError(f"the jax.numpy lowering takes fewer than 2^31 images, got "
                         f"{num_images}")
    rois_per_group, per_group = image_groups or whole(rois.shape[0], num_images)
    per_group = per_group or num_images
    batch = rois[:, 0]
    ok = (batch > -1) & (batch < per_group) & (num_images > 0)
    group = (jnp.arange(rois.shape[0], dtype=jnp.int32) // rois_per_group) % max(
        _groups((rois_per_group, per_group), num_images), 1)
    index = jnp.where(ok, batch, 0).astype(jnp.int32)
    return jnp.where(ok, group * per_group + index, 0), ok
