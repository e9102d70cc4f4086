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
def test_nchw_planes_staged_or_read_in_place(dtype, channel_order):
    # An NCHW forward block copies its plane into shared memory when the
    # plane fits 32 KB and its RoIs number at least one per 64 pixels
    # (gpu_schedule.h, forward_stage_elements). Image 0 of a 20 x 30 map
    # (600 pixels) has 200 RoIs: staged. Image 1, the same pixels, has 3 of
    # those boxes: 192 < 600, read in place. Staging changes where a pixel is
    # read from, not what is summed: the three RoIs' outputs are bitwise
    # those of their twins on image 0.
    rng = np.random.default_rng(17)
    layout = dict(data_format="NCHW", channel_order=channel_order)
    image = rng.normal(size=(1, 2 * 6, 20, 30))
    features = jnp.asarray(np.concatenate([image, image]), dtype)
    rois = random_rois(rng, 200, 1, 20, 30, 1.0, np.float64, outside=0.2)
    twins = rois[:3].copy()
    twins[:, 0] = 1
    rois = np.concatenate([rois, twins]).astype(jnp.promote_types(dtype, np.float32))
    out = native_gpu_schedule("forward", features, rois, (203, 2, *OUTPUT_SIZE), 1.0, 2,
                              **layout)
    np.testing.assert_array_equal(out[200:], out[:3])
    assert np.abs(out[:3].astype(np.float32)).max() > 0.1
    _assert_forward_matches_reference(out, features, rois, 1.0, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nchw_planes_over_the_stage_read_in_place(dtype):
    # A 96 x 96 plane is 36 KB in float32 (and 72 KB in float64): over the
    # 32 KB stage, every block reads it in place however many RoIs it has;
    # 18 KB in the 16-bit types: staged.
    rng = np.random.default_rng(18)
    layout = dict(data_format="NCHW", channel_order="torchvision")
    features = jnp.asarray(rng.normal(size=(2, 1 * 6, 96, 96)), dtype)
    rois = random_rois(rng, 400, 2, 96, 96, 0.5, np.float64).astype(
        jnp.promote_types(dtype, np.float32))
    out = native_gpu_schedule("forward", features, rois, (400, 1, *OUTPUT_SIZE), 0.5, 2,
                              **layout)
    assert np.count_nonzero(out.astype(np.float32)) > out.size // 2
    _assert_forward_matches_reference(out, features, rois, 0.5, layout)
