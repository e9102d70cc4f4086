"""multi_scale_roi_align: one native roi_align call per pyramid level, each
visiting its level's RoIs and updating one result in place, against
torchvision's golden cases and the jax.numpy reference, through every JAX
transformation; and the kernels' in-place update (the CPU kernels and the
CUDA schedule run on the CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_psroi
from jax_psroi import _extension, _levels

from cases import (
    KERNELS,
    LAYOUTS,
    ONE_GROUP,
    TOLERANCE,
    golden,
    gpu_schedule_target,
    multi_scale_case,
    random_rois,
    target,
)

GOLDEN, CASES = golden("multi_scale_roi_align")
IMAGE = (64, 48)  # image height, width of the random pyramids
# Eq. 1 scaled to the small image: boxes of sqrt(area) 24 pool from level
# k0 = 4 (stride 16); every level of the random pyramids gets RoIs.
SCALE24 = dict(canonical_scale=24)


def _nhwc(x):
    return x.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("key", CASES)
def test_forward_and_gradients_match_torchvision(key, data_format):
    levels, boxes, output_size, ratio, image_size, options = multi_scale_case(GOLDEN, key)
    to = _nhwc if data_format == "NHWC" else (lambda x: x)

    @jax.jit
    def pool(xs):
        return jax_psroi.multi_scale_roi_align(xs, boxes, output_size, ratio, image_size,
                                               data_format=data_format, **options)

    out, vjp = jax.vjp(pool, [to(x) for x in levels])
    expected = to(GOLDEN[f"{key}_output"])
    assert out.dtype == expected.dtype and out.shape == expected.shape
    tolerance = TOLERANCE[levels[0].dtype]
    np.testing.assert_allclose(out, expected, **tolerance)
    (grads,) = vjp(to(GOLDEN[f"{key}_cotangent"]))
    for j, grad in enumerate(grads):
        np.testing.assert_allclose(grad, to(GOLDEN[f"{key}_grad_level{j}"]), **tolerance)


def _pyramid(rng, dtype, data_format, channels=3, images=2):
    """Four levels of a 64 x 48 image (strides 4 to 32), RoIs of every size
    (so every level), and hostile ones: an inverted box (no level), a NaN
    box, a bad batch index, a box off the map."""
    levels = [rng.normal(size=(images, channels, IMAGE[0] // s, IMAGE[1] // s)).astype(dtype)
              for s in (4, 8, 16, 32)]
    if data_format == "NHWC":
        levels = [_nhwc(x) for x in levels]
    rois = random_rois(rng, 40, images, IMAGE[0], IMAGE[1], 1.0, dtype, outside=0.2)
    hostile = np.array([[0, 30, 5, 10, 40], [1, np.nan, 0, 5, 5], [images, 0, 0, 40, 40],
                        [1, 500, 500, 600, 620], [0, 0, 0, 64, 48]], dtype)
    return levels, np.concatenate([rois, hostile])


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("dtype,ratio", [(np.float32, 2), (np.float64, 0)])
def test_random_pyramids_match_the_reference(dtype, data_format, ratio):
    rng = np.random.default_rng(20)
    levels, rois = _pyramid(rng, dtype, data_format)
    args = (rois, (3, 2), ratio, IMAGE)
    out, vjp = jax.vjp(jax.jit(lambda xs: jax_psroi.multi_scale_roi_align(
        xs, *args, data_format=data_format, **SCALE24)), levels)
    ref, ref_vjp = jax.vjp(jax.jit(lambda xs: jax_psroi.multi_scale_roi_align_reference(
        xs, *args, data_format=data_format, **SCALE24)), levels)
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(out, ref, **tolerance)
    cotangent = rng.normal(size=out.shape).astype(dtype)
    for grad, ref_grad in zip(vjp(cotangent)[0], ref_vjp(cotangent)[0], strict=True):
        assert np.abs(np.asarray(ref_grad)).max() > 0.01  # every level pools some RoI
        np.testing.assert_allclose(grad, ref_grad, **tolerance)
    # The inverted box has no level and gives 0, as in torchvision.
    np.testing.assert_array_equal(np.asarray(out)[len(rois) - 5], 0)


def test_one_call_per_level_each_updating_the_result():
    rng = np.random.default_rng(21)
    levels, rois = _pyramid(rng, np.float32, "NCHW")
    pool = lambda xs: jax_psroi.multi_scale_roi_align(xs, rois, 7, 2, IMAGE)
    text = jax.jit(pool).lower(levels).as_text()
    assert text.count("jax_psroi_roi_align_forward_nchw_f32") == 4
    assert text.count("output_operand_aliases") == 4
    assert text.count("custom_call") == 4
    loss = lambda xs: jnp.sum(pool(xs) ** 2)
    text = jax.jit(jax.grad(loss)).lower(levels).as_text()
    assert text.count("jax_psroi_roi_align_backward_nchw_f32") == 4


def test_each_roi_reads_only_its_level():
    rng = np.random.default_rng(22)
    levels, _ = _pyramid(rng, np.float64, "NCHW")
    gradient = jax.jit(jax.grad(lambda xs, r: jax_psroi.multi_scale_roi_align(
        xs, r, 2, 2, IMAGE, **SCALE24).sum()))
    # A small box pools from the finest level, a large one from the coarsest.
    for box, level in (([0, 4, 4, 12, 12], 0), ([0, 0, 0, 60, 44], 3)):
        grads = gradient(levels, np.array([box], np.float64))
        touched = [bool(np.any(np.asarray(g) != 0)) for g in grads]
        assert touched == [j == level for j in range(4)]


def test_transformations_run_on_the_native_kernels():
    rng = np.random.default_rng(23)
    levels, _ = _pyramid(rng, np.float32, "NCHW", images=3)
    boxes = rng.uniform(0, 40, size=(3, 6, 4)).astype(np.float32)
    boxes[..., 2:] += rng.uniform(1, 40, size=(3, 6, 2))
    op = lambda xs, b: jax_psroi.multi_scale_roi_align(xs, b, 2, 2, IMAGE, **SCALE24)
    # Every transformation under jit: one program each (eagerly, each
    # jax.numpy operation of the levels and of the losses compiles on its own).
    pool = jax.jit(op)

    per_image = jax.jit(jax.vmap(lambda xs, b: op([x[None] for x in xs], [b])))
    mapped = per_image(levels, boxes)
    whole = pool(levels, list(boxes))
    np.testing.assert_allclose(mapped.reshape(whole.shape), whole, rtol=1e-6, atol=1e-6)
    text = per_image.lower(levels, boxes).as_text()
    assert text.count("jax_psroi_roi_align_forward_nchw_f32") == 4

    rois = jax_psroi.rois_from_boxes(list(boxes), jnp.float32)
    tangents = [rng.normal(size=x.shape).astype(np.float32) for x in levels]
    _, jvp_out = jax.jit(lambda xs, t: jax.jvp(lambda xs: op(xs, rois), (xs,), (t,)))(
        levels, tangents)
    np.testing.assert_allclose(jvp_out, pool(tangents, rois), rtol=1e-6, atol=1e-6)
    loss = lambda xs: 0.5 * jnp.sum(op(xs, rois) ** 2)
    _, hvp = jax.jit(lambda xs, t: jax.jvp(jax.grad(loss), (xs,), (t,)))(levels, tangents)
    vjp = jax.jit(lambda xs, c: jax.vjp(lambda xs: op(xs, rois), xs)[1](c)[0])
    for a, b in zip(hvp, vjp(levels, jvp_out), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # With the maps constant, a box tangent moves the output (box
    # derivatives: tests/test_box_derivatives.py checks their values) and
    # a detached one does not.
    out, box_tangent = jax.jit(lambda r, t: jax.jvp(lambda r: op(levels, r), (r,), (t,)))(
        rois, jnp.ones_like(rois))
    np.testing.assert_array_equal(out, pool(levels, rois))
    assert np.abs(np.asarray(box_tangent)).max() > 0
    _, detached = jax.jit(lambda r, t: jax.jvp(lambda r: op(levels, jax.lax.stop_gradient(r)),
                                               (r,), (t,)))(rois, jnp.ones_like(rois))
    np.testing.assert_array_equal(detached, 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_is_the_float32_result_rounded_once(dtype):
    rng = np.random.default_rng(24)
    levels, rois = _pyramid(rng, np.float32, "NHWC")
    narrow = [jnp.asarray(x, dtype) for x in levels]
    wide = [x.astype(jnp.float32) for x in narrow]
    pool = lambda xs: jax_psroi.multi_scale_roi_align(xs, rois, 3, 2, IMAGE,
                                                      data_format="NHWC", **SCALE24)
    out = pool(narrow)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, pool(wide).astype(dtype))


def test_arguments_are_checked():
    x = np.zeros((1, 2, 16, 16), np.float32)
    rois = np.zeros((1, 5), np.float32)
    with pytest.raises(ValueError, match="at least one level"):
        jax_psroi.multi_scale_roi_align([], rois, 2, 2, (64, 64))
    with pytest.raises(ValueError, match="level 1 is float32, shape \\(1, 3, 8, 8\\)"):
        jax_psroi.multi_scale_roi_align([x, np.zeros((1, 3, 8, 8), np.float32)], rois, 2, 2,
                                        (64, 64))
    with pytest.raises(TypeError, match="image_size must be a pair"):
        jax_psroi.multi_scale_roi_align([x], rois, 2, 2, 64)
    # NCHW levels called NHWC: their "channels" (widths) differ, their axis 1 not.
    with pytest.raises(ValueError, match=r"level 1 is float32, shape \(1, 2, 8, 8\)\. Their "
                                         r"axis 1 agrees: if the maps are \[N, C, H, W\], "
                                         r"pass data_format='NCHW'"):
        jax_psroi.multi_scale_roi_align([x, np.zeros((1, 2, 8, 8), np.float32)], rois, 2, 2,
                                        (64, 64), data_format="NHWC")
    with pytest.raises(ValueError, match=r"shape \(1, 3, 8, 8\)$"):  # no hint: C differs
        jax_psroi.multi_scale_roi_align([x, np.zeros((1, 3, 8, 8), np.float32)], rois, 2, 2,
                                        (64, 64))


# Levels of a 256 x 256 image at strides 4, 8 and 16, every pixel of level j
# equal to j + 1; boxes of sides 40, 112 and 224 px, which eq. 1 sends to
# levels 2 (clamped up from 1), 3 and 4, i.e. to the stride-4, -8 and -16 maps.
PIXELS = 256
STRIDE = {4: 0, 8: 1, 16: 2}
SIDES = np.array([[0, 0, 0, 40, 40], [0, 0, 0, 112, 112], [0, 0, 0, 224, 224]], np.float32)


def _level(stride):
    size = PIXELS // stride
    return np.full((1, 1, size, size), STRIDE[stride] + 1, np.float32)


@pytest.mark.parametrize("pool", [jax_psroi.multi_scale_roi_align,
                                  jax_psroi.multi_scale_roi_align_reference])
def test_a_finest_first_pyramid_pools_each_box_from_its_level(pool):
    levels = [_level(4), _level(8), _level(16)]
    out = np.asarray(pool(levels, SIDES, 1, 2, (PIXELS, PIXELS)))
    np.testing.assert_array_equal(out.ravel(), [1, 2, 3])
    # Two levels: the large boxes clamp to the coarser one, as in torchvision.
    out = np.asarray(pool(tuple(levels[:2]), SIDES, 1, 2, (PIXELS, PIXELS)))
    np.testing.assert_array_equal(out.ravel(), [1, 2, 2])


# Pyramids torchvision's level mapping pools wrongly (it silently gave some
# or all RoIs 0), each with the reason the error gives.
BAD_PYRAMIDS = {
    "missing_level": ((4, 16), "level 1 is 4 times coarser than level 0: a level between "
                               "them is missing"),
    "coarsest_first": ((16, 8, 4), "level 1 is finer than level 0"),
    "out_of_order": ((4, 16, 8), "level 1 is 4 times coarser than level 0"),
    "duplicate": ((4, 8, 8), "level 2 has the scale of level 1"),
}


@pytest.mark.parametrize("pool", [jax_psroi.multi_scale_roi_align,
                                  jax_psroi.multi_scale_roi_align_reference])
@pytest.mark.parametrize("case", sorted(BAD_PYRAMIDS))
def test_a_pyramid_that_cannot_be_pooled_raises_at_trace_time(case, pool):
    strides, why = BAD_PYRAMIDS[case]
    levels = [_level(s) for s in strides]
    heights = ", ".join(str(PIXELS // s) for s in strides)
    with pytest.raises(ValueError, match=(
            rf"features must be the levels of a pyramid, the finest first, .* got levels "
            rf"of heights {heights} for image height {PIXELS}, .*: {why}")):
        jax.eval_shape(lambda xs: pool(xs, SIDES, 1, 2, (PIXELS, PIXELS)), levels)


@pytest.mark.parametrize("pool", [jax_psroi.multi_scale_roi_align,
                                  jax_psroi.multi_scale_roi_align_reference])
def test_a_level_of_height_zero_raises_naming_it(pool):
    empty = np.zeros((1, 1, 0, 16), np.float32)
    for levels, index in (([_level(4), empty], 1), ([empty], 0)):
        with pytest.raises(ValueError, match=rf"features\[{index}\] has height 0 .* every "
                                             r"level needs H >= 1"):
            jax.eval_shape(lambda xs: pool(xs, SIDES, 1, 2, (PIXELS, PIXELS)), levels)


def _call(**changes):
    """multi_scale_roi_align of a good pyramid with some arguments changed."""
    arguments = dict(features=[_level(4), _level(8)], boxes=SIDES, output_size=1,
                     sampling_ratio=2, image_size=(PIXELS, PIXELS))
    arguments.update(changes)
    return lambda: jax_psroi.multi_scale_roi_align(**arguments)


# (call, exception, message), as tests/test_forward.py's BAD_INPUTS.
BAD_ARGUMENTS = {
    "features_dict": (_call(features={"p2": _level(4), "p3": _level(8)}), TypeError,
                      r"features must be a list or tuple of feature maps, the finest first, "
                      r"got a mapping \(torchvision's dict of named levels\)"),
    "features_none": (_call(features=None), TypeError,
                      r"features must be a list or tuple .* got None \(NoneType\)"),
    "features_array": (_call(features=_level(4)), TypeError,
                       r"features must be a list or tuple .* got an array of shape "
                       r"\(1, 1, 64, 64\)"),
    "level_none": (_call(features=[_level(4), None]), TypeError,
                   r"features\[1\] must be a 4-d floating-point array \[N, C, H, W\], got "
                   r"None"),
    "level_rank": (_call(features=[_level(4), _level(8)[0]]), ValueError,
                   r"features\[1\] must be a 4-d feature map"),
    "level_dtype": (_call(features=[_level(4).astype(np.int32)]), TypeError,
                    r"features\[0\] must be bfloat16, float16, float32 or float64, got int32"),
    "boxes_bool": (_call(boxes=SIDES > 0), TypeError,
                   "boxes must be a real floating-point or integer array, got an array of "
                   "dtype bool"),
    "sampling_ratio_none": (_call(sampling_ratio=None), TypeError,
                            r"sampling_ratio must be an int, got None"),
    "sampling_ratio_below_int64": (_call(sampling_ratio=-2**63 - 1), ValueError,
                                   f"sampling_ratio must be at least {-2**63}"),
    "output_size_beyond_int32": (_call(output_size=2**31), ValueError,
                                 "output_size must be at most 2147483647"),
    "image_size_zero": (_call(image_size=(0, PIXELS)), ValueError,
                        r"image_size must be positive, got \(0, 256\)"),
    "image_size_huge": (_call(image_size=(2**1100, PIXELS)), ValueError,
                        "image_size must be at most 2147483647 pixels a side"),
    "canonical_scale_huge": (_call(canonical_scale=2**70), ValueError,
                             f"canonical_scale must be at most 2147483647 pixels, got "
                             f"{2**70}"),
    "canonical_level_huge": (_call(canonical_level=-2**70), ValueError,
                             f"canonical_level must be between -2147483647 and 2147483647, "
                             f"got {-2**70}"),
    "canonical_level_float": (_call(canonical_level=4.0), TypeError,
                              r"canonical_level must be an int, got 4.0 \(float\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_raise_at_trace_time_naming_them(case):
    call, exception, message = BAD_ARGUMENTS[case]
    with pytest.raises(exception, match=message):
        jax.eval_shape(call)


def test_the_bounds_of_the_canonical_settings_are_accepted():
    levels = [_level(4), _level(8), _level(16)]
    for scale, level, expected in ((2**31 - 1, 2**31 - 1, 3), (1, -(2**31 - 1), 1)):
        out = jax_psroi.multi_scale_roi_align(levels, SIDES, 1, 2, (PIXELS, PIXELS),
                                              canonical_scale=scale, canonical_level=level)
        np.testing.assert_array_equal(np.asarray(out).ravel(), [expected] * 3)


@pytest.mark.skipif(not _extension.KERNELS["cuda"], reason="built without CUDA")
def test_export_for_cuda_calls_roi_align_per_level():
    levels = [np.ones((1, 2, 16, 16), np.float32), np.ones((1, 2, 8, 8), np.float32)]
    rois = np.array([[0, 1, 1, 9, 9], [0, 0, 0, 60, 60]], np.float32)
    loss = lambda xs: jnp.sum(jax_psroi.multi_scale_roi_align(xs, rois, 2, 2, (64, 64)) ** 2)
    exported = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"],
                             disabled_checks=jax_psroi.export_safety_checks())(levels)
    text = exported.mlir_module()
    assert text.count("jax_psroi_roi_align_forward_nchw_f32") == 2
    assert text.count("jax_psroi_roi_align_backward_nchw_f32") == 2
    assert text.count("output_operand_aliases") == 2


# --- The kernels' in-place update ---------------------------------------------

@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_an_update_leaves_the_rois_that_read_nothing(kernels, data_format):
    # A forward given the pooled tensor it updates writes the RoIs that read
    # something and leaves the rest (bad batch index, NaN) as they were.
    rng = np.random.default_rng(25)
    shape = (1, 2, 6, 7) if data_format == "NCHW" else (1, 6, 7, 2)
    features = rng.normal(size=shape).astype(np.float32)
    rois = np.array([[0, 1, 1, 4, 5], [-1, 1, 1, 4, 5], [np.nan, 0, 0, 2, 2],
                     [0, 0, 0, 6, 5]], np.float32)
    pooled_shape = (4, 2, 2, 2)
    before = rng.normal(size=pooled_shape).astype(np.float32)
    name = (target("forward", np.float32, data_format, "roi_align") if kernels == "cpu"
            else gpu_schedule_target(("roi_align", "forward", data_format, np.dtype(np.float32))))
    attributes = dict(spatial_scale=1.0, sampling_ratio=2, aligned=0, first_bin_row=0,
                      bin_rows=2, **ONE_GROUP)
    result = jax.ShapeDtypeStruct(pooled_shape, np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        updated = jax.jit(lambda f, r, b: jax.ffi.ffi_call(
            name, result, input_output_aliases={2: 0})(f, r, b, **attributes))(
                features, rois, before)
        whole = jax.ffi.ffi_call(name, result)(features, rois, **attributes)
    updated, whole = np.asarray(updated), np.asarray(whole)
    np.testing.assert_array_equal(updated[[0, 3]], whole[[0, 3]])
    np.testing.assert_array_equal(updated[[1, 2]], before[[1, 2]])
    np.testing.assert_array_equal(whole[[1, 2]], 0)
    assert np.abs(whole[[0, 3]]).min() > 0


def test_a_box_at_a_level_boundary_gets_torchvision_level_eager_and_jitted():
    # sqrt(area) / 224 just below 1: torchvision's float32 quotient is
    # 0.99999924 and eq. 1 gives level 3 (index 1 of P2-P5); XLA's multiply
    # by the reciprocal of 224 (under jit, or eagerly with more than one
    # box) rounded it up to level 4.
    side = np.float32(223.99983)
    quotient = np.sqrt(side * side) / np.float32(224)
    expected = int(np.floor(np.float32(4) + np.log2(quotient) + np.float32(1e-6))) - 2
    assert expected == 1
    box = np.array([[0, 0, 0, side, side]], np.float32)
    other = np.array([[0, 0, 0, 50, 50]], np.float32)
    levels = lambda rois: _levels.roi_levels(rois, (1 / 4, 1 / 8, 1 / 16, 1 / 32), 224, 4)
    for rois in (box, np.concatenate([box, other])):
        assert int(levels(rois)[0]) == expected
        assert int(jax.jit(levels)(rois)[0]) == expected


def test_a_level_scale_is_inferred_in_float32_as_torchvision_infers_it():
    # torchvision takes log2 of torch.tensor(2378 / 3363), a float32
    # 0.70710677 just below 1/sqrt(2): its log2 is -0.500000025, -0.5 in
    # float32, which rounds (half to even) to 0, scale 1. In float64 the
    # ratio's log2 is -0.50000006 and rounds to -1.
    assert round(np.log2(2378 / 3363)) == -1
    assert _levels.level_scales([(1, 1, 2378, 8)], (3363, 3363), "NCHW") == (1.0,)
