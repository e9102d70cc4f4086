"""ps_roi_pool: the native kernels of ps_roi_align with bins that average
windows of whole pixels, against torchvision's golden cases and the jax.numpy
reference, through every JAX transformation; and the CUDA schedule's windows
(spans, tile lists, per-bin divisors), run on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_psroi
from jax_psroi import _extension

from cases import (
    CHANNEL_ORDERS,
    EXACT_DTYPES,
    LAYOUTS,
    TOLERANCE,
    check_rounded_once,
    check_transformations,
    crowded_rois,
    features_as,
    features_from,
    golden,
    hostile_rois,
    native_gpu_schedule,
    pooled_as,
    ps_roi_pool_case,
    random_rois,
)

GOLDEN, CASES = golden("ps_roi_pool")
COMBINATIONS = [(f, o) for f in LAYOUTS for o in CHANNEL_ORDERS]

native = jax.jit(jax_psroi.ps_roi_pool, static_argnums=(2, 3),
                 static_argnames=("data_format", "channel_order"))
reference = jax.jit(jax_psroi.ps_roi_pool_reference, static_argnums=(2, 3),
                    static_argnames=("data_format", "channel_order"))


@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
@pytest.mark.parametrize("key", CASES)
def test_forward_and_gradient_match_torchvision(key, data_format, channel_order):
    features, rois, output_size, scale, consistent = ps_roi_pool_case(GOLDEN, key)
    layout = dict(data_format=data_format, channel_order=channel_order)
    x = features_as(features, data_format, channel_order, output_size)
    out, vjp = jax.vjp(lambda f: native(f, rois, output_size, scale, **layout), x)
    expected = pooled_as(GOLDEN[f"{key}_output"], data_format)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, **TOLERANCE[features.dtype])
    (grad,) = vjp(pooled_as(GOLDEN[f"{key}_cotangent"], data_format))
    grad = features_from(np.asarray(grad), data_format, channel_order, output_size)
    if consistent:  # torchvision's gradient is its forward's adjoint here
        np.testing.assert_allclose(grad, GOLDEN[f"{key}_grad_input"],
                                   **TOLERANCE[features.dtype])
    # Everywhere, ours is the adjoint: <forward(x), c> = <x, gradient(c)>.
    cotangent = GOLDEN[f"{key}_cotangent"].astype(np.float64)
    lhs = np.vdot(np.asarray(GOLDEN[f"{key}_output"], np.float64), cotangent)
    rtol = 1e-10 if features.dtype == np.float64 else 1e-4
    np.testing.assert_allclose(np.vdot(features.astype(np.float64), grad), lhs, rtol=rtol)


def test_fixture_has_both_kinds_of_gradient_case():
    assert {ps_roi_pool_case(GOLDEN, key)[4] for key in CASES} == {False, True}


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1.0), (np.float64, 1 / 8)])
@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
def test_random_and_hostile_rois_match_the_reference(dtype, data_format, channel_order,
                                                     scale):
    rng = np.random.default_rng(12)
    layout = dict(data_format=data_format, channel_order=channel_order)
    features = features_as(rng.normal(size=(2, 5 * 6, 9, 12)).astype(dtype), data_format,
                           channel_order, (2, 3))
    rois = np.concatenate([random_rois(rng, 30, 2, 9, 12, scale, dtype),
                           hostile_rois(2, 9, 12, dtype)])
    cotangent = pooled_as(rng.normal(size=(len(rois), 5, 2, 3)).astype(dtype), data_format)
    out, vjp = jax.vjp(lambda f: native(f, rois, (2, 3), scale, **layout), features)
    ref, ref_vjp = jax.vjp(lambda f: reference(f, rois, (2, 3), scale, **layout), features)
    assert np.abs(np.asarray(ref)).max() > 0.1  # the boxes read something
    np.testing.assert_allclose(out, ref, **TOLERANCE[np.dtype(dtype)])
    np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0],
                               **TOLERANCE[np.dtype(dtype)])


def test_windows_are_torchvisions():
    # One channel per bin, 1 x 1 bins of a 6 x 6 map of distinct values:
    # x1 = 2.5 rounds to 3 (C's round); the window of a box up to x2 = 5.6
    # (rounded 6) stops at column 4 (clipped to W - 1 = 5, exclusive); an
    # inverted box is clamped to one pixel (the window [2, 3)).
    features = np.arange(36, dtype=np.float64).reshape(1, 1, 6, 6)
    rois = np.array([[0, 2.5, 0.0, 4.0, 2.0], [0, 1.0, 1.0, 5.6, 5.6],
                     [0, 2.0, 2.0, 1.0, 1.0]])
    out = np.asarray(native(features, rois, 1, 1.0)).ravel()
    plane = features[0, 0]
    np.testing.assert_array_equal(out, [plane[0:2, 3:4].mean(), plane[1:5, 1:5].mean(),
                                        plane[2, 2]])


def test_the_last_row_and_column_are_never_read():
    # torchvision's forward clips windows to [0, size - 1]: a box over the
    # whole map averages all but the last row and column.
    features = np.zeros((1, 4, 5, 7), np.float32)
    features[:, :, :4, :6] = 1.0
    features[:, :, 4, :] = features[:, :, :, 6] = 1e6
    out = native(features, np.array([[0, 0, 0, 7, 5]], np.float32), 2, 1.0)
    np.testing.assert_array_equal(out, np.ones((1, 1, 2, 2), np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_16_bit_is_the_float32_result_rounded_once(dtype, data_format):
    rng = np.random.default_rng(13)
    features = jnp.asarray(pooled_as(rng.normal(size=(1, 18, 10, 11)), data_format), dtype)
    rois = random_rois(rng, 20, 1, 10, 11, 1.0, np.float32)
    cotangent = jnp.asarray(pooled_as(rng.normal(size=(20, 2, 3, 3)), data_format), dtype)
    check_rounded_once(lambda f: native(f, rois, 3, 1.0, data_format=data_format), features,
                       cotangent)


def test_transformations_run_on_the_native_kernels():
    rng = np.random.default_rng(14)
    features = rng.normal(size=(3, 8, 8, 9)).astype(np.float32)
    boxes = rng.uniform(0, 7, size=(3, 5, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2]
    check_transformations(lambda f, b: jax_psroi.ps_roi_pool(f, b, 2, 1.0), features, boxes,
                          "ps_roi_pool")


def test_channels_must_be_a_multiple_of_the_bins():
    with pytest.raises(ValueError, match="multiple"):
        jax_psroi.ps_roi_pool(np.ones((1, 5, 6, 6), np.float32),
                              np.zeros((1, 5), np.float32), 2)


@pytest.mark.skipif(not _extension.KERNELS["cuda"], reason="built without CUDA")
def test_export_for_cuda_calls_the_ps_roi_pool_rows():
    features, rois = np.ones((2, 8, 8, 8), np.float32), np.zeros((4, 5), np.float32)
    loss = lambda f: jnp.sum(jax_psroi.ps_roi_pool(f, rois, 2, 0.5) ** 2)
    exported = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"],
                             disabled_checks=jax_psroi.export_safety_checks())(features)
    text = exported.mlir_module()
    assert "jax_psroi_ps_roi_pool_forward_nchw_f32" in text
    assert "jax_psroi_ps_roi_pool_backward_nchw_f32" in text


# --- The CUDA schedule with windows of whole pixels, on the CPU ------------------

@pytest.mark.gpu_schedule
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
def test_gpu_schedule_crowded_tiles_match_the_reference(dtype, data_format, channel_order):
    # 300 RoIs crowd one backward tile: its list overflows (passes) in every bin.
    rng = np.random.default_rng(15)
    layout = dict(data_format=data_format, channel_order=channel_order)
    features = features_as(rng.normal(size=(2, 3 * 6, 9, 70)).astype(dtype), data_format,
                           channel_order, (2, 3))
    crowd = crowded_rois(rng, 300, 1, (16.0, 1.5), 1.5, 1.0)
    spread = random_rois(rng, 60, 2, 9, 70, 1.0, np.float64)
    rois = np.concatenate([crowd, spread, hostile_rois(2, 9, 70, np.float64)])
    rois = rois[rng.permutation(len(rois))].astype(dtype)
    expected = np.asarray(reference(features, rois, (2, 3), 1.0, **layout))
    out = native_gpu_schedule("forward", features, rois, expected.shape, 1.0, 0,
                              operation="ps_roi_pool", **layout)
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])

    cotangent = rng.normal(size=expected.shape).astype(dtype)
    _, vjp = jax.vjp(lambda f: reference(f, rois, (2, 3), 1.0, **layout), features)
    grad = native_gpu_schedule("backward", cotangent, rois, features.shape, 1.0, 0,
                               operation="ps_roi_pool", **layout)
    np.testing.assert_allclose(grad, vjp(cotangent)[0], **TOLERANCE[np.dtype(dtype)])
