"""The two primitives of PS-RoI Align and their JAX rules.

``forward_p``:  (features, rois [K, 5]) -> pooled
``backward_p``: (cotangent (pooled), rois [K, 5]) -> like features

with features [N, C, H, W] and pooled [K, C_out, PH, PW] in NCHW, or
[N, H, W, C] and [K, PH, PW, C_out] in NHWC.

Both are linear in their first operand and adjoint to each other, which gives
their JVP and transpose rules (and so any order of differentiation). Each has
a lowering to the native kernels on CPU and CUDA, a lowering of the
``jax.numpy`` reference for every other platform, and a vmap rule that folds
the mapped axis into the image / RoI axes so a batch is one kernel launch.

Parameters, all static: ``pooled_size`` (PH, PW) on ``forward_p``,
``input_shape`` (the features' shape) on ``backward_p``; on both
``spatial_scale`` (a python float: an F64 FFI attribute), ``sampling_ratio``
(a python int: S64), ``data_format`` ("NCHW" or "NHWC": the kernel-table row)
and ``channel_order`` ("torchvision" or "bin_major": an S64 attribute).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

from jax_psroi import _arguments, _extension, reference

forward_p = Primitive("jax_psroi_forward")
backward_p = Primitive("jax_psroi_backward")


# Shapes only: the public functions check the arguments (_arguments.py), and
# the rules below preserve what they checked.
def _forward_abstract_eval(features, rois, *, pooled_size, data_format, **_):
    ph, pw = pooled_size
    c_out = features.shape[_arguments.channel_axis(data_format)] // (ph * pw)
    return jax.core.ShapedArray(
        _arguments.pooled_shape(rois.shape[0], c_out, pooled_size, data_format), features.dtype)


def _backward_abstract_eval(cotangent, rois, *, input_shape, **_):
    del rois
    return jax.core.ShapedArray(tuple(input_shape), cotangent.dtype)


forward_p.def_abstract_eval(_forward_abstract_eval)
backward_p.def_abstract_eval(_backward_abstract_eval)
forward_p.def_impl(partial(xla.apply_primitive, forward_p))
backward_p.def_impl(partial(xla.apply_primitive, backward_p))


# --- Reference semantics, used by the generic lowering ----------------------

def _forward_reference(features, rois, **params):
    return reference.pool(features, rois, **params)


def _backward_reference(cotangent, rois, *, input_shape, **params):
    pooled_size = _arguments.pooled_size_of(cotangent.shape, params["data_format"])
    zeros = jnp.zeros(input_shape, cotangent.dtype)
    _, vjp = jax.vjp(lambda x: reference.pool(x, rois, pooled_size, **params), zeros)
    return vjp(cotangent)[0]


mlir.register_lowering(
    forward_p, mlir.lower_fun(_forward_reference, multiple_results=False))
mlir.register_lowering(
    backward_p, mlir.lower_fun(_backward_reference, multiple_results=False))


# --- Native lowerings --------------------------------------------------------

def _native_lowering(platform, direction, ctx, operand, rois, *,
                     spatial_scale, sampling_ratio, data_format, channel_order, **_):
    dtype = ctx.avals_in[0].dtype
    name = _extension.target_name(platform, direction, dtype, data_format)
    if platform == "cuda":
        # Further results that XLA allocates as temporaries for the kernels;
        # only the first is the primitive's result.
        features, pooled = ((ctx.avals_in[0], ctx.avals_out[0]) if direction == "forward"
                            else (ctx.avals_out[0], ctx.avals_in[0]))
        pooled_h, pooled_w = _arguments.pooled_size_of(pooled.shape, data_format)
        further = []
        compute = _arguments.compute_dtype(dtype)
        if direction == "backward" and compute != dtype:
            # A 16-bit gradient's partial sums between the passes of a crowded
            # tile, in float32.
            further.append(jax.core.ShapedArray((features.size,), compute))
        n, _, height, _ = (features.shape[axis]
                           for axis in _arguments.LAYOUT_AXES[data_format])
        further.append(jax.core.ShapedArray((_extension.cuda_workspace_elements(
            direction == "backward", n, pooled.shape[0], height, pooled_h, pooled_w),),
            np.int32))
        ctx = ctx.replace(avals_out=[ctx.avals_out[0], *further])
    results = jax.ffi.ffi_lowering(name)(
        ctx, operand, rois, spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio),
        channel_order=_arguments.CHANNEL_ORDERS.index(channel_order))
    return results[:1]


for _prim, _direction in ((forward_p, "forward"), (backward_p, "backward")):
    for _platform in ("cpu", "cuda"):
        mlir.register_lowering(
            _prim, partial(_native_lowering, _platform, _direction),
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
# A mapped axis of size B over N images becomes B * N images: RoI batch
# indices are offset by b * N, and invalid ones are set to -1 first so they
# stay invalid instead of pointing into another image. Unmapped operands are
# broadcast, except features, which are never copied: with only the RoIs
# mapped, the B RoI sets are simply concatenated over one image set.

def _to_front(x, dim, size):
    if dim is None:
        return jnp.broadcast_to(x, (size, *x.shape))
    return jnp.moveaxis(x, dim, 0)


def _offset_batch_index(rois, num_images):
    """rois [B, K, 5] over N images each -> [B * K, 5] over B * N images."""
    index = rois[..., 0]
    valid = (index > -1) & (index < num_images) & (num_images > 0)
    batch = jnp.arange(rois.shape[0], dtype=rois.dtype)[:, None]
    new_index = jnp.where(valid, jnp.trunc(index) + batch * num_images, -1)
    rois = jnp.concatenate([new_index[..., None], rois[..., 1:]], axis=-1)
    return rois.reshape(-1, 5)


def _forward_batch(args, dims, **params):
    features, rois = args
    features_dim, rois_dim = dims
    size = (features.shape[features_dim] if features_dim is not None
            else rois.shape[rois_dim])
    rois = _to_front(rois, rois_dim, size)
    num_rois = rois.shape[1]
    if features_dim is None:
        out = forward_p.bind(features, rois.reshape(-1, 5), **params)
    else:
        features = jnp.moveaxis(features, features_dim, 0)
        num_images = features.shape[1]
        out = forward_p.bind(features.reshape((-1, *features.shape[2:])),
                             _offset_batch_index(rois, num_images), **params)
    return out.reshape((size, num_rois, *out.shape[1:])), 0


def _backward_batch(args, dims, *, input_shape, **params):
    cotangent, rois = args
    cotangent_dim, rois_dim = dims
    size = (cotangent.shape[cotangent_dim] if cotangent_dim is not None
            else rois.shape[rois_dim])
    cotangent = _to_front(cotangent, cotangent_dim, size)
    rois = _to_front(rois, rois_dim, size)
    num_images = input_shape[0]
    grad = backward_p.bind(
        cotangent.reshape((-1, *cotangent.shape[2:])),
        _offset_batch_index(rois, num_images),
        input_shape=(size * num_images, *input_shape[1:]), **params)
    return grad.reshape((size, *input_shape)), 0


batching.primitive_batchers[forward_p] = _forward_batch
batching.primitive_batchers[backward_p] = _backward_batch
