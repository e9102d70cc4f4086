"""The Flax modules (PSRoIAlign, RoIAlign, PSRoIPool, RoIPool, MultiScaleRoIAlign; in
full for PSRoIAlign): jax_psroi.flax.linen.PSRoIAlign and
jax_psroi.flax.nnx.PSRoIAlign equal the function, compose with jit, grad and
vmap, check their settings when made, and say what to install without Flax."""

import collections
import subprocess
import sys
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as flax_nnx

import jax_psroi
from jax_psroi.flax import linen, nnx

from cases import LAYOUTS, TOLERANCE, features_as, random_features, random_rois

OUTPUT_SIZE = (3, 2)


def _data(data_format, seed=80):
    rng = np.random.default_rng(seed)
    nchw = random_features(rng, 2, 4 * 6, 10, 12, np.float32)
    features = features_as(nchw, data_format, "torchvision", OUTPUT_SIZE)
    rois = random_rois(rng, 9, 2, 10, 12, 0.5, np.float32)
    return features, rois


def _function(features, rois, data_format, channel_order="torchvision"):
    return jax_psroi.ps_roi_align(features, rois, OUTPUT_SIZE, 0.5, 2, data_format=data_format,
                                  channel_order=channel_order)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("channel_order", ["torchvision", "bin_major"])
def test_modules_equal_the_function(data_format, channel_order):
    features, rois = _data(data_format)
    expected = np.asarray(_function(features, rois, data_format, channel_order))
    assert np.abs(expected).max() > 0.01
    lin = linen.PSRoIAlign(OUTPUT_SIZE, 0.5, 2, data_format, channel_order)
    variables = lin.init(jax.random.key(0), features, rois)
    assert jax.tree.leaves(variables) == []  # no parameters
    np.testing.assert_array_equal(lin.apply(variables, features, rois), expected)
    mod = nnx.PSRoIAlign(OUTPUT_SIZE, 0.5, 2, data_format=data_format,
                         channel_order=channel_order)
    np.testing.assert_array_equal(mod(features, rois), expected)
    # Boxes as one [L, 4] array per image, in list order.
    per_image = [rois[rois[:, 0] == n, 1:] for n in range(2)]
    ordered = np.concatenate([rois[rois[:, 0] == n] for n in range(2)])
    np.testing.assert_array_equal(
        mod(features, per_image), _function(features, ordered, data_format, channel_order))


def test_default_layout_is_nhwc():
    features, rois = _data("NHWC")
    chex.assert_shape(linen.PSRoIAlign(OUTPUT_SIZE, 0.5, 2).apply({}, features, rois),
                      (9, 3, 2, 4))
    chex.assert_shape(nnx.PSRoIAlign(OUTPUT_SIZE, 0.5, 2)(features, rois), (9, 3, 2, 4))


class LinenTransformsTest(chex.TestCase):
    """linen's init/apply with and without jit, under grad and vmap."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_under_jit_grad_and_vmap(self):
        for data_format in LAYOUTS:
            self._check(data_format)

    def _check(self, data_format):
        features, rois = _data(data_format)
        module = linen.PSRoIAlign(OUTPUT_SIZE, 0.5, 2, data_format)
        variables = self.variant(module.init)(jax.random.key(0), features, rois)
        loss = self.variant(
            jax.grad(lambda f: jnp.sum(jnp.sin(module.apply(variables, f, rois)))))
        reference = lambda f: jnp.sum(jnp.sin(_function(f, rois, data_format)))
        chex.assert_trees_all_close(loss(features), jax.grad(reference)(features),
                                    **TOLERANCE[np.dtype(np.float32)])
        # vmap over images, one [L, 5] box array each: the module per image.
        boxes = np.stack([rois[:4], rois[4:8]])
        boxes[:, :, 0] = 0
        per_image = self.variant(jax.vmap(lambda f, b: module.apply(variables, f[None], b)))
        out = per_image(features, boxes)
        for n in range(2):
            chex.assert_trees_all_close(
                out[n], _function(features[n:n + 1], boxes[n], data_format),
                **TOLERANCE[np.dtype(np.float32)])


@pytest.mark.parametrize("data_format", LAYOUTS)
def test_nnx_under_jit_grad_and_vmap(data_format):
    features, rois = _data(data_format)
    module = nnx.PSRoIAlign(OUTPUT_SIZE, 0.5, 2, data_format=data_format)

    @flax_nnx.jit
    def loss_and_grad(m, f):
        return jax.value_and_grad(lambda x: jnp.sum(jnp.sin(m(x, rois))))(f)

    value, grad = loss_and_grad(module, features)
    reference = lambda f: jnp.sum(jnp.sin(_function(f, rois, data_format)))
    np.testing.assert_allclose(value, reference(features), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(reference)(features),
                               **TOLERANCE[np.dtype(np.float32)])
    batched = jax.vmap(lambda f: module(f[None], rois[:3] * np.array([0, 1, 1, 1, 1])))
    out = jax.jit(batched)(features)
    chex.assert_shape(out, (2, 3, *_function(features, rois[:3], data_format).shape[1:]))
    np.testing.assert_allclose(out[1], _function(features[1:], rois[:3] * [0, 1, 1, 1, 1],
                                                 data_format), rtol=1e-6)


def test_settings_are_checked_when_made_and_shown():
    with pytest.raises(ValueError, match="output_size must be positive"):
        linen.PSRoIAlign(0)
    with pytest.raises(ValueError, match="data_format"):
        nnx.PSRoIAlign(7, data_format="CHWN")
    with pytest.raises(TypeError, match="sampling_ratio"):
        nnx.PSRoIAlign(7, 1 / 16, 2.0)
    assert repr(linen.PSRoIAlign(7, 1 / 16, 2)) == (
        "PSRoIAlign(output_size=7, spatial_scale=0.0625, sampling_ratio=2, "
        "data_format='NHWC', channel_order='torchvision')")
    shown = repr(nnx.PSRoIAlign((7, 5), 0.25, -1, channel_order="bin_major"))
    assert "PSRoIAlign" in shown and "output_size=(7, 5)" in shown
    assert "spatial_scale=0.25" in shown and "'bin_major'" in shown


@pytest.mark.parametrize("module", [linen.PSRoIAlign, nnx.PSRoIAlign, linen.RoIAlign,
                                    nnx.RoIAlign, linen.PSRoIPool, nnx.PSRoIPool, linen.RoIPool,
                                    nnx.RoIPool])
def test_every_module_checks_its_scale_when_made(module):
    with pytest.raises(TypeError, match=r"spatial_scale must be a real number, got '0\.5'"):
        module(OUTPUT_SIZE, "0.5")
    for bad in (float("nan"), float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match="spatial_scale must be finite and positive"):
            module(OUTPUT_SIZE, bad)
    # Whether a scale fits float32 depends on the map, so a call says it.
    features, rois = _data("NHWC")
    made = module(OUTPUT_SIZE, 1e300)
    call = made if isinstance(made, flax_nnx.Module) else partial(made.apply, {})
    with pytest.raises(ValueError, match="spatial_scale must be a normal number in float32"):
        call(features, rois)
    assert call(features.astype(np.float64), rois).dtype == np.float64


def test_missing_flax_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['flax'] = None\n"
            "try:\n"
            "    import jax_psroi.flax.linen\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    # From elsewhere: `python -c` puts the current folder (a checkout?) first.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=tmp_path)
    assert "jax_psroi[flax]" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_modules_equal_the_function(data_format, aligned):
    features, rois = _data(data_format)
    expected = np.asarray(jax_psroi.roi_align(features, rois, OUTPUT_SIZE, 0.5, 2, aligned,
                                              data_format=data_format))
    assert np.abs(expected).max() > 0.01
    lin = linen.RoIAlign(OUTPUT_SIZE, 0.5, 2, aligned, data_format)
    variables = lin.init(jax.random.key(0), features, rois)
    assert jax.tree.leaves(variables) == []
    np.testing.assert_array_equal(lin.apply(variables, features, rois), expected)
    mod = nnx.RoIAlign(OUTPUT_SIZE, 0.5, 2, aligned, data_format=data_format)
    np.testing.assert_array_equal(mod(features, rois), expected)
    # NHWC by default: [K, h, w, C].
    if data_format == "NHWC":
        chex.assert_shape(nnx.RoIAlign(OUTPUT_SIZE, 0.5, 2)(features, rois), (9, 3, 2, 24))
    grad = jax.grad(lambda f: jnp.sum(jax.jit(lin.apply)(variables, f, rois) ** 2))(features)
    assert np.abs(np.asarray(grad)).max() > 0


def test_roi_align_settings_are_checked_when_made_and_shown():
    assert repr(linen.RoIAlign(7, 1 / 16, 2, True)) == (
        "RoIAlign(output_size=7, spatial_scale=0.0625, sampling_ratio=2, aligned=True, "
        "data_format='NHWC')")
    with pytest.raises(TypeError, match="aligned must be a Python bool"):
        nnx.RoIAlign(7, 1 / 16, 2, aligned="yes")
    with pytest.raises(ValueError, match="output_size must be positive"):
        linen.RoIAlign(0)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("channel_order", ["torchvision", "bin_major"])
def test_ps_roi_pool_modules_equal_the_function(data_format, channel_order):
    features, rois = _data(data_format)
    expected = np.asarray(jax_psroi.ps_roi_pool(features, rois, OUTPUT_SIZE, 0.5,
                                                data_format=data_format,
                                                channel_order=channel_order))
    assert np.abs(expected).max() > 0.01
    lin = linen.PSRoIPool(OUTPUT_SIZE, 0.5, data_format, channel_order)
    variables = lin.init(jax.random.key(0), features, rois)
    assert jax.tree.leaves(variables) == []
    np.testing.assert_array_equal(lin.apply(variables, features, rois), expected)
    mod = nnx.PSRoIPool(OUTPUT_SIZE, 0.5, data_format=data_format,
                        channel_order=channel_order)
    np.testing.assert_array_equal(mod(features, rois), expected)
    grad = jax.grad(lambda f: jnp.sum(jax.jit(lin.apply)(variables, f, rois) ** 2))(features)
    assert np.abs(np.asarray(grad)).max() > 0


def test_ps_roi_pool_settings_are_checked_when_made_and_shown():
    assert repr(linen.PSRoIPool(7, 1 / 16)) == (
        "PSRoIPool(output_size=7, spatial_scale=0.0625, data_format='NHWC', "
        "channel_order='torchvision')")
    chex.assert_shape(nnx.PSRoIPool(OUTPUT_SIZE, 0.5)(*_data("NHWC")), (9, 3, 2, 4))
    with pytest.raises(ValueError, match="output_size must be positive"):
        linen.PSRoIPool(0)
    with pytest.raises(ValueError):
        nnx.PSRoIPool(7, channel_order="class_major")


@pytest.mark.parametrize("data_format", LAYOUTS)
def test_roi_pool_modules_equal_the_function(data_format):
    features, rois = _data(data_format)
    expected = np.asarray(jax_psroi.roi_pool(features, rois, OUTPUT_SIZE, 0.5,
                                             data_format=data_format))
    assert np.abs(expected).max() > 0.01
    lin = linen.RoIPool(OUTPUT_SIZE, 0.5, data_format)
    variables = lin.init(jax.random.key(0), features, rois)
    assert jax.tree.leaves(variables) == []
    np.testing.assert_array_equal(lin.apply(variables, features, rois), expected)
    mod = nnx.RoIPool(OUTPUT_SIZE, 0.5, data_format=data_format)
    np.testing.assert_array_equal(mod(features, rois), expected)
    grad = jax.grad(lambda f: jnp.sum(jax.jit(lin.apply)(variables, f, rois) ** 2))(features)
    expected_grad = jax.grad(lambda f: jnp.sum(jax_psroi.roi_pool_reference(
        f, rois, OUTPUT_SIZE, 0.5, data_format=data_format) ** 2))(features)
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE[np.dtype(np.float32)])
    assert np.abs(np.asarray(grad)).max() > 0


def test_roi_pool_settings_are_checked_when_made_and_shown():
    assert repr(linen.RoIPool(7, 1 / 16)) == (
        "RoIPool(output_size=7, spatial_scale=0.0625, data_format='NHWC')")
    chex.assert_shape(nnx.RoIPool(OUTPUT_SIZE, 0.5)(*_data("NHWC")), (9, 3, 2, 24))
    with pytest.raises(ValueError, match="output_size must be positive"):
        linen.RoIPool(0)
    with pytest.raises(ValueError):
        nnx.RoIPool(7, data_format="NCWH")


@pytest.mark.parametrize("data_format", LAYOUTS)
def test_multi_scale_modules_equal_the_function(data_format):
    rng = np.random.default_rng(81)
    names = ["p2", "p3", "p4"]
    nchw = [random_features(rng, 2, 5, 32 // s, 24 // s, np.float32) for s in (4, 8, 16)]
    levels = [x.transpose(0, 2, 3, 1) if data_format == "NHWC" else x for x in nchw]
    features = dict(zip(names, levels, strict=True), pool=levels[-1])  # extra levels ignored
    boxes = [random_rois(rng, 6, 1, 32, 24, 1.0, np.float32)[:, 1:] for _ in range(2)]
    # Images of 32 x 20 and 28 x 24: the scales follow the largest, 32 x 24.
    image_shapes = [(32, 20), (28, 24)]
    expected = np.asarray(jax_psroi.multi_scale_roi_align(
        levels, boxes, OUTPUT_SIZE, 2, (32, 24), canonical_scale=16,
        data_format=data_format))
    assert np.abs(expected).max() > 0.01
    lin = linen.MultiScaleRoIAlign(names, OUTPUT_SIZE, 2, canonical_scale=16,
                                   data_format=data_format)
    variables = lin.init(jax.random.key(0), features, boxes, image_shapes)
    assert jax.tree.leaves(variables) == []
    np.testing.assert_array_equal(lin.apply(variables, features, boxes, image_shapes),
                                  expected)
    mod = nnx.MultiScaleRoIAlign(names, OUTPUT_SIZE, 2, canonical_scale=16,
                                 data_format=data_format)
    np.testing.assert_array_equal(mod(features, boxes, image_shapes), expected)
    grads = jax.grad(lambda f: jnp.sum(mod(f, boxes, image_shapes) ** 2))(features)
    assert all(np.abs(np.asarray(grads[name])).max() > 0 for name in names)


def test_multi_scale_settings_are_checked_when_made_and_shown():
    assert repr(linen.MultiScaleRoIAlign(["p2", "p3"], 7, 2)) == (
        "MultiScaleRoIAlign(featmap_names=['p2', 'p3'], output_size=7, sampling_ratio=2, "
        "data_format='NHWC')")
    for names in ("p2", 5, None, [], ["p2", 3]):
        with pytest.raises(TypeError, match="featmap_names must be a non-empty sequence"):
            nnx.MultiScaleRoIAlign(names, 7, 2)
    with pytest.raises(ValueError, match="canonical_scale must be positive"):
        linen.MultiScaleRoIAlign(["p2"], 7, 2, canonical_scale=0)

    # torchvision's rules apply when the module is made, as at trace time.
    with pytest.raises(TypeError, match=r"sampling_ratio must be an int, got None"):
        linen.MultiScaleRoIAlign(["p2"], 7, None)
    with pytest.raises(ValueError, match="canonical_level must be between"):
        nnx.MultiScaleRoIAlign(["p2"], 7, 2, canonical_level=2**40)
    with pytest.raises(ValueError, match="output_size must be at most 2147483647"):
        linen.MultiScaleRoIAlign(["p2"], 2**31, 2)


def test_linen_modules_made_with_lists_are_static_arguments_of_jit():
    # A module is hashed as a static argument; lists are not hashable.
    layer = linen.RoIAlign([3, 2], 0.5, 2)
    pyramid = linen.MultiScaleRoIAlign(["p2", "p3"], [3, 2], 2, canonical_scale=56)
    assert layer.output_size == (3, 2) and pyramid.featmap_names == ("p2", "p3")
    apply = jax.jit(lambda module, *args: module.apply({}, *args), static_argnums=0)
    features = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    boxes = np.array([[1, 0, 1, 9, 12]], np.float32)
    np.testing.assert_array_equal(apply(layer, features, boxes),
                                  jax_psroi.roi_align(features, boxes, (3, 2), 0.5, 2,
                                                      data_format="NHWC"))
    levels = {name: PYRAMID[name] for name in ("p2", "p3")}
    apply_pyramid = jax.jit(lambda module, *args: module.apply({}, *args, [(64, 64)]),
                            static_argnums=0)
    np.testing.assert_array_equal(apply_pyramid(pyramid, levels, SIDES),
                                  pyramid.apply({}, levels, SIDES, [(64, 64)]))


# Levels p2-p4 of a 64 x 64 image, NHWC, every pixel of p<k> equal to k.
PYRAMID = {f"p{k}": np.full((1, 64 >> k, 64 >> k, 1), k, np.float32) for k in (2, 3, 4)}
# Boxes of sides 10, 28 and 56 px: eq. 1 with canonical_scale=56 sends them
# to levels 2 (clamped from 1), 3 and 4.
SIDES = [np.array([[0, 0, 10, 10], [0, 0, 28, 28], [0, 0, 56, 56]], np.float32)]


def _pool_both(names, features, **kwargs):
    """(linen, nnx) MultiScaleRoIAlign(names, 1, 2) of `features` and SIDES."""
    settings = dict(canonical_scale=56, **kwargs)
    lin = linen.MultiScaleRoIAlign(names, 1, 2, **settings).apply({}, features, SIDES,
                                                                 [(64, 64)])
    mod = nnx.MultiScaleRoIAlign(names, 1, 2, **settings)(features, SIDES, [(64, 64)])
    return np.asarray(lin).ravel(), np.asarray(mod).ravel()


def test_multi_scale_modules_take_the_levels_in_the_mappings_order():
    # As torchvision's _filter_input: featmap_names selects, the mapping
    # orders. This configuration once pooled zeros (levels in the names' order).
    for names in (["p2", "p3", "p4"], ["p4", "p3", "p2"], ["p3", "p4", "p2"]):
        for pooled in _pool_both(names, PYRAMID):
            np.testing.assert_array_equal(pooled, [2, 3, 4])
    for pooled in _pool_both(["p3", "p2"], PYRAMID):
        np.testing.assert_array_equal(pooled, [2, 3, 3])


# Each module as a function of (features, boxes, image_shapes), made with
# featmap_names p2-p4.
MADE = {"linen": lambda: partial(linen.MultiScaleRoIAlign(["p2", "p3", "p4"], 1, 2).apply, {}),
        "nnx": lambda: nnx.MultiScaleRoIAlign(["p2", "p3", "p4"], 1, 2)}


@pytest.mark.parametrize("kind", sorted(MADE))
def test_multi_scale_modules_reject_what_they_cannot_pool(kind):
    module = MADE[kind]()
    # Where torchvision would pool zeros: a mapping coarsest first (ordered:
    # eval_shape would rebuild a plain dict with sorted keys, finest first).
    coarsest_first = collections.OrderedDict((name, PYRAMID[name]) for name in ("p4", "p3", "p2"))
    with pytest.raises(ValueError, match=r"features must be the levels of a pyramid, the "
                                         r"finest first.* level 1 is finer than level 0"):
        jax.eval_shape(lambda f: module(f, SIDES, [(64, 64)]), coarsest_first)
    with pytest.raises(ValueError, match=r"features must hold every level of "
                                         r"featmap_names \['p2', 'p3', 'p4'\]; it has no "
                                         r"level named 'p4', only \['p2', 'p3'\]"):
        module({"p2": PYRAMID["p2"], "p3": PYRAMID["p3"]}, SIDES, [(64, 64)])
    with pytest.raises(TypeError, match=r"features must be a mapping from level name to "
                                        r"feature map .* got list"):
        module(list(PYRAMID.values()), SIDES, [(64, 64)])
    with pytest.raises(ValueError, match=r"image_shapes\[1\] must be positive"):
        module(PYRAMID, SIDES, [(64, 64), (0, 64)])
    with pytest.raises(ValueError, match="image_shapes must hold the"):
        module(PYRAMID, SIDES, [])


def test_an_ordered_mapping_keeps_its_order_under_jit():
    # JAX rebuilds a plain dict argument with its keys sorted, an
    # OrderedDict in its own order: with names whose sorted order is not
    # the pyramid's, only the OrderedDict pools (the dict raises, never
    # silently pools zeros).
    names = ["fine", "mid", "coarse"]
    renamed = dict(zip(names, PYRAMID.values(), strict=True))
    pool = nnx.MultiScaleRoIAlign(names, 1, 2, canonical_scale=56)
    call = jax.jit(lambda f: pool(f, SIDES, [(64, 64)]))
    np.testing.assert_array_equal(np.asarray(call(collections.OrderedDict(renamed))).ravel(),
                                  [2, 3, 4])
    with pytest.raises(ValueError, match=r"heights 4, 16, 8 .* level 1 is finer than level 0"):
        call(renamed)


def test_modules_take_their_arguments_by_name_or_position():
    features, rois = _data("NHWC")
    for lin, mod in ((linen.PSRoIAlign(OUTPUT_SIZE, 0.5, 2), nnx.PSRoIAlign(OUTPUT_SIZE, 0.5, 2)),
                     (linen.RoIAlign(OUTPUT_SIZE, 0.5), nnx.RoIAlign(OUTPUT_SIZE, 0.5)),
                     (linen.PSRoIPool(OUTPUT_SIZE, 0.5), nnx.PSRoIPool(OUTPUT_SIZE, 0.5)),
                     (linen.RoIPool(OUTPUT_SIZE, 0.5), nnx.RoIPool(OUTPUT_SIZE, 0.5))):
        positional = lin.apply({}, features, rois)
        np.testing.assert_array_equal(lin.apply({}, features=features, boxes=rois), positional)
        np.testing.assert_array_equal(lin.apply({}, features, boxes=rois), positional)
        np.testing.assert_array_equal(mod(features=features, boxes=rois), positional)
    names = ["p2", "p3"]
    levels = dict(p2=features[:, :8], p3=features[:, :4, :6])
    boxes = [rois[:3, 1:], rois[3:6, 1:]]
    lin = linen.MultiScaleRoIAlign(names, OUTPUT_SIZE, 2)
    positional = lin.apply({}, levels, boxes, [(16, 24)] * 2)
    np.testing.assert_array_equal(
        lin.apply({}, features=levels, boxes=boxes, image_shapes=[(16, 24)] * 2), positional)
    np.testing.assert_array_equal(
        nnx.MultiScaleRoIAlign(names, OUTPUT_SIZE, 2)(features=levels, boxes=boxes,
                                                      image_shapes=[(16, 24)] * 2),
        positional)
