"""bfloat16 and float16: stored in 16 bits, computed in float32.

The rule (after flash_attn_jax): against the float32 reference, the kernel's
error is at most 4x the error of the jax.numpy reference run on the same
16-bit inputs. Beyond it, the kernels round each result once: they agree
with that reference (which also computes in float32 and rounds once) to one
16-bit rounding step.
"""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_psroi
from jax_psroi import _extension

from cases import (
    CHANNEL_ORDERS,
    KERNELS,
    LAYOUTS,
    LOW_PRECISION_DTYPES,
    features_as,
    hostile_rois,
    native_gpu_schedule,
    random_features,
    random_rois,
    reference,
    reference_vjp,
    target,
)

OUTPUT_SIZE = (2, 3)
# Every layout and order with a fixed grid; adaptive grids on the two
# extremes (NCHW torchvision, NHWC bin-major).
CASES = [*itertools.product(LOW_PRECISION_DTYPES, LAYOUTS, CHANNEL_ORDERS, [2]),
         *((dtype, "NCHW", "torchvision", -1) for dtype in LOW_PRECISION_DTYPES),
         *((dtype, "NHWC", "bin_major", -1) for dtype in LOW_PRECISION_DTYPES)]


def _op(data_format, channel_order, ratio):
    return lambda f, r: jax_psroi.ps_roi_align(f, r, OUTPUT_SIZE, 0.5, ratio,
                                               data_format=data_format,
                                               channel_order=channel_order)


def _data(dtype, data_format, channel_order, seed):
    rng = np.random.default_rng(seed)
    nchw = random_features(rng, 2, 5 * 6, 9, 37, np.float32)
    features = jnp.asarray(features_as(nchw, data_format, channel_order, OUTPUT_SIZE))
    rois = np.concatenate([random_rois(rng, 30, 2, 9, 37, 0.5, np.float32, outside=0.2),
                           hostile_rois(2, 9, 37, np.float32)])
    # Exactly representable in 16 bits, so the float32 reference sees the
    # same map.
    return rng, features.astype(dtype), rois


def _step(dtype):
    """One 16-bit rounding step (ulp) relative to the value, at most: 2^-7
    (bfloat16) or 2^-10 (float16). Two roundings of nearly equal float32
    sums can land a step apart when the sum is close to a midpoint."""
    return 2.0 ** -jnp.finfo(dtype).nmant


def _check(value, exact, low_precision, dtype):
    value, exact, low_precision = (np.asarray(a, np.float32) for a in (value, exact, low_precision))
    error = np.abs(value - exact).max()
    baseline = np.abs(low_precision - exact).max()
    assert baseline > 0  # the 16-bit run does lose something
    assert error <= 4 * baseline, (error, baseline)
    # Rounded once: within one rounding step of the round-once reference.
    np.testing.assert_array_less(np.abs(value - low_precision),
                                 _step(dtype) * np.abs(exact) + 1e-6)


# `kernels` "gpu_schedule": the CUDA kernels' per-element code, serially on
# the CPU.
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype,data_format,channel_order,sampling_ratio", CASES)
def test_forward_within_the_low_precision_rule(dtype, data_format, channel_order,
                                               sampling_ratio, kernels):
    _, features, rois = _data(dtype, data_format, channel_order, 50)
    op = _op(data_format, channel_order, sampling_ratio)
    if kernels == "cpu":
        out = jax.jit(op)(features, rois)
    else:
        out = native_gpu_schedule("forward", features, rois,
                                  jax.eval_shape(op, features, rois).shape, 0.5,
                                  sampling_ratio, data_format, channel_order)
    assert out.dtype == dtype
    layout = dict(data_format=data_format, channel_order=channel_order)
    exact = reference(features.astype(jnp.float32), rois, OUTPUT_SIZE, 0.5, sampling_ratio,
                      **layout)
    low_precision = reference(features, rois, OUTPUT_SIZE, 0.5, sampling_ratio, **layout)
    _check(out, exact, low_precision, dtype)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype,data_format,channel_order,sampling_ratio", CASES)
def test_gradient_within_the_low_precision_rule(dtype, data_format, channel_order,
                                                sampling_ratio, kernels):
    rng, features, rois = _data(dtype, data_format, channel_order, 51)
    op = _op(data_format, channel_order, sampling_ratio)
    shape = jax.eval_shape(op, features, rois).shape
    cotangent = jnp.asarray(rng.normal(size=shape), dtype)

    if kernels == "cpu":
        grad = jax.jit(lambda f, c: jax.vjp(lambda x: op(x, rois), f)[1](c)[0])(features,
                                                                               cotangent)
    else:
        grad = native_gpu_schedule("backward", cotangent, rois, features.shape, 0.5,
                                   sampling_ratio, data_format, channel_order)
    assert grad.dtype == dtype and grad.shape == features.shape
    layout = dict(data_format=data_format, channel_order=channel_order)
    exact = reference_vjp(features.astype(jnp.float32), rois, cotangent.astype(jnp.float32),
                          OUTPUT_SIZE, 0.5, sampling_ratio, **layout)
    low_precision = reference_vjp(features, rois, cotangent, OUTPUT_SIZE, 0.5,
                                  sampling_ratio, **layout)
    _check(grad, exact, low_precision, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_boxes_stay_float32(dtype):
    # At x = 801.3 a bfloat16 box would move by whole pixels; the kernels take
    # float32 boxes with 16-bit features and never round them.
    rng = np.random.default_rng(52)
    features = jnp.asarray(random_features(rng, 1, 4, 64, 64, np.float32), dtype)
    boxes = np.array([[0, 801.3, 13.7, 933.1, 301.9]], np.float32)
    out = jax_psroi.ps_roi_align(features, boxes, 2, 1 / 16, 2)
    exact = reference(features.astype(jnp.float32), boxes, 2, 1 / 16, 2)
    rounded_boxes = reference(features.astype(jnp.float32),
                              boxes.astype(jnp.bfloat16).astype(np.float32), 2, 1 / 16, 2)
    error = np.abs(np.asarray(out, np.float32) - exact).max()
    assert error <= _step(dtype) * np.abs(exact).max()
    assert np.abs(np.asarray(rounded_boxes) - exact).max() > 4 * error
    # float64 boxes are accepted, and taken as float32.
    np.testing.assert_array_equal(
        jax_psroi.ps_roi_align(features, boxes.astype(np.float64), 2, 1 / 16, 2), out)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_16_bit_programs_convert_nothing_outside_the_kernels(dtype):
    # No convert of the feature map or of its gradient: the kernels read and
    # write 16 bits, and the backward's float32 sums are its own second result.
    features = jnp.zeros((2, 9, 37, 5 * 6), dtype)
    rois = np.zeros((4, 5), np.float32)
    op = _op("NHWC", "bin_major", 2)
    text = jax.jit(jax.value_and_grad(lambda f: jnp.sum(op(f, rois)))).trace(
        features).lower(lowering_platforms=("cpu",)).as_text()
    suffix = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}[jnp.dtype(dtype)]
    map_type = f"tensor<2x9x37x30x{suffix}>"
    assert f"custom_call @{target('backward', dtype, 'NHWC')}" in text
    assert f"custom_call @{target('forward', dtype, 'NHWC')}" in text
    converts = [line for line in text.splitlines() if "stablehlo.convert" in line]
    assert not [line for line in converts if map_type in line], converts
    assert "transpose" not in text
    # The CPU backward's further result is its workspace of bytes: with its
    # RoIs in one pass, it holds no float32 sums of the gradient.
    backward = [line for line in text.splitlines()
                if f"custom_call @{target('backward', dtype, 'NHWC')}" in line]
    workspace = re.search(rf"-> \({re.escape(map_type)}, tensor<(\d+)xui8>\)$",
                          backward[0].rstrip())
    assert workspace and int(workspace[1]) < 2 * 9 * 37 * 30 * 4, backward[0]


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_16_bit_composes_with_vmap_and_forward_mode(dtype):
    rng, features, rois = _data(dtype, "NHWC", "bin_major", 53)
    op = _op("NHWC", "bin_major", 2)
    batch = jnp.stack([features, -features])
    out = jax.jit(jax.vmap(op, in_axes=(0, None)))(batch, rois)
    single = op(features, rois)
    np.testing.assert_array_equal(out[0], single)
    np.testing.assert_array_equal(out[1], -single)
    # The operation is linear: its JVP is the forward applied to the tangent.
    tangent = jnp.asarray(rng.normal(size=features.shape), dtype)
    _, out_tangent = jax.jvp(lambda f: op(f, rois), (features,), (tangent,))
    np.testing.assert_array_equal(out_tangent, op(tangent, rois))
    loss = lambda f: jnp.sum(jnp.sin(op(f, rois).astype(jnp.float32)))
    grads = jax.jit(jax.vmap(jax.grad(loss)))(batch)
    assert grads.dtype == dtype
    for b in range(2):
        np.testing.assert_array_equal(grads[b], jax.jit(jax.grad(loss))(batch[b]))
    assert np.abs(np.asarray(grads, np.float32)).max() > 0


@pytest.mark.skipif(not _extension.KERNELS["cuda"], reason="built without CUDA")
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_16_bit_exports_for_cuda(dtype):
    # The CUDA lowering of the backward carries the float32 accumulator as a
    # second result of the custom call, and nothing else converts.
    features = jnp.zeros((2, 9, 37, 5 * 6), dtype)
    rois = np.zeros((4, 5), np.float32)
    op = _op("NHWC", "bin_major", 2)
    exported = export.export(
        jax.jit(jax.value_and_grad(lambda f: jnp.sum(op(f, rois)))), platforms=["cuda"],
        disabled_checks=jax_psroi.export_safety_checks())(features)
    calls = [line for line in exported.mlir_module().splitlines()
             if "stablehlo.custom_call" in line]
    backward = [line for line in calls if target("backward", dtype, "NHWC") in line]
    assert len(calls) == 2 and len(backward) == 1
    assert f"tensor<{2 * 9 * 37 * 30}xf32>" in backward[0]


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("data_format,channel_order",
                         [("NCHW", "torchvision"), ("NHWC", "torchvision"), ("NHWC", "bin_major")])
def test_16_bit_backward_over_many_work_units(dtype, data_format, channel_order):
    # Maps large enough that the CPU backward splits each image into several
    # units (row bands channels-last, channel chunks in NCHW), each summing
    # its part in scratch: the offsets of every part are exercised.
    rng = np.random.default_rng(54)
    nchw = random_features(rng, 2, 13 * 4, 128, 96, np.float32)
    features = jnp.asarray(features_as(nchw, data_format, channel_order, (2, 2)), dtype)
    rois = random_rois(rng, 40, 2, 128, 96, 0.25, np.float32, outside=0.2)
    op = lambda f: jax_psroi.ps_roi_align(f, rois, 2, 0.25, 2, data_format=data_format,
                                          channel_order=channel_order)
    shape = jax.eval_shape(op, features).shape
    cotangent = jnp.asarray(rng.normal(size=shape), dtype)
    grad = jax.jit(lambda f, c: jax.vjp(op, f)[1](c)[0])(features, cotangent)
    layout = dict(data_format=data_format, channel_order=channel_order)
    exact = reference_vjp(features.astype(jnp.float32), rois, cotangent.astype(jnp.float32),
                          (2, 2), 0.25, 2, **layout)
    low_precision = reference_vjp(features, rois, cotangent, (2, 2), 0.25, 2, **layout)
    _check(grad, exact, low_precision, dtype)
