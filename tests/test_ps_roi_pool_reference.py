"""Position-Sensitive RoI Pool's jax.numpy reference against
torchvision's own results.

The golden fixtures were written by tests/fixtures/make_golden.py with
torchvision; torchvision is not needed to run these tests. torchvision's
backward clips windows to [0, size] where its forward clips them to
[0, size - 1]: its gradient is the adjoint of its forward only when no
window reaches the last row or column (the fixtures mark those cases
`consistent`); ours is the adjoint of the forward always.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi

from cases import TOLERANCE, features_as, golden, pooled_as, ps_roi_pool_case

GOLDEN, CASES = golden("ps_roi_pool")

reference = jax.jit(jax_psroi.ps_roi_pool_reference, static_argnums=(2, 3),
                    static_argnames=("data_format", "channel_order"))


def test_fixture_covers_the_case_matrix():
    params = [ps_roi_pool_case(GOLDEN, key) for key in CASES]
    assert {p[0].dtype for p in params} == {np.dtype(np.float32), np.dtype(np.float64)}
    assert {p[3] for p in params} >= {1.0, 0.5, 1 / 16}
    assert {p[4] for p in params} == {False, True}
    assert any(p[2][0] != p[2][1] for p in params)


# Other layouts and orders are the same pooling behind permutations: two
# cases check them.
@pytest.mark.parametrize("key,layout", [(key, ("NCHW", "torchvision")) for key in CASES] + [
    ("c02", ("NHWC", "torchvision")), ("c05", ("NHWC", "bin_major"))])
def test_forward_and_gradient_match_torchvision(key, layout):
    features, rois, output_size, scale, consistent = ps_roi_pool_case(GOLDEN, key)
    data_format, order = layout
    x = features_as(features, data_format, order, output_size)
    cotangent = pooled_as(GOLDEN[f"{key}_cotangent"], data_format)
    out, vjp = jax.vjp(lambda f: reference(f, rois, output_size, scale,
                                           data_format=data_format, channel_order=order), x)
    expected = pooled_as(GOLDEN[f"{key}_output"], data_format)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert np.abs(expected).max() > 0.01  # the case exercises something
    np.testing.assert_allclose(out, expected, **TOLERANCE[features.dtype])
    if consistent:
        (grad,) = vjp(cotangent)
        expected = features_as(GOLDEN[f"{key}_grad_input"], data_format, order, output_size)
        np.testing.assert_allclose(grad, expected, **TOLERANCE[features.dtype])


@pytest.mark.parametrize("key", CASES)
def test_gradient_is_the_adjoint_of_the_forward(key):
    # <forward(x), c> = <x, gradient(c)> for ours; torchvision's gradient
    # misses it exactly where its windows reach the last row or column.
    features, rois, output_size, scale, consistent = ps_roi_pool_case(GOLDEN, key)
    features, rois = features.astype(np.float64), rois.astype(np.float64)
    cotangent = GOLDEN[f"{key}_cotangent"].astype(np.float64)
    out, vjp = jax.vjp(lambda f: reference(f, rois, output_size, scale), features)
    (grad,) = vjp(cotangent)
    lhs = np.vdot(np.asarray(out), cotangent)
    np.testing.assert_allclose(np.vdot(features, np.asarray(grad)), lhs, rtol=1e-10)
    theirs = np.vdot(features, GOLDEN[f"{key}_grad_input"].astype(np.float64))
    assert np.isclose(theirs, lhs, rtol=1e-4) == consistent


def test_hostile_rois_give_zero():
    features = np.ones((2, 4, 6, 6))
    rois = np.array([[2, 0, 0, 4, 4], [-1, 0, 0, 4, 4], [np.nan, 0, 0, 4, 4],
                     [0, np.nan, 0, 4, 4], [1, 0, 0, np.inf, 4], [1, 0, 0, 4, 4]])
    out = np.asarray(reference(features, rois, 2, 1.0))
    np.testing.assert_array_equal(out[:5], 0)
    np.testing.assert_allclose(out[5], 1)  # a box on a map of ones averages 1


def test_halves_round_away_from_zero():
    # C's round(): x1 = 2.5 rounds to 3 (jnp.round would give 2 and a wider box).
    features = np.arange(1 * 1 * 6 * 6, dtype=np.float64).reshape(1, 1, 6, 6)
    out = reference(features, np.array([[0, 2.5, 0.0, 4.0, 2.0]]), 1, 1.0)
    np.testing.assert_allclose(out.ravel(), features[0, 0, 0:2, 3:4].mean())


def test_bfloat16_is_the_float32_result_rounded_once():
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(1, 8, 10, 12)), jnp.bfloat16)
    rois = np.array([[0, 0.5, 1.0, 9.0, 7.5], [0, 3.0, 2.0, 11.0, 9.0]], np.float32)
    low = reference(features, rois, 2, 1.0)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(low, reference(features.astype(jnp.float32), rois, 2,
                                                 1.0).astype(jnp.bfloat16))
