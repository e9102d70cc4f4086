"""Random and hostile inputs, oracles and kernel names shared by the tests."""

import contextlib
import importlib
import pathlib
from functools import partial
from unittest import mock

import jax
import numpy as np
import pytest

import jax_psroi
from jax_psroi import _arguments, _extension, _nms

# The dtypes and layouts with native kernels, from the kernel table, and the
# channel orders every kernel takes.
DTYPES = [dtype.type for dtype in _extension.SUPPORTED_DTYPES]
# Dtypes that compute in themselves, compared with the oracles by TOLERANCE;
# the 16-bit ones compute in float32 (tests/test_low_precision.py).
EXACT_DTYPES = [dtype for dtype in DTYPES if np.dtype(dtype).itemsize >= 4]
LOW_PRECISION_DTYPES = [dtype for dtype in DTYPES if np.dtype(dtype).itemsize < 4]
LAYOUTS = list(_extension.SUPPORTED_LAYOUTS)
CHANNEL_ORDERS = list(_arguments.CHANNEL_ORDERS)
# The kernels' image-group attributes of a direct call with [K, 5] RoIs whose
# batch indices are their images (0 and 0: one group; lib/roi_math.h).
ONE_GROUP = dict(rois_per_group=0, images_per_group=0)

# Tolerances keyed by dtype: summation order differs between the kernels and
# the oracles, nothing else.
TOLERANCE = {np.dtype(np.float32): dict(atol=1e-5, rtol=1e-5),
             np.dtype(np.float64): dict(atol=1e-10, rtol=1e-10)}


# The jax.numpy oracle, compiled once per shape (op by op it compiles every
# primitive of it separately, which dominated the suite's time).
reference = jax.jit(jax_psroi.ps_roi_align_reference, static_argnums=(2, 3, 4),
                    static_argnames=("data_format", "channel_order"))


@partial(jax.jit, static_argnums=(3, 4, 5), static_argnames=("data_format", "channel_order"))
def reference_vjp(features, rois, cotangent, output_size, spatial_scale,
                  sampling_ratio, data_format="NCHW", channel_order="torchvision"):
    """The reference's gradient with respect to the features for `cotangent`."""
    _, vjp = jax.vjp(lambda f: jax_psroi.ps_roi_align_reference(
        f, rois, output_size, spatial_scale, sampling_ratio, data_format=data_format,
        channel_order=channel_order), features)
    return vjp(cotangent)[0]


def random_features(rng, n, c, h, w, dtype):
    return rng.normal(size=(n, c, h, w)).astype(dtype)


def random_rois(rng, k, n, h, w, spatial_scale, dtype, outside=0.5):
    """[K, 5] boxes in image coordinates over an image of the map's extent.

    `outside` widens the range corners are drawn from, so some boxes are
    partly or wholly off the map.
    """
    extent = np.array([w, h], np.float64) / spatial_scale
    lo = -outside * extent
    hi = (1 + outside) * extent
    p = rng.uniform(lo, hi, size=(k, 2, 2))
    x1, x2 = np.sort(p[:, :, 0], axis=1).T
    y1, y2 = np.sort(p[:, :, 1], axis=1).T
    batch = rng.integers(0, n, size=k)
    return np.stack([batch, x1, y1, x2, y2], axis=1).astype(dtype)


def whole_pixel_rois(rng, k, n, h, w, spatial_scale, pooled_size):
    """[K, 5] boxes (float64) whose samples fall on whole pixels under the
    aligned rule (-0.5 pixel) of an adaptive grid and of a fixed grid of 5
    samples: corners on whole map pixels (some off the map) and bins of 1 or
    5 pixels. A sample on a pixel weighs its high tap 0, where the
    weights' derivative in the box is still +-1 (random boxes almost never
    reach such a point)."""
    ph, pw = pooled_size
    x1 = rng.integers(-2, w, size=k).astype(np.float64)
    y1 = rng.integers(-2, h, size=k).astype(np.float64)
    x2 = x1 + pw * rng.choice([1.0, 5.0], size=k)
    y2 = y1 + ph * rng.choice([1.0, 5.0], size=k)
    batch = rng.integers(0, n, size=k).astype(np.float64)
    return np.stack([batch, x1, y1, x2, y2], axis=1) / np.array([1, *[spatial_scale] * 4])


def crowded_rois(rng, k, image, centre, half, spatial_scale):
    """[K, 5] boxes (float64) of `image` whose corners lie within `half` map
    pixels of `centre` = (x, y) in map pixels: placed inside one 4 x 32-pixel
    backward tile of the CUDA schedule, they overflow its RoI list (passes)
    and cover its pixels many times."""
    corners = np.asarray(centre) + rng.uniform(-half, half, size=(k, 2, 2))
    x1, x2 = np.sort(corners[:, :, 0], axis=1).T / spatial_scale
    y1, y2 = np.sort(corners[:, :, 1], axis=1).T / spatial_scale
    return np.stack([np.full(k, float(image)), x1, y1, x2, y2], axis=1)


def hostile_rois(n, h, w, dtype):
    """RoIs on which torchvision misbehaves, each paired with a sane one."""
    inf, nan = np.inf, np.nan
    rows = [
        [0, 1, 1, 5, 5],             # sane
        [-1, 1, 1, 5, 5],            # batch index below range
        [n, 1, 1, 5, 5],             # batch index == N
        [1e9, 1, 1, 5, 5],           # batch index far out
        [nan, 1, 1, 5, 5],           # NaN batch index
        [0, nan, 1, 5, 5],           # NaN coordinate
        [0, 1, 1, inf, 5],           # infinite coordinate
        [0, -inf, -inf, inf, inf],   # infinite box
        [0, 2, 2, 2, 2],             # zero-size box
        [0, 6, 6, 2, 2],             # inverted box
        [n - 0.5, 1, 1, 5, 5],       # fractional index, truncated to n - 1
        [-0.5, 1, 1, 5, 5],          # truncated toward zero: image 0
        [0, -1e6, -1e6, 1e6, 1e6],   # huge box, adaptive grid ~ 3e5 per bin
        [0, -1e30, -1e30, 1e30, 1e30],  # grid capped at 2**23 per bin axis
        [0, 3e38, 3e38, 3.4e38, 3.4e38],  # near float32 max, off the map
    ]
    return np.array(rows, dtype)


def target(direction, dtype, data_format="NCHW", operation="ps_roi_align"):
    """The FFI target of a kernel (the same name on every platform)."""
    return _extension.target_name("cpu", direction, dtype, data_format, operation)


def features_as(features, data_format, channel_order, output_size):
    """An NCHW map of torchvision's channel order in another layout and order:
    pooling it with those gives the NCHW result, permuted by pooled_as."""
    n, c, h, w = features.shape
    bins = output_size[0] * output_size[1]
    if channel_order == "bin_major":  # channel (c_out, bin) -> (bin, c_out)
        features = features.reshape(n, c // bins, bins, h, w).transpose(
            0, 2, 1, 3, 4).reshape(n, c, h, w)
    return features.transpose(0, 2, 3, 1) if data_format == "NHWC" else features


def features_from(features, data_format, channel_order, output_size):
    """The inverse of features_as (e.g. for gradients)."""
    if data_format == "NHWC":
        features = features.transpose(0, 3, 1, 2)
    n, c, h, w = features.shape
    bins = output_size[0] * output_size[1]
    if channel_order == "bin_major":
        features = features.reshape(n, bins, c // bins, h, w).transpose(
            0, 2, 1, 3, 4).reshape(n, c, h, w)
    return features


def pooled_as(pooled, data_format):
    """An NCHW pooled tensor [K, C_out, PH, PW] in `data_format`."""
    return pooled.transpose(0, 2, 3, 1) if data_format == "NHWC" else pooled


# The test rig: the CUDA kernels' schedule built for the CPU, in the module
# that only a build with JAX_PSROI_TESTING=ON has. Tests that use it carry the
# `gpu_schedule` marker; without the module they fail (tests/conftest.py)
# unless deselected with -m "not gpu_schedule".
GPU_SCHEDULE_MISSING = (
    "this test needs jax_psroi's test rig, the module jax_psroi._gpu_schedule_testing, "
    "which this installation lacks: install with JAX_PSROI_TESTING=ON "
    "(JAX_PSROI_TESTING=ON pip install \".[test]\"), or deselect these tests with "
    "-m \"not gpu_schedule\"")


def gpu_schedule_module():
    """jax_psroi._gpu_schedule_testing, or None when it was not built."""
    try:
        return importlib.import_module("jax_psroi._gpu_schedule_testing")
    except ImportError:
        return None


_gpu_schedule_targets = None


def gpu_schedule_target(key):
    """The rig's target name of kernel-table row `key` = (operation,
    direction, data_format, dtype); the targets are registered on first use
    (the package never registers them)."""
    global _gpu_schedule_targets
    if _gpu_schedule_targets is None:
        module = gpu_schedule_module()
        if module is None:
            pytest.fail(GPU_SCHEDULE_MISSING, pytrace=False)
        _gpu_schedule_targets = {key: row.name for key, row in _extension._register(
            module.targets(), "cpu").items()}
    return _gpu_schedule_targets[key]


_nms_schedule_targets = None


def nms_schedule_target(dtype):
    """The rig's target of non-maximum suppression's CUDA schedule
    (lib/nms_schedule.h) for boxes of `dtype`, registered on first use."""
    global _nms_schedule_targets
    if _nms_schedule_targets is None:
        module = gpu_schedule_module()
        if module is None:
            pytest.fail(GPU_SCHEDULE_MISSING, pytrace=False)
        _nms_schedule_targets = {row.dtype: row.name for row in _extension._register(
            module.nms_targets(), "cpu").values()}
    return _nms_schedule_targets[np.dtype(dtype)]


@contextlib.contextmanager
def nms_on_gpu_schedule():
    """Within it, the CPU's native nms lowering is the CUDA one
    (_nms.sorted_call: XLA's sort, then lib/nms_schedule.h) on the rig's
    targets; no program compiled inside is reused outside, or the reverse."""
    def call(boxes, scores, categories, **params):
        return _nms.sorted_call(nms_schedule_target(boxes.dtype), boxes, scores, categories,
                                **params)

    jax.clear_caches()
    try:
        with mock.patch.object(_nms, "_native_call", call):
            yield
    finally:
        jax.clear_caches()


_deform_schedule_kernels = None


@contextlib.contextmanager
def deformable_kernels(kernels):
    """Within it (kernels "gpu_schedule"), the CPU lowering of the
    deformable primitives calls the rig's copy of their CUDA kernels."""
    global _deform_schedule_kernels
    if kernels == "cpu":
        yield
        return
    if _deform_schedule_kernels is None:
        module = gpu_schedule_module()
        if module is None:
            pytest.fail(GPU_SCHEDULE_MISSING, pytrace=False)
        _deform_schedule_kernels = _extension._register(module.deform_targets(), "cpu")
    jax.clear_caches()
    try:
        with mock.patch.dict(_extension.DEFORM_KERNELS, {"cpu": _deform_schedule_kernels}):
            yield
    finally:
        jax.clear_caches()


# The `kernels` parameter of tests that run on the CPU kernels and on the rig.
KERNELS = ["cpu", pytest.param("gpu_schedule", marks=pytest.mark.gpu_schedule)]


def golden(operator):
    """The torchvision golden fixture of `operator` (written by
    tests/fixtures/make_golden.py) and its case keys."""
    fixture = np.load(pathlib.Path(__file__).parent / "fixtures" / f"golden_{operator}.npz")
    return fixture, [f"c{i:02d}" for i in range(int(fixture["num_cases"]))]


def roi_align_case(fixture, key):
    """(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    of case `key` of roi_align's golden fixture."""
    ph, pw, ratio, aligned = (int(v) for v in fixture[f"{key}_params"])
    return (fixture[f"{key}_input"], fixture[f"{key}_rois"], (ph, pw),
            float(fixture[f"{key}_spatial_scale"]), ratio, bool(aligned))


def ps_roi_pool_case(fixture, key):
    """(features, rois, output_size, spatial_scale, consistent) of case `key`
    of ps_roi_pool's golden fixture; `consistent`: whether torchvision's
    gradient is its forward's adjoint there."""
    ph, pw = (int(v) for v in fixture[f"{key}_params"])
    return (fixture[f"{key}_input"], fixture[f"{key}_rois"], (ph, pw),
            float(fixture[f"{key}_spatial_scale"]), bool(fixture[f"{key}_consistent"]))


def roi_pool_case(fixture, key):
    """(features, rois, output_size, spatial_scale) of case `key` of
    roi_pool's golden fixture."""
    ph, pw = (int(v) for v in fixture[f"{key}_params"])
    return (fixture[f"{key}_input"], fixture[f"{key}_rois"], (ph, pw),
            float(fixture[f"{key}_spatial_scale"]))


def multi_scale_case(fixture, key):
    """(levels, boxes, output_size, sampling_ratio, image_size, options) of
    case `key` of multi_scale_roi_align's golden fixture; options: its
    canonical_scale and canonical_level."""
    ph, pw, ratio, scale0, level0, num_levels, n, height, width = (
        int(v) for v in fixture[f"{key}_params"])
    levels = [fixture[f"{key}_level{j}"] for j in range(num_levels)]
    boxes = [fixture[f"{key}_boxes{i}"] for i in range(n)]
    return levels, boxes, (ph, pw), ratio, (height, width), dict(
        canonical_scale=scale0, canonical_level=level0)


def check_rounded_once(pool, features, cotangent):
    """A 16-bit call of `pool` (features -> pooled) is its float32 call
    rounded once, forward and gradient, bit for bit."""
    wide = features.astype(np.float32)
    out, vjp = jax.vjp(pool, features)
    out32, vjp32 = jax.vjp(pool, wide)
    assert out.dtype == features.dtype
    np.testing.assert_array_equal(out, out32.astype(features.dtype))
    np.testing.assert_array_equal(
        vjp(cotangent)[0], vjp32(cotangent.astype(np.float32))[0].astype(features.dtype))


def check_transformations(op, features, boxes, operation):
    """What every linear operator owes JAX, on its native kernels:
    `op(features, boxes)` with features [B, C, H, W] and boxes [B, L, 4]
    (one list entry per image) under vmap per image is one forward call of
    `operation` equal to the whole call; forward mode is the forward of the
    tangent; the gradient of a quadratic's gradient is J^T J (the forward,
    then the backward kernel)."""
    rng = np.random.default_rng(9)
    mapped = jax.vmap(lambda f, b: op(f[None], [b]))(features, boxes)
    whole = op(features, list(boxes))
    np.testing.assert_allclose(mapped.reshape(whole.shape), whole, rtol=1e-6, atol=1e-6)
    text = jax.jit(jax.vmap(lambda f, b: op(f[None], [b]))).lower(features, boxes).as_text()
    assert text.count(f"jax_psroi_{operation}_forward_nchw_f32") == 1

    rois = _arguments.rois_from_boxes(list(boxes), jax.numpy.float32)
    tangent = rng.normal(size=features.shape).astype(np.float32)
    _, jvp_out = jax.jvp(lambda f: op(f, rois), (features,), (tangent,))
    np.testing.assert_allclose(jvp_out, op(tangent, rois), rtol=1e-6, atol=1e-6)
    loss = lambda f: 0.5 * jax.numpy.sum(op(f, rois) ** 2)
    _, hvp = jax.jvp(jax.grad(loss), (features,), (tangent,))
    _, vjp = jax.vjp(lambda f: op(f, rois), features)
    np.testing.assert_allclose(hvp, vjp(jvp_out)[0], rtol=1e-5, atol=1e-5)
    text = jax.jit(jax.grad(loss)).lower(features).as_text()
    assert f"jax_psroi_{operation}_backward_nchw_f32" in text


def native_gpu_schedule(direction, operand, rois, out_shape, spatial_scale,
                        sampling_ratio, data_format="NCHW", channel_order="torchvision",
                        first_bin_row=0, bin_rows=None, aligned=None,
                        operation="ps_roi_align", box_parameter=0):
    """Runs the CUDA kernels' schedule (gpu_schedule.h: buckets, blocks, tile
    lists, passes), built for the CPU, serially on the CPU: bin rows
    [first_bin_row, first_bin_row + PH) of a grid of bin_rows (default PH),
    of `operation`'s rows. With `aligned` given, roi_align's rows (shared
    channels); with `box_parameter` (1 to 4), the direction's box row."""
    dtype = jax.numpy.dtype(operand.dtype)
    if aligned is not None:
        operation = "roi_align"
    row = f"box_{direction}" if box_parameter else direction
    name = gpu_schedule_target((operation, row, data_format, dtype))
    call = jax.ffi.ffi_call(name, [jax.ShapeDtypeStruct(out_shape, dtype)])
    pooled = out_shape if direction == "forward" else operand.shape
    pooled_h, _ = _arguments.pooled_size_of(pooled, data_format)
    attribute = (dict(channel_order=CHANNEL_ORDERS.index(channel_order)) if aligned is None
                 else dict(aligned=int(aligned)))
    if box_parameter:
        attribute["box_parameter"] = int(box_parameter)
    with jax.default_device(jax.devices("cpu")[0]):
        out = call(operand, rois, spatial_scale=float(spatial_scale),
                   sampling_ratio=int(sampling_ratio), **attribute,
                   first_bin_row=first_bin_row, bin_rows=bin_rows or pooled_h, **ONE_GROUP)
        return np.asarray(out[0])


def forward_shape(features_shape, num_rois, output_size):
    ph, pw = output_size
    return (num_rois, features_shape[1] // (ph * pw), ph, pw)

