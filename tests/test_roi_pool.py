"""roi_pool: native window maxima with their recorded pixels, against
torchvision's golden cases and the jax.numpy reference, through every JAX
transformation; and the CUDA kernels' schedule (the per-element forward and
the deterministic tile scatter of the backward), run on the CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_psroi
from jax_psroi import _extension, _roi_pool, _xla_path, reference_pools

from cases import (
    LAYOUTS,
    LOW_PRECISION_DTYPES,
    ONE_GROUP,
    TOLERANCE,
    check_rounded_once,
    crowded_rois,
    golden,
    gpu_schedule_target,
    hostile_rois,
    pooled_as,
    random_rois,
    roi_pool_case,
)

GOLDEN, CASES = golden("roi_pool")
LOWEST = -np.finfo(np.float32).max  # torchvision's -FLT_MAX

native = jax.jit(jax_psroi.roi_pool, static_argnums=(2, 3), static_argnames=("data_format",))
reference = jax.jit(jax_psroi.roi_pool_reference, static_argnums=(2, 3),
                    static_argnames=("data_format",))


def _recorded(features, rois, output_size, scale, data_format="NCHW"):
    """The native forward's (pooled, pixels)."""
    return jax.jit(lambda f, r: _roi_pool.roi_pool_p.bind(
        f, r, pooled_size=output_size, spatial_scale=scale, data_format=data_format,
        image_groups=(max(len(rois), 1), features.shape[0]), implementation="native"))(
            features, jnp.asarray(rois, features.dtype if features.dtype.itemsize >= 4
                                  else np.float32))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("key", CASES)
def test_forward_and_gradient_match_torchvision(key, data_format):
    features, rois, output_size, scale = roi_pool_case(GOLDEN, key)
    x = pooled_as(features, data_format)
    out, vjp = jax.vjp(lambda f: native(f, rois, output_size, scale,
                                        data_format=data_format), x)
    expected = pooled_as(GOLDEN[f"{key}_output"], data_format)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert np.abs(expected).max() > 0.01
    np.testing.assert_array_equal(out, expected)  # a maximum is an element
    (grad,) = vjp(pooled_as(GOLDEN[f"{key}_cotangent"], data_format))
    np.testing.assert_allclose(grad, pooled_as(GOLDEN[f"{key}_grad_input"], data_format),
                               **TOLERANCE[features.dtype])


@functools.partial(jax.jit, static_argnums=(3, 4), static_argnames=("data_format",))
def _reference_pool_and_vjp(features, rois, cotangent, output_size, scale, data_format):
    """The reference's pooled tensor, its pixels and its gradient for
    `cotangent`, as one program (eagerly, pool_roi_pool compiles each of
    its operations, and a vjp its forward and its backward, on their own)."""
    pooled, pixels = reference_pools.pool_roi_pool(features, rois, output_size, scale,
                                                   data_format=data_format)
    _, vjp = jax.vjp(lambda f: jax_psroi.roi_pool_reference(
        f, rois, output_size, scale, data_format=data_format), features)
    return pooled, pixels, vjp(cotangent)[0]


@pytest.mark.parametrize("dtype,scale,data_format",
                         [(np.float32, 1.0, "NCHW"), (np.float64, 1 / 8, "NHWC"),
                          (np.float32, 1 / 8, "NHWC"), (np.float64, 1.0, "NCHW")])
def test_random_and_hostile_rois_match_the_reference(dtype, scale, data_format):
    rng = np.random.default_rng(21)
    # 21 channels: the NCHW forward's blocks of 16 planes and the rest
    features = pooled_as(rng.normal(size=(2, 21, 9, 12)).astype(dtype), data_format)
    rois = np.concatenate([random_rois(rng, 40, 2, 9, 12, scale, dtype),
                           hostile_rois(2, 9, 12, dtype)])
    layout = dict(data_format=data_format)
    pooled, pixels = _recorded(features, rois, (3, 2), scale, data_format)
    cotangent = rng.normal(size=pooled.shape).astype(dtype)
    ref, ref_pixels, ref_grad = _reference_pool_and_vjp(features, rois, cotangent, (3, 2),
                                                         scale, data_format=data_format)
    np.testing.assert_array_equal(pooled, ref)
    np.testing.assert_array_equal(pixels, ref_pixels)
    assert (np.asarray(pixels) >= 0).sum() > 100 and (np.asarray(pixels) == -1).any()
    _, vjp = jax.vjp(lambda f: native(f, rois, (3, 2), scale, **layout), features)
    np.testing.assert_allclose(vjp(cotangent)[0], ref_grad, **TOLERANCE[np.dtype(dtype)])


def test_ties_nan_and_windows_without_a_maximum():
    # The first maximum in row-major order takes the gradient; NaN is never
    # taken; a window of -inf and NaN gives -FLT_MAX (no gradient); an empty
    # window (off the map) gives 0; the last row and column are reachable.
    features = np.full((1, 1, 4, 4), -np.inf)
    features[0, 0, 0, 0] = np.nan
    features[0, 0, 1, 3] = features[0, 0, 2, 0] = features[0, 0, 2, 2] = 5.0
    features[0, 0, 3, 3] = 7.0
    rois = np.array([[0, 0, 0, 1, 1],      # NaN and -inf only
                     [0, 0, 0, 3, 2],      # ties at (y, x) = (1, 3), (2, 0), (2, 2)
                     [0, 3, 3, 3, 3],      # the last pixel
                     [0, 5, 5, 9, 9]])     # off the map: empty
    for data_format in LAYOUTS:
        x = pooled_as(features, data_format)
        out, vjp = jax.vjp(lambda f, layout=data_format: native(f, rois, 1, 1.0,
                                                                data_format=layout), x)
        np.testing.assert_array_equal(np.asarray(out).ravel(), [LOWEST, 5.0, 7.0, 0.0])
        (grad,) = vjp(pooled_as(np.arange(1.0, 5.0).reshape(4, 1, 1, 1), data_format))
        expected = np.zeros_like(features)
        expected[0, 0, 1, 3] = 2.0
        expected[0, 0, 3, 3] = 3.0
        np.testing.assert_array_equal(grad, pooled_as(expected, data_format))


@pytest.mark.parametrize("implementation", [
    "native", "xla", "reference", pytest.param("gpu_schedule", marks=pytest.mark.gpu_schedule)])
def test_a_box_wider_than_2_24_pixels_spans_end_minus_start_plus_1(implementation,
                                                                  monkeypatch):
    # x from -2^24 to 1: torchvision's int width is 2^24 + 2, so with 2 bins
    # of 2^23 + 1 pixels the second ends at column 2 and holds the maxima of
    # columns 0 and 1. float32's (1 - -2^24) + 1 rounds twice to 2^24: bins
    # of 2^23, the second ending at column 0, empty, pooled as 0.
    features = np.arange(1.0, 13.0, dtype=np.float32).reshape(1, 2, 2, 3)
    rois = np.array([[0, -2.0**24, 0, 1, 1]], np.float32)
    expected = np.array([[[[0.0, 5.0]], [[0.0, 11.0]]]], np.float32)
    if implementation == "gpu_schedule":
        pooled, pixels = _scheduled("forward", features, rois, None, expected.shape, 1.0,
                                    "NCHW")
        np.testing.assert_array_equal(pixels.ravel(), [-1, 4, -1, 4])
    elif implementation == "reference":
        pooled = reference(features, rois, (1, 2), 1.0)
    else:
        monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", implementation)
        pooled, vjp = jax.vjp(lambda f: jax_psroi.roi_pool(f, rois, (1, 2), 1.0), features)
        grad = np.zeros_like(features)
        grad[0, :, 1, 1] = 1.0
        np.testing.assert_array_equal(vjp(np.ones_like(expected))[0], grad)
    np.testing.assert_array_equal(pooled, expected)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_16_bit_is_float32_rounded_once(dtype):
    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.normal(size=(2, 3, 10, 12)), dtype)
    rois = random_rois(rng, 30, 2, 10, 12, 1.0, np.float32)
    cotangent = jnp.asarray(rng.normal(size=(30, 3, 2, 2)), dtype)
    check_rounded_once(lambda f: jax_psroi.roi_pool(f, rois, 2, 1.0), features, cotangent)
    # and the same elements as the reference (a maximum is an element)
    np.testing.assert_array_equal(jax_psroi.roi_pool(features, rois, 2, 1.0),
                                  reference(features, rois, 2, 1.0))


def test_transformations_run_on_the_native_kernels():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(3, 4, 10, 11)).astype(np.float32)
    boxes = np.stack([random_rois(rng, 6, 1, 10, 11, 1.0, np.float32)[:, 1:]
                      for _ in range(3)])
    op = lambda f, b: jax_psroi.roi_pool(f, b, (2, 3), 1.0)
    ref = lambda f, b: jax_psroi.roi_pool_reference(f, b, (2, 3), 1.0)
    # vmap per image: one forward call, equal to the whole call
    per_image = jax.jit(jax.vmap(lambda f, b: op(f[None], [b])))
    np.testing.assert_array_equal(per_image(features, boxes).reshape(18, 4, 2, 3),
                                  op(features, list(boxes)))
    text = per_image.lower(features, boxes).as_text()
    assert text.count("jax_psroi_roi_pool_forward_nchw_f32") == 1
    # vmap over RoI sets on shared features (features not copied), and of the gradient;
    # each transformation under jit, one program (eagerly, each jax.numpy
    # operation of the losses compiles on its own)
    pool = jax.jit(op)
    rois = np.stack([jax_psroi.rois_from_boxes(list(boxes), jnp.float32)] * 2)
    rois[1, :, 1:] += 0.7
    mapped = jax.jit(jax.vmap(lambda r: op(features, r)))(rois)
    np.testing.assert_array_equal(mapped[1], pool(features, rois[1]))
    loss = lambda f, r: jnp.sum(jnp.sin(op(f, r)))
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(features, rois)
    np.testing.assert_allclose(grads[1], jax.jit(jax.grad(loss))(features, rois[1]), rtol=1e-6)

    # forward mode is the tangent at the recorded pixels, as the reference's
    r = rois[0]
    tangent = rng.normal(size=features.shape).astype(np.float32)
    out, jvp_out = jax.jit(lambda f, t: jax.jvp(lambda f: op(f, r), (f,), (t,)))(
        features, tangent)
    ref_out, ref_jvp = jax.jit(lambda f, t: jax.jvp(lambda f: ref(f, r), (f,), (t,)))(
        features, tangent)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(jvp_out, ref_jvp)
    # the Hessian of 0.5 |pool(x)|^2 applied to a tangent is J^T J t
    quadratic = lambda f: 0.5 * jnp.sum(op(f, r) ** 2)
    reverse = jax.jit(jax.grad(quadratic))
    second = jax.jit(lambda f, t: jax.jvp(jax.grad(quadratic), (f,), (t,))[1])
    vjp = jax.jit(lambda f, c: jax.vjp(lambda f: op(f, r), f)[1](c)[0])
    np.testing.assert_allclose(second(features, tangent), vjp(features, jvp_out),
                               rtol=1e-6, atol=1e-6)
    for text in (reverse.lower(features).as_text(), second.lower(features, tangent).as_text()):
        assert "jax_psroi_roi_pool_forward_nchw_f32" in text
        assert "jax_psroi_roi_pool_backward_nchw_f32" in text
        assert "stablehlo.scatter" not in text and "stablehlo.gather" not in text


def test_gradient_is_bitwise_reproducible_and_boxes_get_zero():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(2, 8, 20, 20)).astype(np.float32)
    rois = crowded_rois(rng, 300, 0, (10, 10), 6, 1.0)
    grad = jax.jit(jax.grad(lambda f, r: jnp.sum(jax_psroi.roi_pool(f, r, 3) ** 3),
                            argnums=(0, 1)))
    first, box_grad = grad(features, rois)
    np.testing.assert_array_equal(box_grad, 0)
    for _ in range(3):
        np.testing.assert_array_equal(grad(features, rois)[0], first)


@pytest.mark.skipif(not _extension.KERNELS["cuda"], reason="built without CUDA")
def test_cuda_export_lowers_to_the_native_targets():
    features = jax.ShapeDtypeStruct((2, 4, 16, 16), jnp.float32)
    rois = jax.ShapeDtypeStruct((5, 5), jnp.float32)
    fn = jax.jit(jax.grad(lambda f, r: jnp.sum(jax_psroi.roi_pool(f, r, 7, 0.5) ** 2)))
    text = export.export(fn, platforms=["cuda"], disabled_checks=jax_psroi.export_safety_checks())(
        features, rois).mlir_module()
    assert "jax_psroi_roi_pool_forward_nchw_f32" in text
    assert "jax_psroi_roi_pool_backward_nchw_f32" in text


def test_a_plane_too_large_for_int32_pixels_is_refused_at_trace_time():
    features = jax.ShapeDtypeStruct((1, 1, 65536, 32768), jnp.float32)
    with pytest.raises(ValueError, match="int32 pixels"):
        jax.eval_shape(lambda f: jax_psroi.roi_pool(f, np.zeros((1, 5), np.float32), 2),
                       features)


def _scheduled(direction, operand, rois, pixels, out_shape, scale, data_format):
    """The CUDA kernels' schedule (gpu_schedule.h) serially on the CPU: the
    forward's blocks of one RoI's outputs, or the backward's tile lists and
    passes."""
    dtype = jnp.dtype(operand.dtype)
    name = gpu_schedule_target(("roi_pool", direction, data_format, dtype))
    with jax.default_device(jax.devices("cpu")[0]):
        if direction == "forward":
            call = jax.ffi.ffi_call(name, [jax.ShapeDtypeStruct(out_shape, dtype),
                                           jax.ShapeDtypeStruct(out_shape, np.int32)])
            return [np.asarray(r) for r in call(operand, rois, spatial_scale=scale,
                                                **ONE_GROUP)]
        call = jax.ffi.ffi_call(name, [jax.ShapeDtypeStruct(out_shape, dtype)])
        return np.asarray(call(operand, rois, pixels, spatial_scale=scale, **ONE_GROUP)[0])


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("data_format,dtype,channels", [
    ("NCHW", np.float32, 3), ("NCHW", np.float32, 60), ("NHWC", np.float64, 60),
    ("NHWC", np.float16, 3)])
def test_cuda_schedule_matches_the_cpu_kernels(data_format, dtype, channels):
    # Crowded tiles overflow the backward's RoI lists (passes); boxes reach
    # the last row and column and beyond. 60 channels: an RoI's 540 outputs
    # take two forward blocks, the second partly filled.
    rng = np.random.default_rng(8)
    rois_dtype = np.float32 if np.dtype(dtype).itemsize < 4 else dtype
    features = pooled_as(rng.normal(size=(2, channels, 13, 40)), data_format).astype(dtype)
    rois = np.concatenate([crowded_rois(rng, 400, 1, (6, 20), 5, 1.0),
                           random_rois(rng, 40, 2, 13, 40, 1.0, np.float32),
                           hostile_rois(2, 13, 40, np.float32)]).astype(rois_dtype)
    pooled, pixels = _recorded(jnp.asarray(features), rois, (3, 3), 1.0, data_format)
    scheduled, scheduled_pixels = _scheduled("forward", features, rois, None, pooled.shape,
                                             1.0, data_format)
    np.testing.assert_array_equal(scheduled, pooled)
    np.testing.assert_array_equal(scheduled_pixels, pixels)
    cotangent = rng.normal(size=pooled.shape).astype(dtype)
    grad = jax.vjp(lambda f: jax_psroi.roi_pool(f, rois, 3, 1.0, data_format=data_format),
                   jnp.asarray(features))[1](cotangent)[0]
    scheduled_grad = _scheduled("backward", cotangent, rois, pixels, features.shape, 1.0,
                                data_format)
    tolerance = TOLERANCE.get(np.dtype(dtype), dict(rtol=1e-2, atol=1e-2))
    np.testing.assert_allclose(np.asarray(scheduled_grad, np.float64),
                               np.asarray(grad, np.float64), **tolerance)
    assert np.count_nonzero(scheduled_grad) > 100


def test_the_xla_path_records_the_native_pixels():
    # The lowering where no kernel exists (any other platform) records the
    # native kernels' pixels, and gathers and scatters at them as they do.
    rng = np.random.default_rng(3)
    features = rng.normal(size=(1, 2, 8, 9)).astype(np.float64)
    rois = random_rois(rng, 10, 1, 8, 9, 1.0, np.float64)
    params = dict(spatial_scale=1.0, data_format="NCHW", image_groups=(10, 1))
    # Each call one program (eagerly, each of its operations compiles on
    # its own).
    static = ("result_shape", *params)
    xla_pool = jax.jit(_xla_path.roi_pool, static_argnames=static)
    xla_scatter = jax.jit(_xla_path.roi_pool_scatter, static_argnames=static)
    pooled, pixels = xla_pool(jnp.asarray(features), jnp.asarray(rois),
                              result_shape=(10, 2, 2, 2), **params)
    native_pooled, native_pixels = _recorded(features, rois, (2, 2), 1.0)
    np.testing.assert_array_equal(pooled, native_pooled)
    np.testing.assert_array_equal(pixels, native_pixels)
    tangent = rng.normal(size=features.shape)
    np.testing.assert_array_equal(
        xla_pool(jnp.asarray(tangent), rois, pixels, result_shape=pooled.shape, **params),
        jax.jvp(lambda f: jax_psroi.roi_pool(f, rois, 2, 1.0), (features,), (tangent,))[1])
    cotangent = rng.normal(size=pooled.shape)
    scattered = xla_scatter(jnp.asarray(cotangent), rois, pixels, result_shape=features.shape,
                            **params)
    _, vjp = jax.vjp(lambda f: jax_psroi.roi_pool(f, rois, 2, 1.0), features)
    np.testing.assert_allclose(scattered, vjp(cotangent)[0], **TOLERANCE[np.dtype(np.float64)])


def test_a_gather_must_update_the_pixels_it_reads():
    # The forward row given recorded pixels gathers at them, and must alias
    # them to its pixels result (which it then leaves as they are).
    name = _extension.target_name("cpu", "forward", np.float32, "NCHW", "roi_pool")
    shape = (1, 1, 2, 2)
    call = jax.ffi.ffi_call(name, (jax.ShapeDtypeStruct(shape, np.float32),
                                   jax.ShapeDtypeStruct(shape, np.int32)))
    features = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    pixels = np.array([5, 6, 9, -1], np.int32).reshape(shape)
    with pytest.raises(Exception, match="aliased to its pixels result"):
        jax.block_until_ready(call(features, rois, pixels, spatial_scale=1.0, **ONE_GROUP))
    aliased = jax.ffi.ffi_call(name, (jax.ShapeDtypeStruct(shape, np.float32),
                                      jax.ShapeDtypeStruct(shape, np.int32)),
                               input_output_aliases={2: 1})
    values, kept = jax.jit(lambda f, r, p: aliased(f, r, p, spatial_scale=1.0, **ONE_GROUP))(
        features, rois, pixels)
    np.testing.assert_array_equal(values.ravel(), [5, 6, 9, 0])
    np.testing.assert_array_equal(kept, pixels)
