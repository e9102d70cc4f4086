"""The two primitives of PS-RoI Align, RoI Align and PS-RoI Pool and their JAX rules.

``forward_p``:  (features, rois [K, 5]) -> pooled
``backward_p``: (cotangent (pooled), rois [K, 5]) -> like features

with features [N, C, H, W] and pooled [K, C_out, PH, PW] in NCHW, or
[N, H, W, C] and [K, PH, PW, C_out] in NHWC.

Both are linear in their first operand and adjoint to each other, which gives
their JVP and transpose rules (and so any order of differentiation). Each has
a lowering to the native kernels on CPU and CUDA, a lowering to the XLA path
(_xla_path.py) for every other platform, and a vmap rule that folds the
mapped axis into the image / RoI axes so a batch is one kernel launch.

Parameters, all static: ``pooled_size`` (PH, PW) on ``forward_p``,
``input_shape`` (the features' shape) on ``backward_p``; on both
``spatial_scale`` (a python float: an F64 FFI attribute), ``sampling_ratio``
(a python int: S64), ``data_format`` ("NCHW" or "NHWC": the kernel-table row),
``operation`` ("ps_roi_align", "roi_align" or "ps_roi_pool": the kernel
table's operation, which all run the same kernels with other bins or
channels), ``channel_order`` ("torchvision" or "bin_major": the
position-sensitive operations, their S64 attribute; "shared": roi_align,
output channel c of every bin reads input channel c), ``aligned`` (roi_align's
box geometry, its S64 attribute; True for ps_roi_align, unread by
ps_roi_pool, whose calls carry a sampling ratio of 0 that it ignores) and
``image_groups`` (rois_per_group, images_per_group): which image each RoI's
batch index counts from, the kernels' S64 attributes of those names
(_image_groups.py); ``implementation`` ("native" or "xla", read from the
environment when the call was traced: _implementation.py). The vmap rules
fold a mapped axis into the images without touching batch indices, and a
partitioned program splits a call whose groups are blocks of images without
communication (_partitioning.py).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

from jax_psroi import (
    _arguments,
    _extension,
    _image_groups,
    _implementation,
    _partitioning,
    _xla_path,
)

forward_p = Primitive("jax_psroi_forward")
backward_p = Primitive("jax_psroi_backward")


# Shapes only: the public functions check the arguments (_arguments.py), and
# the rules below preserve what they checked. A result is typed like the map
# operand it comes from, so that inside shard_map it varies over the manual
# mesh axes its operands vary over (as the transpose rules' cotangents must).

def _varying(aval) -> frozenset:
    return getattr(getattr(aval, "mat", None), "varying", frozenset())


def _result(operand, rois, shape):
    result = operand.update(shape=tuple(shape), weak_type=False)
    if _varying(rois) > _varying(operand):
        result = result.update(manual_axis_type=rois.mat)
    return result


def image_blocks(operand_or_shape, rois, image_groups, data_format) -> int:
    """_partitioning's blocks of images of a call with features (or a
    shape) `operand_or_shape` and `rois` [K, 5]."""
    shape = getattr(operand_or_shape, "shape", operand_or_shape)
    num_images = shape[_arguments.LAYOUT_AXES[data_format][0]]
    return _image_groups.blocks(image_groups, rois.shape[0], num_images)


def _forward_abstract_eval(features, rois, *, pooled_size, data_format, channel_order,
                           image_groups, **_):
    ph, pw = pooled_size
    c_out = features.shape[_arguments.channel_axis(data_format)]
    if channel_order != "shared":
        c_out //= ph * pw
    pooled = _result(features, rois, _arguments.pooled_shape(
        rois.shape[0], c_out, pooled_size, data_format))
    return _partitioning.typed_result("forward", features, rois, pooled,
                                      data_format=data_format, channel_order=channel_order,
                                      image_blocks=image_blocks(features, rois, image_groups,
                                                                data_format))


def _backward_abstract_eval(cotangent, rois, *, input_shape, data_format, channel_order,
                            image_groups, **_):
    return _partitioning.typed_result("backward", cotangent, rois,
                                      _result(cotangent, rois, input_shape),
                                      data_format=data_format, channel_order=channel_order,
                                      image_blocks=image_blocks(input_shape, rois,
                                                                image_groups, data_format))


forward_p.def_abstract_eval(_forward_abstract_eval)
backward_p.def_abstract_eval(_backward_abstract_eval)
forward_p.def_impl(partial(xla.apply_primitive, forward_p))
backward_p.def_impl(partial(xla.apply_primitive, backward_p))


# --- Lowerings ----------------------------------------------------------------
# Each lowering is one device's call, (operand, rois, result shape) -> result:
# the native kernel on CPU and CUDA, the XLA path (_xla_path.py) on every
# other platform, where a CUDA install lacks its kernels and where the
# `implementation` parameter asks for it (_implementation.py).
# _partitioning.lower runs it on every device's shards when the program is
# partitioned over a mesh.

def cuda_further_results(direction, dtype, features, pooled, data_format) -> list:
    """Further results of a CUDA call, which XLA allocates as temporaries for
    the kernels (only the first result is the primitive's): for a 16-bit
    backward, the gradient's partial sums between the passes of a crowded
    tile, in float32; then the schedule's int32 workspace (gpu_schedule.h)."""
    results = []
    compute = _arguments.compute_dtype(dtype)
    if direction == "backward" and compute != dtype:
        results.append(jax.ShapeDtypeStruct((math.prod(features),), compute))
    n, _, height, _ = (features[axis] for axis in _arguments.LAYOUT_AXES[data_format])
    pooled_h, pooled_w = _arguments.pooled_size_of(pooled, data_format)
    results.append(jax.ShapeDtypeStruct((_extension.cuda_workspace_elements(
        direction == "backward", n, pooled[0], height, pooled_h, pooled_w),), np.int32))
    return results


def cpu_further_results(direction, operation, dtype, features, pooled, data_format,
                        channel_order) -> list:
    """Further results of a CPU call, which XLA allocates for the kernels: a
    backward's workspace of bytes (its passes of RoIs' tables and cotangent,
    and the sums it carries between passes)."""
    if direction == "forward":
        return []
    axes = _arguments.LAYOUT_AXES[data_format]
    order = 0 if channel_order == "shared" else _arguments.CHANNEL_ORDERS.index(channel_order)
    size = _extension.cpu_backward_workspace_bytes(
        operation, data_format, dtype, [features[a] for a in axes], [pooled[a] for a in axes],
        order)
    return [jax.ShapeDtypeStruct((size,), np.uint8)]


def _native_call(platform, direction, operand, rois, result_shape, *, operation,
                 spatial_scale, sampling_ratio, data_format, channel_order, aligned,
                 image_groups, first_bin_row=0, bin_rows=None, updated=None):
    """One kernel call. `updated` (a forward's only): the pooled tensor the
    call updates in place, leaving the outputs of RoIs that read nothing
    (multi-scale RoI Align, level after level)."""
    dtype = operand.dtype
    features, pooled = _arguments.features_and_pooled(direction, operand.shape, result_shape)
    pooled_h, _ = _arguments.pooled_size_of(pooled, data_format)
    results = [jax.ShapeDtypeStruct(result_shape, dtype)]
    if platform == "cuda":
        results += cuda_further_results(direction, dtype, features, pooled, data_format)
    else:
        results += cpu_further_results(direction, operation, dtype, features, pooled,
                                       data_format, channel_order)
    # The attribute the operations' calls differ in: roi_align's `aligned`,
    # the position-sensitive ones' channel order.
    if operation == "roi_align":
        attribute = dict(aligned=int(aligned))
    else:
        attribute = dict(channel_order=_arguments.CHANNEL_ORDERS.index(channel_order))
    name = _extension.target_name(platform, direction, dtype, data_format, operation)
    operands, aliases = (operand, rois), {}
    if updated is not None:
        operands, aliases = (operand, rois, updated), {2: 0}
    return jax.ffi.ffi_call(name, results, input_output_aliases=aliases)(
        *operands, spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio), **attribute,
        first_bin_row=int(first_bin_row), bin_rows=int(bin_rows or pooled_h),
        **group_attributes(image_groups))[0]


def group_attributes(image_groups) -> dict:
    """The kernels' image-group attributes (S64) of `image_groups`."""
    rois_per_group, images_per_group = image_groups
    return dict(rois_per_group=int(rois_per_group), images_per_group=int(images_per_group))


def _lowering(direction, platform, ctx, operand, rois, *, implementation, operation,
              spatial_scale, sampling_ratio, data_format, channel_order, aligned,
              image_groups, **params):
    native = _implementation.native(platform, implementation)
    call = partial(_native_call, platform) if native else _xla_path.pool
    local_call = partial(call, direction, operation=operation, spatial_scale=spatial_scale,
                         sampling_ratio=sampling_ratio, data_format=data_format,
                         channel_order=channel_order, aligned=aligned,
                         image_groups=image_groups)
    features = (ctx.avals_out if direction == "backward" else ctx.avals_in)[0].shape
    blocks = image_blocks(features, ctx.avals_in[1], image_groups, data_format)
    return _partitioning.lower(ctx, operand, rois, direction=direction,
                               local_call=local_call, image_blocks=blocks,
                               data_format=data_format, channel_order=channel_order,
                               bin_rows_call=native)


_partitioning.lower_with_devices(forward_p, backward_p)
for _prim, _direction in ((forward_p, "forward"), (backward_p, "backward")):
    mlir.register_lowering(_prim, partial(_lowering, _direction, None))
    for _platform in ("cpu", "cuda"):
        mlir.register_lowering(_prim, partial(_lowering, _direction, _platform),
                               platform=_platform)


# --- Differentiation ---------------------------------------------------------
# RoIs are not differentiated (torchvision gives them a zero gradient): their
# JVP rules are None and their transposes are never requested.

def _forward_transpose(cotangent, features, rois, *, pooled_size, **params):
    assert ad.is_undefined_primal(features) and not ad.is_undefined_primal(rois)
    if type(cotangent) is ad.Zero:
        return ad.Zero(features.aval), None
    return backward_p.bind(cotangent, rois, input_shape=features.aval.shape,
                           **params), None


def _backward_transpose(grad_features, cotangent, rois, *, input_shape, **params):
    assert ad.is_undefined_primal(cotangent) and not ad.is_undefined_primal(rois)
    if type(grad_features) is ad.Zero:
        return ad.Zero(cotangent.aval), None
    pooled_size = _arguments.pooled_size_of(cotangent.aval.shape, params["data_format"])
    return forward_p.bind(grad_features, rois, pooled_size=pooled_size,
                          **params), None


ad.defjvp(forward_p, lambda t, _, rois, **params: forward_p.bind(t, rois, **params),
          None)
ad.defjvp(backward_p, lambda t, _, rois, **params: backward_p.bind(t, rois, **params),
          None)
ad.primitive_transposes[forward_p] = _forward_transpose
ad.primitive_transposes[backward_p] = _backward_transpose


# --- Batching ----------------------------------------------------------------
# A mapped axis of size B over N images becomes B * N images and B * K RoIs
# in the same image groups (_image_groups.py: element b's RoIs read element
# b's images by integer arithmetic in the kernels; batch indices are left as
# they are). Unmapped operands are broadcast, except features, which are
# never copied: with only the RoIs mapped, the B RoI sets are simply
# concatenated over one image set.

def _mapped_size(args, dims) -> int:
    """The size of the mapped axis: that of the first mapped operand."""
    return next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)


def _to_front(x, dim, size):
    if dim is None:
        return jnp.broadcast_to(x, (size, *x.shape))
    return jnp.moveaxis(x, dim, 0)


def fold_call(features, features_dim, rois, rois_dim, size, image_groups):
    """The operands of a forward call folded over a mapped axis of `size`:
    (features [B * N, ...], or unmapped ones, rois [B * K, 5] in the folded
    call's order, and how many copies of the groups that order put first;
    _image_groups.fold)."""
    rois = _to_front(rois, rois_dim, size)
    if features_dim is None:
        # The B RoI sets read the same images: copies of the groups, in order.
        return features, _image_groups.fold(rois, 1), 1
    features = jnp.moveaxis(features, features_dim, 0)
    copies = _image_groups.copies(image_groups, rois.shape[1], features.shape[1])
    # Explicit sizes: with a zero-size axis, -1 is ambiguous.
    features = features.reshape((size * features.shape[1], *features.shape[2:]))
    return features, _image_groups.fold(rois, copies), copies


def fold_backward_call(cotangent, cotangent_dim, rois, rois_dim, size, image_groups,
                       num_images):
    """The pooled-like and RoI operands of a backward call folded over a
    mapped axis of `size` (the gradient is per element: its images are
    always folded), and the copies of the groups put first."""
    rois = _to_front(rois, rois_dim, size)
    copies = _image_groups.copies(image_groups, rois.shape[1], num_images)
    return (_image_groups.fold(_to_front(cotangent, cotangent_dim, size), copies),
            _image_groups.fold(rois, copies), copies)


def _forward_batch(args, dims, *, image_groups, **params):
    size = _mapped_size(args, dims)
    features, rois, copies = fold_call(*args[:1], dims[0], args[1], dims[1], size,
                                       image_groups)
    out = forward_p.bind(features, rois, image_groups=image_groups, **params)
    return _image_groups.unfold(out, size, copies), 0


def _backward_batch(args, dims, *, input_shape, image_groups, **params):
    size = _mapped_size(args, dims)
    cotangent, rois, _ = fold_backward_call(args[0], dims[0], args[1], dims[1], size,
                                            image_groups, input_shape[0])
    grad = backward_p.bind(cotangent, rois, input_shape=(size * input_shape[0], *input_shape[1:]),
                           image_groups=image_groups, **params)
    return grad.reshape((size, *input_shape)), 0


batching.primitive_batchers[forward_p] = _forward_batch
batching.primitive_batchers[backward_p] = _backward_batch
