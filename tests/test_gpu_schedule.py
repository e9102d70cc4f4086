"""The CUDA kernels' schedule (lib/gpu_schedule.h), run serially on the CPU.

The other suites compare it with the reference on small cases, where every
backward tile takes one pass and every pixel keeps all its RoIs. Here the
RoIs crowd: hundreds meet one tile in every bin, so a tile's list fills and
the tile is done in several passes (float32 lists hold 128 RoIs, float64
lists 64), partial sums carried in the gradient or, for 16-bit types, in a
float32 accumulator; and dozens cover one pixel, past the 16 a pixel keeps.
And RoIs are many: bucketing blocks take 1,024 RoIs each, in parallel.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi

from cases import (
    CHANNEL_ORDERS,
    DTYPES,
    EXACT_DTYPES,
    LAYOUTS,
    TOLERANCE,
    crowded_rois,
    features_as,
    native_gpu_schedule,
    pooled_as,
    random_rois,
    reference,
    reference_vjp,
)

pytestmark = pytest.mark.gpu_schedule

OUTPUT_SIZE = (2, 3)
COMBINATIONS = [(f, o) for f in LAYOUTS for o in CHANNEL_ORDERS]


def _crowd(dtype, seed):
    """Two images 9 x 70 (three tile rows, three tile columns, the last ones
    partial); 300 boxes inside the first tile (rows 0-3, columns 0-31) of
    image 1, and 60 anywhere."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, 3 * 6, 9, 70)).astype(np.float32)
    crowd = crowded_rois(rng, 300, 1, (16.0, 1.5), 1.5, 1.0)
    spread = random_rois(rng, 60, 2, 9, 70, 1.0, np.float64)
    rois = np.concatenate([crowd, spread])[rng.permutation(360)]
    return rng, features, rois


def _as(dtype, *arrays):
    return [jnp.asarray(a, dtype) for a in arrays]


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
def test_crowded_tiles_match_the_reference(dtype, data_format, channel_order):
    rng, features, rois = _crowd(dtype, 70)
    layout = dict(data_format=data_format, channel_order=channel_order)
    features = features_as(features.astype(dtype), data_format, channel_order, OUTPUT_SIZE)
    rois = rois.astype(dtype)
    cotangent = pooled_as(rng.normal(size=(360, 3, *OUTPUT_SIZE)).astype(dtype), data_format)

    expected = np.asarray(reference(features, rois, OUTPUT_SIZE, 1.0, 2, **layout))
    out = native_gpu_schedule("forward", features, rois, expected.shape, 1.0, 2, **layout)
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])

    expected = np.asarray(reference_vjp(features, rois, cotangent, OUTPUT_SIZE, 1.0, 2,
                                        **layout))
    grad = native_gpu_schedule("backward", cotangent, rois, features.shape, 1.0, 2, **layout)
    # The crowd really covers pixels many times over: with a cotangent of
    # ones a pixel's gradient sums the weights (each at most 1) of the RoIs
    # covering it.
    coverage = np.asarray(reference_vjp(features, rois, np.ones_like(cotangent),
                                        OUTPUT_SIZE, 1.0, 2, **layout))
    assert coverage.max() > 20
    np.testing.assert_allclose(grad, expected, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d not in EXACT_DTYPES])
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_crowded_16_bit_gradient_is_rounded_once(dtype, data_format):
    # Partial sums between passes stay in float32: the result is the float32
    # gradient rounded once, within one 16-bit step.
    rng, features, rois = _crowd(dtype, 71)
    layout = dict(data_format=data_format, channel_order="torchvision")
    features = features_as(features, data_format, "torchvision", OUTPUT_SIZE)
    cotangent = pooled_as(rng.normal(size=(360, 3, *OUTPUT_SIZE)).astype(np.float32),
                          data_format)
    cot16, = _as(dtype, cotangent)
    exact = np.asarray(reference_vjp(features, rois.astype(np.float32),
                                     np.asarray(cot16, np.float32), OUTPUT_SIZE, 1.0, 2,
                                     **layout))
    grad = native_gpu_schedule("backward", cot16, rois.astype(np.float32), features.shape,
                               1.0, 2, **layout).astype(np.float32)
    step = 2.0 ** -jnp.finfo(dtype).nmant
    assert np.abs(exact).max() > 1
    np.testing.assert_array_less(np.abs(grad - exact), step * np.abs(exact) + 1e-6)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
def test_forward_images_split_into_chunks(dtype, data_format, channel_order):
    # 700 RoIs on 2 images of few channels: every image's RoIs (its buckets,
    # one per band of rows, in turn) are split into chunks, each its own
    # block (NCHW 3 chunks an image, NHWC 3 too: 2 images of 66 channels are
    # far from the blocks the forward wants), and chunks cut across bands;
    # RoIs with a bad batch index fill the last bucket, whose outputs are
    # zeros.
    rng = np.random.default_rng(13)
    layout = dict(data_format=data_format, channel_order=channel_order)
    features = features_as(rng.normal(size=(2, 11 * 6, 9, 13)).astype(dtype),
                           data_format, channel_order, OUTPUT_SIZE)
    rois = random_rois(rng, 700, 2, 9, 13, 0.5, dtype)
    rois[::7, 0] = 5
    rois[3::7, 0] = -3
    expected = np.asarray(reference(features, rois, OUTPUT_SIZE, 0.5, 2, **layout))
    assert np.count_nonzero(expected) > expected.size // 4
    out = native_gpu_schedule("forward", features, rois, expected.shape, 0.5, 2, **layout)
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("data_format", LAYOUTS)
def test_many_rois_bucketed_by_several_blocks(data_format):
    # 2,600 RoIs: three bucketing segments, every bucket fed by all three.
    rng = np.random.default_rng(72)
    layout = dict(data_format=data_format, channel_order="torchvision")
    features = features_as(rng.normal(size=(3, 6, 9, 40)), data_format, "torchvision",
                           OUTPUT_SIZE)
    rois = random_rois(rng, 2600, 3, 9, 40, 1.0, np.float64)
    expected = np.asarray(reference(features, rois, OUTPUT_SIZE, 1.0, 2, **layout))
    out = native_gpu_schedule("forward", features, rois, expected.shape, 1.0, 2, **layout)
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(np.float64)])
    cotangent = rng.normal(size=expected.shape)
    expected = np.asarray(reference_vjp(features, rois, cotangent, OUTPUT_SIZE, 1.0, 2,
                                        **layout))
    grad = native_gpu_schedule("backward", cotangent, rois, features.shape, 1.0, 2, **layout)
    assert np.abs(expected).max() > 1
    np.testing.assert_allclose(grad, expected, **TOLERANCE[np.dtype(np.float64)])


def _assert_forward_matches_reference(out, features, rois, spatial_scale, layout):
    """Exact types: within TOLERANCE of the reference. 16-bit types: the
    float32 forward of the same (16-bit) values rounded once."""
    dtype = np.dtype(features.dtype)
    if dtype in TOLERANCE:
        expected = reference(features, rois, OUTPUT_SIZE, spatial_scale, 2, **layout)
        np.testing.assert_allclose(out, expected, **TOLERANCE[dtype])
        return
    exact = np.asarray(reference(features.astype(np.float32), rois, OUTPUT_SIZE,
                                 spatial_scale, 2, **layout))
    step = 2.0 ** -jnp.finfo(dtype).nmant
    assert np.abs(exact).max() > 0.1
    np.testing.assert_array_less(np.abs(out.astype(np.float32) - exact),
                                 step * np.abs(exact) + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_order", CHANNEL_ORDERS)
@pytest.mark.parametrize("channels_out", [1, 8, 11, 17])
def test_nchw_threads_sum_runs_of_output_channels(dtype, channel_order, channels_out):
    # An NCHW forward thread sums its RoI's bin in the planes of up to 8
    # consecutive output channels, from taps it finds once; C_out is split
    # evenly: 1 -> 1, 8 -> 8, 11 -> 6 + 5, 17 -> 6 + 6 + 5 (gpu_schedule.h,
    # forward_planes). Each value is summed as for a plane alone: bitwise the
    # NHWC schedule's, where a thread takes one channel.
    rng = np.random.default_rng(channels_out)
    layout = dict(data_format="NCHW", channel_order=channel_order)
    canonical = rng.normal(size=(2, channels_out * 6, 9, 13))
    features = jnp.asarray(features_as(canonical, "NCHW", channel_order, OUTPUT_SIZE), dtype)
    rois = random_rois(rng, 60, 2, 9, 13, 1.0, np.float64).astype(
        jnp.promote_types(dtype, np.float32))
    shape = (60, channels_out, *OUTPUT_SIZE)
    out = native_gpu_schedule("forward", features, rois, shape, 1.0, 2, **layout)
    _assert_forward_matches_reference(out, features, rois, 1.0, layout)
    nhwc = native_gpu_schedule(
        "forward", jnp.asarray(features_as(canonical, "NHWC", channel_order, OUTPUT_SIZE), dtype),
        rois, pooled_as(np.zeros(shape), "NHWC").shape, 1.0, 2, data_format="NHWC",
        channel_order=channel_order)
    np.testing.assert_array_equal(out, nhwc.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("operation", ["roi_align", "ps_roi_pool"])
def test_nchw_runs_of_planes_for_the_family(dtype, operation):
    # The same runs for roi_align (every bin of output channel c reads plane
    # c: a run is 6 planes of one bin) and ps_roi_pool (windows of whole
    # pixels, summed plane by plane over a run), 11 output channels.
    rng = np.random.default_rng(19)
    bins = 1 if operation == "roi_align" else 6
    features = jnp.asarray(rng.normal(size=(2, 11 * bins, 9, 13)), dtype)
    rois = random_rois(rng, 60, 2, 9, 13, 1.0, np.float64).astype(dtype)
    if operation == "roi_align":
        expected = jax_psroi.roi_align_reference(features, rois, OUTPUT_SIZE, 1.0, 2, True)
        out = native_gpu_schedule("forward", features, rois, expected.shape, 1.0, 2,
                                  aligned=True)
    else:
        expected = jax_psroi.ps_roi_pool_reference(features, rois, OUTPUT_SIZE, 1.0)
        out = native_gpu_schedule("forward", features, rois, expected.shape, 1.0, 0,
                                  operation="ps_roi_pool")
    assert np.count_nonzero(np.asarray(expected)) > expected.size // 2
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])
