"""Forward pass: native CPU kernel against the oracles."""

import fractions
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi

from cases import (
    EXACT_DTYPES,
    KERNELS,
    TOLERANCE,
    forward_shape,
    hostile_rois,
    native_gpu_schedule,
    random_features,
    random_rois,
    reference,
    target,
)
from loop_reference import ps_roi_align_loops


def _native(features, rois, output_size, scale, ratio):
    return jax.jit(jax_psroi.ps_roi_align, static_argnums=(2, 3, 4))(
        features, rois, output_size, scale, ratio)


def _forward(kernels, features, rois, output_size, scale, ratio):
    """ps_roi_align's forward by the CPU kernels or, serially on the CPU,
    the CUDA kernels' per-element code (the test rig)."""
    if kernels == "cpu":
        return _native(features, rois, output_size, scale, ratio)
    shape = forward_shape(features.shape, len(rois), output_size)
    return native_gpu_schedule("forward", features, rois, shape, scale, ratio)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("output_size", [(3, 3), (2, 3), (1, 1)])
@pytest.mark.parametrize("spatial_scale,sampling_ratio", [
    (1.0, -1), (1.0, 2), (0.5, 0), (0.5, 1), (1 / 16, -1), (1 / 16, 4),
])
@pytest.mark.parametrize("kernels", KERNELS)
def test_random_cases_match_reference(kernels, dtype, output_size, spatial_scale,
                                      sampling_ratio):
    rng = np.random.default_rng(hash((output_size, spatial_scale,
                                      sampling_ratio)) % 2**32)
    ph, pw = output_size
    features = random_features(rng, 3, 2 * ph * pw, 9, 13, dtype)
    rois = random_rois(rng, 17, 3, 9, 13, spatial_scale, dtype)
    out = _forward(kernels, features, rois, output_size, spatial_scale, sampling_ratio)
    ref = reference(features, rois, output_size, spatial_scale,
                    sampling_ratio)
    chex.assert_shape(out, forward_shape(features.shape, 17, output_size))
    assert out.dtype == dtype
    assert np.abs(np.asarray(out)).max() > 0.01  # not trivially zero
    np.testing.assert_allclose(out, ref, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 4])
def test_small_cases_match_torchvision_loops(dtype, sampling_ratio):
    rng = np.random.default_rng(sampling_ratio + 10)
    features = random_features(rng, 2, 8, 6, 7, dtype)
    rois = random_rois(rng, 6, 2, 6, 7, 0.5, dtype)
    out = _native(features, rois, (2, 2), 0.5, sampling_ratio)
    loops = ps_roi_align_loops(features, rois, (2, 2), 0.5, sampling_ratio)
    np.testing.assert_allclose(out, loops, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("height,width", [(1, 6), (6, 1), (1, 1)])
def test_single_row_or_column_maps(height, width):
    rng = np.random.default_rng(height * 10 + width)
    features = random_features(rng, 1, 4, height, width, np.float64)
    rois = random_rois(rng, 8, 1, height, width, 1.0, np.float64, outside=1.0)
    for ratio in (-1, 2):
        out = _native(features, rois, 2, 1.0, ratio)
        loops = ps_roi_align_loops(features, rois, (2, 2), 1.0, ratio)
        np.testing.assert_allclose(out, loops, atol=1e-12)


class HandComputedTest(chex.TestCase):
    """Values worked out on paper for a 2x2 map [[1, 2], [3, 4]]."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_single_samples_and_averages(self):
        plane = jnp.array([[[[1.0, 2.0], [3.0, 4.0]]]])
        op = self.variant(
            lambda boxes, ratio: jax_psroi.ps_roi_align(plane, boxes, 1, 1.0, ratio),
            static_argnums=1)
        # (0,0)-(1,1): start -0.5, one sample at (0, 0) -> pixel (0, 0).
        chex.assert_trees_all_close(op(jnp.array([[0, 0, 0, 1, 1.0]]), 1),
                                    jnp.full((1, 1, 1, 1), 1.0))
        # (0.5,0.5)-(1.5,1.5): one sample at (0.5, 0.5): mean of all four.
        chex.assert_trees_all_close(op(jnp.array([[0, 0.5, 0.5, 1.5, 1.5]]), 1),
                                    jnp.full((1, 1, 1, 1), 2.5))
        # (0,0)-(2,2) with 2x2 samples at 0 and 1 on each axis: the corners.
        chex.assert_trees_all_close(op(jnp.array([[0, 0, 0, 2, 2.0]]), 2),
                                    jnp.full((1, 1, 1, 1), 2.5))
        # Sample at y = -0.75 (in [-1, 0]) reads row 0; x = 1.5 -> 1.5 on row 0.
        chex.assert_trees_all_close(op(jnp.array([[0, 1.5, -0.75, 2.5, 0.25]]), 1),
                                    jnp.full((1, 1, 1, 1), 2.0))
        # Sample at y = -1.25 is off the map: 0.
        chex.assert_trees_all_close(op(jnp.array([[0, 0, -1.25, 1, -0.25]]), 1),
                                    jnp.zeros((1, 1, 1, 1)))
        # Sample at y = 1.75 (in [H-1, H]) reads the last row: 3 + 0.5 = 3.5.
        chex.assert_trees_all_close(op(jnp.array([[0, 0.5, 1.75, 1.5, 2.75]]), 1),
                                    jnp.full((1, 1, 1, 1), 3.5))

    @chex.variants(with_jit=True, without_jit=True)
    def test_position_sensitive_channel_mapping(self):
        # Channel c is constant c: bin (i, j) of output channel o must read
        # input channel (o * 2 + i) * 3 + j.
        c_out, ph, pw = 2, 2, 3
        channels = c_out * ph * pw
        features = jnp.broadcast_to(
            jnp.arange(channels, dtype=jnp.float32)[None, :, None, None],
            (1, channels, 5, 5))
        out = self.variant(
            lambda f: jax_psroi.ps_roi_align(f, [jnp.array([[0.0, 0, 4, 4]])],
                                             (ph, pw)))(features)
        expected = np.arange(channels, dtype=np.float32).reshape(1, c_out, ph, pw)
        chex.assert_trees_all_close(out, expected)

    def test_adaptive_grid_exact_at_integer_ratio(self):
        # roi width 21 over 7 bins: grid = ceil(3) = 3 in float32, not 4.
        # With a linear ramp the mean of 3 samples at offsets 0.5, 1.5, 2.5
        # is the bin centre; 4 samples would give the same mean, so use a
        # quadratic profile to tell them apart.
        x = jnp.arange(32, dtype=jnp.float32) ** 2
        features = jnp.broadcast_to(x, (1, 7, 1, 32))
        box = np.array([[0, 0.5, 0, 21.5, 0]], np.float32)
        out = jax_psroi.ps_roi_align(features, box, (1, 7), 1.0, -1)
        loops = ps_roi_align_loops(np.asarray(features), box, (1, 7), 1.0, -1)
        grid4 = ps_roi_align_loops(np.asarray(features), box, (1, 7), 1.0, 4)
        np.testing.assert_allclose(out, loops, rtol=1e-6)
        assert not np.allclose(out, grid4, rtol=1e-4)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_hostile_rois_are_safe(kernels, dtype, sampling_ratio):
    n, h, w = 2, 6, 7
    rng = np.random.default_rng(7)
    features = random_features(rng, n, 4, h, w, dtype)
    rois = hostile_rois(n, h, w, dtype)
    out = np.asarray(_forward(kernels, features, rois, (2, 2), 1.0, sampling_ratio))
    ref = np.asarray(reference(features, rois, (2, 2), 1.0, sampling_ratio))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, **TOLERANCE[np.dtype(dtype)])

    sane = [0, 10, 11]  # rows torchvision handles: its loops must agree
    np.testing.assert_allclose(
        out[sane], ps_roi_align_loops(features, rois[sane], (2, 2), 1.0,
                                      sampling_ratio),
        **TOLERANCE[np.dtype(dtype)])
    invalid = [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(out[invalid], 0)
    if sampling_ratio <= 0:
        np.testing.assert_array_equal(out[[8, 9]], 0)  # empty adaptive grids
    else:
        np.testing.assert_allclose(
            out[[8, 9]], ps_roi_align_loops(features, rois[[8, 9]], (2, 2),
                                            1.0, sampling_ratio),
            **TOLERANCE[np.dtype(dtype)])
    if sampling_ratio <= 0:
        # A box 2e6 wide averages ~2.5e11 samples per bin, of which only those
        # on the map are visited: small, but not zero.
        assert np.abs(out[12]).max() > 0


def test_huge_box_matches_exhaustive_sum():
    # A box large enough that most samples are off the map, small enough to
    # visit every sample in the loop oracle: the skipping is exact.
    rng = np.random.default_rng(3)
    features = random_features(rng, 1, 1, 5, 6, np.float64)
    rois = np.array([[0, -300, -200, 400, 350]], np.float64)
    out = _native(features, rois, 1, 1.0, -1)
    loops = ps_roi_align_loops(features, rois, (1, 1), 1.0, -1)
    np.testing.assert_allclose(out, loops, rtol=1e-12)


def test_reference_divides_bin_sizes_exactly():
    # A box 21 pixels wide in 7 bins: bins of exactly 3 pixels, 3 adaptive
    # samples each. XLA on CPU turns a division by a broadcast scalar into a
    # multiplication by its reciprocal (21 * (1 / 7) = 3.0000002 in float32,
    # 4 samples); with several RoIs (a vector) the reference got that once.
    rng = np.random.default_rng(21)
    features = rng.normal(size=(1, 7, 4, 30)).astype(np.float32)
    rois = np.array([[0, 0.0, 0.0, 21.0, 3.0], [0, 2.0, 1.0, 23.0, 2.0],
                     [0, 5.0, 0.0, 26.0, 1.0]], np.float32)
    expected = _native(features, rois, (1, 7), 1.0, -1)
    np.testing.assert_allclose(reference(features, rois, (1, 7), 1.0, -1), expected,
                               **TOLERANCE[np.dtype(np.float32)])


def test_empty_boxes():
    features = np.ones((1, 8, 4, 4), np.float32)
    out = _native(features, np.zeros((0, 5), np.float32), 2, 1.0, -1)
    chex.assert_shape(out, (0, 2, 2, 2))
    out = jax_psroi.ps_roi_align(features, [np.zeros((0, 4), np.float32)], 2)
    chex.assert_shape(out, (0, 2, 2, 2))


def test_list_of_boxes_equals_batch_index_form():
    rng = np.random.default_rng(5)
    features = random_features(rng, 3, 9, 8, 8, np.float32)
    per_image = [random_rois(rng, k, 1, 8, 8, 1.0, np.float32)[:, 1:]
                 for k in (2, 0, 3)]
    rois = np.concatenate([
        np.concatenate([np.full((len(b), 1), i, np.float32), b], axis=1)
        for i, b in enumerate(per_image)])
    from_list = jax_psroi.ps_roi_align(features, per_image, 3, 1.0, 2)
    from_tuple = jax_psroi.ps_roi_align(features, tuple(per_image), 3, 1.0, 2)
    from_array = jax_psroi.ps_roi_align(features, rois, 3, 1.0, 2)
    np.testing.assert_array_equal(from_list, from_array)
    np.testing.assert_array_equal(from_tuple, from_array)


def test_boxes_are_cast_to_the_input_dtype():
    features = np.random.default_rng(0).normal(size=(1, 4, 5, 5))
    boxes = np.array([[0, 1, 1, 4, 4]], np.float32)
    out = jax_psroi.ps_roi_align(features, boxes, 2)
    assert out.dtype == np.float64
    np.testing.assert_allclose(
        out, ps_roi_align_loops(features, boxes.astype(np.float64), (2, 2), 1.0, -1),
        atol=1e-12)


def _traced(name, value):
    """Calls ps_roi_align under jit with argument `name` traced."""
    def call(f, b):
        def op(v):
            args = dict(output_size=2, spatial_scale=1.0, sampling_ratio=-1)
            args[name] = v
            return jax_psroi.ps_roi_align(f, b, **args)
        return jax.jit(op)(value)
    return call


# (call, exception, message): every message names the argument, what it
# expected and what it got.
BAD_INPUTS = {
    "rank": (lambda f, b: jax_psroi.ps_roi_align(f[0], b, 2), ValueError,
             r"input must be a 4-d feature map \[N, C, H, W\] \(data_format='NCHW'\), "
             r"got shape \(8, 4, 4\)"),
    "dtype": (lambda f, b: jax_psroi.ps_roi_align(f.astype(np.int32), b, 2),
              TypeError, "input must be bfloat16, float16, float32 or float64, got int32"),
    "channels": (lambda f, b: jax_psroi.ps_roi_align(f, b, 3), ValueError,
                 r"input channels .* multiple of output_size h \* w = 3 \* 3 = 9; "
                 r"got shape \(1, 8, 4, 4\), so C = 8"),
    "nhwc": (lambda f, b: jax_psroi.ps_roi_align(np.zeros((1, 5, 5, 8), np.float32), b, 2),
             ValueError, r"axis 3 \(8\) is a multiple of 4: .*channels-last .*"
                         r"data_format='NHWC'"),
    "output_size_length": (lambda f, b: jax_psroi.ps_roi_align(f, b, (2, 2, 2)),
                           ValueError, r"output_size must be an int or a pair of ints "
                                       r"\(h, w\), got \(2, 2, 2\) \(3 entries\)"),
    "output_size_zero": (lambda f, b: jax_psroi.ps_roi_align(f, b, 0), ValueError,
                         "output_size must be positive, got 0"),
    "output_size_float": (lambda f, b: jax_psroi.ps_roi_align(f, b, 7.0), TypeError,
                          r"output_size must be an int or a pair of ints \(h, w\), "
                          r"got 7.0 \(float\)"),
    "output_size_pair_float": (lambda f, b: jax_psroi.ps_roi_align(f, b, (2, 2.5)),
                               TypeError, r"output_size .* got 2.5 \(float\)"),
    "output_size_traced": (_traced("output_size", 2), TypeError,
                           "output_size must be an int or a pair of ints .* known at "
                           "trace time, got a traced value"),
    "boxes_columns": (lambda f, b: jax_psroi.ps_roi_align(f, b[:, :4], 2), ValueError,
                      r"boxes must be a \[K, 5\] array .* got \(2, 4\)"),
    "boxes_string": (lambda f, b: jax_psroi.ps_roi_align(f, "boxes", 2), TypeError,
                     r"boxes must be a real floating-point or integer array, got 'boxes' "
                     r"\(str\)"),
    "boxes_bool": (lambda f, b: jax_psroi.ps_roi_align(f, b.astype(bool), 2), TypeError,
                   "boxes must be a real floating-point or integer array, got an array of "
                   "dtype bool"),
    "boxes_complex": (lambda f, b: jax_psroi.ps_roi_align(f, b.astype(np.complex64), 2),
                      TypeError, "boxes must be a real floating-point or integer array, "
                                 "got an array of dtype complex64"),
    "boxes_list_bool": (lambda f, b: jax_psroi.ps_roi_align(f, [b[:, 1:].astype(bool)], 2),
                        TypeError, r"boxes\[0\] must be a real floating-point or integer "
                                   "array, got an array of dtype bool"),
    "input_none": (lambda f, b: jax_psroi.ps_roi_align(None, b, 2), TypeError,
                   r"input must be a 4-d floating-point array \[N, C, H, W\], got None "
                   r"\(NoneType\)"),
    "boxes_list": (lambda f, b: jax_psroi.ps_roi_align(f, [b], 2), ValueError,
                   r"\[L, 4\] arrays; element 0 is \(2, 5\)"),
    "sampling_ratio_large": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, 1.0, 2**24),
                             ValueError, f"sampling_ratio must be at most {2**23} .* "
                                         f"got {2**24}"),
    "sampling_ratio_none": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, 1.0, None),
                            TypeError, r"sampling_ratio must be an int, got None \(NoneType\)"),
    "sampling_ratio_below_int64": (
        lambda f, b: jax_psroi.ps_roi_align(f, b, 2, 1.0, -2**63 - 1), ValueError,
        f"sampling_ratio must be at least {-2**63} .* got {-2**63 - 1}"),
    "output_size_beyond_int32": (lambda f, b: jax_psroi.ps_roi_align(f, b, (1, 2**31)),
                                 ValueError, r"output_size must be at most 2147483647 bins "
                                             r"per axis .* got \(1, 2147483648\)"),
    "sampling_ratio_float": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, 1.0, 2.0),
                             TypeError, r"sampling_ratio must be an int, got 2.0 \(float\)"),
    "sampling_ratio_fraction": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, 1.0, 1.5),
                                TypeError, r"sampling_ratio must be an int, got 1.5"),
    "sampling_ratio_traced": (_traced("sampling_ratio", 2), TypeError,
                              "sampling_ratio must be an int known at trace time, "
                              "got a traced value"),
    "spatial_scale_traced": (_traced("spatial_scale", 1.0), TypeError,
                             "spatial_scale must be a real number known at trace "
                             "time, got a traced value"),
    "spatial_scale_string": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, "1/16"),
                             TypeError, r"spatial_scale must be a real number, got "
                                        r"'1/16' \(str\)"),
    "spatial_scale_number_string": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, "0.5"),
                                    TypeError, r"spatial_scale must be a real number, got "
                                               r"'0.5' \(str\)"),
    "spatial_scale_complex": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, 0.5 + 0j),
                              TypeError, r"spatial_scale must be a real number, got "
                                         r"\(0.5\+0j\) \(complex\)"),
    "spatial_scale_bool": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, True), TypeError,
                           r"spatial_scale must be a real number, got True \(bool\)"),
    "spatial_scale_vector": (lambda f, b: jax_psroi.ps_roi_align(f, b, 2, np.array([0.5])),
                             TypeError, r"spatial_scale must be a real number, got an "
                                        r"array of shape \(1,\)"),
    **{f"spatial_scale_{name}": (
        lambda f, b, scale=scale: jax_psroi.ps_roi_align(f, b, 2, scale), ValueError,
        f"spatial_scale must be finite and positive .* got {shown}")
       for name, scale, shown in (("nan", np.nan, "nan"), ("inf", np.inf, "inf"),
                                  ("zero", 0, "0"), ("negative", -0.5, "-0.5"),
                                  ("huge_int", 10**400, "1000"))},
    # float32 input computes in float32, where these become inf, 0 and a
    # subnormal (which XLA's CPU runtime flushes to 0).
    **{f"spatial_scale_{name}_in_float32": (
        lambda f, b, scale=scale: jax_psroi.ps_roi_align(f, b, 2, scale), ValueError,
        rf"spatial_scale must be a normal number in float32, .* got {re.escape(str(scale))}")
       for name, scale in (("overflow", 1e300), ("underflow", 1e-300),
                           ("subnormal", 1e-40))},
    "spatial_scale_subnormal_in_float64": (
        lambda f, b: jax_psroi.ps_roi_align(f.astype(np.float64), b, 2, 1e-310), ValueError,
        r"spatial_scale must be a normal number in float64, .* got 1e-310"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_at_trace_time_naming_the_argument(case):
    call, exception, message = BAD_INPUTS[case]
    features = np.zeros((1, 8, 4, 4), np.float32)
    boxes = np.zeros((2, 5), np.float32)
    # Under eval_shape nothing is lowered or run: the error comes from tracing.
    with pytest.raises(exception, match=message):
        jax.eval_shape(call, features, boxes)


# Every operator and reference with a spatial scale, every argument but the
# map, the boxes and the scale fixed.
SCALED_OPERATORS = {
    "ps_roi_align": lambda x, b, s: jax_psroi.ps_roi_align(x, b, 2, s, 2),
    "roi_align": lambda x, b, s: jax_psroi.roi_align(x, b, 2, s, 2),
    "ps_roi_pool": lambda x, b, s: jax_psroi.ps_roi_pool(x, b, 2, s),
    "roi_pool": lambda x, b, s: jax_psroi.roi_pool(x, b, 2, s),
    "ps_roi_align_reference": lambda x, b, s: jax_psroi.ps_roi_align_reference(x, b, 2, s, 2),
    "roi_align_reference": lambda x, b, s: jax_psroi.roi_align_reference(x, b, 2, s, 2),
    "ps_roi_pool_reference": lambda x, b, s: jax_psroi.ps_roi_pool_reference(x, b, 2, s),
    "roi_pool_reference": lambda x, b, s: jax_psroi.roi_pool_reference(x, b, 2, s),
}
# (input, boxes, spatial_scale) -> bad arguments, the error and its message.
BAD_FOR_EVERY_OPERATOR = {
    "input_none": (lambda x, b, s: (None, b, s), TypeError,
                   r"input must be a 4-d floating-point array .* got None"),
    "boxes_bool": (lambda x, b, s: (x, b > 0, s), TypeError,
                   "boxes must be a real floating-point or integer array, got an array of "
                   "dtype bool"),
    "boxes_complex": (lambda x, b, s: (x, b + 1j, s), TypeError,
                      "boxes must be a real floating-point or integer array, got an array "
                      "of dtype complex"),
    "scale_string": (lambda x, b, s: (x, b, "0.5"), TypeError,
                     "spatial_scale must be a real number, got '0.5'"),
    "scale_nan": (lambda x, b, s: (x, b, float("nan")), ValueError,
                  "spatial_scale must be finite and positive"),
    "scale_negative": (lambda x, b, s: (x, b, -s), ValueError,
                       "spatial_scale must be finite and positive"),
    "scale_float32_overflow": (lambda x, b, s: (x, b, 1e300), ValueError,
                               "spatial_scale must be a normal number in float32"),
}


@pytest.mark.parametrize("bad", sorted(BAD_FOR_EVERY_OPERATOR))
@pytest.mark.parametrize("name", sorted(SCALED_OPERATORS))
def test_every_operator_checks_input_boxes_and_scale_at_trace_time(name, bad):
    arguments, exception, message = BAD_FOR_EVERY_OPERATOR[bad]
    features = np.ones((1, 8, 4, 4), np.float32)
    boxes = np.array([[0, 0, 0, 4, 4]], np.float32)
    x, b, scale = arguments(features, boxes, 0.5)
    with pytest.raises(exception, match=message):
        jax.eval_shape(lambda b: SCALED_OPERATORS[name](x, b, scale), b)


@pytest.mark.parametrize("name", sorted(SCALED_OPERATORS))
def test_every_kind_of_real_scale_and_integer_boxes_are_accepted(name):
    op = SCALED_OPERATORS[name]
    rng = np.random.default_rng(9)
    features = random_features(rng, 2, 8, 6, 7, np.float32)
    boxes = np.array([[0, 1, 2, 9, 11], [1, 0, 0, 13, 12], [1, 4, 3, 7, 12]], np.float32)
    expected = np.asarray(op(features, boxes, 0.5))
    assert np.abs(expected).max() > 0.01
    for scale in (np.float32(0.5), np.float64(0.5), fractions.Fraction(1, 2), np.array(0.5),
                  jnp.array(0.5, jnp.float32)):
        np.testing.assert_array_equal(op(features, boxes, scale), expected, err_msg=repr(scale))
    at_one = np.asarray(op(features, boxes / 2, 1))
    np.testing.assert_array_equal(op(features, boxes / 2, np.int64(1)), at_one)
    np.testing.assert_array_equal(op(features, boxes / 2, jnp.array(1)), at_one)
    # Integer boxes are cast to the compute dtype (torchvision raises).
    for dtype in (np.int32, np.int64, np.uint8):
        np.testing.assert_array_equal(op(features, boxes.astype(dtype), 0.5), expected)
        np.testing.assert_array_equal(
            op(features, [boxes[:1, 1:].astype(dtype), boxes[1:, 1:].astype(dtype)], 0.5),
            expected)
    # float64 maps compute in float64, where 1e300 is a finite scale.
    assert op(features.astype(np.float64), boxes, 1e300).dtype == np.float64


def test_reference_checks_its_arguments_by_the_same_rules():
    features = np.zeros((1, 8, 4, 4), np.float32)
    boxes = np.zeros((2, 5), np.float32)
    with pytest.raises(TypeError, match=r"output_size .* got 7.0 \(float\)"):
        jax_psroi.ps_roi_align_reference(features, boxes, 7.0)
    with pytest.raises(ValueError, match="multiple of output_size"):
        jax_psroi.ps_roi_align_reference(features, boxes, 3)


def test_integer_like_arguments_are_accepted():
    # NumPy integers and concrete 0-d arrays are ints known at trace time.
    rng = np.random.default_rng(8)
    features = random_features(rng, 1, 8, 5, 5, np.float32)
    boxes = random_rois(rng, 3, 1, 5, 5, 1.0, np.float32)
    expected = jax_psroi.ps_roi_align(features, boxes, 2, 0.5, 2)
    out = jax_psroi.ps_roi_align(features, boxes, (np.int64(2), jnp.array(2)),
                                 np.float32(0.5), np.int32(2))
    np.testing.assert_array_equal(out, expected)


def test_lowers_to_the_ffi_custom_call():
    features = np.zeros((1, 8, 4, 4), np.float32)
    boxes = np.zeros((2, 5), np.float32)
    text = jax.jit(lambda f, b: jax_psroi.ps_roi_align(f, b, 2, 0.5, 2)).lower(
        features, boxes).as_text()
    assert f"stablehlo.custom_call @{target('forward', np.float32)}" in text
    assert "spatial_scale = 5.000000e-01 : f64" in text
    assert "sampling_ratio = 2 : i64" in text
    assert "gather" not in text


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("channels_out", [4, 7, 13])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_many_output_channels_match_reference(dtype, channels_out,
                                              sampling_ratio):
    # The CPU kernel sums a bin of several output channels at a time (4 in
    # float32, 2 in float64) and the rest one by one; mix both, on a map wide
    # enough for tiles both inside it and against its right border.
    rng = np.random.default_rng(channels_out * 10 + sampling_ratio)
    features = random_features(rng, 2, channels_out * 4, 10, 37, dtype)
    rois = random_rois(rng, 40, 2, 10, 37, 0.5, dtype, outside=0.2)
    out = _native(features, rois, (2, 2), 0.5, sampling_ratio)
    ref = reference(features, rois, (2, 2), 0.5, sampling_ratio)
    assert np.abs(np.asarray(out)).max() > 0.01
    np.testing.assert_allclose(out, ref, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_planes_larger_than_cache_match_reference(dtype):
    # Large maps with 2 x 2 bins: most bins span more than a tile's 8 rows
    # or 12 columns, so the forward's generic loops run beside its tiles
    # (the backward counterpart also splits output channels into chunks).
    rng = np.random.default_rng(6)
    features = random_features(rng, 2, 13 * 4, 128, 128, dtype)
    rois = random_rois(rng, 30, 2, 128, 128, 0.25, dtype, outside=0.2)
    out = _native(features, rois, (2, 2), 0.25, 2)
    ref = reference(features, rois, (2, 2), 0.25, 2)
    assert np.abs(np.asarray(out)).max() > 0.01
    np.testing.assert_allclose(out, ref, **TOLERANCE[np.dtype(dtype)])
