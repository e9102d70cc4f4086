"""The primitives of RoI Pool (the max-pooling operator, _operators.ROI_POOL)
and their JAX rules.

``roi_pool``:         (features, rois [K, 5]) -> (pooled, pixels)
    the maximum of each bin's window and the pixel y * W + x it came from
    (int32, -1 for none), both shaped [K, C, PH, PW] (NCHW) or
    [K, PH, PW, C] (NHWC);
``roi_pool_gather``:  (features, rois, pixels) -> pooled
    the features at recorded pixels: RoI Pool's output as the linear
    function of the features it is near a point (its tangent);
``roi_pool_scatter``: (cotangent (pooled), rois, pixels) -> like features
    the cotangent added at recorded pixels: the gather's transpose.

RoI Pool is piecewise linear: its JVP is the gather at the pixels the
forward recorded, and the gather and the scatter are linear and transposes
of each other, so every mode and order of differentiation runs on native
kernels (the pixels, like the RoIs, are not differentiated). Each has a
native lowering on CPU and CUDA (the kernel table's ``roi_pool`` rows:
``forward`` is the max and, given pixels, the gather; ``backward`` the
scatter), the XLA path (_xla_path.py) elsewhere, and a vmap rule that folds
the mapped axis into images and RoIs (_rules.py).

Parameters, static: ``pooled_size`` (roi_pool), ``input_shape``
(roi_pool_scatter), and on all three ``spatial_scale``, ``data_format``,
``image_groups`` and ``implementation`` (as the averaging operators'
primitives, _averaging.py). Their sharding rules split over images, RoIs
and channels as roi_align's do, the pixels split like the pooled tensor.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, xla

from jax_psroi import (
    _arguments,
    _averaging,
    _extension,
    _image_groups,
    _implementation,
    _operators,
    _partitioning,
    _rules,
    _xla_path,
)

OPERATION = _operators.ROI_POOL.name

roi_pool_p = Primitive(OPERATION)
roi_pool_p.multiple_results = True
gather_p = Primitive(f"{OPERATION}_gather")
scatter_p = Primitive(f"{OPERATION}_scatter")


def _typed(direction, operand, rois, shape, data_format, image_groups):
    return _rules.typed_result(direction, operand, rois, shape, data_format=data_format,
                               channel_order="shared", image_groups=image_groups)


def _roi_pool_abstract_eval(features, rois, *, pooled_size, data_format, image_groups, **_):
    channels = features.shape[_arguments.channel_axis(data_format)]
    shape = _arguments.pooled_shape(rois.shape[0], channels, pooled_size, data_format)
    pooled = _typed("forward", features, rois, shape, data_format, image_groups)
    return pooled, pooled.update(dtype=np.dtype(np.int32))


def _gather_abstract_eval(features, rois, pixels, *, data_format, image_groups, **_):
    return _typed("forward", features, rois, pixels.shape, data_format, image_groups)


def _scatter_abstract_eval(cotangent, rois, pixels, *, input_shape, data_format,
                           image_groups, **_):
    return _typed("backward", cotangent, rois, input_shape, data_format, image_groups)


# --- Lowerings ----------------------------------------------------------------
# One device's calls, (operand, rois, [pixels,] result_shape=) -> result(s),
# which _partitioning.lower runs on every device's shards when the program
# is partitioned over a mesh.

def _native_forward(platform, features, rois, pixels=None, *, result_shape, spatial_scale,
                    data_format, image_groups):
    """The forward row: maxima and pixels, or (given pixels, which the call
    aliases to its pixels result) the features at them."""
    name = _extension.target_name(platform, "forward", features.dtype, data_format, OPERATION)
    results = (jax.ShapeDtypeStruct(result_shape, features.dtype),
               jax.ShapeDtypeStruct(result_shape, np.int32))
    operands, aliases = (features, rois), {}
    if pixels is not None:
        operands, aliases = (features, rois, pixels), {2: 1}
    pooled, recorded = jax.ffi.ffi_call(name, results, input_output_aliases=aliases)(
        *operands, spatial_scale=float(spatial_scale),
        **_averaging.group_attributes(image_groups))
    return pooled if pixels is not None else (pooled, recorded)


def _native_scatter(platform, cotangent, rois, pixels, *, result_shape, spatial_scale,
                    data_format, image_groups):
    name = _extension.target_name(platform, "backward", cotangent.dtype, data_format,
                                  OPERATION)
    results = [jax.ShapeDtypeStruct(result_shape, cotangent.dtype)]
    if platform == "cuda":
        results += _averaging.cuda_further_results(
            "backward", cotangent.dtype, result_shape, cotangent.shape, data_format)
    return jax.ffi.ffi_call(name, results)(cotangent, rois, pixels,
                                           spatial_scale=float(spatial_scale),
                                           **_averaging.group_attributes(image_groups))[0]


def _lowering(direction, native_call, xla_call, platform, ctx, operand, rois, *pixels,
              implementation, spatial_scale, data_format, image_groups, **_):
    call = (partial(native_call, platform) if _implementation.native(platform, implementation)
            else xla_call)
    return _partitioning.lower(
        ctx, operand, rois, *pixels, direction=direction,
        local_call=partial(call, spatial_scale=spatial_scale, data_format=data_format,
                           image_groups=image_groups),
        image_blocks=_rules.image_blocks(_rules.features_shape_of(direction, ctx),
                                         ctx.avals_in[1], image_groups, data_format),
        data_format=data_format, channel_order="shared", bin_rows_call=False)


# --- Differentiation ---------------------------------------------------------

def _zero_tangent(value):
    return ad.Zero(jax.typeof(value).to_tangent_aval())


def _roi_pool_jvp(primals, tangents, *, pooled_size, **params):
    features, rois = primals
    pooled, pixels = roi_pool_p.bind(features, rois, pooled_size=pooled_size, **params)
    if type(tangents[0]) is ad.Zero:
        tangent = _zero_tangent(pooled)
    else:
        tangent = gather_p.bind(tangents[0], rois, pixels, **params)
    return (pooled, pixels), (tangent, _zero_tangent(pixels))


def _gather_transpose(cotangent, features, rois, pixels, **params):
    assert ad.is_undefined_primal(features)
    if type(cotangent) is ad.Zero:
        return ad.Zero(features.aval), None, None
    return scatter_p.bind(cotangent, rois, pixels, input_shape=features.aval.shape,
                          **params), None, None


def _scatter_transpose(grad, cotangent, rois, pixels, *, input_shape, **params):
    assert ad.is_undefined_primal(cotangent)
    if type(grad) is ad.Zero:
        return ad.Zero(cotangent.aval), None, None
    return gather_p.bind(grad, rois, pixels, **params), None, None


def _linear_jvp(primitive):
    return lambda t, _, rois, pixels, **params: primitive.bind(t, rois, pixels, **params)


# --- Batching ----------------------------------------------------------------
# The mapped axis folds into images and RoIs as the averaging operators'
# does (_rules.py); the pixels fold like the RoIs.

def _roi_pool_batch(args, dims, *, image_groups, **params):
    size = _rules.mapped_size(args, dims)
    (features,), rois, folding = _rules.fold_maps(args[:1], dims[:1], args[1], dims[1], size,
                                                 image_groups)
    pooled, pixels = roi_pool_p.bind(features, rois, image_groups=image_groups, **params)
    return ((_image_groups.unfold(pooled, folding),
             _image_groups.unfold(pixels, folding)), (0, 0))


def _gather_batch(args, dims, *, image_groups, **params):
    size = _rules.mapped_size(args, dims)
    (features,), rois, folding = _rules.fold_maps(args[:1], dims[:1], args[1], dims[1], size,
                                                 image_groups)
    pixels = _rules.fold_like_rois(args[2], dims[2], folding)
    out = gather_p.bind(features, rois, pixels, image_groups=image_groups, **params)
    return _image_groups.unfold(out, folding), 0


def _scatter_batch(args, dims, *, input_shape, image_groups, **params):
    size = _rules.mapped_size(args, dims)
    cotangent, rois, folding = _rules.fold_backward(args[0], dims[0], args[1], dims[1], size,
                                                   image_groups, input_shape[0])
    pixels = _rules.fold_like_rois(args[2], dims[2], folding)
    grad = scatter_p.bind(cotangent, rois, pixels,
                          input_shape=_rules.folded_input_shape(size, input_shape),
                          image_groups=image_groups, **params)
    return grad.reshape((size, *input_shape)), 0


for _prim, _abstract_eval, _direction, _native, _xla, _batch in (
        (roi_pool_p, _roi_pool_abstract_eval, "forward", _native_forward,
         _xla_path.roi_pool, _roi_pool_batch),
        (gather_p, _gather_abstract_eval, "forward", _native_forward,
         _xla_path.roi_pool, _gather_batch),
        (scatter_p, _scatter_abstract_eval, "backward", _native_scatter,
         _xla_path.roi_pool_scatter, _scatter_batch)):
    _prim.def_abstract_eval(_abstract_eval)
    _prim.def_impl(partial(xla.apply_primitive, _prim))
    _rules.register_lowerings(_prim, partial(_lowering, _direction, _native, _xla))
    batching.primitive_batchers[_prim] = _batch

ad.primitive_jvps[roi_pool_p] = _roi_pool_jvp
ad.defjvp(gather_p, _linear_jvp(gather_p), None, None)
ad.defjvp(scatter_p, _linear_jvp(scatter_p), None, None)
ad.primitive_transposes[gather_p] = _gather_transpose
ad.primitive_transposes[scatter_p] = _scatter_transpose


def _check_plane(features_shape, data_format) -> None:
    """The kernels record pixels in int32: a plane must have fewer than 2**31."""
    axes = _arguments.LAYOUT_AXES[data_format]
    height, width = features_shape[axes[2]], features_shape[axes[3]]
    if height * width > np.iinfo(np.int32).max:
        raise ValueError(f"roi_pool records maxima as int32 pixels: a plane of {height} x "
                         f"{width} pixels is too large")


def apply(input, boxes, output_size, spatial_scale, data_format) -> jax.Array:
    """A public call of ``roi_pool``: its arguments checked, its RoIs and
    image groups made, its primitive bound; the pooled maxima."""
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, _arguments.NO_SAMPLING_RATIO, data_format,
        "torchvision", _extension.SUPPORTED_DTYPES, position_sensitive=False)
    _check_plane(features.shape, params["data_format"])
    rois, groups = _image_groups.of_call(boxes, rois, features.shape[0])
    features, rois = _rules.varying_alike(features, rois)
    return roi_pool_p.bind(features, rois, pooled_size=params["pooled_size"],
                           spatial_scale=params["spatial_scale"],
                           data_format=params["data_format"], image_groups=groups,
                           implementation=_implementation.requested())[0]
