"""Deformable RoI Align and PS-RoI Align (jax_psroi/_deformable.py,
lib/deformable.h).

The oracles: loops written from the paper's equations with mmcv's
semantics (loop_reference.py), the jax.numpy reference
(reference_deformable.py) differentiated by JAX, finite differences in
float64, and the plain operators, which an offset of zero must equal bit
for bit. Every native check runs on the CPU kernels and, through the test
rig, on the CUDA kernels' code.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_psroi

from cases import (
    KERNELS,
    LAYOUTS,
    deformable_kernels,
    features_as,
    hostile_rois,
    native_gpu_schedule,
    random_features,
    random_rois,
    whole_pixel_rois,
)
from loop_reference import deform_roi_align_loops

SCALE = 0.5
SIZE = (3, 2)  # unequal: rows and columns are not mixed up
GAMMA = 0.1
OPERATIONS = ("deform_roi_align", "deform_ps_roi_align")

def _case(rng, operation, dtype=np.float64, n=2, h=9, w=11, k=6, c_out=2):
    """(features [N, C, H, W], boxes [K, 5], offset [K, 2, PH, PW])."""
    bins = SIZE[0] * SIZE[1]
    c = c_out * bins if operation == "deform_ps_roi_align" else c_out
    features = random_features(rng, n, c, h, w, dtype)
    boxes = random_rois(rng, k, n, h, w, SCALE, np.float64, outside=0.3)
    offset = rng.uniform(-1.5, 1.5, size=(k, 2, *SIZE))
    return features, boxes, offset


def _op(operation, sampling_ratio=-1, data_format="NCHW", channel_order="torchvision"):
    """(features, boxes, offset) -> pooled, and its reference."""
    kw = dict(data_format=data_format)
    if operation == "deform_ps_roi_align":
        kw["channel_order"] = channel_order
    native = getattr(jax_psroi, operation)
    reference = getattr(jax_psroi, f"{operation}_reference")
    return (lambda f, b, o: native(f, b, o, SIZE, SCALE, sampling_ratio, GAMMA, **kw),
            lambda f, b, o: reference(f, b, o, SIZE, SCALE, sampling_ratio, GAMMA, **kw))


def _shared(*values):
    """`values` as the cached cases below hand them to every test that
    shares them: their numpy arrays read-only, so no test can change
    another's case."""
    for value in values:
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return values


@functools.cache
def _loops_case(operation, sampling_ratio, dtype):
    """test_matches_loops's case, the loops' pooled tensor and the
    reference's, shared by its kernels (switching to the rig clears JAX's
    caches, and the reference would compile again, operation by
    operation)."""
    features, boxes, offset = _case(np.random.default_rng(0), operation, dtype)
    _, reference = _op(operation, sampling_ratio)
    expected = deform_roi_align_loops(features, boxes, offset, SIZE, SCALE, sampling_ratio,
                                      GAMMA, operation == "deform_ps_roi_align")
    return _shared(features, boxes, offset, expected,
                   np.asarray(reference(features, boxes, offset)))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_loops(kernels, operation, sampling_ratio, dtype):
    features, boxes, offset, expected, pooled = _loops_case(operation, sampling_ratio, dtype)
    op, _ = _op(operation, sampling_ratio)
    tolerance = 1e-12 if dtype == np.float64 else 2e-5
    with deformable_kernels(kernels):
        np.testing.assert_allclose(op(features, boxes, offset), expected, rtol=tolerance,
                                   atol=tolerance)
    np.testing.assert_allclose(pooled, expected, rtol=tolerance, atol=tolerance)
    assert np.abs(expected).max() > 0.1  # the offsets move real samples


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_zero_offset_is_the_plain_operator_bit_for_bit(kernels, data_format, dtype):
    rng = np.random.default_rng(1)
    features, boxes, _ = _case(rng, "deform_ps_roi_align", np.float32, k=9)
    features = features_as(jnp.asarray(features, dtype), data_format, "torchvision", SIZE)
    shared = features[..., :3] if data_format == "NHWC" else features[:, :3]
    with deformable_kernels(kernels):
        ps = jax_psroi.deform_ps_roi_align(features, boxes, None, SIZE, SCALE,
                                           data_format=data_format)
        align = jax_psroi.deform_roi_align(shared, boxes, np.zeros((9, 2, *SIZE)), SIZE, SCALE,
                                           data_format=data_format)
    if kernels == "cpu":
        plain_ps = jax_psroi.ps_roi_align(features, boxes, SIZE, SCALE, data_format=data_format)
        plain_align = jax_psroi.roi_align(shared, boxes, SIZE, SCALE, aligned=True,
                                          data_format=data_format)
    else:  # the plain operators' CUDA forward on the rig
        rois = jnp.asarray(boxes, jnp.float64 if dtype == "float64" else jnp.float32)
        plain_ps = native_gpu_schedule("forward", features, rois, ps.shape, SCALE, -1,
                                       data_format)
        plain_align = native_gpu_schedule("forward", shared, rois, align.shape, SCALE, -1,
                                          data_format, aligned=True)
    assert np.abs(np.asarray(ps, np.float64)).max() > 0.1
    np.testing.assert_array_equal(np.asarray(ps, np.float64), np.asarray(plain_ps, np.float64))
    np.testing.assert_array_equal(np.asarray(align, np.float64),
                                  np.asarray(plain_align, np.float64))


class LayoutsTest(chex.TestCase):
    """Every layout, channel order and dtype against the reference, jitted
    and not."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_layouts_orders_and_dtypes(self):
        rng = np.random.default_rng(2)
        for operation in OPERATIONS:
            orders = ["torchvision", "bin_major"] if operation == "deform_ps_roi_align" else [
                "torchvision"]
            features, boxes, offset = _case(rng, operation, np.float32)
            for data_format in LAYOUTS:
                for order in orders:
                    for dtype in ("float32", "bfloat16", "float16", "float64"):
                        op, reference = _op(operation, 2, data_format, order)
                        if operation == "deform_roi_align":
                            x = features_as(features, data_format, "torchvision", (1, 1))
                        else:
                            x = features_as(features, data_format, order, SIZE)
                        x = jnp.asarray(x, dtype)
                        out = self.variant(op)(x, boxes, offset)
                        expected = reference(x, boxes, offset)
                        chex.assert_equal(out.dtype, jnp.dtype(dtype))
                        chex.assert_shape(out, expected.shape)
                        tolerance = 2e-2 if dtype in ("bfloat16", "float16") else 1e-5
                        np.testing.assert_allclose(np.asarray(out, np.float64),
                                                   np.asarray(expected, np.float64),
                                                   rtol=tolerance, atol=tolerance)


def _loss(op, cotangent):
    return lambda f, b, o: jnp.sum(op(f, b, o) * cotangent)


@functools.cache
def _gradient_case(operation, data_format):
    """test_gradients_match_the_reference's case, cotangent and the
    reference's gradients, shared by its kernels: compiled, one program
    (eagerly, each operation of the reference and of its gradient compiles
    on its own)."""
    rng = np.random.default_rng(3)
    features, boxes, offset = _case(rng, operation)
    _, reference = _op(operation, -1, data_format)
    features = features_as(features, data_format, "torchvision",
                           SIZE if operation == "deform_ps_roi_align" else (1, 1))
    cotangent = rng.normal(size=jax.eval_shape(reference, features, boxes, offset).shape)
    expected = jax.jit(jax.grad(_loss(reference, cotangent), argnums=(0, 1, 2)))(
        features, boxes, offset)
    return _shared(features, boxes, offset, cotangent, expected)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_gradients_match_the_reference(kernels, operation, data_format):
    features, boxes, offset, cotangent, expected = _gradient_case(operation, data_format)
    op, _ = _op(operation, -1, data_format)
    with deformable_kernels(kernels):
        grads = jax.jit(jax.grad(_loss(op, cotangent), argnums=(0, 1, 2)))(
            features, boxes, offset)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert np.abs(grads[1][:, 1:]).max() > 1e-3 and np.abs(grads[2]).max() > 1e-3
    np.testing.assert_array_equal(grads[1][:, 0], 0)  # the batch index


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_check_grads_in_boxes_and_offsets(kernels, operation, sampling_ratio):
    """Finite differences in float64, both modes, away from the points
    where the pooled tensor is not differentiable (random boxes and
    offsets almost surely are)."""
    features, boxes, offset = _case(np.random.default_rng(4), operation, k=4)
    op, _ = _op(operation, sampling_ratio)
    with deformable_kernels(kernels):
        # The corners only: the batch index is piecewise constant (truncated).
        # Compiled: eagerly, every evaluation dispatches each operation of
        # the box derivatives on its own.
        check_grads(jax.jit(lambda c, o: op(features, jnp.concatenate([boxes[:, :1], c], axis=1),
                                            o)),
                    (boxes[:, 1:], offset), order=1, modes=("fwd", "rev"), eps=1e-6)
        check_grads(lambda f: op(f, boxes, offset), (features,), order=2,
                    modes=("fwd", "rev"))


@pytest.mark.parametrize("operation", OPERATIONS)
def test_mixed_second_derivatives_and_higher_orders(operation):
    """Mixed feature/box second derivatives (first order in the boxes) are
    exact; a second derivative in the boxes or offsets raises."""
    features, boxes, offset = _case(np.random.default_rng(5), operation, k=3)
    op, reference = _op(operation)

    def mixed(fn):  # compiled: one program, not each operation on its own
        return jax.jit(jax.jacfwd(jax.grad(lambda f, b: jnp.sum(fn(f, b, offset) ** 2) / 2),
                                  argnums=1))(features, boxes)

    np.testing.assert_allclose(mixed(op), mixed(reference), rtol=1e-8, atol=1e-8)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.hessian(lambda o: jnp.sum(op(features, boxes, o)))(offset)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_undifferentiated_boxes_and_offsets_cost_nothing(operation):
    features, boxes, offset = _case(np.random.default_rng(6), operation, k=3)
    op, _ = _op(operation)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda f: jnp.sum(op(f, boxes, offset))))(features))
    assert "box_parameter=0" in jaxpr and "box_parameter=1" not in jaxpr
    assert f"{operation}_backward" in jaxpr
    text = jax.jit(jax.grad(lambda f: jnp.sum(op(f, boxes, offset)))).lower(features).as_text()
    assert f"jax_psroi_{operation}_backward_nchw_f64" in text


@pytest.mark.parametrize("operation", OPERATIONS)
def test_vmap_is_one_launch_and_matches_a_loop(operation):
    rng = np.random.default_rng(7)
    batch = [_case(rng, operation, n=2, k=4) for _ in range(3)]
    features, boxes, offset = (np.stack(parts) for parts in zip(*batch, strict=True))
    op, _ = _op(operation)
    out = jax.vmap(op)(features, boxes, offset)
    for b in range(3):
        np.testing.assert_allclose(out[b], op(features[b], boxes[b], offset[b]), rtol=1e-12)
    # The gradients compiled: eagerly, each operation of the box derivatives
    # compiles on its own.
    grad = jax.grad(lambda f, b, o: jnp.sum(op(f, b, o) ** 2), argnums=(0, 1, 2))
    grads = jax.jit(jax.vmap(grad))(features, boxes, offset)
    single = jax.jit(grad)
    for b in range(3):
        want = single(features[b], boxes[b], offset[b])
        for got, expected in zip(grads, want, strict=True):
            np.testing.assert_allclose(got[b], expected, rtol=1e-10, atol=1e-12)
    # Boxes and offsets mapped over one set of images.
    shared = jax.vmap(op, in_axes=(None, 0, 0))(features[0], boxes, offset)
    for b in range(3):
        np.testing.assert_allclose(shared[b], op(features[0], boxes[b], offset[b]), rtol=1e-12)
    jaxpr = str(jax.make_jaxpr(jax.vmap(op))(features, boxes, offset))
    assert jaxpr.count(f"{operation}[") == 1


def _pooled_and_gradient(op):
    """(features, boxes, offset) -> (pooled, the gradients of its sum),
    compiled as one program (eagerly, each operation of the gradient, and
    the XLA path's forward, compile on their own)."""
    loss = lambda f, b, o: jnp.sum(op(f, b, o))
    return jax.jit(lambda f, b, o: (op(f, b, o), jax.grad(loss, argnums=(0, 1, 2))(f, b, o)))


@functools.cache
def _hostile_case(operation):
    """The hostile case of `operation`, and the reference's pooled tensor
    and gradients on it, shared by the kernels."""
    features, _, _ = _case(np.random.default_rng(8), operation, n=2, h=8, w=8)
    boxes = hostile_rois(2, 8, 8, np.float64)
    k = len(boxes)
    offset = np.full((k, 2, *SIZE), 0.25)
    offset[0, 0, 0, 0] = np.nan       # one bin of a sane box
    offset[0, 1, 1, 1] = 1e300        # moved far off the map
    offset[10, :, :, :] = -np.inf
    _, reference = _op(operation)
    pooled, gradients = _pooled_and_gradient(reference)(features, boxes, offset)
    return _shared(features, boxes, offset, pooled, gradients)


@pytest.mark.parametrize("kernels", [*KERNELS, "xla"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_hostile_boxes_and_offsets_read_nothing_and_differentiate_as_the_reference(
        kernels, operation, monkeypatch):
    features, boxes, offset, expected, reference_grads = _hostile_case(operation)
    op, _ = _op(operation)
    if kernels == "xla":
        monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "xla")
    with deformable_kernels("cpu" if kernels == "xla" else kernels):
        program = _pooled_and_gradient(op)
        text = program.lower(features, boxes, offset).as_text()
        assert ("custom_call" in text) == (kernels != "xla")
        out, grads = program(features, boxes, offset)
    assert out[0, :, 0, 0].tolist() == [0] * out.shape[1]  # the NaN offset's bin
    assert np.abs(out[0]).max() > 0  # the box's other bins
    # Every RoI, the huge boxes' grids of 3e5 and 2**23 samples included:
    # values, and the features', boxes' and offsets' gradients (finite).
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    for name, grad, reference_grad in zip(("features", "boxes", "offset"), grads,
                                          reference_grads, strict=True):
        assert np.isfinite(reference_grad).all()
        np.testing.assert_allclose(grad, reference_grad, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_boxes_give_an_empty_result(operation):
    features, _, _ = _case(np.random.default_rng(25), operation)
    op, reference = _op(operation)
    boxes, offset = np.zeros((0, 5)), np.zeros((0, 2, *SIZE))
    for fn in (op, reference):
        out = fn(features, boxes, offset)
        assert out.shape == (0, 2, *SIZE) and out.dtype == features.dtype


def test_arguments_are_checked():
    features, boxes, offset = _case(np.random.default_rng(9), "deform_roi_align")
    with pytest.raises(ValueError, match=r"offset must be \[K, 2, h, w\]"):
        jax_psroi.deform_roi_align(features, boxes, offset[:, :1], SIZE, SCALE)
    with pytest.raises(TypeError, match="offset must be a real"):
        jax_psroi.deform_roi_align(features, boxes, offset > 0, SIZE, SCALE)
    with pytest.raises(ValueError, match="gamma must be a finite"):
        jax_psroi.deform_roi_align(features, boxes, offset, SIZE, SCALE, gamma=float("nan"))
    for bad in ("0.1", None, True, np.True_):
        with pytest.raises(TypeError, match="gamma must be a real number, got"):
            jax_psroi.deform_roi_align(features, boxes, offset, SIZE, SCALE, gamma=bad)
    with pytest.raises(TypeError, match="gamma must be a real number known at trace time"):
        jax.jit(lambda g: jax_psroi.deform_roi_align(features, boxes, offset, SIZE, SCALE,
                                                     gamma=g))(0.1)
    np.testing.assert_array_equal(
        jax_psroi.deform_roi_align(features, boxes, offset, SIZE, SCALE, gamma=np.float32(0.25)),
        jax_psroi.deform_roi_align(features, boxes, offset, SIZE, SCALE, gamma=0.25))
    # Finite in the kernels' compute dtype (float32 for 32- and 16-bit maps).
    for dtype in (np.float32, jnp.bfloat16):
        with pytest.raises(ValueError, match="gamma must be finite in float32"):
            jax_psroi.deform_roi_align(features.astype(dtype), boxes, offset, SIZE, SCALE,
                                       gamma=1e39)
    assert jax.eval_shape(lambda f: jax_psroi.deform_roi_align(
        f, boxes, offset, SIZE, SCALE, gamma=1e39), features).dtype == np.float64
    with pytest.raises(ValueError):
        jax_psroi.deform_ps_roi_align(features, boxes, offset, SIZE, SCALE)  # C % (h * w)


@pytest.mark.parametrize(("sampling_ratio", "data_format", "channel_order"),
                         [(-1, "NCHW", "torchvision"), (2, "NHWC", "bin_major"),
                          (7, "NHWC", "torchvision"), (80, "NCHW", "bin_major")])
def test_xla_path_matches_the_native_kernels(monkeypatch, sampling_ratio, data_format,
                                             channel_order):
    """The XLA path's taps: adaptive grids and fixed ones past 4 samples
    from tables of pixel weights, small fixed grids sample by sample."""
    monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "xla")
    for operation in OPERATIONS:
        features, boxes, offset = _case(np.random.default_rng(10), operation, k=4)
        order = channel_order if operation == "deform_ps_roi_align" else "torchvision"
        features = features_as(features, data_format, order, SIZE)
        op, _ = _op(operation, sampling_ratio, data_format, channel_order)
        shape = jax.eval_shape(op, features, boxes, offset).shape
        cotangent = np.random.default_rng(11).normal(size=shape)
        loss = _loss(op, cotangent)
        # The program checked is the one run (lowered once).
        xla = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(features, boxes, offset)
        assert "jax_psroi_" not in xla.as_text()
        got = xla.compile()(features, boxes, offset)
        monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "native")
        # Compiled too, from a loss of its own: traced now, on the native kernels.
        want = jax.jit(jax.value_and_grad(_loss(op, cotangent), argnums=(0, 1, 2)))(
            features, boxes, offset)
        monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "xla")
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampling_ratio", [-1, 5])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_xla_path_derivatives_at_samples_on_whole_pixels(monkeypatch, operation, sampling_ratio):
    """Zero offsets and boxes whose samples fall on whole pixels: a tap of
    weight 0 whose derivative is not, which the XLA path's tables of pixel
    weights must keep (the boxes' and the offsets' gradients)."""
    features, _, _ = _case(np.random.default_rng(23), operation)
    boxes = whole_pixel_rois(np.random.default_rng(24), 8, 2, 9, 11, SCALE, SIZE)
    offset = np.zeros((8, 2, *SIZE))
    op, _ = _op(operation, sampling_ratio)
    # A new function for each implementation, which is chosen when it is traced.
    gradient = lambda: jax.jit(jax.grad(lambda f, b, o: jnp.sum(jnp.sin(op(f, b, o))),
                                        argnums=(0, 1, 2)))
    native = gradient()(features, boxes, offset)
    monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "xla")
    on_the_xla_path = gradient()
    assert "jax_psroi_" not in on_the_xla_path.lower(features, boxes, offset).as_text()
    xla = on_the_xla_path(features, boxes, offset)
    assert np.abs(native[1]).max() > 0.1 and np.abs(native[2]).max() > 0.1
    for got, want in zip(xla, native, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("sampling_ratio", [-1, 3, 80])
def test_cpu_and_cuda_backward_give_the_same_bits(sampling_ratio, data_format):
    """The CPU's backward units (every channel of a band, its bins' outputs
    8 at a time) and the CUDA kernels' (one channel each) add the same
    terms in the same order: the same feature gradient, bit for bit, for
    grids summed sample by sample and, past kPerSampleGrid (sampling ratio
    80), pixel by pixel in kernels of their own. The boxes' and offsets'
    gradients come from the forward's derivative directions, which the CPU
    sums from its tables: close."""
    rng = np.random.default_rng(21)
    features, boxes, offset = _case(rng, "deform_ps_roi_align", np.float32, h=12, k=10,
                                    c_out=10)
    if data_format == "NHWC":
        features = np.transpose(features, (0, 2, 3, 1))
    op, reference = _op("deform_ps_roi_align", sampling_ratio, data_format)
    pooled_shape = jax.eval_shape(op, features, boxes, offset).shape
    cotangent = rng.normal(size=pooled_shape).astype(np.float32)
    grad = jax.jit(jax.grad(_loss(op, cotangent), argnums=(0, 1, 2)))
    grads = {}
    for kernels in KERNELS:
        kernels = getattr(kernels, "values", [kernels])[0]
        with deformable_kernels(kernels):
            grads[kernels] = [np.asarray(g) for g in grad(features, boxes, offset)]
    np.testing.assert_array_equal(grads["cpu"][0], grads["gpu_schedule"][0])
    assert np.abs(grads["cpu"][0]).max() > 0.1
    for cpu, rig in zip(grads["cpu"][1:], grads["gpu_schedule"][1:], strict=True):
        np.testing.assert_allclose(cpu, rig, rtol=1e-5, atol=1e-5)
    # Compiled: eagerly, each operation of the reference's gradient compiles on its own.
    want = jax.jit(jax.grad(_loss(reference, cotangent), argnums=(0, 1, 2)))(features, boxes,
                                                                             offset)
    for got, expected in zip(grads["cpu"], want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


@functools.cache
def _reproducible_case():
    """test_backward_is_bitwise_reproducible_and_pooled_as_reference's case,
    cotangent and the reference's feature gradient (compiled), shared by
    its kernels."""
    features, boxes, offset = _case(np.random.default_rng(12), "deform_roi_align", np.float32,
                                    h=20, k=40)
    _, reference = _op("deform_roi_align")
    cotangent = np.random.default_rng(13).normal(size=(40, 2, *SIZE)).astype(np.float32)
    want = jax.jit(jax.grad(_loss(reference, cotangent)))(features, boxes, offset)
    return _shared(features, boxes, offset, cotangent, want)


@pytest.mark.parametrize("kernels", KERNELS)
def test_backward_is_bitwise_reproducible_and_pooled_as_reference(kernels):
    """The backward's units own their part of the gradient: the same bits
    on every run, however the threads split it."""
    features, boxes, offset, cotangent, want = _reproducible_case()
    op, _ = _op("deform_roi_align")
    with deformable_kernels(kernels):
        grad = jax.jit(jax.grad(_loss(op, cotangent)))
        first = np.asarray(grad(features, boxes, offset))
        for _ in range(3):
            np.testing.assert_array_equal(np.asarray(grad(features, boxes, offset)), first)
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-5)


def test_flax_modules():
    from jax_psroi.flax import linen, nnx

    rng = np.random.default_rng(14)
    for operation, name in (("deform_roi_align", "DeformRoIAlign"),
                            ("deform_ps_roi_align", "DeformPSRoIAlign")):
        features, boxes, offset = _case(rng, operation, np.float32)
        nhwc = features.transpose(0, 2, 3, 1)
        expected = getattr(jax_psroi, operation)(nhwc, boxes, offset, SIZE, SCALE, 2, 0.2,
                                                 data_format="NHWC")
        layer = getattr(linen, name)(SIZE, SCALE, 2, gamma=0.2)
        np.testing.assert_array_equal(layer.apply({}, nhwc, boxes, offset), expected)
        module = getattr(nnx, name)(SIZE, SCALE, 2, 0.2)
        np.testing.assert_array_equal(module(nhwc, boxes, offset), expected)
        plain = layer.apply({}, nhwc, boxes)  # no offset: the plain operator's sampling
        np.testing.assert_array_equal(plain, layer.apply({}, nhwc, boxes, np.zeros_like(offset)))
        assert repr(layer).startswith(f"{name}(output_size=(3, 2), spatial_scale=0.5, "
                                      "sampling_ratio=2, gamma=0.2, data_format='NHWC'")
    with pytest.raises(ValueError, match="gamma"):
        linen.DeformRoIAlign(7, gamma=float("inf"))
    with pytest.raises(TypeError, match="gamma must be a real number"):
        linen.DeformRoIAlign(7, gamma="1e-1")


@pytest.mark.parametrize("platform", ["tpu", "rocm"])
def test_platforms_without_kernels_lower_to_the_xla_path(platform):
    features, boxes, offset = _case(np.random.default_rng(15), "deform_ps_roi_align", k=3)
    op, _ = _op("deform_ps_roi_align")
    loss = jax.value_and_grad(lambda f, b, o: jnp.sum(op(f, b, o) ** 2), argnums=(0, 1, 2))
    text = jax.jit(loss).trace(features, boxes, offset).lower(
        lowering_platforms=(platform,)).as_text()
    assert "custom_call" not in text and "jax_psroi" not in text
