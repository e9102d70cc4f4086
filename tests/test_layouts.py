"""Layouts (NCHW, NHWC) and channel orders (torchvision, bin_major).

Every combination must equal the NCHW torchvision-order result with the
permutation applied: features permuted into the layout and order give the
NCHW pooled tensor in the layout, and gradients come back permuted the same
way as the features.
"""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.test_util import check_grads

import jax_psroi
from jax_psroi import _extension

from cases import (
    CHANNEL_ORDERS,
    EXACT_DTYPES,
    KERNELS,
    LAYOUTS,
    TOLERANCE,
    features_as,
    features_from,
    hostile_rois,
    native_gpu_schedule,
    pooled_as,
    random_features,
    random_rois,
    target,
)

COMBINATIONS = [combo for combo in itertools.product(LAYOUTS, CHANNEL_ORDERS)
                if combo != ("NCHW", "torchvision")]


def _op(data_format, channel_order, output_size, scale, ratio):
    return lambda f, r: jax_psroi.ps_roi_align(
        f, r, output_size, scale, ratio, data_format=data_format,
        channel_order=channel_order)


def _case(dtype, seed, output_size=(2, 3), channels_out=5, n=2, h=9, w=37, scale=0.5):
    rng = np.random.default_rng(seed)
    features = random_features(rng, n, channels_out * output_size[0] * output_size[1],
                               h, w, dtype)
    rois = np.concatenate([random_rois(rng, 30, n, h, w, scale, dtype, outside=0.2),
                           hostile_rois(n, h, w, dtype)])
    return rng, features, rois


# `kernels` "gpu_schedule": the CUDA kernels' per-element code, serially on
# the CPU, in the layout and order, against the CPU kernels' NCHW result.
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
def test_forward_equals_permuted_nchw(data_format, channel_order, sampling_ratio, dtype,
                                      kernels):
    # 5 output channels: the CPU's grouped and leftover channels both run;
    # a map 37 wide: tiles inside it and against its right border.
    _, features, rois = _case(dtype, 40)
    nchw = jax.jit(_op("NCHW", "torchvision", (2, 3), 0.5, sampling_ratio))(features, rois)
    permuted = features_as(features, data_format, channel_order, (2, 3))
    expected = pooled_as(np.asarray(nchw), data_format)
    if kernels == "cpu":
        out = jax.jit(_op(data_format, channel_order, (2, 3), 0.5, sampling_ratio))(
            permuted, rois)
    else:
        out = native_gpu_schedule("forward", permuted, rois, expected.shape, 0.5,
                                  sampling_ratio, data_format, channel_order)
    assert out.shape == expected.shape and out.dtype == dtype
    assert np.abs(expected).max() > 0.01
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
def test_gradient_equals_permuted_nchw(data_format, channel_order, sampling_ratio, dtype,
                                       kernels):
    rng, features, rois = _case(dtype, 41)
    cotangent = rng.normal(size=(len(rois), 5, 2, 3)).astype(dtype)

    def gradient(op, f, c):
        return jax.jit(lambda f, c: jax.vjp(lambda x: op(x, rois), f)[1](c)[0])(f, c)

    nchw = gradient(_op("NCHW", "torchvision", (2, 3), 0.5, sampling_ratio),
                    features, cotangent)
    permuted = features_as(features, data_format, channel_order, (2, 3))
    if kernels == "cpu":
        grad = gradient(_op(data_format, channel_order, (2, 3), 0.5, sampling_ratio),
                        permuted, pooled_as(cotangent, data_format))
    else:
        grad = native_gpu_schedule("backward", pooled_as(cotangent, data_format), rois,
                                   permuted.shape, 0.5, sampling_ratio, data_format,
                                   channel_order)
    assert grad.shape == permuted.shape
    assert np.abs(np.asarray(nchw)).max() > 0.01
    np.testing.assert_allclose(features_from(np.asarray(grad), data_format, channel_order,
                                             (2, 3)),
                               nchw, **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("data_format,channel_order", COMBINATIONS)
def test_reference_agrees_in_every_layout(data_format, channel_order):
    _, features, rois = _case(np.float64, 42)
    permuted = features_as(features, data_format, channel_order, (2, 3))
    out = jax.jit(_op(data_format, channel_order, (2, 3), 0.5, -1))(permuted, rois)
    ref = jax.jit(lambda f: jax_psroi.ps_roi_align_reference(
        f, rois, (2, 3), 0.5, -1, data_format=data_format,
        channel_order=channel_order))(permuted)
    np.testing.assert_allclose(out, ref, atol=1e-10)


@pytest.mark.parametrize("channels_out", [13, 17])
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_nhwc_on_large_planes_and_many_channels(dtype, channels_out):
    # Windows wider than the backward's tables (recomputed weights), bands of
    # several rows, and output channels the channels-last backward pads to
    # whole vectors (13) or walks as they are (17); both orders, forward and
    # backward.
    rng = np.random.default_rng(43)
    features = random_features(rng, 2, channels_out * 4, 64, 64, dtype)
    rois = random_rois(rng, 20, 2, 64, 64, 0.25, dtype, outside=0.2)
    cotangent = rng.normal(size=(20, channels_out, 2, 2)).astype(dtype)
    nchw_op = _op("NCHW", "torchvision", (2, 2), 0.25, 2)
    nchw, nchw_vjp = jax.vjp(lambda f: nchw_op(f, rois), features)
    nchw_grad = nchw_vjp(cotangent)[0]
    for channel_order in CHANNEL_ORDERS:
        op = _op("NHWC", channel_order, (2, 2), 0.25, 2)
        permuted = features_as(features, "NHWC", channel_order, (2, 2))
        out, vjp = jax.vjp(lambda f, op=op: op(f, rois), permuted)
        grad = vjp(pooled_as(cotangent, "NHWC"))[0]
        tol = TOLERANCE[np.dtype(dtype)]
        np.testing.assert_allclose(out, pooled_as(np.asarray(nchw), "NHWC"), **tol)
        np.testing.assert_allclose(
            features_from(np.asarray(grad), "NHWC", channel_order, (2, 2)), nchw_grad, **tol)


def test_golden_fixtures_through_nhwc_bin_major():
    # torchvision's own results, reached through the other layout and order.
    golden = np.load(pathlib.Path(__file__).parent / "fixtures" / "golden_ps_roi_align.npz")
    for i in range(int(golden["num_cases"])):
        key = f"c{i:02d}"
        ph, pw, ratio = (int(v) for v in golden[f"{key}_params"])
        scale = float(golden[f"{key}_spatial_scale"])
        features, rois = golden[f"{key}_input"], golden[f"{key}_rois"]
        permuted = features_as(features, "NHWC", "bin_major", (ph, pw))
        op = _op("NHWC", "bin_major", (ph, pw), scale, ratio)
        out, vjp = jax.vjp(lambda f, op=op, rois=rois: op(f, rois), permuted)
        grad = vjp(pooled_as(golden[f"{key}_cotangent"], "NHWC"))[0]
        tol = TOLERANCE[features.dtype]
        np.testing.assert_allclose(out, pooled_as(golden[f"{key}_output"], "NHWC"), **tol)
        np.testing.assert_allclose(features_from(np.asarray(grad), "NHWC", "bin_major",
                                                 (ph, pw)),
                                   golden[f"{key}_grad_input"], **tol)


def test_nhwc_composes_with_every_transformation():
    # vmap on a non-leading axis, jit, grad, and forward mode, float64.
    _, features, rois = _case(np.float64, 44, n=1)
    nhwc = features_as(features, "NHWC", "bin_major", (2, 3))
    batch = np.stack([nhwc, 2 * nhwc, -nhwc], axis=2)  # [1, H, B, W, C]
    op = _op("NHWC", "bin_major", (2, 3), 0.5, 2)
    out = jax.jit(jax.vmap(op, in_axes=(2, None), out_axes=1))(batch, rois)
    single = np.asarray(op(nhwc, rois))
    np.testing.assert_allclose(out[:, 1], 2 * single, atol=1e-12)
    fn = lambda f: jnp.sin(op(f, rois))
    check_grads(fn, (nhwc,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("channel_order", CHANNEL_ORDERS)
def test_nhwc_lowers_without_transposes(channel_order):
    # No hidden copies: the feature map is never transposed, forward or back.
    features = np.zeros((1, 6, 7, 8 * 4), np.float32)
    rois = np.zeros((3, 5), np.float32)
    op = _op("NHWC", channel_order, 2, 1.0, 2)
    loss = lambda f: jnp.sum(op(f, rois) ** 2)
    text = jax.jit(jax.value_and_grad(loss)).lower(features).as_text()
    assert f"custom_call @{target('forward', np.float32, 'NHWC')}" in text
    assert f"custom_call @{target('backward', np.float32, 'NHWC')}" in text
    assert "transpose" not in text
    assert f"channel_order = {1 if channel_order == 'bin_major' else 0} : i64" in text


@pytest.mark.skipif(not _extension.KERNELS["cuda"], reason="built without CUDA")
def test_nhwc_exports_for_cpu_and_cuda():
    features = np.zeros((2, 6, 7, 8 * 4), np.float32)
    rois = np.zeros((3, 5), np.float32)
    op = _op("NHWC", "bin_major", 2, 1.0, 2)
    exported = export.export(
        jax.jit(jax.grad(lambda f, r: jnp.sum(op(f, r) ** 2))), platforms=["cpu", "cuda"],
        disabled_checks=jax_psroi.export_safety_checks())(features, rois)
    text = exported.mlir_module()
    assert text.count(f"@{target('forward', np.float32, 'NHWC')}") == 2
    assert text.count(f"@{target('backward', np.float32, 'NHWC')}") == 2
    restored = export.deserialize(exported.serialize())
    rng = np.random.default_rng(45)
    features = rng.normal(size=features.shape).astype(np.float32)
    rois = random_rois(rng, 3, 2, 6, 7, 1.0, np.float32)
    np.testing.assert_array_equal(
        restored.call(features, rois),
        jax.jit(jax.grad(lambda f, r: jnp.sum(op(f, r) ** 2)))(features, rois))


def test_bad_layout_arguments_name_themselves():
    features = np.zeros((1, 8, 4, 4), np.float32)
    rois = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="data_format must be 'NCHW' or 'NHWC', got 'NWHC'"):
        jax_psroi.ps_roi_align(features, rois, 2, data_format="NWHC")
    with pytest.raises(ValueError, match="channel_order must be 'torchvision' or 'bin_major'"):
        jax_psroi.ps_roi_align(features, rois, 2, channel_order="tf")
    with pytest.raises(ValueError, match=r"axis 3 of \[N, H, W, C\].*axis 1 \(8\) is a "
                                         r"multiple of 4: .*data_format='NCHW'"):
        jax_psroi.ps_roi_align(features[:, :, :, :3], rois, 2, data_format="NHWC")
    with pytest.raises(TypeError):
        jax_psroi.ps_roi_align(features, rois, 2, 1.0, 2, "NHWC")  # keyword-only


@pytest.mark.parametrize("shape", [(1, 0, 5), (1, 5, 0)])
@pytest.mark.parametrize("operator", ["ps_roi_align", "roi_align", "deform_ps_roi_align",
                                      "deform_roi_align"])
def test_references_differentiate_maps_without_pixels(operator, shape):
    # Every derivative is 0, as the kernels' are; the references' interpolation
    # weights were a scatter into the empty axis, whose transpose raised.
    n, h, w = shape
    features = np.zeros((n, 8, h, w), np.float32)
    rois = np.array([[0, 0.5, 1, 3, 2.5], [0, 0, 0, 4, 4]], np.float32)
    offset = np.full((2, 2, 2, 2), 0.1, np.float32)
    args = (features, rois, offset) if operator.startswith("deform") else (features, rois)
    settings = dict(aligned=True) if operator == "roi_align" else {}
    for function in (getattr(jax_psroi, operator), getattr(jax_psroi, operator + "_reference")):
        grads = jax.grad(lambda *a, f=function: f(*a, 2, 1.0, 2, **settings).sum(),
                         argnums=tuple(range(len(args))))(*args)
        for grad, arg in zip(grads, args, strict=True):
            assert grad.shape == arg.shape
            np.testing.assert_array_equal(grad, 0)


@pytest.mark.parametrize("dtype", [*EXACT_DTYPES, jnp.bfloat16])
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 0, 5), (1, 5, 0), (0, 5, 5)])
def test_maps_without_pixels_or_images_read_nothing(shape, data_format, dtype):
    # With N = 0 a batch index in (-1, 0) would truncate to image 0, and with
    # H or W = 0 the border rule would take pixel -1: both read nothing.
    n, h, w = shape
    nchw = np.zeros((n, 8, h, w), np.float32)
    features = jnp.asarray(features_as(nchw, data_format, "torchvision", (2, 2)), dtype)
    rois = np.array([[-0.5, 0, -1, 3, 0.2], [0, 0, 0, 4, 4]], np.float32)
    op = lambda f: jax_psroi.ps_roi_align(f, rois, 2, 1.0, 2, data_format=data_format)
    out, vjp = jax.vjp(op, features)
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0)
    grad = vjp(jnp.ones_like(out))[0]
    assert grad.shape == features.shape
