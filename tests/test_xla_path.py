"""The XLA path (jax_psroi/_xla_path.py), what every platform without native
kernels runs, forced on the CPU with JAX_PSROI_IMPLEMENTATION=xla: the
operators' key cases against the jax.numpy reference and torchvision's
golden fixtures with the native kernels' tolerances, forward, gradients
(reverse and forward mode), vmap and hostile boxes; programs lowered for TPU
and ROCm hold no custom call and no tensor larger than a small multiple of
their inputs and outputs; and `import jax_psroi` works without the compiled
module.

Sized for CI: a few shapes, each compiled once.
"""

import math
import os
import re
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_psroi
from jax_psroi import _implementation, _xla_path

from cases import (
    CHANNEL_ORDERS,
    LAYOUTS,
    TOLERANCE,
    features_as,
    features_from,
    golden,
    hostile_rois,
    multi_scale_case,
    pooled_as,
    ps_roi_pool_case,
    random_features,
    random_rois,
    roi_align_case,
    roi_pool_case,
)


@pytest.fixture(autouse=True)
def xla_path(monkeypatch):
    """Every call traced in these tests takes the XLA path."""
    monkeypatch.setenv(_implementation.ENVIRONMENT_VARIABLE, "xla")


def _custom_calls(fn, *args):
    return jax.jit(fn).lower(*args).as_text().count("custom_call")


def test_the_switch_selects_the_path_when_a_call_is_traced(monkeypatch):
    # A function traced before keeps its path (jit caches the trace): each
    # of these is traced anew.
    features = np.zeros((1, 8, 4, 4), np.float32)
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    assert _custom_calls(lambda f: jax_psroi.ps_roi_align(f, rois, 2), features) == 0
    monkeypatch.setenv(_implementation.ENVIRONMENT_VARIABLE, "native")
    assert _custom_calls(lambda f: jax_psroi.ps_roi_align(f, rois, 2), features) == 1
    monkeypatch.setenv(_implementation.ENVIRONMENT_VARIABLE, "dense")
    with pytest.raises(ValueError, match="JAX_PSROI_IMPLEMENTATION must be 'native' or 'xla'"):
        jax_psroi.ps_roi_align(features, rois, 2)


# --- Against the reference -----------------------------------------------------

N, H, W = 2, 11, 13
OUTPUT_SIZE = (3, 2)
SCALE = 0.5


def _operator(name, ratio, data_format, channel_order):
    """(operator, its reference), each (features, rois) -> pooled."""
    args = (OUTPUT_SIZE, SCALE)
    layout = dict(data_format=data_format)
    if name in ("ps_roi_align", "ps_roi_pool"):
        layout["channel_order"] = channel_order
    if name in ("ps_roi_align", "roi_align"):
        args += (ratio,)
    if name == "roi_align":
        args += (ratio > 0,)  # aligned both ways across the ratios
    op, ref = getattr(jax_psroi, name), getattr(jax_psroi, f"{name}_reference")
    return (lambda f, r: op(f, r, *args, **layout)), (lambda f, r: ref(f, r, *args, **layout))


def _data(name, dtype, data_format, channel_order, seed=0):
    rng = np.random.default_rng(seed)
    channels = 2 if name in ("roi_align", "roi_pool") else 2 * math.prod(OUTPUT_SIZE)
    features = random_features(rng, N, channels, H, W, dtype)
    if channels > 2:
        features = features_as(features, data_format, channel_order, OUTPUT_SIZE)
    else:
        features = pooled_as(features, data_format)
    rois = np.concatenate([random_rois(rng, 24, N, H, W, SCALE, dtype),
                           hostile_rois(N, H, W, dtype)])
    return features, rois


def _pooled_and_gradient(pool, features, cotangent=None):
    """pool(features) and its gradient for `cotangent` (default: a fixed
    pattern), compiled as one program."""
    def run(f):
        out, vjp = jax.vjp(pool, f)
        c = (jnp.cos(jnp.arange(out.size)).reshape(out.shape).astype(out.dtype)
             if cotangent is None else cotangent)
        return out, vjp(c)[0]

    return jax.jit(run)(features)


# Every operator, layout and channel order; the sample taps of a fixed grid,
# the per-pixel tables of adaptive and larger grids, the pools' windows.
CASES = [("ps_roi_align", -1, "NCHW", "torchvision", np.float64),
         ("ps_roi_align", -1, "NHWC", "bin_major", np.float32),
         ("ps_roi_align", 2, "NCHW", "bin_major", np.float32),
         ("ps_roi_align", 2, "NHWC", "torchvision", np.float64),
         ("ps_roi_align", 7, "NCHW", "torchvision", np.float32),
         ("roi_align", 0, "NHWC", "torchvision", np.float64),
         ("roi_align", 3, "NCHW", "torchvision", np.float32),
         ("ps_roi_pool", 0, "NCHW", "torchvision", np.float64),
         ("ps_roi_pool", 0, "NHWC", "bin_major", np.float32),
         ("roi_pool", 0, "NCHW", "torchvision", np.float32),
         ("roi_pool", 0, "NHWC", "torchvision", np.float64)]


@pytest.mark.parametrize("name,ratio,data_format,channel_order,dtype", CASES)
def test_forward_and_gradient_match_the_reference(name, ratio, data_format, channel_order,
                                                  dtype):
    # Random boxes, partly off the map, and every hostile box of the native
    # kernels' tests: bad batch indices, NaN and inf coordinates, empty,
    # inverted, huge and capped boxes.
    features, rois = _data(name, dtype, data_format, channel_order)
    op, ref = _operator(name, ratio, data_format, channel_order)
    out, grad = _pooled_and_gradient(lambda f: op(f, rois), features)
    expected, expected_grad = _pooled_and_gradient(lambda f: ref(f, rois), features)
    tolerance = TOLERANCE[np.dtype(dtype)]
    assert out.dtype == expected.dtype and np.isfinite(out).all() and np.isfinite(grad).all()
    if name == "roi_pool":
        np.testing.assert_array_equal(out, expected)  # a maximum is an element
    else:
        np.testing.assert_allclose(out, expected, **tolerance)
    np.testing.assert_allclose(grad, expected_grad, **tolerance)
    # RoIs that read nothing give exactly 0 (rows 1-7 of hostile_rois).
    invalid = len(rois) - 15 + np.arange(1, 8)
    np.testing.assert_array_equal(np.asarray(out)[invalid], 0)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_16_bit_maps_are_summed_in_float32_and_rounded_once(dtype):
    features, rois = _data("ps_roi_align", np.float32, "NHWC", "bin_major")
    op, _ = _operator("ps_roi_align", -1, "NHWC", "bin_major")
    narrow = features.astype(dtype)
    shape = jax.eval_shape(op, narrow, rois).shape
    cotangent = np.cos(np.arange(math.prod(shape))).reshape(shape).astype(dtype)
    out, grad = _pooled_and_gradient(lambda f: op(f, rois), narrow, cotangent)
    wide, wide_grad = _pooled_and_gradient(lambda f: op(f, rois), narrow.astype(np.float32),
                                           cotangent.astype(np.float32))
    assert out.dtype == grad.dtype == dtype
    np.testing.assert_array_equal(out, wide.astype(dtype))
    np.testing.assert_array_equal(grad, wide_grad.astype(dtype))


@pytest.mark.parametrize("ratio", [-1, 9])
def test_check_grads_forward_and_reverse_to_second_order(ratio):
    features, rois = _data("ps_roi_align", np.float64, "NCHW", "torchvision", seed=1)
    op, _ = _operator("ps_roi_align", ratio, "NCHW", "torchvision")
    check_grads(lambda f: op(f, rois[:8]), (features,), order=2, modes=("fwd", "rev"))


def test_roi_pool_check_grads_and_tangent():
    # Distinct values: the maxima, hence the pixels, do not move under the
    # finite differences.
    features = np.random.default_rng(4).permutation(N * 2 * H * W).reshape(
        N, 2, H, W).astype(np.float64)
    rois = random_rois(np.random.default_rng(5), 8, N, H, W, SCALE, np.float64)
    pool = lambda f: jax_psroi.roi_pool(f, rois, OUTPUT_SIZE, SCALE)
    check_grads(pool, (features,), order=2, modes=("fwd", "rev"))


def test_vmap_equals_separate_calls():
    rng = np.random.default_rng(6)
    features = rng.normal(size=(3, 1, 24, H, W)).astype(np.float32)
    boxes = rng.uniform(0, 20, size=(3, 5, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2]
    for op in (lambda f, b: jax_psroi.ps_roi_align(f, [b], OUTPUT_SIZE, SCALE, -1),
               lambda f, b: jax_psroi.roi_pool(f, [b], OUTPUT_SIZE, SCALE),
               lambda f, b: jax.grad(lambda x: jnp.sum(jax_psroi.ps_roi_pool(
                   x, [b], OUTPUT_SIZE, SCALE) ** 2))(f)):
        mapped = jax.vmap(op)(features, boxes)
        loop = np.stack([op(features[i], boxes[i]) for i in range(3)])
        np.testing.assert_array_equal(mapped, loop)


def test_huge_box_and_large_fixed_grid_stay_exact():
    # Adaptive grids of ~3e5 and 2^23 samples per bin axis visit only the
    # samples on the map; a fixed grid of 2^12 samples puts ~2000 in a
    # pixel, whose weights must not drift in float32.
    rng = np.random.default_rng(7)
    features = rng.uniform(1, 2, size=(1, 4, 8, 8)).astype(np.float32)
    rois = np.array([[0, -1e6, -1e6, 1e6, 1e6], [0, -1e30, -1e30, 1e30, 1e30],
                     [0, 1.3, 2.2, 5.9, 6.7]], np.float32)
    for ratio in (-1, 2**12):
        out = jax_psroi.ps_roi_align(features, rois, 2, 1.0, ratio)
        expected = jax_psroi.ps_roi_align_reference(features.astype(np.float64),
                                                    rois.astype(np.float64), 2, 1.0, ratio)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _on_each_path(fn, monkeypatch, *args):
    """({path: fn(*args)}, the XLA path's program text) for the native
    kernels and the XLA path, each one compiled program, traced anew (a
    traced function keeps its path), the XLA path's without a custom call."""
    results = {}
    for path in ("native", "xla"):
        monkeypatch.setenv(_implementation.ENVIRONMENT_VARIABLE, path)
        program = jax.jit(lambda *a: fn(*a)).lower(*args)
        text = program.as_text()
        assert ("custom_call" in text) == (path == "native")
        results[path] = program.compile()(*args)
    return results, text


@pytest.mark.parametrize("ratio", [5, 300, 2**20])
def test_fixed_grids_visit_the_run_of_samples_on_the_map(ratio, monkeypatch):
    # A fixed grid's samples on the map are found by binary searches, upwards
    # and, in an inverted box of aligned roi_align, downwards; the rest,
    # maybe millions, are skipped. Values and box gradients as the kernels'.
    rng = np.random.default_rng(11)
    features = rng.normal(size=(1, 4 * 9, 16, 20))
    rois = np.array([[0, -3e5, -3e5, 3e5, 3e5], [0, 3e5, 18, -3e5, -2],  # huge, and inverted
                     [0, 15.2, 9.7, 4.1, 2.3], [0, -5, -6, 3, 25],       # inverted; half off
                     [0, 19.6, 15.6, 19.9, 15.9]])                       # at the far corner
    if ratio == 2**20:
        rois = rois[:1]  # a million samples on the map take seconds on either path
    calls = [lambda f, r: jax_psroi.roi_align(f, r, 3, 1.0, ratio, aligned=True),
             lambda f, r: jax_psroi.ps_roi_align(f, r, 3, 1.0, ratio)]
    for call in calls:
        shape = jax.eval_shape(call, features, rois).shape
        cotangent = np.cos(np.arange(math.prod(shape))).reshape(shape)

        def value_and_gradients(f, r, call=call, cotangent=cotangent):
            out, vjp = jax.vjp(call, f, r)
            return (out, *vjp(cotangent))

        results, _ = _on_each_path(value_and_gradients, monkeypatch, features, rois)
        for native, xla in zip(results["native"], results["xla"], strict=True):
            assert np.abs(native).max() > 0
            np.testing.assert_allclose(xla, native, rtol=1e-12, atol=1e-12)


def test_roi_blocks_are_equal_sorted_by_cost_and_filled_with_the_cheapest():
    blocks = _xla_path._RoiBlocks.of(jnp.arange(1000.0), largest=2**62)
    assert blocks[1:] == (16, 63)  # at most 16 blocks, of at least 64 RoIs
    np.testing.assert_array_equal(blocks.order, [*range(999, -1, -1), *[0] * 8])  # 8 fillers
    assert _xla_path._RoiBlocks.of(jnp.arange(200.0), largest=2**62)[1:] == (4, 50)
    assert _xla_path._RoiBlocks.of(jnp.arange(1000.0), largest=40)[1:] == (25, 40)  # tables
    assert _xla_path._RoiBlocks.of(jnp.arange(64.0), largest=2**62).order is None  # one block
    assert _xla_path._RoiBlocks.of(jnp.arange(64.0), largest=0)[1:] == (64, 1)
    assert _xla_path._RoiBlocks.of(None, largest=1).order is None


BLOCKED = {  # every kind of run-time tap count: tables (adaptive, a large fixed grid), windows
    "ps_roi_align": lambda f, r, o: jax_psroi.ps_roi_align(f, r, 3, 0.5, -1),
    "roi_align": lambda f, r, o: jax_psroi.roi_align(f[:, :4], r, 3, 0.5, 6, aligned=True),
    "ps_roi_pool": lambda f, r, o: jax_psroi.ps_roi_pool(f, r, 3, 0.5),
    "roi_pool": lambda f, r, o: jax_psroi.roi_pool(f[:, :4], r, 3, 0.5),
    "deform_ps_roi_align": lambda f, r, o: jax_psroi.deform_ps_roi_align(f, r, o, 3, 0.5, -1),
}


@pytest.mark.parametrize("name,budget", [
    *((name, "default") for name in BLOCKED),
    # The tables' budget: the operators whose tables are largest.
    ("ps_roi_align", "tables of 10 RoIs"), ("deform_ps_roi_align", "tables of 10 RoIs")])
def test_rois_in_blocks_equal_the_native_kernels(name, budget, monkeypatch):
    # 167 RoIs of every size, hostile ones among them, run in 3 blocks of 56
    # sorted by cost (the last with one filler), or with the tables' budget
    # cut to 10 RoIs in 17 blocks of 10 (3 fillers): values and the
    # gradients of the map, the boxes and the offsets, in the RoIs' order,
    # as the kernels'.
    if budget != "default":
        monkeypatch.setattr(_xla_path, "_largest_block", lambda *_: 10)
    rng = np.random.default_rng(12)
    features = rng.normal(size=(2, 4 * 9, 16, 20))
    rois = np.concatenate([random_rois(rng, 150, 2, 16, 20, 0.5, np.float64, outside=2.0),
                           random_rois(rng, 2, 2, 16, 20, 0.05, np.float64),
                           hostile_rois(2, 16, 20, np.float64)])
    rois[[5, 70, 140]] = [[1, -5, -5, 45, 37], [0, 0, 0, 40, 32], [1, 3, 3, 4, 4]]
    offset = rng.normal(size=(len(rois), 2, 3, 3))
    call = BLOCKED[name]
    shape = jax.eval_shape(call, features, rois, offset).shape
    cotangent = np.cos(np.arange(math.prod(shape))).reshape(shape)

    def value_and_gradients(f, r, o):
        out, vjp = jax.vjp(call, f, r, o)
        return (out, *vjp(cotangent))

    results, xla_program = _on_each_path(value_and_gradients, monkeypatch, features, rois,
                                         offset)
    assert "stablehlo.sort" in xla_program
    for native, xla in zip(results["native"], results["xla"], strict=True):
        np.testing.assert_allclose(xla, native, rtol=1e-11, atol=1e-12)
    assert np.abs(results["xla"][0]).max() > 0 and np.abs(results["xla"][1]).max() > 0


# --- Against torchvision -------------------------------------------------------

def _golden_forward_and_gradient(pool, features, key, fixture, tolerance, exact=False):
    out, grad = _pooled_and_gradient(pool, features, fixture[f"{key}_cotangent"])
    check = np.testing.assert_array_equal if exact else (
        lambda a, b: np.testing.assert_allclose(a, b, **tolerance))
    check(out, fixture[f"{key}_output"])
    np.testing.assert_allclose(grad, fixture[f"{key}_grad_input"], **tolerance)


def _one_per(fixture, keys, distinct):
    """The first case of `keys` for each value of distinct(params): the
    golden cases that exercise something of their own (each compiles)."""
    chosen = {}
    for key in keys:
        chosen.setdefault(distinct(tuple(int(v) for v in fixture[f"{key}_params"])), key)
    return list(chosen.values())


def test_golden_ps_roi_align_and_roi_align():
    fixture, keys = golden("ps_roi_align")
    for key in _one_per(fixture, keys, lambda params: params[2]):  # each sampling ratio
        ph, pw, ratio = (int(v) for v in fixture[f"{key}_params"])
        pool = partial(jax_psroi.ps_roi_align, boxes=fixture[f"{key}_rois"],
                       output_size=(ph, pw), spatial_scale=float(fixture[f"{key}_spatial_scale"]),
                       sampling_ratio=ratio)
        features = fixture[f"{key}_input"]
        _golden_forward_and_gradient(pool, features, key, fixture, TOLERANCE[features.dtype])
    fixture, keys = golden("roi_align")
    for key in _one_per(fixture, keys, lambda params: params[2:]):  # ratio, aligned
        features, rois, size, scale, ratio, aligned = roi_align_case(fixture, key)
        pool = partial(jax_psroi.roi_align, boxes=rois, output_size=size, spatial_scale=scale,
                       sampling_ratio=ratio, aligned=aligned)
        _golden_forward_and_gradient(pool, features, key, fixture, TOLERANCE[features.dtype])


def test_golden_pools():
    fixture, keys = golden("roi_pool")
    for key in keys:
        features, rois, size, scale = roi_pool_case(fixture, key)
        pool = partial(jax_psroi.roi_pool, boxes=rois, output_size=size, spatial_scale=scale)
        _golden_forward_and_gradient(pool, features, key, fixture, TOLERANCE[features.dtype],
                                     exact=True)
    fixture, keys = golden("ps_roi_pool")
    for key in keys:
        features, rois, size, scale, consistent = ps_roi_pool_case(fixture, key)
        if not consistent:  # torchvision's gradient is not its forward's adjoint
            continue
        pool = partial(jax_psroi.ps_roi_pool, boxes=rois, output_size=size,
                       spatial_scale=scale)
        _golden_forward_and_gradient(pool, features, key, fixture, TOLERANCE[features.dtype])


def test_golden_multi_scale_roi_align():
    fixture, keys = golden("multi_scale_roi_align")
    for key in keys:
        levels, boxes, size, ratio, image_size, options = multi_scale_case(fixture, key)
        pool = partial(jax_psroi.multi_scale_roi_align, boxes=boxes, output_size=size,
                       sampling_ratio=ratio, image_size=image_size, **options)
        out, grads = _pooled_and_gradient(pool, levels, fixture[f"{key}_cotangent"])
        tolerance = TOLERANCE[levels[0].dtype]
        np.testing.assert_allclose(out, fixture[f"{key}_output"], **tolerance)
        for j, grad in enumerate(grads):
            np.testing.assert_allclose(grad, fixture[f"{key}_grad_level{j}"], **tolerance)


def test_layouts_give_the_permuted_nchw_gradient():
    features, rois = _data("ps_roi_align", np.float64, "NCHW", "torchvision")
    op, _ = _operator("ps_roi_align", 2, "NCHW", "torchvision")
    out, grad = _pooled_and_gradient(lambda f: op(f, rois), features)
    cotangent = np.cos(np.arange(out.size)).reshape(out.shape)
    for data_format in LAYOUTS:
        for order in CHANNEL_ORDERS:
            other, _ = _operator("ps_roi_align", 2, data_format, order)
            x = features_as(features, data_format, order, OUTPUT_SIZE)
            out_other, grad_other = _pooled_and_gradient(partial(other, r=rois), x,
                                                         pooled_as(cotangent, data_format))
            np.testing.assert_allclose(out_other, pooled_as(out, data_format), rtol=1e-12)
            np.testing.assert_allclose(features_from(np.asarray(grad_other), data_format,
                                                     order, OUTPUT_SIZE), grad, rtol=1e-12)


# --- Lowered for platforms without kernels ----------------------------------------

_TENSOR = re.compile(r"tensor<((?:\d+x)*)[a-z]+\d*>")


def _largest_tensor(text) -> int:
    """Elements of the largest tensor a StableHLO module names."""
    return max(math.prod(int(d) for d in dims.split("x") if d)
               for dims in _TENSOR.findall(text))


S = jax.ShapeDtypeStruct
# The benchmark's maps (Light-Head R-CNN, R-FCN), RoI Align on an FPN level,
# and a map smaller than its pooled tensor.
LOWERED = [
    ("ps_roi_align", (2, 490, 50, 84), 4000, -1),
    ("ps_roi_align", (1, 3969, 38, 63), 300, 2),
    ("ps_roi_align", (1, 3969, 38, 63), 300, 16),
    ("ps_roi_pool", (1, 392, 38, 63), 300, 0),
    ("roi_align", (2, 256, 100, 152), 1000, 0),
    ("roi_pool", (2, 256, 50, 76), 1000, 0),
]


@pytest.mark.parametrize("platform", ["tpu", "rocm"])
@pytest.mark.parametrize("name,shape,num_rois,ratio", LOWERED)
def test_lowered_programs_hold_no_custom_call_and_no_large_temporary(name, shape, num_rois,
                                                                     ratio, platform,
                                                                     monkeypatch):
    # What these platforms run by default, whatever the switch says.
    monkeypatch.delenv(_implementation.ENVIRONMENT_VARIABLE)
    features, rois = S(shape, jnp.float32), S((num_rois, 5), jnp.float32)
    args = (7, 1 / 16) + ((ratio,) if "align" in name else ())
    op = lambda f, r: getattr(jax_psroi, name)(f, r, *args)
    out = jax.eval_shape(op, features, rois)
    bound = 4 * max(math.prod(shape), math.prod(out.shape))

    def value_and_grad(f, r):
        return jax.value_and_grad(lambda x: jnp.sum(op(x, r) ** 2))(f)

    text = jax.jit(value_and_grad).trace(features, rois).lower(
        lowering_platforms=(platform,)).as_text()
    assert "custom_call" not in text
    # Gathers of one pooled tensor per step, their index tensors (4 int32
    # per element at most), per-axis weight tables [K, bins, size].
    assert _largest_tensor(text) <= bound


def test_the_dense_reference_breaks_that_bound():
    # What the bound above catches: the reference's contractions hold a
    # [K, C_out, PH, PW, H] tensor.
    shape, num_rois = (2, 490, 50, 84), 4000
    text = jax.jit(lambda f, r: jax_psroi.ps_roi_align_reference(f, r, 7, 1 / 16)).trace(
        S(shape, jnp.float32), S((num_rois, 5), jnp.float32)).lower(
            lowering_platforms=("tpu",)).as_text()
    assert _largest_tensor(text) > 4 * math.prod(shape)


# --- Without the compiled module --------------------------------------------------

def test_import_without_the_compiled_module_runs_the_xla_path():
    script = textwrap.dedent("""
        import builtins, warnings
        real_import = builtins.__import__

        def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
            if name.startswith("jax_psroi._cpu") or (
                    name == "jax_psroi" and fromlist and "_cpu" in fromlist):
                raise ImportError("no compiled module (test)")
            return real_import(name, globals, locals, fromlist, level)

        builtins.__import__ = no_extension
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import jax, numpy as np
            import jax_psroi
        assert any("XLA formulation" in str(w.message) for w in caught), caught
        assert not jax_psroi.build_info()["native"]
        features = np.arange(2 * 8 * 5 * 6, dtype=np.float32).reshape(2, 8, 5, 6)
        rois = np.array([[1, 0.5, 1, 4, 3.5]], np.float32)
        pool = lambda f: jax_psroi.ps_roi_align(f, rois, 2, 1.0, 2).sum()
        text = jax.jit(jax.grad(pool)).lower(features).as_text()
        assert "custom_call" not in text
        expected = jax_psroi.ps_roi_align_reference(features, rois, 2, 1.0, 2)
        np.testing.assert_allclose(jax_psroi.ps_roi_align(features, rois, 2, 1.0, 2),
                                   expected, rtol=1e-6)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != _implementation.ENVIRONMENT_VARIABLE}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
