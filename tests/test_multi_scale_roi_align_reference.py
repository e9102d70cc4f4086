"""Multi-scale RoI Align's jax.numpy reference against
torchvision's MultiScaleRoIAlign (golden fixtures written by
tests/fixtures/make_golden.py; torchvision is not needed here)."""

import jax
import numpy as np
import pytest

import jax_psroi

from cases import TOLERANCE, golden, multi_scale_case

GOLDEN, CASES = golden("multi_scale_roi_align")


def _levels_used(key):
    """The pyramid level each RoI pools from, by eq. 1 (numpy, float64)."""
    levels, boxes, _, _, (height, _), options = multi_scale_case(GOLDEN, key)
    b = np.concatenate(boxes).astype(np.float64)
    k = np.floor(options["canonical_level"] + np.log2(
        np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / options["canonical_scale"]) + 1e-6)
    scales = [2.0 ** round(np.log2(x.shape[2] / height)) for x in levels]
    return np.clip(k, -np.log2(scales[0]), -np.log2(scales[-1])) + np.log2(scales[0])


def test_fixture_pools_from_several_levels():
    used = [set(_levels_used(key)) for key in CASES]
    assert any(len(u) >= 3 for u in used)
    # torchvision's one-level path
    assert any(len(multi_scale_case(GOLDEN, key)[0]) == 1 for key in CASES)


@pytest.mark.parametrize("key,data_format", [(key, "NCHW") for key in CASES] + [
    ("c00", "NHWC")])
def test_forward_and_gradients_match_torchvision(key, data_format):
    levels, boxes, output_size, ratio, image_size, options = multi_scale_case(GOLDEN, key)
    to = (lambda x: x.transpose(0, 2, 3, 1)) if data_format == "NHWC" else (lambda x: x)
    expected = to(GOLDEN[f"{key}_output"])
    cotangent = to(GOLDEN[f"{key}_cotangent"])

    @jax.jit
    def pool(xs):
        return jax_psroi.multi_scale_roi_align_reference(
            xs, boxes, output_size, ratio, image_size, data_format=data_format, **options)

    out, vjp = jax.vjp(pool, [to(x) for x in levels])
    tolerance = TOLERANCE[levels[0].dtype]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert np.abs(expected).max() > 0.01
    np.testing.assert_allclose(out, expected, **tolerance)
    (grads,) = vjp(cotangent)
    for j, grad in enumerate(grads):
        np.testing.assert_allclose(grad, to(GOLDEN[f"{key}_grad_level{j}"]), **tolerance)


def test_each_roi_reads_only_its_level():
    # The gradient of an RoI's output reaches its own level and no other.
    levels, boxes, output_size, ratio, image_size, options = multi_scale_case(GOLDEN, "c00")
    used = _levels_used("c00")
    rois = np.concatenate(boxes)
    gradient = jax.jit(jax.grad(lambda xs, box: jax_psroi.multi_scale_roi_align_reference(
        xs, [box], output_size, ratio, image_size, **options).sum()))
    for roi in (int(np.argmin(used)), int(np.argmax(used))):
        grads = gradient([x[:1] for x in levels], rois[roi:roi + 1])
        touched = [bool(np.any(np.asarray(g) != 0)) for g in grads]
        assert touched == [j == used[roi] for j in range(len(levels))]


def test_arguments_are_checked():
    x = [np.zeros((1, 2, 8, 8))]
    with pytest.raises(ValueError, match="at least one level"):
        jax_psroi.multi_scale_roi_align_reference([], np.zeros((1, 5)), 2, 2, (32, 32))
    with pytest.raises(TypeError, match="image_size must be a pair"):
        jax_psroi.multi_scale_roi_align_reference(x, np.zeros((1, 5)), 2, 2, 32)
    with pytest.raises(ValueError, match="image_size must be positive"):
        jax_psroi.multi_scale_roi_align_reference(x, np.zeros((1, 5)), 2, 2, (0, 32))
