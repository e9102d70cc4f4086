"""Forward and gradient against torchvision's own results (golden fixtures).

The fixtures were written by tests/fixtures/make_golden.py with torchvision;
torchvision is not needed to run these tests.
"""

import jax
import numpy as np
import pytest

import jax_psroi

from cases import TOLERANCE, golden, reference

GOLDEN, CASES = golden("ps_roi_align")


def _case(key):
    ph, pw, ratio = (int(v) for v in GOLDEN[f"{key}_params"])
    return (GOLDEN[f"{key}_input"], GOLDEN[f"{key}_rois"], (ph, pw),
            float(GOLDEN[f"{key}_spatial_scale"]), ratio)


def test_fixture_covers_the_case_matrix():
    params = [_case(key) for key in CASES]
    assert {p[4] for p in params} >= {-1, 0, 1, 2, 4}
    assert {p[3] for p in params} >= {1.0, 0.5, 1 / 16}
    assert {p[0].dtype for p in params} == {np.dtype(np.float32),
                                            np.dtype(np.float64)}
    assert any(p[0].shape[0] > 1 for p in params)           # several images
    assert any(p[2][0] != p[2][1] for p in params)          # non-square bins
    assert any(1 in p[0].shape[2:] for p in params)         # H or W = 1


@pytest.mark.parametrize("key", CASES)
def test_forward_matches_torchvision(key):
    features, rois, output_size, scale, ratio = _case(key)
    out = jax.jit(jax_psroi.ps_roi_align, static_argnums=(2, 3, 4))(
        features, rois, output_size, scale, ratio)
    expected = GOLDEN[f"{key}_output"]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert np.abs(expected).max() > 0.01  # the case exercises something
    np.testing.assert_allclose(out, expected, **TOLERANCE[features.dtype])


@pytest.mark.parametrize("key", CASES)
def test_gradient_matches_torchvision(key):
    features, rois, output_size, scale, ratio = _case(key)
    cotangent = GOLDEN[f"{key}_cotangent"]

    @jax.jit
    def grad_input(f, c):
        _, vjp = jax.vjp(lambda x: jax_psroi.ps_roi_align(
            x, rois, output_size, scale, ratio), f)
        return vjp(c)[0]

    grad = grad_input(features, cotangent)
    expected = GOLDEN[f"{key}_grad_input"]
    assert grad.dtype == expected.dtype and grad.shape == expected.shape
    assert np.abs(expected).max() > 0.01
    np.testing.assert_allclose(grad, expected, **TOLERANCE[features.dtype])


@pytest.mark.parametrize("key", CASES)
def test_reference_matches_torchvision(key):
    # The oracle of the other tests is itself checked against torchvision.
    features, rois, output_size, scale, ratio = _case(key)
    out = reference(features, rois, output_size, scale, ratio)
    np.testing.assert_allclose(out, GOLDEN[f"{key}_output"],
                               **TOLERANCE[features.dtype])
