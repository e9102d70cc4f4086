"""roi_align: the native kernels of ps_roi_align with shared channels, against
torchvision's golden cases and the jax.numpy reference, through every JAX
transformation; and the CUDA schedule's handling of shared channels (every
bin of a backward tile summed in turn), run on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_psroi
from jax_psroi import _extension

from cases import (
    LAYOUTS,
    TOLERANCE,
    check_rounded_once,
    check_transformations,
    crowded_rois,
    golden,
    hostile_rois,
    native_gpu_schedule,
    pooled_as,
    random_rois,
    roi_align_case,
)

GOLDEN, CASES = golden("roi_align")

native = jax.jit(jax_psroi.roi_align, static_argnums=(2, 3, 4, 5),
                 static_argnames=("data_format",))
reference = jax.jit(jax_psroi.roi_align_reference, static_argnums=(2, 3, 4, 5),
                    static_argnames=("data_format",))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("key", CASES)
def test_forward_and_gradient_match_torchvision(key, data_format):
    features, rois, output_size, scale, ratio, aligned = roi_align_case(GOLDEN, key)
    x = pooled_as(features, data_format)
    out, vjp = jax.vjp(lambda f: native(f, rois, output_size, scale, ratio, aligned,
                                        data_format=data_format), x)
    expected = pooled_as(GOLDEN[f"{key}_output"], data_format)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, **TOLERANCE[features.dtype])
    (grad,) = vjp(pooled_as(GOLDEN[f"{key}_cotangent"], data_format))
    np.testing.assert_allclose(grad, pooled_as(GOLDEN[f"{key}_grad_input"], data_format),
                               **TOLERANCE[features.dtype])


@pytest.mark.parametrize("dtype,scale,ratio", [(np.float32, 1.0, 2), (np.float64, 1 / 8, 0)])
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
def test_random_and_hostile_rois_match_the_reference(dtype, data_format, aligned, scale,
                                                     ratio):
    rng = np.random.default_rng(7)
    features = pooled_as(rng.normal(size=(2, 5, 9, 12)).astype(dtype), data_format)
    rois = np.concatenate([random_rois(rng, 30, 2, 9, 12, scale, dtype),
                           hostile_rois(2, 9, 12, dtype)])
    cotangent = pooled_as(rng.normal(size=(len(rois), 5, 2, 3)).astype(dtype), data_format)
    args = ((2, 3), scale, ratio, aligned)
    out, vjp = jax.vjp(lambda f: native(f, rois, *args, data_format=data_format), features)
    ref, ref_vjp = jax.vjp(lambda f: reference(f, rois, *args, data_format=data_format),
                           features)
    np.testing.assert_allclose(out, ref, **TOLERANCE[np.dtype(dtype)])
    np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0],
                               **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_16_bit_is_the_float32_result_rounded_once(dtype, data_format):
    rng = np.random.default_rng(8)
    features = jnp.asarray(pooled_as(rng.normal(size=(1, 6, 10, 11)), data_format), dtype)
    rois = random_rois(rng, 20, 1, 10, 11, 1.0, np.float32)
    cotangent = jnp.asarray(pooled_as(rng.normal(size=(20, 6, 3, 3)), data_format), dtype)
    check_rounded_once(lambda f: native(f, rois, 3, 1.0, 2, False, data_format=data_format),
                       features, cotangent)


def test_channels_need_not_be_a_multiple_of_the_bins():
    features = np.ones((1, 5, 6, 6), np.float32)
    out = native(features, np.array([[0, 0, 0, 5, 5]], np.float32), 7, 1.0, 2, False)
    assert out.shape == (1, 5, 7, 7)
    np.testing.assert_allclose(out, 1)


def test_transformations_run_on_the_native_kernels():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(3, 4, 8, 9)).astype(np.float32)
    boxes = rng.uniform(0, 7, size=(3, 5, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2]
    check_transformations(lambda f, b: jax_psroi.roi_align(f, b, 2, 1.0, 2, True), features,
                          boxes, "roi_align")


def test_aligned_must_be_a_python_bool():
    with pytest.raises(TypeError, match="aligned must be a Python bool"):
        jax_psroi.roi_align(np.ones((1, 1, 4, 4), np.float32), np.zeros((1, 5), np.float32),
                            2, aligned=jnp.bool_(True))


@pytest.mark.skipif(not _extension.KERNELS["cuda"], reason="built without CUDA")
def test_export_for_cuda_calls_the_roi_align_rows():
    features, rois = np.ones((2, 3, 8, 8), np.float32), np.zeros((4, 5), np.float32)
    loss = lambda f: jnp.sum(jax_psroi.roi_align(f, rois, 2, 0.5, 2) ** 2)
    exported = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"],
                             disabled_checks=jax_psroi.export_safety_checks())(features)
    text = exported.mlir_module()
    assert "jax_psroi_roi_align_forward_nchw_f32" in text
    assert "jax_psroi_roi_align_backward_nchw_f32" in text
    assert "aligned = 0" in text


# --- The CUDA schedule with shared channels, on the CPU --------------------------

@pytest.mark.gpu_schedule
@pytest.mark.parametrize("dtype,aligned", [(np.float32, False), (np.float64, True)])
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_gpu_schedule_crowded_tiles_sum_every_bin(dtype, data_format, aligned):
    # 300 RoIs crowd one backward tile: its list overflows (passes) in every
    # one of the 6 bins, all of which feed the same channels.
    rng = np.random.default_rng(10)
    features = pooled_as(rng.normal(size=(2, 3, 9, 70)).astype(dtype), data_format)
    crowd = crowded_rois(rng, 300, 1, (16.0, 1.5), 1.5, 1.0)
    spread = random_rois(rng, 60, 2, 9, 70, 1.0, np.float64)
    rois = np.concatenate([crowd, spread])[rng.permutation(360)].astype(dtype)
    args = ((2, 3), 1.0, 2, aligned)
    expected = np.asarray(reference(features, rois, *args, data_format=data_format))
    out = native_gpu_schedule("forward", features, rois, expected.shape, 1.0, 2,
                              data_format=data_format, aligned=aligned)
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])

    cotangent = rng.normal(size=expected.shape).astype(dtype)
    _, vjp = jax.vjp(lambda f: reference(f, rois, *args, data_format=data_format), features)
    grad = native_gpu_schedule("backward", cotangent, rois, features.shape, 1.0, 2,
                               data_format=data_format, aligned=aligned)
    np.testing.assert_allclose(grad, vjp(cotangent)[0], **TOLERANCE[np.dtype(dtype)])


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_gpu_schedule_16_bit_gradient_is_rounded_once(data_format):
    rng = np.random.default_rng(11)
    features = pooled_as(rng.normal(size=(2, 3, 9, 70)), data_format).astype(np.float32)
    rois = np.concatenate([crowded_rois(rng, 200, 0, (20.0, 2.0), 1.5, 1.0),
                           random_rois(rng, 40, 2, 9, 70, 1.0, np.float64)]).astype(np.float32)
    cotangent = jnp.asarray(rng.normal(size=pooled_as(np.zeros((240, 3, 2, 2)),
                                                      data_format).shape), jnp.bfloat16)
    grad = native_gpu_schedule("backward", cotangent, rois, features.shape, 1.0, 2,
                               data_format=data_format, aligned=False)
    wide = native_gpu_schedule("backward", cotangent.astype(jnp.float32), rois,
                               features.shape, 1.0, 2, data_format=data_format,
                               aligned=False)
    np.testing.assert_array_equal(grad, wide.astype(jnp.bfloat16))
