"""Exact derivatives with respect to the boxes (jax_psroi/_box_derivatives.py).

The oracles: finite differences in float64 (jax.test_util.check_grads, away
from the points where the pooled tensor is not differentiable: random
boxes almost surely are), and the jax.numpy reference differentiated by JAX.
The native kernels' box directions run on the CPU and, through the test
rig, as the CUDA kernels' schedule.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_psroi
from jax_psroi import _averaging, _operators

from cases import (
    CHANNEL_ORDERS,
    LAYOUTS,
    features_as,
    hostile_rois,
    native_gpu_schedule,
    random_features,
    random_rois,
    whole_pixel_rois,
)

SCALE = 0.5
SIZE = (3, 2)  # unequal: the bins' rows and columns are not mixed up


def _operator(name, data_format="NCHW", channel_order="torchvision", sampling_ratio=-1):
    """(features, boxes) -> pooled, and its reference."""
    if name == "ps_roi_align":
        kw = dict(data_format=data_format, channel_order=channel_order)
        return (lambda f, b: jax_psroi.ps_roi_align(f, b, SIZE, SCALE, sampling_ratio, **kw),
                lambda f, b: jax_psroi.ps_roi_align_reference(f, b, SIZE, SCALE,
                                                              sampling_ratio, **kw))
    aligned = name == "roi_align_aligned"
    kw = dict(aligned=aligned, data_format=data_format)
    return (lambda f, b: jax_psroi.roi_align(f, b, SIZE, SCALE, sampling_ratio, **kw),
            lambda f, b: jax_psroi.roi_align_reference(f, b, SIZE, SCALE, sampling_ratio, **kw))


OPERATORS = ["ps_roi_align", "roi_align_aligned", "roi_align"]


def _case(seed, dtype=np.float64, images=2, boxes_per_image=5):
    rng = np.random.default_rng(seed)
    features = random_features(rng, images, 12, 9, 11, dtype)
    rois = random_rois(rng, images * boxes_per_image, images, 9, 11, SCALE, dtype)
    # A list of [L, 4] boxes per image: the batch index is not a coordinate.
    boxes = [rois[rois[:, 0] == b, 1:] for b in range(images)]
    return rng, features, boxes


def _layout(features, data_format, channel_order):
    return features_as(features, data_format, channel_order, SIZE)


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_check_grads_with_respect_to_boxes(name, sampling_ratio, data_format):
    _, features, boxes = _case(1)
    features = _layout(features, data_format, "torchvision")
    op, _ = _operator(name, data_format, sampling_ratio=sampling_ratio)
    fn = lambda b: jnp.sin(op(features, b))
    check_grads(fn, (boxes,), order=1, modes=("fwd", "rev"), eps=1e-6)
    assert np.abs(np.asarray(jax.grad(lambda b: jnp.sum(fn(b)))(boxes)[0])).max() > 0.01


@pytest.mark.parametrize("name,data_format,channel_order",
                         [(n, f, o) for n in OPERATORS for f in LAYOUTS for o in CHANNEL_ORDERS
                          if n == "ps_roi_align" or o == "torchvision"])
def test_box_gradient_equals_the_references(name, data_format, channel_order):
    rng, features, boxes = _case(2)
    features = _layout(features, data_format, channel_order)
    op, reference = _operator(name, data_format, channel_order)
    out = op(features, boxes)
    cotangent = rng.normal(size=out.shape)
    loss = lambda fn: lambda f, b: jnp.sum(fn(f, b) * cotangent)
    # Each derivative compiled as one program (the operators' eager calls
    # are tested in test_operators.py).
    native = jax.jit(jax.grad(loss(op), argnums=(0, 1)))(features, boxes)
    expected = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(features, boxes)
    np.testing.assert_allclose(native[0], expected[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(native[1], expected[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        assert np.abs(want).max() > 0.01
    # Forward mode, through jvp and jacfwd.
    tangent = [rng.normal(size=b.shape) for b in boxes]
    box_jvp = lambda fn: jax.jit(lambda b, t: jax.jvp(lambda b: fn(features, b), (b,), (t,))[1])
    np.testing.assert_allclose(box_jvp(op)(boxes, tangent), box_jvp(reference)(boxes, tangent),
                               rtol=1e-9, atol=1e-9)
    of_first_boxes = lambda b: op(features, [b, boxes[1]])
    np.testing.assert_allclose(jax.jit(jax.jacfwd(of_first_boxes))(boxes[0]),
                               jax.jit(jax.jacrev(of_first_boxes))(boxes[0]),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampling_ratio", [-1, 2, 70])
def test_xla_path_box_derivatives_equal_the_native_ones(sampling_ratio, monkeypatch):
    # 70 samples per bin axis: the XLA path's and the kernels' per-pixel sums.
    _, features, boxes = _case(15)
    op, _ = _operator("roi_align", "NHWC", sampling_ratio=sampling_ratio)
    features = _layout(features, "NHWC", "torchvision")
    loss = lambda f, b: jnp.sum(jnp.sin(op(f, b)))
    mixed = lambda f, b: jnp.sum(jax.grad(loss, argnums=1)(f, b)[0] ** 2)
    # Compiled as one program each; a new function for each implementation,
    # which is chosen when it is traced.
    derivatives = lambda: jax.jit(
        lambda f, b: (jax.grad(loss, argnums=1)(f, b), jax.grad(mixed)(f, b)))
    native = derivatives()(features, boxes)
    monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "xla")
    on_the_xla_path = derivatives()
    assert "custom_call" not in on_the_xla_path.lower(features, boxes).as_text()
    xla = on_the_xla_path(features, boxes)
    for got, want in zip(jax.tree.leaves(xla), jax.tree.leaves(native), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampling_ratio", [-1, 5])
@pytest.mark.parametrize("name", ["ps_roi_align", "roi_align_aligned"])
def test_xla_path_box_derivatives_at_samples_on_whole_pixels(name, sampling_ratio, monkeypatch):
    # The XLA path's per-pixel tables (adaptive grids, fixed ones past 4
    # samples) must keep a tap of weight 0 whose derivative is not.
    _, features, _ = _case(16)
    rois = whole_pixel_rois(np.random.default_rng(17), 12, 2, 9, 11, SCALE, SIZE)
    op, reference = _operator(name, sampling_ratio=sampling_ratio)
    loss = lambda fn: lambda f, r: jnp.sum(jnp.sin(fn(f, r)))
    # A new function for each implementation, which is chosen when it is traced.
    gradient = lambda: jax.jit(jax.grad(loss(op), argnums=(0, 1)))
    native = gradient()(features, rois)
    monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "xla")
    on_the_xla_path = gradient()
    assert "custom_call" not in on_the_xla_path.lower(features, rois).as_text()
    xla = on_the_xla_path(features, rois)
    expected = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(features, rois)
    assert np.abs(expected[1]).max() > 0.1
    for got in (native, xla):
        for g, want in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-9)


def test_rois_array_gets_no_batch_index_gradient():
    _, features, boxes = _case(3)
    rois = np.concatenate([np.column_stack([np.full(len(b), i), b])
                           for i, b in enumerate(boxes)])
    grad = jax.grad(lambda r: jnp.sum(jax_psroi.ps_roi_align(features, r, SIZE, SCALE) ** 2))(
        rois)
    np.testing.assert_array_equal(grad[:, 0], 0)
    as_list = jax.grad(lambda b: jnp.sum(jax_psroi.ps_roi_align(features, b, SIZE, SCALE) ** 2))(
        boxes)
    np.testing.assert_allclose(grad[:, 1:], np.concatenate(as_list), rtol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_mixed_second_derivatives_are_exact(sampling_ratio):
    # First order in the boxes, any order in the features: d/dfeatures of
    # the box gradient (reverse over reverse, and forward over reverse).
    _, features, boxes = _case(4)
    op, reference = _operator("roi_align_aligned", sampling_ratio=sampling_ratio)
    loss = lambda fn: lambda f, b: jnp.sum(jnp.sin(fn(f, b)))
    box_grad = lambda fn: lambda f: jax.grad(loss(fn), argnums=1)(f, boxes)[0]
    direction = np.random.default_rng(5).normal(size=features.shape)
    # Each derivative compiled as one program.
    forward_over_reverse = lambda fn: jax.jit(
        lambda f, d: jax.jvp(box_grad(fn), (f,), (d,))[1])
    np.testing.assert_allclose(forward_over_reverse(op)(features, direction),
                               forward_over_reverse(reference)(features, direction),
                               rtol=1e-9, atol=1e-9)
    weights = np.random.default_rng(6).normal(size=boxes[0].shape)
    projected = lambda fn: lambda f: jnp.sum(box_grad(fn)(f) * weights)
    np.testing.assert_allclose(jax.jit(jax.grad(projected(op)))(features),
                               jax.jit(jax.grad(projected(reference)))(features),
                               rtol=1e-9, atol=1e-9)
    # The hessian in the features is exact as before (the operator is linear).
    check_grads(lambda f: loss(op)(f, boxes), (features,), order=2, modes=("fwd", "rev"))


def test_second_derivatives_in_the_boxes_raise():
    _, features, boxes = _case(7)
    loss = lambda b: jnp.sum(jax_psroi.ps_roi_align(features, b, SIZE, SCALE) ** 2)
    with pytest.raises(NotImplementedError, match="second derivatives with respect to the boxes"):
        jax.hessian(loss)(boxes)


def test_unused_box_derivatives_cost_nothing():
    # Symbolic zeros: differentiating the features only, no box call.
    _, features, boxes = _case(8)
    loss = lambda f, b: jnp.sum(jax_psroi.ps_roi_align(f, b, SIZE, SCALE) ** 2)
    features_only = jax.jit(jax.grad(loss)).lower(features, boxes).as_text()
    assert "box_forward" not in features_only and "box_backward" not in features_only
    both = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(features, boxes).as_text()
    assert both.count("jax_psroi_ps_roi_align_box_forward_nchw_f64") == 4
    # Detached boxes, as torchvision-style training writes them.
    detached = lambda f, b: loss(f, jax.lax.stop_gradient(b))
    assert jax.grad(detached, argnums=1)(features, boxes)[0].sum() == 0


def test_vmap_of_the_box_gradient_is_a_loop():
    _, features, boxes = _case(9)
    op, _ = _operator("ps_roi_align")
    loss = lambda f, b: jnp.sum(jnp.sin(op(f[None], [b])))
    boxes = [b[:3] for b in boxes]
    stacked = np.stack(boxes)
    mapped = jax.jit(jax.vmap(jax.grad(loss, argnums=1)))(features, stacked)
    for i in range(len(boxes)):
        np.testing.assert_allclose(mapped[i], jax.grad(loss, argnums=1)(features[i], boxes[i]),
                                   rtol=1e-12, atol=1e-12)


def test_hostile_boxes_have_finite_zero_derivatives():
    features = random_features(np.random.default_rng(10), 2, 12, 9, 11, np.float64)
    rois = hostile_rois(2, 9, 11, np.float64)
    grad = jax.grad(lambda r: jnp.sum(jax_psroi.ps_roi_align(features, r, SIZE, 1.0) ** 2))(rois)
    assert np.isfinite(np.asarray(grad)).all()
    # An RoI that reads nothing (bad batch index, non-finite corners) has none.
    reads = np.asarray(jax_psroi.ps_roi_align(features, rois, SIZE, 1.0)).reshape(
        len(rois), -1).any(axis=1)
    np.testing.assert_array_equal(np.asarray(grad)[~reads], 0)


def test_whole_pixel_operators_have_zero_box_derivatives():
    # ps_roi_pool and roi_pool are piecewise constant in the boxes: their
    # exact derivative is zero almost everywhere.
    _, features, boxes = _case(11)
    for op in (lambda b: jax_psroi.ps_roi_pool(features, b, SIZE, SCALE),
               lambda b: jax_psroi.roi_pool(features, b, SIZE, SCALE)):
        grad = jax.grad(lambda b, op=op: jnp.sum(op(b) ** 2))(boxes)
        for g in grad:
            np.testing.assert_array_equal(g, 0)


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 1e-4), (jnp.bfloat16, 0.05),
                                             (np.float16, 0.01)])
def test_box_gradient_in_every_dtype(dtype, tolerance):
    _, features, boxes = _case(12)
    op, _ = _operator("ps_roi_align", "NHWC", "bin_major")
    features = _layout(features, "NHWC", "bin_major")
    loss = lambda f, b: jnp.sum(op(f, b).astype(jnp.float32) ** 2)
    exact = jax.grad(loss, argnums=1)(features, boxes)
    low = jax.grad(loss, argnums=1)(jnp.asarray(features, dtype),
                                    [jnp.asarray(b, dtype) for b in boxes])
    for got, want in zip(low, exact, strict=True):
        assert got.dtype == dtype
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tolerance * scale,
                                   rtol=0)


def _wide_16_bit_case(name):
    """(features [1, C, 32, 32] of a smooth ramp, ready for `name`; the
    function of the features and boxes [1, 4] whose box gradient (and
    offset gradient, deformable) the caller takes). 256 channels of 7 x 7
    bins: a RoI's box terms are thousands of products of one sign."""
    ramp = np.linspace(0, 60, 32, dtype=np.float32)
    channels = 16 * 49 if name == "ps_roi_align" else 256
    features = np.broadcast_to(ramp, (1, channels, 32, 32)).copy()
    size, scale = (7, 7), 0.25
    offset = np.random.default_rng(22).uniform(-0.3, 0.3, (1, 2, *size)).astype(np.float32)
    pooled = {
        "roi_align": lambda f, b: jax_psroi.roi_align(f, b, size, scale, 2),
        "ps_roi_align": lambda f, b: jax_psroi.ps_roi_align(f, b, size, scale, 2),
        "multi_scale_roi_align": lambda f, b: jax_psroi.multi_scale_roi_align(
            [f, f[:, :, ::2, ::2]], b, size, 2, (128, 128)),
        "deform_roi_align": lambda f, b, o: jax_psroi.deform_roi_align(
            f, b, o.astype(f.dtype), size, scale, 2, 0.1),
    }[name]
    if name == "deform_roi_align":
        return features, lambda f, b, o: jnp.sum(pooled(f, b, o).astype(jnp.float32)), offset
    return features, lambda f, b: jnp.sum(pooled(f, b).astype(jnp.float32)), None


@pytest.mark.parametrize("dtype,tolerance", [(np.float16, 2e-3), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ["roi_align", "ps_roi_align", "multi_scale_roi_align",
                                  "deform_roi_align"])
def test_16_bit_box_gradients_are_summed_in_float32(name, dtype, tolerance):
    # The per-RoI sums of the box terms (and the deformable offsets'
    # per-bin sums) are those of float32 on the same 16-bit values, not
    # sums in 16 bits (which overflow float16 and cancel bfloat16's).
    features, loss, offset = _wide_16_bit_case(name)
    features = np.asarray(jnp.asarray(features, dtype).astype(jnp.float32))
    box = [np.array([[10.3, 12.7, 100.9, 90.1]], np.float32)]
    operands = (box,) if offset is None else (box, offset)
    argnums = tuple(range(1, 1 + len(operands)))
    gradient = jax.jit(jax.grad(loss, argnums=argnums))
    exact = gradient(features, *operands)
    low = gradient(jnp.asarray(features, dtype), *operands)
    for got, want in zip(jax.tree.leaves(low), jax.tree.leaves(exact), strict=True):
        scale = np.abs(want).max()
        assert scale > 100
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tolerance * scale,
                                   rtol=0)


def test_multi_scale_roi_align_box_gradient():
    rng = np.random.default_rng(13)
    levels = [random_features(rng, 2, 4, 16, 16, np.float64),
              random_features(rng, 2, 4, 8, 8, np.float64)]
    boxes = [rng.uniform(0, 40, (6, 2)) for _ in range(2)]
    boxes = [np.concatenate([b, b + rng.uniform(20, 120, (6, 2))], axis=1) for b in boxes]
    op = lambda b: jnp.sin(jax_psroi.multi_scale_roi_align(levels, b, (3, 3), 2, (64, 64)))
    check_grads(op, (boxes,), order=1, modes=("fwd", "rev"), eps=1e-6)
    grad = jax.grad(lambda b: jnp.sum(op(b)))(boxes)
    assert all(np.abs(np.asarray(g)).max() > 0.01 for g in grad)


# --- The CUDA kernels' box directions on the test rig -------------------------

@pytest.mark.gpu_schedule
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("parameter", [1, 2, 3, 4])
def test_gpu_schedule_box_directions_equal_the_cpu_kernels(data_format, parameter):
    rng, features, boxes = _case(14)
    features = _layout(features, data_format, "bin_major")
    rois = np.concatenate([np.column_stack([np.full(len(b), i), b])
                           for i, b in enumerate(boxes)])
    op, _ = _operator("ps_roi_align", data_format, "bin_major", sampling_ratio=2)
    # The rig's box rows against the CPU kernels' (through the primitives'
    # native calls), and adjoint to each other.
    pooled = np.asarray(op(features, rois))
    layout = dict(data_format=data_format, channel_order="bin_major")
    forward = native_gpu_schedule("forward", features, rois, pooled.shape, SCALE, 2,
                                  box_parameter=parameter, **layout)
    cotangent = rng.normal(size=pooled.shape)
    backward = native_gpu_schedule("backward", cotangent, rois, features.shape, SCALE, 2,
                                   box_parameter=parameter, **layout)
    np.testing.assert_allclose(np.sum(forward * cotangent), np.sum(backward * features),
                               rtol=1e-10)
    cpu = partial(_averaging.native_call, _operators.PS_ROI_ALIGN, "cpu", spatial_scale=SCALE,
                  sampling_ratio=2, box_rule=_operators.BoxRule.samples(True),
                  image_groups=(0, 0), box_parameter=parameter, **layout)
    np.testing.assert_allclose(forward, cpu("forward", features, rois, pooled.shape),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backward, cpu("backward", cotangent, rois, features.shape),
                               rtol=1e-12, atol=1e-12)
    assert np.abs(forward).max() > 0.01
