"""Gradients: native backward kernel, custom_vjp, higher orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_psroi
from cases import (TOLERANCE, hostile_rois, native_elementwise,
                   random_features, random_rois)
from loop_reference import ps_roi_align_grad_loops


def _vjp_features(fn, features, cotangent):
    _, vjp = jax.vjp(fn, features)
    return vjp(cotangent)[0]


def _native_grad(features, rois, cotangent, output_size, scale, ratio):
    fn = lambda f: jax_psroi.ps_roi_align(f, rois, output_size, scale, ratio)
    return jax.jit(lambda f, c: _vjp_features(fn, f, c))(features, cotangent)


def _reference_grad(features, rois, cotangent, output_size, scale, ratio):
    fn = lambda f: jax_psroi.ps_roi_align_reference(f, rois, output_size,
                                                    scale, ratio)
    return _vjp_features(fn, jnp.asarray(features), cotangent)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("output_size,spatial_scale,sampling_ratio", [
    ((3, 3), 1.0, -1), ((2, 3), 0.5, 2), ((3, 2), 1 / 16, 0), ((1, 1), 1.0, 4),
])
def test_backward_matches_reference_and_elementwise(
        dtype, output_size, spatial_scale, sampling_ratio):
    rng = np.random.default_rng(11)
    ph, pw = output_size
    features = random_features(rng, 2, 2 * ph * pw, 9, 11, dtype)
    rois = random_rois(rng, 13, 2, 9, 11, spatial_scale, dtype)
    cotangent = rng.normal(size=(13, 2, ph, pw)).astype(dtype)
    grad = _native_grad(features, rois, cotangent, output_size, spatial_scale,
                        sampling_ratio)
    ref = _reference_grad(features, rois, cotangent, output_size,
                          spatial_scale, sampling_ratio)
    elementwise = native_elementwise("backward", cotangent, rois,
                                     features.shape, spatial_scale,
                                     sampling_ratio)
    assert grad.dtype == dtype and grad.shape == features.shape
    assert np.abs(np.asarray(grad)).max() > 0.01
    np.testing.assert_allclose(grad, ref, **TOLERANCE[np.dtype(dtype)])
    np.testing.assert_allclose(elementwise, ref, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_backward_matches_torchvision_loops(sampling_ratio):
    rng = np.random.default_rng(12)
    features = random_features(rng, 2, 8, 6, 7, np.float64)
    rois = random_rois(rng, 5, 2, 6, 7, 1.0, np.float64)
    cotangent = rng.normal(size=(5, 2, 2, 2))
    grad = _native_grad(features, rois, cotangent, (2, 2), 1.0, sampling_ratio)
    loops = ps_roi_align_grad_loops(features, rois, cotangent, (2, 2), 1.0,
                                    sampling_ratio)
    np.testing.assert_allclose(grad, loops, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_backward_on_hostile_rois(sampling_ratio):
    rng = np.random.default_rng(13)
    features = random_features(rng, 2, 4, 6, 7, np.float64)
    rois = hostile_rois(2, 6, 7, np.float64)
    cotangent = rng.normal(size=(len(rois), 1, 2, 2))
    grad = _native_grad(features, rois, cotangent, (2, 2), 1.0, sampling_ratio)
    ref = _reference_grad(features, rois, cotangent, (2, 2), 1.0,
                          sampling_ratio)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, ref, atol=1e-10)


def test_boxes_get_zero_gradient():
    rng = np.random.default_rng(14)
    features = random_features(rng, 1, 4, 6, 6, np.float64)
    rois = random_rois(rng, 3, 1, 6, 6, 1.0, np.float64)
    loss = lambda f, b: jnp.sum(jax_psroi.ps_roi_align(f, b, 2) ** 2)
    grad_f, grad_b = jax.grad(loss, argnums=(0, 1))(features, rois)
    assert np.abs(np.asarray(grad_f)).max() > 0
    np.testing.assert_array_equal(grad_b, np.zeros_like(rois))
    boxes = [rois[:, 1:]]
    grad_list = jax.grad(lambda b: loss(features, b))(boxes)
    np.testing.assert_array_equal(grad_list[0], np.zeros_like(boxes[0]))


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_check_grads_first_and_second_order(sampling_ratio):
    rng = np.random.default_rng(15)
    features = random_features(rng, 2, 8, 5, 6, np.float64)
    rois = random_rois(rng, 4, 2, 5, 6, 1.0, np.float64)
    # A nonlinear loss makes the second order non-trivial.
    fn = lambda f: jnp.sin(jax_psroi.ps_roi_align(f, rois, 2, 1.0, sampling_ratio))
    check_grads(fn, (features,), order=1, modes=("rev",))
    check_grads(fn, (features,), order=2, modes=("rev",))


def test_gradient_penalty_matches_reference():
    # d/df ||d loss/df||^2, reverse over reverse, against the reference.
    rng = np.random.default_rng(16)
    features = random_features(rng, 1, 8, 6, 6, np.float64)
    rois = random_rois(rng, 5, 1, 6, 6, 1.0, np.float64)

    def penalty(op):
        loss = lambda f: jnp.sum(jnp.tanh(op(f, rois, 2, 1.0, -1)))
        return lambda f: jnp.sum(jax.grad(loss)(f) ** 2)

    native = jax.jit(jax.grad(penalty(jax_psroi.ps_roi_align)))(features)
    ref = jax.grad(penalty(jax_psroi.ps_roi_align_reference))(features)
    assert np.abs(np.asarray(native)).max() > 0
    np.testing.assert_allclose(native, ref, atol=1e-10)


def test_backward_is_bitwise_deterministic():
    rng = np.random.default_rng(17)
    # Big enough that the backward is split over the thread pool.
    features = random_features(rng, 2, 49 * 4, 20, 24, np.float32)
    rois = random_rois(rng, 300, 2, 20, 24, 1.0, np.float32)
    cotangent = rng.normal(size=(300, 4, 7, 7)).astype(np.float32)
    first = np.asarray(_native_grad(features, rois, cotangent, 7, 1.0, -1))
    for _ in range(3):
        again = np.asarray(_native_grad(features, rois, cotangent, 7, 1.0, -1))
        np.testing.assert_array_equal(again, first)


def test_backward_lowers_to_the_ffi_custom_call():
    features = np.zeros((1, 8, 4, 4), np.float64)
    rois = np.zeros((2, 5), np.float64)
    loss = lambda f: jnp.sum(jax_psroi.ps_roi_align(f, rois, 2) ** 2)
    text = jax.jit(jax.grad(loss)).lower(features).as_text()
    assert "stablehlo.custom_call @jax_psroi_backward_f64" in text
    assert "scatter" not in text and "while" not in text


def test_platforms_without_kernels_lower_the_reference():
    # Forward and backward on a platform with no native kernel (ROCm here)
    # lower to the jax.numpy reference: no custom call at all.
    features = np.zeros((1, 8, 4, 4), np.float32)
    rois = np.zeros((2, 5), np.float32)
    loss = lambda f: jnp.sum(jax_psroi.ps_roi_align(f, rois, 2) ** 2)
    text = jax.jit(jax.value_and_grad(loss)).trace(features).lower(
        lowering_platforms=("rocm",)).as_text()
    assert "custom_call" not in text
    assert "scatter" in text and "dot_general" in text


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_out", [5, 13])
def test_backward_with_many_output_channels(dtype, channels_out):
    rng = np.random.default_rng(channels_out)
    features = random_features(rng, 2, channels_out * 4, 10, 37, dtype)
    rois = random_rois(rng, 40, 2, 10, 37, 0.5, dtype, outside=0.2)
    cotangent = rng.normal(size=(40, channels_out, 2, 2)).astype(dtype)
    grad = _native_grad(features, rois, cotangent, (2, 2), 0.5, 2)
    ref = _reference_grad(features, rois, cotangent, (2, 2), 0.5, 2)
    assert np.abs(np.asarray(grad)).max() > 0.01
    np.testing.assert_allclose(grad, ref, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_on_planes_larger_than_cache(dtype):
    # The CPU backward gives each work unit as many output channels' planes
    # as fit in 256 KiB; 128 x 128 planes make it split 13 output channels
    # into chunks (4, 4, 4, 1 in float32).
    rng = np.random.default_rng(5)
    features = random_features(rng, 2, 13 * 4, 128, 128, dtype)
    rois = random_rois(rng, 30, 2, 128, 128, 0.25, dtype, outside=0.2)
    cotangent = rng.normal(size=(30, 13, 2, 2)).astype(dtype)
    grad = _native_grad(features, rois, cotangent, (2, 2), 0.25, 2)
    ref = _reference_grad(features, rois, cotangent, (2, 2), 0.25, 2)
    assert np.abs(np.asarray(grad)).max() > 0.01
    np.testing.assert_allclose(grad, ref, **TOLERANCE[np.dtype(dtype)])
