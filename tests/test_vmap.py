"""vmap: every mapping combination equals a Python loop and is one launch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi

from cases import random_features, random_rois, target

B, N, C, H, W, K = 3, 2, 8, 6, 7, 4
OUT = 2


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(21)
    features = random_features(rng, B, N * C, H, W, np.float64).reshape(B, N, C, H, W)
    rois = np.stack([random_rois(rng, K, N, H, W, 1.0, np.float64)
                     for _ in range(B)])
    # An invalid batch index must stay invalid after folding, not point at
    # the next batch element's images.
    rois[1, 0, 0] = N
    rois[2, 1, 0] = -1
    return features, rois


def _op(features, rois):
    return jax_psroi.ps_roi_align(features, rois, OUT, 1.0, -1)


def _loop(features, rois, features_mapped, rois_mapped):
    outs = []
    for b in range(B):
        outs.append(_op(features[b] if features_mapped else features[0],
                        rois[b] if rois_mapped else rois[0]))
    return np.stack(outs)


@pytest.mark.parametrize("features_mapped,rois_mapped", [
    (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("jit", [False, True])
def test_forward_vmap_equals_loop(data, features_mapped, rois_mapped, jit):
    features, rois = data
    fn = jax.vmap(_op, in_axes=(0 if features_mapped else None,
                                0 if rois_mapped else None))
    fn = jax.jit(fn) if jit else fn
    out = fn(features if features_mapped else features[0],
             rois if rois_mapped else rois[0])
    expected = _loop(features, rois, features_mapped, rois_mapped)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_forward_vmap_other_axes(data):
    features, rois = data
    moved_features = jnp.moveaxis(features, 0, 3)  # [N, C, H, B, W]
    moved_rois = jnp.moveaxis(rois, 0, 1)           # [K, B, 5]
    out = jax.vmap(_op, in_axes=(3, 1), out_axes=2)(moved_features, moved_rois)
    expected = np.moveaxis(_loop(features, rois, True, True), 0, 2)
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_nested_vmap(data):
    features, rois = data
    # Outer axis over batch elements, inner over 2 scalings of the features.
    scaled = np.stack([features, 2 * features], axis=1)  # [B, 2, N, C, H, W]
    out = jax.vmap(jax.vmap(_op, in_axes=(0, None)), in_axes=(0, 0))(scaled, rois)
    base = _loop(features, rois, True, True)
    np.testing.assert_allclose(out[:, 0], base, atol=1e-12)
    np.testing.assert_allclose(out[:, 1], 2 * base, atol=1e-12)


def test_per_image_idiom():
    rng = np.random.default_rng(22)
    features = random_features(rng, B, 49 * 2, 10, 12, np.float32)
    boxes = random_rois(rng, B * 5, 1, 10, 12, 1 / 16, np.float32)[:, 1:]
    boxes = boxes.reshape(B, 5, 4)
    out = jax.vmap(lambda f, b: jax_psroi.ps_roi_align(f[None], [b], 7, 1 / 16, 2))(
        features, boxes)
    expected = jax_psroi.ps_roi_align(features, list(boxes), 7, 1 / 16, 2)
    assert out.shape == (B, 5, 2, 7, 7)
    np.testing.assert_allclose(out, np.asarray(expected).reshape(out.shape),
                               atol=1e-6)


def _loss(features, rois):
    return jnp.sum(jnp.sin(_op(features, rois)))


@pytest.mark.parametrize("features_mapped,rois_mapped", [
    (True, False), (False, True), (True, True)])
def test_vmap_of_grad_equals_loop(data, features_mapped, rois_mapped):
    features, rois = data
    fn = jax.jit(jax.vmap(jax.grad(_loss), in_axes=(
        0 if features_mapped else None, 0 if rois_mapped else None)))
    out = fn(features if features_mapped else features[0],
             rois if rois_mapped else rois[0])
    expected = np.stack([
        jax.grad(_loss)(features[b] if features_mapped else features[0],
                        rois[b] if rois_mapped else rois[0]) for b in range(B)])
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_grad_of_vmap_equals_loop(data):
    features, rois = data
    batched_loss = lambda f, r: jnp.sum(jax.vmap(_loss)(f, r))
    out = jax.grad(batched_loss)(features, rois)
    expected = np.stack([jax.grad(_loss)(features[b], rois[b]) for b in range(B)])
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_vmapped_call_is_one_custom_call_without_loops(data):
    features, rois = data
    text = jax.jit(jax.vmap(_op)).lower(features, rois).as_text()
    assert text.count(f"stablehlo.custom_call @{target('forward', np.float64)}") == 1
    assert "while" not in text


def test_training_step_runs_native_kernels_only():
    # A Flax-style step: a per-image head vmapped over the batch, under
    # jit(grad). The HLO must hold our kernels and none of the reference's
    # gathers, scatters or loops.
    rng = np.random.default_rng(23)
    features = random_features(rng, B, 3, 12, 14, np.float32)
    boxes = random_rois(rng, B * 6, 1, 12, 14, 1 / 4, np.float32)[:, 1:].reshape(B, 6, 4)
    kernel = rng.normal(size=(49 * 2, 3)).astype(np.float32) * 0.1

    def head(params, op, f, b):
        x = jnp.einsum("oc,chw->ohw", params, f)  # 1x1 conv to 2 * 7 * 7
        pooled = op(x[None], [b], 7, 1 / 4, 2)
        return jnp.mean(pooled ** 2)

    def loss(params, op):
        return jnp.mean(jax.vmap(lambda f, b: head(params, op, f, b))(features, boxes))

    step = jax.jit(jax.grad(lambda p: loss(p, jax_psroi.ps_roi_align)))
    text = step.lower(kernel).as_text()
    assert f"custom_call @{target('forward', np.float32)}" in text
    assert f"custom_call @{target('backward', np.float32)}" in text
    for op in ("gather", "scatter", "while"):
        assert op not in text
    ref_step = jax.jit(jax.grad(lambda p: loss(p, jax_psroi.ps_roi_align_reference)))
    grad = step(kernel)
    assert np.abs(np.asarray(grad)).max() > 0
    np.testing.assert_allclose(grad, ref_step(kernel), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n,c_out,k", [(0, 2, 3), (2, 0, 3), (2, 2, 0), (0, 0, 0)])
def test_vmap_with_empty_axes(n, c_out, k):
    # Found by the fuzz test: the batching rules folded the mapped axis with
    # reshape(-1, ...), which fails when another axis is empty.
    rng = np.random.default_rng(23)
    features = rng.normal(size=(B, n, c_out * 4, 5, 6))
    rois = np.stack([random_rois(rng, k, max(n, 1), 5, 6, 1.0, np.float64)
                     for _ in range(B)])
    pool = jax.vmap(lambda f, r: jax_psroi.ps_roi_align(f, r, 2, 1.0, 2))
    out, vjp = jax.vjp(lambda f: pool(f, rois), features)
    assert out.shape == (B, k, c_out, 2, 2)
    # Valid RoIs on an empty map read nothing: zeros, like the unmapped call.
    np.testing.assert_array_equal(out, np.stack(
        [jax_psroi.ps_roi_align(features[b], rois[b], 2, 1.0, 2) for b in range(B)]))
    (gradient,) = vjp(jnp.ones_like(out))
    assert gradient.shape == features.shape


@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0)])
def test_vmap_over_no_elements_keeps_the_rois_axis(in_axes):
    # B = 0: unfolding took K from the folded axis, B * K = 0, so K came out 0.
    features = np.zeros((1, 8, 5, 5), np.float32)
    rois = np.array([[0, 1, 1, 3, 3]] * 3, np.float32)
    offset = np.zeros((3, 2, 2, 2), np.float32)
    empty = lambda x, axis: np.zeros((0, *x.shape), x.dtype) if axis == 0 else x
    calls = {
        "ps_roi_align": lambda f, r: jax_psroi.ps_roi_align(f, r, 2, 1.0, 2),
        "ps_roi_pool": lambda f, r: jax_psroi.ps_roi_pool(f, r, 2, 1.0),
        "roi_pool": lambda f, r: jax_psroi.roi_pool(f, r, 2, 1.0),
        "multi_scale": lambda f, r: jax_psroi.multi_scale_roi_align([f], r, 2, 2, (5, 5)),
        "deform_roi_align": lambda f, r: jax_psroi.deform_roi_align(f, r, offset, 2, 1.0, 2),
    }
    for name, call in calls.items():
        args = (empty(features, in_axes[0]), empty(rois, in_axes[1]))
        out, vjp = jax.vjp(jax.vmap(call, in_axes=in_axes), *args)
        assert out.shape == (0, *call(features, rois).shape), name
        grads = vjp(jnp.ones_like(out))
        assert [g.shape for g in grads] == [a.shape for a in args], name
        np.testing.assert_array_equal(grads[0], 0)


def test_vmap_image_offsets_are_exact_past_float32_integers():
    # 2 x (2**24 + 2) images: folded into one call, element 1's image 1 is
    # image 2**24 + 3, which a float32 batch index cannot hold (it would
    # read image 2**24 + 4, whose value is 1002). The kernels add the
    # offset of whole image groups in integers.
    n = 2**24 + 2
    images = jnp.arange(n, dtype=jnp.float32) % 1000
    features = jnp.stack([images, 1000 + images])[:, :, None, None, None]
    boxes = jnp.asarray([[[1, 0, 0, 0.5, 0.5]]] * 2, jnp.float32)
    for op in (lambda f, b: jax_psroi.roi_align(f, b, 1, 1.0, 1),
               lambda f, b: jax_psroi.roi_pool(f, b, 1, 1.0)):
        np.testing.assert_array_equal(jax.vmap(op)(features, boxes).ravel(), [1, 1001])
    # The gradient goes to that image too.
    grads = jax.vmap(jax.grad(lambda f, b: jax_psroi.roi_align(f, b, 1, 1.0, 1).sum()))(
        features, boxes)
    assert grads[0, 1].sum() == grads[1, 1].sum() == 1
    assert grads.sum() == 2


# Every operator, as (features [N, C, H, W], rois [K, 5]) -> pooled.
OPERATORS = {
    "ps_roi_align": _op,
    "roi_align": lambda f, r: jax_psroi.roi_align(f, r, OUT, 1.0, 2, True),
    "ps_roi_pool": lambda f, r: jax_psroi.ps_roi_pool(f, r, OUT, 1.0),
    "roi_pool": lambda f, r: jax_psroi.roi_pool(f, r, OUT, 1.0),
    "multi_scale": lambda f, r: jax_psroi.multi_scale_roi_align(
        [f, f[..., ::2, ::2]], r, OUT, 2, (H, W)),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_vmap_over_images_of_a_vmap_over_boxes(data, name):
    # The inner vmap concatenates B RoI sets over the same images (copies
    # of its image groups); the outer one folds 2 feature sets into the
    # images: its RoI order puts the copies first (_image_groups.fold).
    features, rois = data
    op = OPERATORS[name]
    scaled = np.stack([features[0], -2 * features[1]])  # [2, N, C, H, W]
    nested = jax.jit(jax.vmap(jax.vmap(op, in_axes=(None, 0)), in_axes=(0, None)))
    expected = np.stack([np.stack([op(f, r) for r in rois]) for f in scaled])
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(nested(scaled, rois), expected, atol=1e-12)
    # And its gradient, through the backward's batching rule.
    loss = lambda f, r: jnp.sum(jnp.sin(op(f, r)))
    grad = jax.jit(jax.vmap(jax.vmap(jax.grad(loss), in_axes=(None, 0)), in_axes=(0, None)))
    expected = np.stack([np.stack([jax.grad(loss)(f, r) for r in rois]) for f in scaled])
    np.testing.assert_allclose(grad(scaled, rois), expected, atol=1e-12)


def test_vmap_alternating_three_deep(data):
    # Features, then boxes, then features again: groups of groups.
    features, rois = data
    pairs = np.stack([features, 3 * features], axis=1)  # [B, 2, N, C, H, W]
    inner = jax.vmap(_op, in_axes=(0, None))             # over the pair
    middle = jax.vmap(inner, in_axes=(None, 0))          # over RoI sets
    outer = jax.jit(jax.vmap(middle, in_axes=(0, None)))  # over B
    out = outer(pairs[:2], rois)                          # [2, B, 2, K, ...]
    for b in range(2):
        for r in range(B):
            for p in range(2):
                np.testing.assert_allclose(out[b, r, p], _op(pairs[b, p], rois[r]),
                                           atol=1e-12)


def test_vmap_of_the_per_image_list(data):
    # A list of equally many boxes per image: one image group per image,
    # batch indices 0; folded by vmap over features and boxes.
    features, rois = data
    boxes = rois[..., 1:]  # [B, K, 4]
    per_image = lambda f, b: _op(f, [b[: K // 2], b[K // 2:]])  # N = 2 images
    out = jax.jit(jax.vmap(per_image))(features, boxes)
    for b in range(B):
        np.testing.assert_allclose(out[b], per_image(features[b], boxes[b]), atol=1e-12)
