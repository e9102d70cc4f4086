"""The registry's matrix: every operator spec (_operators.py), in every
layout and exact dtype, against its own reference, forward and gradient,
with and without jit, under vmap, and named for itself in a jaxpr. A new
operator's spec puts it in this matrix; its own test file adds its golden
cases and what only it does."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi
from jax_psroi import _extension, _operators

from cases import EXACT_DTYPES, LAYOUTS, TOLERANCE, random_features, random_rois

OUTPUT_SIZE = (2, 3)
SCALE = 0.5
N, H, W, K = 2, 7, 9, 6
OPERATORS = list(_operators.OPERATORS.values())


def test_the_registry_is_the_kernel_tables_operations():
    assert [operator.name for operator in OPERATORS] == [
        "ps_roi_align", "roi_align", "ps_roi_pool", "roi_pool"]
    if _extension.KERNELS["cpu"]:
        assert {row.operation for row in _extension.KERNELS["cpu"].values()} == set(
            _operators.OPERATORS)
    for operator in OPERATORS:
        assert getattr(jax_psroi, operator.name).__name__ == operator.name
        assert set(operator.attributes) <= set(_operators.ATTRIBUTE_CHECKS)


def _data(operator, dtype, data_format, seed=0):
    rng = np.random.default_rng(seed)
    channels = 2 * OUTPUT_SIZE[0] * OUTPUT_SIZE[1] if operator.position_sensitive else 3
    features = random_features(rng, N, channels, H, W, dtype)
    if data_format == "NHWC":
        features = features.transpose(0, 2, 3, 1)
    rois = random_rois(rng, K, N, H, W, SCALE, dtype)
    return jnp.asarray(features), jnp.asarray(rois)


def _calls(operator, data_format):
    public = getattr(jax_psroi, operator.name)
    call = lambda op: (lambda f, r: op(f, r, OUTPUT_SIZE, SCALE, data_format=data_format))
    return call(public), call(operator.reference)


@functools.cache
def _reference_results(name, data_format, dtype):
    """The reference's forward of _data, random loss weights of its shape and
    the gradient of the loss sum(forward * weights), read-only: one program,
    shared by a case's jit and eager variants (an eager gradient of the
    reference compiles it piece by piece)."""
    operator = _operators.OPERATORS[name]
    features, rois = _data(operator, dtype, data_format)
    _, reference = _calls(operator, data_format)
    shape = jax.eval_shape(reference, features, rois).shape
    weights = jnp.asarray(np.random.default_rng(1).normal(size=shape), dtype)
    loss = lambda f, r, w: jnp.sum(reference(f, r) * w)
    expected, grad = jax.jit(lambda f, r, w: (reference(f, r), jax.grad(loss)(f, r, w)))(
        features, rois, weights)
    return np.asarray(expected), weights, np.asarray(grad)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("operator", OPERATORS, ids=lambda operator: operator.name)
class TestEveryOperator:

    @pytest.mark.parametrize("dtype", EXACT_DTYPES)
    @pytest.mark.parametrize("variant", [jax.jit, lambda f: f], ids=["jit", "eager"])
    def test_forward_and_gradient_equal_the_reference(self, operator, data_format, dtype,
                                                      variant):
        features, rois = _data(operator, dtype, data_format)
        native, _ = _calls(operator, data_format)
        expected, weights, expected_grad = _reference_results(operator.name, data_format, dtype)
        out = variant(native)(features, rois)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(dtype)])
        loss = lambda f: jnp.sum(native(f, rois) * weights)
        grad = variant(jax.grad(loss))(features)
        np.testing.assert_allclose(grad, expected_grad, **TOLERANCE[np.dtype(dtype)])

    def test_vmap_over_images_equals_a_loop(self, operator, data_format):
        features, rois = _data(operator, np.float32, data_format)
        native, _ = _calls(operator, data_format)
        batch = jnp.stack([features, -3 * features])
        out = jax.jit(jax.vmap(native, in_axes=(0, None)))(batch, rois)
        for element in range(2):
            np.testing.assert_array_equal(out[element], native(batch[element], rois))

    def test_a_jaxpr_names_the_operator(self, operator, data_format):
        features, rois = _data(operator, np.float32, data_format)
        native, _ = _calls(operator, data_format)
        jaxpr = jax.make_jaxpr(jax.grad(lambda f: jnp.sum(native(f, rois))))(features)
        names = {equation.primitive.name for equation in jaxpr.eqns}
        expected = ({operator.name, f"{operator.name}_backward"}
                    if operator.pooling == "average"
                    else {operator.name, f"{operator.name}_scatter"})
        assert expected <= names, names
