"""RoI Pool's jax.numpy reference against torchvision's own
results, and the arg-max rules it shares with torchvision.

The golden fixtures were written by tests/fixtures/make_golden.py with
torchvision; torchvision is not needed to run these tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi

from cases import TOLERANCE, golden, pooled_as, roi_pool_case

GOLDEN, CASES = golden("roi_pool")
LOWEST = -np.finfo(np.float32).max  # torchvision's -FLT_MAX

reference = jax.jit(jax_psroi.roi_pool_reference, static_argnums=(2, 3),
                    static_argnames=("data_format",))


def test_fixture_covers_the_case_matrix():
    params = [roi_pool_case(GOLDEN, key) for key in CASES]
    assert {p[0].dtype for p in params} == {np.dtype(np.float32), np.dtype(np.float64)}
    assert {p[3] for p in params} >= {1.0, 0.5, 1 / 16}
    assert any(1 in p[0].shape[2:] for p in params)
    assert any((p[1][:, 1] * p[3] < -1).any() for p in params)  # boxes off the map
    # Some bins' windows are empty (0) in the fixtures.
    assert any((GOLDEN[f"{key}_output"] == 0).any() for key in CASES)


@pytest.mark.parametrize("key,data_format", [(key, "NCHW") for key in CASES] + [
    ("c00", "NHWC"), ("c08", "NHWC")])
def test_forward_and_gradient_match_torchvision(key, data_format):
    features, rois, output_size, scale = roi_pool_case(GOLDEN, key)
    expected = pooled_as(GOLDEN[f"{key}_output"], data_format)
    cotangent = pooled_as(GOLDEN[f"{key}_cotangent"], data_format)
    expected_grad = pooled_as(GOLDEN[f"{key}_grad_input"], data_format)
    x = pooled_as(features, data_format)
    out, vjp = jax.vjp(lambda f: reference(f, rois, output_size, scale,
                                           data_format=data_format), x)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert np.abs(expected).max() > 0.01
    # A maximum is an element: exact.
    np.testing.assert_array_equal(out, expected)
    (grad,) = vjp(cotangent)
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE[features.dtype])


def test_ties_send_the_gradient_to_the_first_maximum_in_row_major_order():
    features = np.zeros((1, 1, 4, 4))
    features[0, 0, 1, 3] = features[0, 0, 2, 0] = features[0, 0, 2, 2] = 5.0
    rois = np.array([[0, 0, 0, 3, 3]])
    out, vjp = jax.vjp(lambda f: reference(f, rois, 1, 1.0), features)
    np.testing.assert_array_equal(out, [[[[5.0]]]])
    (grad,) = vjp(np.ones((1, 1, 1, 1)))
    expected = np.zeros_like(features)
    expected[0, 0, 1, 3] = 1.0
    np.testing.assert_array_equal(grad, expected)


def test_windows_without_a_finite_maximum_and_empty_windows():
    # NaNs are never taken; a window of -inf and NaN has no maximum above
    # -FLT_MAX and gives -FLT_MAX (no gradient); an empty window gives 0.
    features = np.full((1, 1, 3, 3), -np.inf)
    features[0, 0, 0, 0] = np.nan
    features[0, 0, 2, 2] = 1.0
    rois = np.array([[0, 0, 0, 1, 1],      # NaN and -inf only
                     [0, 0, 0, 2, 2],      # the 1.0 past the NaN
                     [0, 5, 5, 9, 9]])     # off the map: empty windows
    out, vjp = jax.vjp(lambda f: reference(f, rois, 1, 1.0), features)
    np.testing.assert_array_equal(np.asarray(out).ravel(), [LOWEST, 1.0, 0.0])
    (grad,) = vjp(np.ones((3, 1, 1, 1)))
    expected = np.zeros_like(features)
    expected[0, 0, 2, 2] = 1.0
    np.testing.assert_array_equal(grad, expected)


def test_hostile_rois_give_zero():
    features = np.ones((2, 2, 6, 6))
    rois = np.array([[2, 0, 0, 4, 4], [-1, 0, 0, 4, 4], [np.nan, 0, 0, 4, 4],
                     [0, np.nan, 0, 4, 4], [1, 0, 0, np.inf, 4], [1, 0, 0, 4, 4]])
    out = np.asarray(reference(features, rois, 2, 1.0))
    np.testing.assert_array_equal(out[:5], 0)
    np.testing.assert_array_equal(out[5], 1)


def test_forward_mode_and_second_order_are_the_recorded_gather():
    # Piecewise linear through the recorded arg-max: forward mode agrees with
    # reverse mode, and the Hessian of 0.5 * |pool(x)|^2 is J^T J.
    rng = np.random.default_rng(4)
    features = rng.normal(size=(1, 2, 7, 8))
    rois = np.array([[0, 0.5, 1.0, 6.0, 5.5], [0, 2.0, 0.0, 7.0, 6.0]])
    tangent = rng.normal(size=features.shape)
    fn = lambda f: reference(f, rois, (2, 2), 1.0)
    out, jvp_out = jax.jvp(fn, (features,), (tangent,))
    _, vjp = jax.vjp(fn, features)
    for index in np.ndindex(out.shape):
        basis = np.zeros(out.shape)
        basis[index] = 1.0
        (row,) = vjp(basis)
        np.testing.assert_allclose(jvp_out[index], np.vdot(np.asarray(row), tangent))
    loss = lambda f: 0.5 * jnp.sum(fn(f) ** 2)
    _, hvp = jax.jvp(jax.grad(loss), (features,), (tangent,))
    np.testing.assert_allclose(hvp, vjp(jvp_out)[0], rtol=1e-12, atol=1e-12)


def test_bfloat16_pools_the_same_elements():
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(1, 3, 10, 12)), jnp.bfloat16)
    rois = np.array([[0, 0.5, 1.0, 9.0, 7.5], [0, 3.0, 2.0, 11.0, 9.0]], np.float32)
    low = reference(features, rois, 2, 1.0)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(low, reference(features.astype(jnp.float32), rois, 2,
                                                 1.0).astype(jnp.bfloat16))
