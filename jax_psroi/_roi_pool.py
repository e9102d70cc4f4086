"""The primitives of RoI Pool and their JAX rules.

``roi_pool_p``: (features, rois [K, 5]) -> (pooled, pixels)
    the maximum of each bin's window and the pixel y * W + x it came from
    (int32, -1 for none), both shaped [K, C, PH, PW] (NCHW) or
    [K, PH, PW, C] (NHWC);
``gather_p``:   (features, rois, pixels) -> pooled
    the features at recorded pixels: RoI Pool's output as the linear
    function of the features it is near a point (its tangent);
``scatter_p``:  (cotangent (pooled), rois, pixels) -> like features
    the cotangent added at recorded pixels: ``gather_p``'s transpose.

RoI Pool is piecewise linear: its JVP is ``gather_p`` at the pixels the
forward recorded, and ``gather_p`` and ``scatter_p`` are linear and
transposes of each other, so every mode and order of differentiation runs on
native kernels (the pixels, like the RoIs, are not differentiated). Each has
a native lowering on CPU and CUDA (the kernel table's ``roi_pool`` rows:
``forward`` is the max and, given pixels, the gather; ``backward`` the
scatter), the XLA path (_xla_path.py) elsewhere, and a vmap rule that folds
the mapped axis into images and RoIs as ``forward_p``'s does.

Parameters, static: ``pooled_size`` (roi_pool_p), ``input_shape``
(scatter_p), and on all three ``spatial_scale``, ``data_format``,
``image_groups`` (forward_p's: which image each RoI's batch index counts
from) and ``implementation`` (forward_p's). Their sharding rules split over
images, RoIs and channels as roi_align's do, the pixels split like the
pooled tensor.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

from jax_psroi import (
    _arguments,
    _extension,
    _image_groups,
    _implementation,
    _partitioning,
    _primitives,
    _xla_path,
)

roi_pool_p = Primitive("jax_psroi_roi_pool")
roi_pool_p.multiple_results = True
gather_p = Primitive("jax_psroi_roi_pool_gather")
scatter_p = Primitive("jax_psroi_roi_pool_scatter")

OPERATION = "roi_pool"


def _pooled_shape(features_shape, num_rois, pooled_size, data_format):
    channels = features_shape[_arguments.channel_axis(data_format)]
    return _arguments.pooled_shape(num_rois, channels, pooled_size, data_format)


def _typed(direction, operand, rois, shape, data_format, image_groups):
    """A result typed like forward_p's and backward_p's (shard_map's
    varying axes, explicit mesh axes' shardings)."""
    features = operand.shape if direction == "forward" else shape
    return _partitioning.typed_result(
        direction, operand, rois, _primitives._result(operand, rois, shape),
        data_format=data_format, channel_order="shared",
        image_blocks=_primitives.image_blocks(features, rois, image_groups, data_format))


def _roi_pool_abstract_eval(features, rois, *, pooled_size, data_format, image_groups, **_):
    pooled = _typed("forward", features, rois, _pooled_shape(
        features.shape, rois.shape[0], pooled_size, data_format), data_format, image_groups)
    return pooled, pooled.update(dtype=np.dtype(np.int32))


def _gather_abstract_eval(features, rois, pixels, *, data_format, image_groups, **_):
    return _typed("forward", features, rois, pixels.shape, data_format, image_groups)


def _scatter_abstract_eval(cotangent, rois, pixels, *, input_shape, data_format,
                           image_groups, **_):
    return _typed("backward", cotangent, rois, input_shape, data_format, image_groups)


roi_pool_p.def_abstract_eval(_roi_pool_abstract_eval)
gather_p.def_abstract_eval(_gather_abstract_eval)
scatter_p.def_abstract_eval(_scatter_abstract_eval)
for _prim in (roi_pool_p, gather_p, scatter_p):
    _prim.def_impl(partial(xla.apply_primitive, _prim))


# --- Lowerings ----------------------------------------------------------------
# One device's calls, (operand, rois, [pixels,] result_shape=) -> result(s):
# _partitioning.lower runs them on every device's shards when the program is
# partitioned over a mesh (as forward_p's, with RoI Pool's shared channels;
# the pixels are split like the pooled tensor).

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
        **_primitives.group_attributes(image_groups))
    return pooled if pixels is not None else (pooled, recorded)


def _native_scatter(platform, cotangent, rois, pixels, *, result_shape, spatial_scale,
                    data_format, image_groups):
    name = _extension.target_name(platform, "backward", cotangent.dtype, data_format,
                                  OPERATION)
    results = [jax.ShapeDtypeStruct(result_shape, cotangent.dtype)]
    if platform == "cuda":
        results += _primitives.cuda_further_results(
            "backward", cotangent.dtype, result_shape, cotangent.shape, data_format)
    return jax.ffi.ffi_call(name, results)(cotangent, rois, pixels,
                                           spatial_scale=float(spatial_scale),
                                           **_primitives.group_attributes(image_groups))[0]


def _lowering(direction, native_call, xla_call, platform, ctx, operand, rois, *pixels,
              implementation, spatial_scale, data_format, image_groups, **_):
    call = (partial(native_call, platform) if _implementation.native(platform, implementation)
            else xla_call)
    features = (ctx.avals_out if direction == "backward" else ctx.avals_in)[0].shape
    return _partitioning.lower(
        ctx, operand, rois, *pixels, direction=direction,
        local_call=partial(call, spatial_scale=spatial_scale, data_format=data_format,
                           image_groups=image_groups),
        image_blocks=_primitives.image_blocks(features, ctx.avals_in[1], image_groups,
                                              data_format),
        data_format=data_format, channel_order="shared", bin_rows_call=False)


_partitioning.lower_with_devices(roi_pool_p, gather_p, scatter_p)
for _prim, _direction, _native, _xla in (
        (roi_pool_p, "forward", _native_forward, _xla_path.roi_pool),
        (gather_p, "forward", _native_forward, _xla_path.roi_pool),
        (scatter_p, "backward", _native_scatter, _xla_path.roi_pool_scatter)):
    mlir.register_lowering(_prim, partial(_lowering, _direction, _native, _xla, None))
    for _platform in ("cpu", "cuda"):
        mlir.register_lowering(_prim, partial(_lowering, _direction, _native, _xla, _platform),
                               platform=_platform)


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


ad.primitive_jvps[roi_pool_p] = _roi_pool_jvp
ad.defjvp(gather_p, lambda t, _, rois, pixels, **params: gather_p.bind(t, rois, pixels,
                                                                        **params),
          None, None)
ad.defjvp(scatter_p, lambda t, _, rois, pixels, **params: scatter_p.bind(t, rois, pixels,
                                                                          **params),
          None, None)
ad.primitive_transposes[gather_p] = _gather_transpose
ad.primitive_transposes[scatter_p] = _scatter_transpose


# --- Batching ----------------------------------------------------------------
# As forward_p's: a mapped axis of size B over N images becomes B * N images
# in the same image groups, and RoI sets and their pixels are concatenated
# (in the folded call's order). Unmapped features are never copied.

def _roi_pool_batch(args, dims, *, image_groups, **params):
    size = _primitives._mapped_size(args, dims)
    features, rois, copies = _primitives.fold_call(args[0], dims[0], args[1], dims[1], size,
                                                   image_groups)
    pooled, pixels = roi_pool_p.bind(features, rois, image_groups=image_groups, **params)
    return ((_image_groups.unfold(pooled, size, copies),
             _image_groups.unfold(pixels, size, copies)), (0, 0))


def _gather_batch(args, dims, *, image_groups, **params):
    size = _primitives._mapped_size(args, dims)
    features, rois, copies = _primitives.fold_call(args[0], dims[0], args[1], dims[1], size,
                                                   image_groups)
    pixels = _image_groups.fold(_primitives._to_front(args[2], dims[2], size), copies)
    out = gather_p.bind(features, rois, pixels, image_groups=image_groups, **params)
    return _image_groups.unfold(out, size, copies), 0


def _scatter_batch(args, dims, *, input_shape, image_groups, **params):
    size = _primitives._mapped_size(args, dims)
    cotangent, rois, copies = _primitives.fold_backward_call(
        args[0], dims[0], args[1], dims[1], size, image_groups, input_shape[0])
    pixels = _image_groups.fold(_primitives._to_front(args[2], dims[2], size), copies)
    grad = scatter_p.bind(cotangent, rois, pixels,
                          input_shape=(size * input_shape[0], *input_shape[1:]),
                          image_groups=image_groups, **params)
    return grad.reshape((size, *input_shape)), 0


batching.primitive_batchers[roi_pool_p] = _roi_pool_batch
batching.primitive_batchers[gather_p] = _gather_batch
batching.primitive_batchers[scatter_p] = _scatter_batch


def check_plane(features_shape, data_format) -> None:
    """The kernels record pixels in int32: a plane must have fewer than 2**31."""
    axes = _arguments.LAYOUT_AXES[data_format]
    height, width = features_shape[axes[2]], features_shape[axes[3]]
    if height * width > np.iinfo(np.int32).max:
        raise ValueError(f"roi_pool records maxima as int32 pixels: a plane of {height} x "
                         f"{width} pixels is too large")
