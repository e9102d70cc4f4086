"""Bin sums at large sampling ratios: up to 2^23 samples per bin
axis, the most the API takes, in float32, forward and gradient within 1e-5
of float64, on the CPU kernels and on the CUDA kernels' schedule run on the
CPU.

Added one by one in float32, the weights of 2^22 samples that fall in one
pixel would drift (a weight of 0.5 added to a sum past 2^21 is rounded to a
quarter), and so would the gradient of four bins of ones. The oracle here
sums every sample's bilinear weights per pixel in float64 (numpy), the
separable form of a bin.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi

from cases import KERNELS, LAYOUTS, native_gpu_schedule, pooled_as

RATIOS = [2**16, 2**20, 2**22, 2**23]
OUTPUT_SIZE = (2, 2)
# Boxes inside an 8 x 8 map, bins of 0.8 to 2.4 pixels: every sample on the
# map, tens of thousands to millions of them per pixel.
ROIS = np.array([[0, 1.3, 2.2, 5.9, 6.7], [0, 0.4, 0.9, 3.1, 2.6]], np.float32)


def _axis_weights(start, bin_size, grid, bins, size):
    """[bins, size]: what every sample of each bin gives each pixel of an
    axis, summed in float64 (torchvision's sample positions and border
    rules)."""
    weights = np.zeros((bins, size))
    index = np.arange(grid, dtype=np.float64)
    for b in range(bins):
        v = start + b * bin_size + (index + 0.5) * bin_size / grid
        v = np.maximum(v[(v >= -1) & (v <= size)], 0)
        low = np.floor(v).astype(np.int64)
        last = low >= size - 1
        low = np.where(last, size - 1, low)
        frac = np.where(last, 0.0, v - low)
        high = np.where(last, size - 1, low + 1)
        weights[b] = (np.bincount(low, 1 - frac, minlength=size)
                      + np.bincount(high, frac, minlength=size))
    return weights


def _oracle(rois, height, width, ratio):
    """[K, PH * PW, H, W]: the weight of each pixel in each bin of each RoI
    (ps_roi_align's geometry at spatial scale 1), divided by the sample
    count, in float64."""
    ph, pw = OUTPUT_SIZE
    rois = rois.astype(np.float64)
    weights = []
    for _, x1, y1, x2, y2 in rois:
        start_w, start_h = x1 - 0.5, y1 - 0.5
        wy = _axis_weights(start_h, (y2 - y1) / ph, ratio, ph, height)
        wx = _axis_weights(start_w, (x2 - x1) / pw, ratio, pw, width)
        weights.append(np.einsum("py,qx->pqyx", wy, wx).reshape(ph * pw, height, width))
    return np.stack(weights) / float(ratio) ** 2


@functools.cache
def _roi_weights(ratio):
    """_oracle of ROIS on the 8 x 8 map, read-only: computed once per ratio
    (seconds at 2^23), not once per layout, kernel and direction."""
    weights = _oracle(ROIS, 8, 8, ratio)
    weights.flags.writeable = False
    return weights


def _features(data_format):
    # Positive values, so that a relative error of the sums is one of the
    # sums, not of a cancellation.
    rng = np.random.default_rng(23)
    features = rng.uniform(1, 2, size=(1, OUTPUT_SIZE[0] * OUTPUT_SIZE[1], 8, 8))
    return features.astype(np.float32), pooled_as(features, data_format).astype(np.float32)


def _forward(kernels, features, ratio, data_format):
    if kernels == "cpu":
        return np.asarray(jax_psroi.ps_roi_align(features, ROIS, OUTPUT_SIZE, 1.0, ratio,
                                                 data_format=data_format))
    shape = pooled_as(np.zeros((len(ROIS), 1, *OUTPUT_SIZE)), data_format).shape
    return native_gpu_schedule("forward", features, ROIS, shape, 1.0, ratio, data_format)


def _gradient_of_ones(kernels, features_shape, ratio, data_format):
    ones = pooled_as(np.ones((len(ROIS), 1, *OUTPUT_SIZE), np.float32), data_format)
    if kernels == "cpu":
        _, vjp = jax.vjp(lambda f: jax_psroi.ps_roi_align(f, ROIS, OUTPUT_SIZE, 1.0, ratio,
                                                          data_format=data_format),
                         jnp.zeros(features_shape, np.float32))
        return np.asarray(vjp(ones)[0])
    return native_gpu_schedule("backward", ones, ROIS, features_shape, 1.0, ratio,
                               data_format)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_float32_forward_at_large_sampling_ratios(ratio, data_format, kernels):
    nchw, features = _features(data_format)
    # Output channel 0 of bin b reads input channel b (torchvision's order).
    weights = _roi_weights(ratio)
    expected = np.einsum("kbyx,byx->kb", weights, nchw[0].astype(np.float64))
    out = _forward(kernels, features, ratio, data_format)
    assert out.dtype == np.float32
    out = out.reshape(len(ROIS), -1)  # [K, PH * PW]: C_out is 1 in both layouts
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_float32_gradient_at_large_sampling_ratios(ratio, data_format, kernels):
    _, features = _features(data_format)
    grad = _gradient_of_ones(kernels, features.shape, ratio, data_format)
    # Every sample is on the map: each bin's weights sum to its sample count,
    # so the gradient of four bins of ones sums to 4 per RoI.
    assert abs(grad.astype(np.float64).sum() - 4 * len(ROIS)) <= 4 * len(ROIS) * 1e-5
    expected = _roi_weights(ratio).sum(axis=0)  # [PH * PW channels, H, W]
    expected = pooled_as(expected[None], data_format)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kernels", KERNELS)
def test_adaptive_grids_past_the_cap_and_over_many_pixels(kernels):
    # Adaptive grids of more than 64 samples (bins of 140 pixels) and a
    # box so wide that its grid is capped at 2^23 samples per axis (2^24
    # pixels: a sample every pixel, positions exact in float32), on a map
    # 8 x 300.
    rois = np.array([[0, 3.5, 0.5, 283.5, 7.5], [0, -4194304.0, 1.0, 12582912.0, 3.0]],
                    np.float32)
    rng = np.random.default_rng(3)
    nchw = rng.uniform(1, 2, size=(1, 4, 8, 300)).astype(np.float32)
    ph, pw = OUTPUT_SIZE
    weights, grids = [], []
    for _, x1, y1, x2, y2 in rois.astype(np.float64):
        grid_h = min(int(np.ceil((y2 - y1) / ph)), 2**23)
        grid_w = min(int(np.ceil((x2 - x1) / pw)), 2**23)
        wy = _axis_weights(y1 - 0.5, (y2 - y1) / ph, grid_h, ph, 8)
        wx = _axis_weights(x1 - 0.5, (x2 - x1) / pw, grid_w, pw, 300)
        weights.append(np.einsum("py,qx->pqyx", wy, wx).reshape(ph * pw, 8, 300)
                       / (grid_h * grid_w))
        grids.append(grid_w)
    assert grids == [140, 2**23]
    expected = np.einsum("kbyx,byx->kb", np.stack(weights), nchw[0].astype(np.float64))
    if kernels == "cpu":
        out = np.asarray(jax_psroi.ps_roi_align(nchw, rois, OUTPUT_SIZE, 1.0, -1))
    else:
        out = native_gpu_schedule("forward", nchw, rois, (2, 1, *OUTPUT_SIZE), 1.0, -1)
    np.testing.assert_allclose(out.reshape(2, -1), expected, rtol=1e-5, atol=0)
