"""RoI Align's jax.numpy reference against torchvision's own results, and
against the ps_roi_align machinery.

The golden fixtures were written by tests/fixtures/make_golden.py with
torchvision; torchvision is not needed to run these tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi

from cases import TOLERANCE, golden, roi_align_case
from cases import reference as ps_reference

GOLDEN, CASES = golden("roi_align")

reference = jax.jit(jax_psroi.roi_align_reference, static_argnums=(2, 3, 4, 5),
                    static_argnames=("data_format",))


def test_fixture_covers_the_case_matrix():
    params = [roi_align_case(GOLDEN, key) for key in CASES]
    assert {p[5] for p in params} == {False, True}                  # aligned both ways
    assert {p[4] for p in params} >= {-1, 0, 1, 2, 4}               # adaptive and fixed
    assert {p[0].dtype for p in params} == {np.dtype(np.float32), np.dtype(np.float64)}
    assert any(p[0].shape[1] % (p[2][0] * p[2][1]) for p in params)  # any channel count
    # Boxes off the map, and boxes under one map pixel (the clamp of
    # aligned=False; empty adaptive grids of aligned=True).
    assert any((p[1][:, 1] * p[3] < -1).any() for p in params)
    assert any(((p[1][:, 3] - p[1][:, 1]) * p[3] < 1).any() and not p[5] for p in params)


# NHWC is the same pooling behind transposes: one case checks it (the native
# kernels' tests run every case in both layouts).
@pytest.mark.parametrize("key,data_format", [(key, "NCHW") for key in CASES] + [
    ("c00", "NHWC"), ("c11", "NHWC")])
def test_forward_and_gradient_match_torchvision(key, data_format):
    features, rois, output_size, scale, ratio, aligned = roi_align_case(GOLDEN, key)
    expected = GOLDEN[f"{key}_output"]
    expected_grad = GOLDEN[f"{key}_grad_input"]
    cotangent = GOLDEN[f"{key}_cotangent"]
    if data_format == "NHWC":
        features = features.transpose(0, 2, 3, 1)
        expected, cotangent = expected.transpose(0, 2, 3, 1), cotangent.transpose(0, 2, 3, 1)
        expected_grad = expected_grad.transpose(0, 2, 3, 1)

    out, vjp = jax.vjp(lambda x: reference(x, rois, output_size, scale, ratio, aligned,
                                           data_format=data_format), features)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert np.abs(expected).max() > 0.01  # the case exercises something
    np.testing.assert_allclose(out, expected, **TOLERANCE[features.dtype])
    (grad,) = vjp(cotangent)
    assert grad.dtype == expected_grad.dtype and grad.shape == expected_grad.shape
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE[features.dtype])


def test_aligned_is_ps_roi_align_of_a_map_repeated_over_bins():
    # aligned=True is ps_roi_align's geometry; with every input channel
    # repeated once per bin, ps_roi_align reads channel c in every bin.
    rng = np.random.default_rng(5)
    features = rng.normal(size=(2, 3, 9, 11))
    rois = np.array([[0, 1, 1, 7, 8], [1, -3, 2, 20, 5], [0, 2, 2, 2.2, 2.1],
                     [1, 0, 0, 11, 9], [0, 5, 4, 3, 2]])
    for ratio in (2, -1):
        out = reference(features, rois, (2, 3), 1.0, ratio, True)
        ps = ps_reference(np.repeat(features, 6, axis=1), rois, (2, 3), 1.0, ratio)
        np.testing.assert_allclose(out, ps, **TOLERANCE[np.dtype(np.float64)])


def test_hostile_rois_give_zero():
    features = np.ones((2, 2, 6, 6))
    rois = np.array([[2, 0, 0, 4, 4], [-1, 0, 0, 4, 4], [np.nan, 0, 0, 4, 4],
                     [0, np.nan, 0, 4, 4], [1, 0, 0, np.inf, 4], [1, 0, 0, 4, 4]])
    for aligned in (False, True):
        out = np.asarray(reference(features, rois, 2, 1.0, -1, aligned))
        np.testing.assert_array_equal(out[:5], 0)
        np.testing.assert_allclose(out[5], 1)  # a box on a map of ones averages 1


def test_bfloat16_is_the_float32_result_rounded_once():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(1, 4, 10, 12)).astype(np.float32)
    rois = np.array([[0, 0.5, 1.0, 9.0, 7.5], [0, 3.0, 2.0, 11.0, 9.0]], np.float32)
    low = reference(jnp.asarray(features, jnp.bfloat16), rois, 3, 1.0, 2, False)
    exact = reference(jnp.asarray(features, jnp.bfloat16).astype(jnp.float32), rois, 3, 1.0,
                      2, False)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(low, exact.astype(jnp.bfloat16))


def test_aligned_must_be_a_python_bool():
    with pytest.raises(TypeError, match="aligned must be a Python bool"):
        jax_psroi.roi_align_reference(np.ones((1, 1, 4, 4)), np.zeros((1, 5)), 2,
                                      aligned=jnp.bool_(True))


def test_vmap_per_image_equals_one_call_on_the_batch():
    rng = np.random.default_rng(11)
    features = rng.normal(size=(3, 2, 8, 9))
    boxes = rng.uniform(0, 8, size=(3, 4, 4))
    boxes[..., 2:] += boxes[..., :2]
    mapped = jax.jit(jax.vmap(lambda f, b: jax_psroi.roi_align_reference(
        f[None], [b], (2, 2), 1.0, -1, True)))(features, boxes)
    whole = reference(features, list(boxes), (2, 2), 1.0, -1, True)
    np.testing.assert_allclose(mapped.reshape(whole.shape), whole,
                               **TOLERANCE[np.dtype(np.float64)])
