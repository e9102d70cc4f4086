"""Runs every sharding case on 8 simulated CPU devices; prints one JSON line.

Run by tests/test_sharding.py in a process of its own, so that the rest of
the suite keeps one device:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py

For each case, layout, channel order and dtype, the sharded program (jit
with the inputs placed as the case says) and the same function on one device
are compiled and run; a record gives the largest difference of their
results, the largest magnitude of the unsharded result, and the number of
each kind of collective in the compiled sharded program. Non-maximum
suppression's records (each case and operation) say whether the sharded
indices and counts equal the unsharded ones, the counts, how the results
are split and the collectives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_psroi

# Output channels and bin rows in multiples of 8: the channel cases split
# torchvision-order maps over C_out and bin-major maps over bin rows.
IMAGES, ROIS_PER_IMAGE, CHANNELS_OUT, POOLED, SIZE = 8, 6, 8, (8, 3), 16
SCALE, SAMPLING = 0.5, 2
PYRAMID_LEVELS = 2
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")

# (operation, layout, channel order, dtype): ps_roi_align in every layout and
# order in float32, every other dtype in one of them; roi_align ("shared"
# channels, aligned=False), ps_roi_pool (windows of whole pixels, bin rows
# split with the channels of a bin-major map) and roi_pool (maxima, their
# pixels split like the pooled tensor) on the same map; multi-scale RoI
# Align on a pyramid of that map and its every other pixel (PYRAMID_LEVELS
# levels, each RoI pooled from the one its size picks); the deformable
# operators with offsets made from the boxes (so the box gradient flows
# through the offsets too), split with the RoIs and, bin-major, over the
# bin rows a device's channels hold.
COMBINATIONS = [("ps_roi_align", "NCHW", "torchvision", "float32"),
                ("ps_roi_align", "NHWC", "torchvision", "float32"),
                ("ps_roi_align", "NCHW", "bin_major", "float32"),
                ("ps_roi_align", "NHWC", "bin_major", "float32"),
                ("ps_roi_align", "NCHW", "torchvision", "float64"),
                ("ps_roi_align", "NHWC", "bin_major", "bfloat16"),
                ("ps_roi_align", "NCHW", "bin_major", "float16"),
                ("roi_align", "NCHW", "shared", "float32"),
                ("roi_align", "NHWC", "shared", "float32"),
                ("ps_roi_pool", "NHWC", "bin_major", "float32"),
                ("roi_pool", "NCHW", "shared", "float32"),
                ("roi_pool", "NHWC", "shared", "float64"),
                ("multi_scale_roi_align", "NCHW", "shared", "float32"),
                ("multi_scale_roi_align", "NHWC", "shared", "float32"),
                ("deform_ps_roi_align", "NCHW", "torchvision", "float32"),
                ("deform_ps_roi_align", "NHWC", "bin_major", "float32"),
                ("deform_roi_align", "NHWC", "shared", "float64")]
DEFORM_GAMMA = 0.1
# How the inputs are split: the per-image head
# vmapped over a batch of images split over the mesh; RoIs split with the
# features replicated; features split over channels with the RoIs
# replicated; images over one mesh axis and channels over another; the
# per-image call inside shard_map; and features split over rows of pixels,
# which no rule splits (they are gathered); the per-image head with its
# boxes split and the features replicated (each device slices its images:
# RoIs in several image groups must not be split without them); the call on
# all RoIs inside shard_map with the RoIs split and the features replicated
# (the features' gradient summed over the shards).
# The first three again on a mesh with explicit axes (jax.make_mesh's
# default), where shardings are part of the types; the first of those again
# on the XLA path (what a platform without native kernels runs).
CASES = ["images", "rois", "channels", "images_and_channels", "shard_map", "pixels",
         "images_of_replicated", "shard_map_rois",
         "images_explicit", "rois_explicit", "channels_explicit", "images_explicit_xla"]
# The forward, the gradient in the features and the gradient in the boxes
# (tests/test_box_derivatives.py: the box calls under the same rules).
DIRECTIONS = ["forward", "gradient", "box_gradient"]


def _mesh(case):
    auto = jax.sharding.AxisType.Auto
    if case == "images_and_channels":
        return jax.make_mesh((4, 2), ("data", "model"), axis_types=(auto, auto))
    if case.endswith("_explicit"):
        return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    return jax.make_mesh((8,), ("x",), axis_types=(auto,))


def _inputs(layout, dtype, rng):
    features = rng.normal(size=(IMAGES, CHANNELS_OUT * POOLED[0] * POOLED[1], SIZE, SIZE))
    if layout == "NHWC":
        features = features.transpose(0, 2, 3, 1)
    extent = SIZE / SCALE
    corners = np.sort(rng.uniform(-0.3 * extent, 1.3 * extent,
                                  size=(IMAGES, ROIS_PER_IMAGE, 2, 2)), axis=2)
    boxes = corners.transpose(0, 1, 3, 2).reshape(IMAGES, ROIS_PER_IMAGE, 4)
    return jnp.asarray(features, dtype), jnp.asarray(boxes, jnp.float32)


def _rois(boxes, rng):
    """[K, 5] RoIs reading any image, a few of them invalid."""
    k = boxes.shape[0] * boxes.shape[1]
    index = rng.integers(0, IMAGES, size=k).astype(np.float32)
    index[::7] = -1.0
    return jnp.concatenate([jnp.asarray(index)[:, None], boxes.reshape(k, 4)], axis=1)


def _offsets(coordinates):
    """Offsets [K, 2, PH, PW] that vary with each box [K, 4] and bin, made
    by exact arithmetic (scaling by powers of 2, one rounded sum), so that a
    device computes its share's offsets bit for bit as one device does
    (which XLA's vectorized transcendentals do not promise)."""
    rows = jnp.arange(POOLED[0], dtype=coordinates.dtype)[:, None] / 16
    columns = jnp.arange(POOLED[1], dtype=coordinates.dtype) / 8
    return coordinates[:, :2, None, None] / 128 + (rows - columns)


def _deformable(operation, layout, order):
    operator = getattr(jax_psroi, operation)
    position_sensitive = {} if order == "shared" else {"channel_order": order}

    def pool(features, boxes):
        coordinates = boxes[0] if isinstance(boxes, list) else boxes[:, 1:]
        return operator(features, boxes, _offsets(coordinates), POOLED, SCALE, SAMPLING,
                        DEFORM_GAMMA, data_format=layout, **position_sensitive)
    return pool


def _functions(case, operation, layout, order, mesh):
    """(forward, placements): forward(features, boxes) -> pooled, and the
    sharding of each input."""
    case = case.removesuffix("_explicit")
    if operation == "roi_align":
        pool = partial(jax_psroi.roi_align, output_size=POOLED, spatial_scale=SCALE,
                       sampling_ratio=SAMPLING, data_format=layout)
    elif operation == "multi_scale_roi_align":
        def pool(features, boxes):
            # Level 1: every other pixel. Scales 1/2 and 1/4 of an image of
            # SIZE / SCALE pixels; boxes under 24 pixels go to level 0.
            coarse = (features[:, :, ::2, ::2] if layout == "NCHW"
                      else features[:, ::2, ::2, :])
            return jax_psroi.multi_scale_roi_align(
                [features, coarse], boxes, POOLED, SAMPLING, (int(SIZE / SCALE),) * 2,
                canonical_scale=24, canonical_level=2, data_format=layout)
    elif operation == "roi_pool":
        pool = partial(jax_psroi.roi_pool, output_size=POOLED, spatial_scale=SCALE,
                       data_format=layout)
    elif operation.startswith("deform_"):
        pool = _deformable(operation, layout, order)
    elif operation == "ps_roi_pool":
        pool = partial(jax_psroi.ps_roi_pool, output_size=POOLED, spatial_scale=SCALE,
                       data_format=layout, channel_order=order)
    else:
        pool = partial(jax_psroi.ps_roi_align, output_size=POOLED, spatial_scale=SCALE,
                       sampling_ratio=SAMPLING, data_format=layout, channel_order=order)
    channel_axis = 1 if layout == "NCHW" else 3

    def channels_spec(axis_name, images=None):
        spec = [images, None, None, None]
        spec[channel_axis] = axis_name
        return P(*spec)

    def per_image(features, boxes):
        return jax.vmap(lambda f, b: pool(f[None], [b]))(features, boxes)

    if case == "images":
        return per_image, (P("x"), P("x"))
    if case == "images_and_channels":
        return per_image, (channels_spec("model", "data"), P("data"))
    if case == "rois":
        return (lambda features, rois: pool(features, rois)), (P(), P("x"))
    if case == "channels":
        return (lambda features, rois: pool(features, rois)), (channels_spec("x"), P())
    if case == "pixels":
        return (lambda features, rois: pool(features, rois)), (
            P(None, None, "x") if layout == "NCHW" else P(None, "x"), P())
    if case == "images_of_replicated":
        return per_image, (P(), P("x"))
    if case == "shard_map_rois":
        def sharded_rois(features, rois):
            # Each shard pools its RoIs from the whole map.
            return jax.shard_map(pool, mesh=mesh, in_specs=(P(), P("x")), out_specs=P("x"))(
                features, rois)
        return sharded_rois, (P(), P("x"))
    if case == "shard_map":
        def sharded(features, boxes):
            # Each shard holds one image and its boxes.
            return jax.shard_map(lambda f, b: pool(f, [b[0]])[None], mesh=mesh,
                                 in_specs=(P("x"), P("x")), out_specs=P("x"))(
                                     features, boxes)
        return sharded, (P("x"), P("x"))
    raise ValueError(case)


def _collectives(compiled) -> dict:
    text = compiled.as_text()
    return {name: len(re.findall(rf"\b{name}(?:-start)?\(", text)) for name in COLLECTIVES}


def _kernel_calls(compiled) -> int:
    """How many calls of our FFI targets the compiled program makes (none on
    the XLA path)."""
    return len(re.findall(r'custom_call_target="jax_psroi_', compiled.as_text()))


def _largest_gather(compiled) -> int:
    """The most elements any all-gather of the compiled program gathers."""
    shapes = re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(",
                        compiled.as_text())
    return max((int(np.prod([int(n) for n in shape.split(",") if n])) for shape in shapes),
               default=0)


def _run(case, direction, operation, layout, order, dtype):
    implementation = "xla" if case.endswith("_xla") else "native"
    with _implementation(implementation):
        record = _run_case(case.removesuffix("_xla"), direction, operation, layout, order,
                           dtype, implementation)
    return {**record, "case": case}


# The unsharded results, computed once for every case of the same function
# and inputs: (implementation, per-image head, direction, operation, layout,
# channel order, dtype) -> result.
_UNSHARDED: dict[tuple, np.ndarray] = {}


def _run_case(case, direction, operation, layout, order, dtype, implementation):
    rng = np.random.default_rng(0)
    mesh = _mesh(case)
    features, boxes = _inputs(layout, dtype, rng)
    forward, specs = _functions(case, operation, layout, order, mesh)
    per_image = case in ("images", "images_and_channels", "shard_map", "images_explicit",
                         "images_of_replicated")
    second = boxes if per_image else _rois(boxes, rng)
    pooled_shape = jax.eval_shape(forward, features, second).shape
    cotangent = jnp.asarray(rng.normal(size=pooled_shape), features.dtype)

    def in_direction(forward):
        if direction == "forward":
            return forward

        def gradient(features, second):
            # The vjp with `cotangent`, written so that under explicit axes
            # the cotangent takes the result's type.
            return jax.grad(lambda f: jnp.sum(forward(f, second) * cotangent))(features)

        def box_gradient(features, second):
            return jax.grad(lambda b: jnp.sum(forward(features, b) * cotangent))(second)
        return gradient if direction == "gradient" else box_gradient

    function = in_direction(forward)

    placements = [NamedSharding(mesh, spec) for spec in specs]
    out_sharding = {"gradient": placements[0], "box_gradient": placements[1]}.get(direction)
    placed = [jax.device_put(x, s) for x, s in zip((features, second), placements, strict=True)]
    with jax.set_mesh(mesh) if case.endswith("_explicit") else contextlib.nullcontext():
        sharded = jax.jit(function, out_shardings=out_sharding).lower(*placed).compile()
        result = sharded(*placed)
    # On one device, as the per-image head or the call on all RoIs (the
    # shard_map's per-shard call is the per-image head), with the same
    # inputs in every case of either: the same rng draws.
    key = (implementation, per_image, direction, operation, layout, order, dtype)
    if key not in _UNSHARDED:
        if case in ("shard_map", "shard_map_rois"):
            forward = _functions("images" if per_image else "rois", operation, layout, order,
                                 mesh)[0]
        _UNSHARDED[key] = np.asarray(jax.jit(in_direction(forward))(features, second),
                                     np.float64)
    expected = _UNSHARDED[key]
    result = np.asarray(result, np.float64)
    return dict(case=case, direction=direction, operation=operation, layout=layout,
                order=order, dtype=dtype,
                shape=list(result.shape), expected_shape=list(expected.shape),
                max_difference=float(np.max(np.abs(result - expected))),
                max_magnitude=float(np.max(np.abs(expected))),
                collectives=_collectives(sharded), largest_gather=_largest_gather(sharded),
                kernel_calls=_kernel_calls(sharded))


# --- Channel groups cut by the split ---------------------------------------------
# A position-sensitive map split over C where a device's share cuts a channel
# group: 4 output channels of 2 x 1 bins (torchvision order: 2 channels a
# group, 1 a device) and a bin-major grid of 2 rows (a row: 8 channels, 2 a
# device). No rule splits them: the map is gathered, the results right (the
# sharding rule must not let propagation split a mesh axis across two
# factors of the channels, which custom_partitioning cannot express).
CUT_GROUPS = [("ps_roi_align", "torchvision", (2, 1)), ("ps_roi_align", "bin_major", (2, 2)),
              ("ps_roi_pool", "torchvision", (2, 1)),
              ("deform_ps_roi_align", "bin_major", (2, 2))]


def _cut_groups_run(operation, order, pooled):
    rng = np.random.default_rng(2)
    mesh = _mesh("channels")
    features = jnp.asarray(rng.normal(size=(IMAGES, 4 * pooled[0] * pooled[1], SIZE, SIZE)),
                           jnp.float32)
    rois = _rois(jnp.asarray(_inputs("NCHW", np.float32, rng)[1]), rng)
    settings = dict(spatial_scale=SCALE, channel_order=order)
    if operation == "ps_roi_pool":
        pool = partial(jax_psroi.ps_roi_pool, output_size=pooled, **settings)
    else:
        pool = partial(getattr(jax_psroi, operation), output_size=pooled,
                       sampling_ratio=SAMPLING, **settings)
        if operation.startswith("deform_"):
            pool = partial(pool, offset=None)
    cotangent = jnp.asarray(rng.normal(size=jax.eval_shape(
        lambda f, r: pool(f, r), features, rois).shape), jnp.float32)
    functions = {"forward": lambda f, r: pool(f, r),
                 "gradient": jax.grad(lambda f, r: jnp.sum(pool(f, r) * cotangent))}
    placed = jax.device_put(features, NamedSharding(mesh, P(None, "x")))
    records = []
    for direction, function in functions.items():
        sharded = jax.jit(function).lower(placed, rois).compile()
        result = np.asarray(sharded(placed, rois), np.float64)
        expected = np.asarray(jax.jit(function)(features, rois), np.float64)
        records.append(dict(operation=operation, order=order, direction=direction,
                            max_difference=float(np.max(np.abs(result - expected))),
                            max_magnitude=float(np.max(np.abs(expected))),
                            collectives=_collectives(sharded)))
    return records


# --- Non-maximum suppression ----------------------------------------------------
# NMS_IMAGES images of NMS_BOXES crowded boxes (a few objects, each boxed many
# times, with tied scores), NMS_KEPT kept per image. Cases: the per-image call
# vmapped over images split over the mesh, native and XLA formulation; a
# vmap of that (images [NMS_GROUPS, NMS_IMAGES / NMS_GROUPS]) split over its
# first axis; the images under explicit mesh axes; the boxes split over N,
# which no rule splits (gathered); images over one mesh axis and boxes over
# another.
NMS_IMAGES, NMS_BOXES, NMS_KEPT, NMS_GROUPS, NMS_CATEGORIES = 16, 48, 24, 8, 3
NMS_OPERATIONS = ["nms", "batched_nms"]
NMS_CASES = ["images", "images_xla", "nested_vmap", "images_explicit", "boxes",
             "images_and_boxes"]


def _nms_inputs(rng):
    objects = rng.uniform(0, 60, (NMS_IMAGES, 6, 1, 4))
    objects[..., 2:] += objects[..., :2] + rng.uniform(15, 30, (NMS_IMAGES, 6, 1, 2))
    boxes = objects + rng.normal(0, 2, (NMS_IMAGES, 6, NMS_BOXES // 6, 4))
    boxes = boxes.reshape(NMS_IMAGES, NMS_BOXES, 4)
    scores = rng.integers(0, 20, (NMS_IMAGES, NMS_BOXES)) / 20  # ties
    categories = rng.integers(0, NMS_CATEGORIES, (NMS_IMAGES, NMS_BOXES))
    return (jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32),
            jnp.asarray(categories, jnp.int32))


def _nms_function(operation, nested: bool):
    """(boxes [B, N, 4], scores, categories) -> (indices [B, M], counts [B]),
    one call per image under vmap (twice, over [G, B / G], when nested)."""
    if operation == "nms":
        def per_image(boxes, scores, categories):
            del categories
            return jax_psroi.nms(boxes, scores, 0.5, NMS_KEPT)
    else:
        def per_image(boxes, scores, categories):
            return jax_psroi.batched_nms(boxes, scores, categories, 0.5, NMS_KEPT)
    if not nested:
        return jax.vmap(per_image)

    def grouped(*inputs):
        inputs = [x.reshape(NMS_GROUPS, -1, *x.shape[1:]) for x in inputs]
        indices, counts = jax.vmap(jax.vmap(per_image))(*inputs)
        return indices.reshape(NMS_IMAGES, -1), counts.reshape(NMS_IMAGES)
    return grouped


def _nms_run(case, operation):
    mesh = _mesh("images_and_channels" if case == "images_and_boxes" else case)
    spec = {"boxes": P(None, "x"), "images_and_boxes": P("data", "model")}.get(case, P("x"))
    inputs = _nms_inputs(np.random.default_rng(1))
    function = _nms_function(operation, nested=case == "nested_vmap")
    implementation = "xla" if case == "images_xla" else "native"
    with _implementation(implementation):
        placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in inputs]
        with jax.set_mesh(mesh) if case.endswith("_explicit") else contextlib.nullcontext():
            sharded = jax.jit(function).lower(*placed).compile()
            indices, counts = sharded(*placed)
        expected_indices, expected_counts = jax.jit(function)(*inputs)
    return dict(case=case, operation=operation,
                equal=bool(np.array_equal(indices, expected_indices)
                           and np.array_equal(counts, expected_counts)),
                counts=np.asarray(expected_counts).tolist(),
                # The mesh axes that split the images of each result.
                split=[x.sharding.spec[0] if x.sharding.spec else None
                       for x in (indices, counts)],
                collectives=_collectives(sharded), kernel_calls=_kernel_calls(sharded))


@contextlib.contextmanager
def _implementation(name):
    # Read when a call is traced (_implementation.py).
    before = os.environ.get("JAX_PSROI_IMPLEMENTATION")
    os.environ["JAX_PSROI_IMPLEMENTATION"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["JAX_PSROI_IMPLEMENTATION"]
        else:
            os.environ["JAX_PSROI_IMPLEMENTATION"] = before


def main():
    jax.config.update("jax_enable_x64", True)
    if jax.device_count() < 8:
        sys.exit("needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    pooling = [_run(case, direction, *combination)
               for case in CASES for direction in DIRECTIONS
               for combination in COMBINATIONS]
    nms = [_nms_run(case, operation) for case in NMS_CASES for operation in NMS_OPERATIONS]
    cut_groups = [record for combination in CUT_GROUPS
                  for record in _cut_groups_run(*combination)]
    print(json.dumps(dict(pooling=pooling, nms=nms, cut_groups=cut_groups)))


if __name__ == "__main__":
    main()
