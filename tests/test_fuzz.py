"""Property-based fuzzing of every kernel (hypothesis).

Random calls over the whole input space the kernels must survive: every
operator with kernels (ps_roi_align, roi_align with `aligned` both ways,
ps_roi_pool, roi_pool), 0 to 3 images, 0 to 9 output channels, maps of 1 to 40 pixels
a side, non-square output sizes of 1 to 9, sampling ratios -1 to 5 and a few
large ones, several spatial scales, every layout, channel order and dtype;
and boxes drawn to
include NaN, +-inf, 1e30, negative, inverted, zero-size and off-map
coordinates and out-of-range, fractional and NaN batch indices. Properties,
forward, backward and vmap:

* equal to the jax.numpy reference (which implements the documented
  semantics, the zeros where we deviate from torchvision included);
* RoIs that read nothing (bad batch index, non-finite geometry, empty
  adaptive grid) give exactly 0 and send exactly 0 to the gradient;
* finite results for finite features and cotangents;
* a bitwise-deterministic backward;
* vmap equal to the separate calls, bit for bit;
* the gradient in the boxes (ps_roi_align, roi_align): finite, bitwise
  deterministic, zero for RoIs that read nothing and for the batch index,
  and equal to the reference's (differentiated by JAX) for RoIs of finite
  coordinates.

And the kernels' own checks, past Python: direct FFI calls of every
operation, direction, layout and dtype, on the CPU kernels and on the CUDA
kernels' schedule, with hostile attributes (what a hand-written or tampered
exported program may hold: NaN, zero, negative and overflowing scales,
sampling ratios up to 2^63, bin rows that overflow, impossible image
groups). Each either fails with the kernels' error or, exactly when every
attribute is valid, runs; valid image groups pool as the jax.numpy lowering
of the same groups does.

Non-maximum suppression is fuzzed in test_fuzz_nms.py.

Examples: JAX_PSROI_FUZZ_EXAMPLES (default 20 here, so the suite stays
quick; scripts/sanitize.sh runs 10,000 under ASan and UBSan), split evenly
among the operators in test_fuzzed_calls (at least 5 each). The reference
compiles once per shape, which dominates long runs: only the first
JAX_PSROI_FUZZ_REFERENCE_EXAMPLES examples (default: all) are compared with
it; every example checks the other properties.
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_psroi
from jax_psroi import _arguments, _extension, reference, reference_pools

from cases import (
    CHANNEL_ORDERS,
    DTYPES,
    KERNELS,
    LAYOUTS,
    features_as,
    gpu_schedule_target,
    target,
)

EXAMPLES = int(os.environ.get("JAX_PSROI_FUZZ_EXAMPLES", "20"))
REFERENCE_EXAMPLES = int(os.environ.get("JAX_PSROI_FUZZ_REFERENCE_EXAMPLES", str(EXAMPLES)))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                # A short run is the same every time; a long one explores.
                derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPECIAL = [np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38, 0.0, -0.0, -5.0, 1e6, -1e6]


@st.composite
def coordinates(draw, extent, pixel):
    """A box corner coordinate in image pixels: mostly around the map, often
    within a few pixels of its edges (where the kernels' vector tiles shift
    and their windows end)."""
    kind = draw(st.sampled_from(["map"] * 4 + ["edge"] * 2 + ["special", "wide"]))
    if kind == "map":
        return draw(st.floats(-0.3 * extent, 1.3 * extent))
    if kind == "edge":
        edge = draw(st.sampled_from([0.0, extent]))
        return draw(st.floats(edge - 4 * pixel, edge + 2 * pixel))
    if kind == "special":
        return draw(st.sampled_from(SPECIAL))
    return draw(st.floats(-1e7, 1e7))


@st.composite
def batch_indices(draw, n):
    kind = draw(st.sampled_from(["valid"] * 4 + ["special", "real"]))
    if kind == "valid":
        return float(draw(st.integers(0, max(n - 1, 0))))
    if kind == "special":
        return draw(st.sampled_from([-1.0, -0.5, 0.5, n - 0.5, float(n), 1e9, -1e9,
                                     np.nan, np.inf, -np.inf]))
    return draw(st.floats(-2.0, n + 1.0))


@st.composite
def calls(draw, operator):
    # Counts drawn from lists whose first value, hypothesis's simplest
    # draw, is not 0: a short derandomized run starts from its simplest
    # examples, and calls of no image, channel or box pool nothing.
    n = draw(st.sampled_from([2, 1, 3, 0]))
    c_out = draw(st.sampled_from([3, 1, 2, 5, 9, 0]))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pooled = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    ratio = draw(st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 16, 64]))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 2.0]))
    k = draw(st.sampled_from([6, 1, 2, 12, 0]))
    rois = []
    for _ in range(k):
        x1 = draw(coordinates(w / scale, 1 / scale))
        y1 = draw(coordinates(h / scale, 1 / scale))
        shape = draw(st.sampled_from(["free"] * 3 + ["zero", "inverted"]))
        if shape == "free":
            x2 = draw(coordinates(w / scale, 1 / scale))
            y2 = draw(coordinates(h / scale, 1 / scale))
        elif shape == "zero":
            x2, y2 = x1, y1
        else:
            x2, y2 = x1 - abs(draw(st.floats(0, w / scale))), y1 - 1.0
        rois.append([draw(batch_indices(n)), x1, y1, x2, y2])
    shared = operator in ("roi_align", "roi_pool")
    return dict(
        operator=operator, aligned=draw(st.booleans()),
        shape=(n, c_out * (1 if shared else pooled[0] * pooled[1]), h, w), rois=rois,
        pooled=pooled, ratio=ratio, scale=scale, dtype=draw(st.sampled_from(DTYPES)),
        data_format=draw(st.sampled_from(LAYOUTS)),
        channel_order="torchvision" if shared else draw(st.sampled_from(CHANNEL_ORDERS)),
        seed=draw(st.integers(0, 2**32 - 1)))


OPERATORS = ["ps_roi_align", "roi_align", "ps_roi_pool", "roi_pool"]


def pools(call):
    """(native, reference) of the call's operator, each (features, rois) ->
    pooled."""
    args = (call["pooled"], call["scale"])
    if call["operator"] == "roi_align":
        args += (call["ratio"], call["aligned"])
        layout = dict(data_format=call["data_format"])
        return (lambda f, r: jax_psroi.roi_align(f, r, *args, **layout),
                lambda f, r: jax_psroi.roi_align_reference(f, r, *args, **layout))
    if call["operator"] == "roi_pool":
        layout = dict(data_format=call["data_format"])
        return (lambda f, r: jax_psroi.roi_pool(f, r, *args, **layout),
                lambda f, r: jax_psroi.roi_pool_reference(f, r, *args, **layout))
    layout = dict(data_format=call["data_format"], channel_order=call["channel_order"])
    if call["operator"] == "ps_roi_pool":
        return (lambda f, r: jax_psroi.ps_roi_pool(f, r, *args, **layout),
                lambda f, r: jax_psroi.ps_roi_pool_reference(f, r, *args, **layout))
    args += (call["ratio"],)
    return (lambda f, r: jax_psroi.ps_roi_align(f, r, *args, **layout),
            lambda f, r: jax_psroi.ps_roi_align_reference(f, r, *args, **layout))


def reads_nothing(rois, n, call):
    """The RoIs the kernels must skip (lib/roi_math.h: roi_geometry), in
    their compute dtype's arithmetic."""
    t = rois.dtype.type
    pooled, scale, ratio = call["pooled"], call["scale"], call["ratio"]
    window = call["operator"] in ("ps_roi_pool", "roi_pool")
    clamped = window or (call["operator"] == "roi_align" and not call["aligned"])
    offset = 0.5 if call["operator"] == "ps_roi_align" or (
        call["operator"] == "roi_align" and call["aligned"]) else 0.0
    with np.errstate(all="ignore"):
        start_w, start_h, end_w, end_h = (rois[:, i] * t(scale) - t(offset)
                                          for i in range(1, 5))
        if window:  # C's round: halves away from zero
            start_w, start_h, end_w, end_h = (
                np.where(np.abs(v - np.trunc(v)) >= 0.5, np.trunc(v) + np.sign(v),
                         np.trunc(v)).astype(rois.dtype)
                for v in (start_w, start_h, end_w, end_h))
        size_w, size_h = end_w - start_w, end_h - start_h
        if call["operator"] == "roi_pool":  # both corner pixels count
            size_w, size_h = size_w + t(1), size_h + t(1)
        if clamped:  # std::max(size, 1), NaN kept
            size_w = np.where(size_w < 1, t(1), size_w)
            size_h = np.where(size_h < 1, t(1), size_h)
        bin_w = size_w / t(pooled[1])
        bin_h = size_h / t(pooled[0])
        readable = ((rois[:, 0] > -1) & (rois[:, 0] < n) & np.isfinite(start_w)
                    & np.isfinite(start_h) & np.isfinite(bin_w) & np.isfinite(bin_h))
        if ratio <= 0 and not window:
            readable &= (np.ceil(bin_w) > 0) & (np.ceil(bin_h) > 0)
    return ~readable | (n == 0)


def _close(value, expected, dtype):
    value, expected = np.asarray(value, np.float64), np.asarray(expected, np.float64)
    if jnp.dtype(dtype).itemsize < 4:
        # Both compute in float32 and round once: one 16-bit step apart.
        step = 2.0 ** -jnp.finfo(dtype).nmant
        np.testing.assert_array_less(np.abs(value - expected),
                                     step * np.abs(expected) + 1e-3)
    else:
        tolerance = 1e-4 if jnp.dtype(dtype) == jnp.float32 else 1e-10
        np.testing.assert_allclose(value, expected, rtol=tolerance, atol=tolerance)


_examples = itertools.count()


@pytest.mark.parametrize("operator", OPERATORS)
@settings(FUZZ, max_examples=max(5, -(-EXAMPLES // len(OPERATORS))))
@given(data=st.data())
def test_fuzzed_calls(operator, data):
    call = data.draw(calls(operator))
    rng = np.random.default_rng(call["seed"])
    dtype, layout, order = call["dtype"], call["data_format"], call["channel_order"]
    n = call["shape"][0]
    # NumPy arrays into jitted calls, whose arguments the CPU client uses in
    # place: their allocations end where the data ends, so a sanitizer sees
    # a read past the end (XLA's own buffers may be padded).
    features = features_as(rng.normal(size=call["shape"]), layout, order,
                           call["pooled"]).astype(dtype)
    compute = _arguments.compute_dtype(dtype)
    rois = np.asarray(call["rois"], np.float64).reshape(-1, 5).astype(compute)
    pool, reference = pools(call)
    forward = jax.jit(pool)
    backward = jax.jit(lambda f, r, t: jax.vjp(lambda x: pool(x, r), f)[1](t)[0])
    pooled = np.asarray(forward(features, rois), np.float64)
    cotangent = rng.normal(size=pooled.shape).astype(dtype)
    gradient = np.asarray(backward(features, rois, cotangent))

    # Finite, and the backward bit for bit the same on a second run.
    assert np.isfinite(pooled).all() and np.isfinite(gradient.astype(np.float64)).all()
    np.testing.assert_array_equal(np.asarray(backward(features, rois, cotangent)), gradient)

    # RoIs that read nothing: zero out, and nothing to the gradient.
    dead = reads_nothing(rois, n, call)
    assert not pooled[dead].any()
    only_dead = np.where(dead.reshape(-1, 1, 1, 1), cotangent, 0).astype(dtype)
    assert not np.asarray(backward(features, rois, only_dead), np.float64).any()

    # vmap over two calls: the separate calls, bit for bit.
    twice = jax.vmap(pool)(np.stack([features, -features]), np.stack([rois, rois[::-1]]))
    np.testing.assert_array_equal(np.asarray(twice[0], np.float64), pooled)
    np.testing.assert_array_equal(np.asarray(twice[1]),
                                  np.asarray(forward(-features, rois[::-1])))

    box_gradient = None
    if call["operator"] in ("ps_roi_align", "roi_align"):
        box_vjp = jax.jit(lambda f, r, t: jax.vjp(lambda b: pool(f, b), r)[1](t)[0])
        box_gradient = np.asarray(box_vjp(features, rois, cotangent), np.float64)
        assert np.isfinite(box_gradient).all()
        np.testing.assert_array_equal(np.asarray(box_vjp(features, rois, cotangent),
                                                 np.float64), box_gradient)
        assert not box_gradient[dead].any() and not box_gradient[:, 0].any()

    example = next(_examples)
    if example % 500 == 499:
        # Every example compiles new programs: keep long runs' memory flat.
        jax.clear_caches()
    if example < REFERENCE_EXAMPLES:
        def reference_and_gradient(f, r, t):
            out, vjp = jax.vjp(lambda x: reference(x, r), f)
            return out, vjp(t)[0]

        expected, expected_gradient = jax.jit(reference_and_gradient)(features, rois, cotangent)
        _close(pooled, expected, dtype)
        _close(gradient, expected_gradient, dtype)
        if box_gradient is not None:
            expected_box = np.asarray(jax.jit(lambda f, r, t: jax.vjp(
                lambda b: reference(f, b), r)[1](t)[0])(features, rois, cotangent), np.float64)
            # RoIs of moderate, finite coordinates (the reference's
            # derivative of 1e30 boxes is not finite).
            moderate = ~dead & (np.abs(rois[:, 1:].astype(np.float64)) < 1e7).all(axis=1)
            _close_box_gradient(box_gradient[moderate], expected_box[moderate], dtype)


def _close_box_gradient(value, expected, dtype):
    # A box gradient sums products of the cotangent, the features and the
    # tap derivatives over a bin: relative to the largest of them, within
    # the rounding of their sums (16-bit: each box call is rounded once).
    scale = np.abs(expected).max(initial=0.0) + 1e-30
    tolerance = {2: 2e-2, 4: 1e-4, 8: 1e-9}[jnp.dtype(dtype).itemsize]
    np.testing.assert_allclose(value / scale, expected / scale, rtol=0, atol=tolerance)


# Values of each attribute (the kernels' S64 and F64 attributes): as often
# valid as hostile, so that every check also meets calls it must let run.
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
SCALES = [1.0, 0.5, 1e-300, 1e300, 0.0, -0.0, -1.0, np.nan, np.inf, -np.inf]
RATIOS = [-1, 0, 2, 2**23, -1, 0, 2, 2**23 + 1, 2**40, INT64_MAX, INT64_MIN]
INTS = [0, 1, 2, 0, 1, 2, 3, -1, 2**40, INT64_MAX, INT64_MIN]


def _mostly(valid, values):
    """Draws from `values` or, three times as often, from `valid`."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid),
                     st.sampled_from(valid), st.sampled_from(values))


@st.composite
def attribute_calls(draw, kernels):
    operation = draw(st.sampled_from(OPERATORS))
    # The box rows (lib/kernel_table.h) of the operators of samples.
    boxes = ["box_forward", "box_backward"] if operation in ("ps_roi_align", "roi_align") else []
    direction = draw(st.sampled_from(["forward", "backward", *boxes]))
    forward = direction.endswith("forward")
    pooled = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    # Results of at least one element: XLA does not run a call whose result
    # is empty (a forward's N and a backward's K may still be 0).
    n = draw(st.integers(0 if forward else 1, 4))
    k = draw(st.integers(1 if forward else 0, 4))
    shared = operation in ("roi_align", "roi_pool")
    attributes = dict(spatial_scale=draw(_mostly([1.0, 0.5], SCALES)),
                      rois_per_group=draw(_mostly([0, 1, 2], INTS)),
                      images_per_group=draw(_mostly([0, 1, n or 1], INTS)))
    if operation != "roi_pool":
        attributes.update(
            sampling_ratio=draw(_mostly([-1, 2], RATIOS)),
            first_bin_row=draw(_mostly([0], INTS)),
            bin_rows=draw(_mostly([pooled[0]], [*INTS, pooled[0] + 1])))
        attributes["aligned" if shared else "channel_order"] = draw(
            _mostly([0, 1], [2, -1, INT64_MAX]))
    if direction in boxes:
        attributes["box_parameter"] = draw(_mostly([1, 2, 3, 4], [0, 5, -1, INT64_MAX]))
    return dict(operation=operation, direction=direction,
                kernels=kernels,
                dtype=draw(st.sampled_from(DTYPES)), data_format=draw(st.sampled_from(LAYOUTS)),
                shape=(n, 2 * (1 if shared else pooled[0] * pooled[1]), 5, 6), pooled=pooled,
                rois=[[float(draw(st.integers(-1, 4))), 0.5, 1.0, 5.0, 4.0]
                      for _ in range(k)],
                attributes=attributes, seed=draw(st.integers(0, 2**32 - 1)))


def attribute_errors(call) -> list[str]:
    """The attributes the kernels must refuse (lib/ffi_common.h: call_dims)."""
    a, n = call["attributes"], call["shape"][0]
    compute = _arguments.compute_dtype(call["dtype"]).type
    with np.errstate(all="ignore"):
        scale = compute(a["spatial_scale"])
    errors = []
    if not (np.isfinite(scale) and scale > 0):
        errors.append("spatial_scale")
    if a.get("sampling_ratio", 0) > _arguments.MAX_GRID_PER_AXIS:
        errors.append("sampling_ratio")
    if a.get("aligned", a.get("channel_order", 0)) not in (0, 1):
        errors.append("aligned" if "aligned" in a else "channel_order")
    if a.get("box_parameter", 1) not in (1, 2, 3, 4):
        errors.append("box_parameter")
    first, rows = a.get("first_bin_row", 0), a.get("bin_rows", call["pooled"][0])
    if first < 0 or rows < 0 or rows - first < call["pooled"][0]:
        errors.append("bin rows")
    groups = a["rois_per_group"], a["images_per_group"]
    if min(groups) < 0 or (groups[1] > 0 and n % groups[1]):
        errors.append("rois_per_group")
    return errors


# `kernels` "gpu_schedule": the CUDA kernels' code, serially on the CPU.
@pytest.mark.parametrize("kernels", KERNELS)
@settings(FUZZ, max_examples=max(5, -(-EXAMPLES // len(KERNELS))))
@given(data=st.data())
def test_fuzzed_attributes_of_direct_calls(kernels, data):
    call = data.draw(attribute_calls(kernels))
    rng = np.random.default_rng(call["seed"])
    dtype, layout, operation = call["dtype"], call["data_format"], call["operation"]
    k = len(call["rois"])
    features = features_as(rng.normal(size=call["shape"]), layout, "torchvision",
                           call["pooled"]).astype(dtype)
    rois = np.asarray(call["rois"], np.float64).reshape(k, 5).astype(
        _arguments.compute_dtype(dtype))
    c_out = call["shape"][1] // (1 if operation in ("roi_align", "roi_pool")
                                 else call["pooled"][0] * call["pooled"][1])
    pooled_shape = (k, c_out, *call["pooled"])
    if layout == "NHWC":
        pooled_shape = (k, *call["pooled"], c_out)
    # A box row is called as its direction is.
    direction = call["direction"].removeprefix("box_")
    operand = features
    if direction == "backward":
        operand = rng.normal(size=pooled_shape).astype(dtype)
    results = [jax.ShapeDtypeStruct(pooled_shape if direction == "forward"
                                    else features.shape, dtype)]
    operands = [operand, rois]
    if (direction == "backward" and call["kernels"] == "cpu"
            and operation != "roi_pool"):  # the CPU backward's byte workspace
        size = _extension.cpu_backward_workspace_bytes(
            operation, layout, dtype, call["shape"], (k, c_out, *call["pooled"]),
            call["attributes"].get("channel_order", 0) == 1)  # the size of a valid order
        results.append(jax.ShapeDtypeStruct((size,), np.uint8))
    if operation == "roi_pool":
        if direction == "forward":
            results.append(jax.ShapeDtypeStruct(pooled_shape, np.int32))
        else:
            operands.append(np.full(pooled_shape, -1, np.int32))
    name = (target(call["direction"], dtype, layout, operation) if call["kernels"] == "cpu"
            else gpu_schedule_target((operation, call["direction"], layout, np.dtype(dtype))))
    errors = attribute_errors(call)
    with jax.default_device(jax.devices("cpu")[0]):
        run = jax.ffi.ffi_call(name, results)
        if errors:
            with np.testing.assert_raises_regex(Exception, "jax_psroi: "):
                jax.block_until_ready(run(*operands, **call["attributes"]))
            return
        out = np.asarray(run(*operands, **call["attributes"])[0], np.float64)
    assert np.isfinite(out).all()
    a = call["attributes"]
    if (call["direction"] == "forward" and a.get("first_bin_row", 0) == 0
            and a.get("bin_rows", call["pooled"][0]) == call["pooled"][0]
            and a.get("sampling_ratio", 0) <= 2):
        # Image groups as the jax.numpy lowering takes them (0: one group).
        groups = (a["rois_per_group"] or k, a["images_per_group"] or call["shape"][0])
        with jax.default_device(jax.devices("cpu")[0]):
            expected = _reference_forward(call, jnp.asarray(features), jnp.asarray(rois),
                                          groups)
        _close(out, expected, dtype)


def _reference_forward(call, features, rois, image_groups):
    """The jax.numpy lowering of a forward call with `image_groups`."""
    a, pooled_size = call["attributes"], call["pooled"]
    if call["operation"] == "roi_pool":
        return reference_pools.pool_roi_pool(features, rois, pooled_size, a["spatial_scale"],
                                             data_format=call["data_format"],
                                             image_groups=image_groups)[0]
    layout = dict(data_format=call["data_format"], image_groups=image_groups)
    if call["operation"] == "roi_align":
        return reference.pool_roi_align(features, rois, pooled_size, a["spatial_scale"],
                                        a["sampling_ratio"], bool(a.get("aligned", 1)), **layout)
    order = CHANNEL_ORDERS[a["channel_order"]]
    if call["operation"] == "ps_roi_pool":
        return reference_pools.pool_ps_roi_pool(features, rois, pooled_size,
                                                a["spatial_scale"], channel_order=order,
                                                **layout)
    return reference.pool(features, rois, pooled_size, a["spatial_scale"],
                          a["sampling_ratio"], channel_order=order, **layout)


@pytest.mark.parametrize("attributes,message", [
    # A grid of 2**40 samples per bin axis would never finish.
    (dict(sampling_ratio=2**40), "sampling_ratio must be at most 8388608"),
    # first_bin_row + PH overflows int64: the check subtracts instead.
    (dict(first_bin_row=INT64_MAX, bin_rows=INT64_MAX), "bin rows from row"),
    (dict(spatial_scale=np.nan), "spatial_scale must be finite and positive"),
    (dict(spatial_scale=1e300), "spatial_scale must be finite and positive"),
    (dict(images_per_group=3), "images_per_group a divisor"),
    (dict(rois_per_group=-1), "rois_per_group and images_per_group must be >= 0"),
])
def test_a_direct_call_with_a_bad_attribute_fails(attributes, message):
    call = jax.ffi.ffi_call(target("forward", np.float32),
                            jax.ShapeDtypeStruct((1, 1, 1, 1), np.float32))
    valid = dict(spatial_scale=1.0, sampling_ratio=2, channel_order=0, first_bin_row=0,
                 bin_rows=1, rois_per_group=0, images_per_group=0)
    features, rois = np.ones((2, 1, 4, 4), np.float32), np.array([[1, 0, 0, 2, 2]], np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        np.testing.assert_array_equal(call(features, rois, **valid), 1)
        with pytest.raises(jax.errors.JaxRuntimeError, match=message):
            jax.block_until_ready(call(features, rois, **(valid | attributes)))
