"""Differentiation: the native backward kernel, and every mode and order.

The forward primitive is linear in the features, its transpose binds the
backward kernel and the backward's transpose binds the forward, so reverse
mode, forward mode and their compositions all run on native kernels. These
tests compare each mode with the jax.numpy reference, in float64.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_psroi

from cases import (
    EXACT_DTYPES,
    KERNELS,
    TOLERANCE,
    hostile_rois,
    native_gpu_schedule,
    random_features,
    random_rois,
    reference_vjp,
    target,
)
from loop_reference import ps_roi_align_grad_loops


def _vjp_features(fn, features, cotangent):
    _, vjp = jax.vjp(fn, features)
    return vjp(cotangent)[0]


@partial(jax.jit, static_argnums=(3, 4, 5))
def _native_grad(features, rois, cotangent, output_size, scale, ratio):
    fn = lambda f: jax_psroi.ps_roi_align(f, rois, output_size, scale, ratio)
    return _vjp_features(fn, features, cotangent)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("output_size,spatial_scale,sampling_ratio", [
    ((3, 3), 1.0, -1), ((2, 3), 0.5, 2), ((3, 2), 1 / 16, 0), ((1, 1), 1.0, 4),
])
@pytest.mark.parametrize("kernels", KERNELS)
def test_backward_matches_reference(kernels, dtype, output_size, spatial_scale,
                                    sampling_ratio):
    rng = np.random.default_rng(11)
    ph, pw = output_size
    features = random_features(rng, 2, 2 * ph * pw, 9, 11, dtype)
    rois = random_rois(rng, 13, 2, 9, 11, spatial_scale, dtype)
    cotangent = rng.normal(size=(13, 2, ph, pw)).astype(dtype)
    if kernels == "cpu":
        grad = _native_grad(features, rois, cotangent, output_size, spatial_scale,
                            sampling_ratio)
    else:  # the CUDA kernels' per-element code, serially on the CPU
        grad = native_gpu_schedule("backward", cotangent, rois, features.shape,
                                   spatial_scale, sampling_ratio)
    ref = reference_vjp(features, rois, cotangent, output_size, spatial_scale,
                        sampling_ratio)
    assert grad.dtype == dtype and grad.shape == features.shape
    assert np.abs(np.asarray(grad)).max() > 0.01
    np.testing.assert_allclose(grad, ref, **TOLERANCE[np.dtype(dtype)])


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
    ref = reference_vjp(features, rois, cotangent, (2, 2), 1.0, sampling_ratio)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, ref, atol=1e-10)


def test_detached_boxes_get_zero_gradient_and_tangent():
    # Boxes are differentiated (tests/test_box_derivatives.py checks the
    # values); torchvision-style training detaches them.
    rng = np.random.default_rng(14)
    features = random_features(rng, 1, 4, 6, 6, np.float64)
    rois = random_rois(rng, 3, 1, 6, 6, 1.0, np.float64)
    loss = lambda f, b: jnp.sum(jax_psroi.ps_roi_align(f, b, 2) ** 2)
    detached = lambda f, b: loss(f, jax.lax.stop_gradient(b))
    grad_f, grad_b = jax.grad(detached, argnums=(0, 1))(features, rois)
    assert np.abs(np.asarray(grad_f)).max() > 0
    np.testing.assert_array_equal(grad_b, np.zeros_like(rois))
    assert np.abs(np.asarray(jax.grad(loss, argnums=1)(features, rois))).max() > 0
    _, tangent = jax.jvp(lambda b: jax_psroi.ps_roi_align(features, jax.lax.stop_gradient(b), 2),
                         (rois,), (np.ones_like(rois),))
    np.testing.assert_array_equal(tangent, np.zeros_like(tangent))


# --- Every mode and order, against the reference (float64) --------------------

def _small_case(seed=15):
    rng = np.random.default_rng(seed)
    features = random_features(rng, 2, 8, 5, 6, np.float64)
    rois = random_rois(rng, 4, 2, 5, 6, 1.0, np.float64)
    return rng, features, rois


def _nonlinear(op, rois, sampling_ratio):
    # A nonlinear function of the output makes second orders non-trivial.
    return lambda f: jnp.sin(op(f, rois, 2, 1.0, sampling_ratio))


def _loss(op, rois, sampling_ratio):
    fn = _nonlinear(op, rois, sampling_ratio)
    return lambda f: jnp.sum(fn(f) ** 2)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_check_grads_forward_and_reverse_to_second_order(sampling_ratio):
    _, features, rois = _small_case()
    fn = _nonlinear(jax_psroi.ps_roi_align, rois, sampling_ratio)
    check_grads(fn, (features,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("jit", [False, True])
def test_jvp_matches_reference(jit):
    rng, features, rois = _small_case(16)
    tangent = rng.normal(size=features.shape)
    native, ref = (_nonlinear(op, rois, -1) for op in (
        jax_psroi.ps_roi_align, jax_psroi.ps_roi_align_reference))
    jvp = lambda fn: lambda f, t: jax.jvp(fn, (f,), (t,))
    run = jax.jit(jvp(native)) if jit else jvp(native)
    out, out_tangent = run(features, tangent)
    ref_out, ref_tangent = jax.jit(jvp(ref))(features, tangent)
    assert np.abs(np.asarray(ref_tangent)).max() > 0.01
    np.testing.assert_allclose(out, ref_out, atol=1e-12)
    np.testing.assert_allclose(out_tangent, ref_tangent, atol=1e-12)


def test_vmapped_jvp_matches_reference():
    # A batch of tangents (and of feature maps) under vmap: one launch each.
    rng, features, rois = _small_case(17)
    batch_features = np.stack([features, 2 * features, -features])
    tangents = rng.normal(size=batch_features.shape)
    native, ref = (_nonlinear(op, rois, 2) for op in (
        jax_psroi.ps_roi_align, jax_psroi.ps_roi_align_reference))
    tangent_of = lambda fn: jax.vmap(lambda f, t: jax.jvp(fn, (f,), (t,))[1])
    out = jax.jit(tangent_of(native))(batch_features, tangents)
    np.testing.assert_allclose(out, jax.jit(tangent_of(ref))(batch_features, tangents),
                               atol=1e-12)


def test_jacfwd_equals_jacrev_and_reference():
    _, features, rois = _small_case(18)
    native, ref = (_nonlinear(op, rois, -1) for op in (
        jax_psroi.ps_roi_align, jax_psroi.ps_roi_align_reference))
    forward = jax.jit(jax.jacfwd(native))(features)
    reverse = jax.jit(jax.jacrev(native))(features)
    expected = jax.jit(jax.jacrev(ref))(features)
    assert forward.shape == (4, 2, 2, 2, *features.shape)
    assert np.abs(expected).max() > 0.01
    np.testing.assert_allclose(forward, expected, atol=1e-12)
    np.testing.assert_allclose(reverse, expected, atol=1e-12)


def test_hessian_matches_reference():
    # jax.hessian is forward over reverse: jacfwd(jacrev(loss)).
    _, features, rois = _small_case(19)
    features = features[:1, :, :4, :4]
    rois = rois.copy()
    rois[:, 0] = 0
    native, ref = (_loss(op, rois, 2) for op in (
        jax_psroi.ps_roi_align, jax_psroi.ps_roi_align_reference))
    hessian = jax.jit(jax.hessian(native))(features)
    expected = jax.jit(jax.hessian(ref))(features)
    assert hessian.shape == features.shape * 2
    assert np.abs(expected).max() > 0.01
    np.testing.assert_allclose(hessian, expected, atol=1e-10)
    flat = np.asarray(hessian).reshape(features.size, features.size)
    np.testing.assert_allclose(flat, flat.T, atol=1e-12)


@pytest.mark.parametrize("order", ["forward_over_reverse", "reverse_over_forward",
                                   "reverse_over_reverse"])
def test_hessian_vector_products_match_reference(order):
    rng, features, rois = _small_case(20)
    vector = rng.normal(size=features.shape)

    def hvp(loss):
        if order == "forward_over_reverse":
            return lambda f, v: jax.jvp(jax.grad(loss), (f,), (v,))[1]
        if order == "reverse_over_forward":
            return lambda f, v: jax.grad(lambda x: jax.jvp(loss, (x,), (v,))[1])(f)
        return lambda f, v: jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(f)

    native = jax.jit(hvp(_loss(jax_psroi.ps_roi_align, rois, -1)))
    ref = jax.jit(hvp(_loss(jax_psroi.ps_roi_align_reference, rois, -1)))
    expected = ref(features, vector)
    assert np.abs(np.asarray(expected)).max() > 0.01
    np.testing.assert_allclose(native(features, vector), expected, atol=1e-10)


def test_vmapped_hessian_vector_products_match_reference():
    rng, features, rois = _small_case(21)
    vectors = rng.normal(size=(3, *features.shape))
    hvp = lambda loss: jax.vmap(
        lambda v: jax.jvp(jax.grad(loss), (features,), (v,))[1])
    native = jax.jit(hvp(_loss(jax_psroi.ps_roi_align, rois, 2)))(vectors)
    expected = jax.jit(hvp(_loss(jax_psroi.ps_roi_align_reference, rois, 2)))(vectors)
    np.testing.assert_allclose(native, expected, atol=1e-10)


def test_gradient_penalty_matches_reference():
    # d/df ||d loss/df||^2, reverse over reverse, against the reference.
    rng = np.random.default_rng(16)
    features = random_features(rng, 1, 8, 6, 6, np.float64)
    rois = random_rois(rng, 5, 1, 6, 6, 1.0, np.float64)

    def penalty(op):
        loss = lambda f: jnp.sum(jnp.tanh(op(f, rois, 2, 1.0, -1)))
        return lambda f: jnp.sum(jax.grad(loss)(f) ** 2)

    native = jax.jit(jax.grad(penalty(jax_psroi.ps_roi_align)))(features)
    ref = jax.jit(jax.grad(penalty(jax_psroi.ps_roi_align_reference)))(features)
    assert np.abs(np.asarray(native)).max() > 0
    np.testing.assert_allclose(native, ref, atol=1e-10)


def test_every_mode_lowers_to_native_kernels_only():
    # Forward mode and second orders hold our custom calls and none of the
    # reference's gathers, scatters or loops.
    features = np.zeros((1, 8, 4, 4), np.float64)
    rois = np.zeros((2, 5), np.float64)
    loss = _loss(jax_psroi.ps_roi_align, rois, 2)
    programs = {
        "jvp": jax.jit(lambda f, t: jax.jvp(loss, (f,), (t,))).lower(features, features),
        "hessian": jax.jit(jax.hessian(loss)).lower(features),
    }
    for mode, lowered in programs.items():
        text = lowered.as_text()
        assert f"custom_call @{target('forward', np.float64)}" in text, mode
        for op in ("gather", "scatter", "while"):
            assert op not in text, (mode, op)
    assert f"custom_call @{target('backward', np.float64)}" in programs["hessian"].as_text()


# --- Properties of the CPU backward ------------------------------------------

def test_backward_is_bitwise_deterministic_on_the_cpu():
    rng = np.random.default_rng(17)
    cpu = jax.devices("cpu")[0]
    # Big enough that the backward is split over the thread pool.
    features, rois, cotangent = jax.device_put((
        random_features(rng, 2, 49 * 4, 20, 24, np.float32),
        random_rois(rng, 300, 2, 20, 24, 1.0, np.float32),
        rng.normal(size=(300, 4, 7, 7)).astype(np.float32)), cpu)
    first = np.asarray(_native_grad(features, rois, cotangent, 7, 1.0, -1))
    for _ in range(3):
        again = np.asarray(_native_grad(features, rois, cotangent, 7, 1.0, -1))
        np.testing.assert_array_equal(again, first)


def test_backward_lowers_to_the_ffi_custom_call():
    features = np.zeros((1, 8, 4, 4), np.float64)
    rois = np.zeros((2, 5), np.float64)
    loss = lambda f: jnp.sum(jax_psroi.ps_roi_align(f, rois, 2) ** 2)
    text = jax.jit(jax.grad(loss)).lower(features).as_text()
    assert f"stablehlo.custom_call @{target('backward', np.float64)}" in text
    assert "scatter" not in text and "while" not in text


def test_platforms_without_kernels_lower_the_xla_path():
    # Forward and backward on a platform with no native kernel (ROCm here)
    # lower to the XLA path: gathers and scatter-adds in loops, no custom
    # call, and none of the dense reference's contractions.
    features = np.zeros((1, 8, 4, 4), np.float32)
    rois = np.zeros((2, 5), np.float32)
    loss = lambda f: jnp.sum(jax_psroi.ps_roi_align(f, rois, 2) ** 2)
    text = jax.jit(jax.value_and_grad(loss)).trace(features).lower(
        lowering_platforms=("rocm",)).as_text()
    assert "custom_call" not in text and "dot_general" not in text
    assert "gather" in text and "scatter" in text and "while" in text


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("channels_out", [5, 13])
def test_backward_with_many_output_channels(dtype, channels_out):
    rng = np.random.default_rng(channels_out)
    features = random_features(rng, 2, channels_out * 4, 10, 37, dtype)
    rois = random_rois(rng, 40, 2, 10, 37, 0.5, dtype, outside=0.2)
    cotangent = rng.normal(size=(40, channels_out, 2, 2)).astype(dtype)
    grad = _native_grad(features, rois, cotangent, (2, 2), 0.5, 2)
    ref = reference_vjp(features, rois, cotangent, (2, 2), 0.5, 2)
    assert np.abs(np.asarray(grad)).max() > 0.01
    np.testing.assert_allclose(grad, ref, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_backward_on_planes_larger_than_cache(dtype):
    # The CPU backward gives each work unit as many output channels' planes
    # as fit in 256 KiB; 128 x 128 planes make it split 13 output channels
    # into chunks (4, 4, 4, 1 in float32).
    rng = np.random.default_rng(5)
    features = random_features(rng, 2, 13 * 4, 128, 128, dtype)
    rois = random_rois(rng, 30, 2, 128, 128, 0.25, dtype, outside=0.2)
    cotangent = rng.normal(size=(30, 13, 2, 2)).astype(dtype)
    grad = _native_grad(features, rois, cotangent, (2, 2), 0.25, 2)
    ref = reference_vjp(features, rois, cotangent, (2, 2), 0.25, 2)
    assert np.abs(np.asarray(grad)).max() > 0.01
    np.testing.assert_allclose(grad, ref, **TOLERANCE[np.dtype(dtype)])
