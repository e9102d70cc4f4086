"""The primitives of deformable RoI Align and PS-RoI Align, a pair each:

``deform_<op>``:          (features, rois [K, 5], offset [K, 2, PH, PW]) -> pooled
``deform_<op>_backward``: (cotangent (pooled), rois, offset) -> like features

for op ``roi_align`` (every bin of output channel c reads input channel c)
and ``ps_roi_align`` (position-sensitive), features [N, C, H, W] and pooled
[K, C_out, PH, PW] in NCHW, or [N, H, W, C] and [K, PH, PW, C_out] in NHWC.
Bin (ph, pw) of RoI k starts where the plain operator's does, moved by
``gamma * size * offset[k, :, ph, pw]`` (x, then y; lib/deformable.h).

Both primitives are linear in their first operand and adjoint to each
other. In the RoIs and the offsets, a bin sees four sampling parameters:

    start_x = x1 * scale - 0.5 + gamma * size_w * offset_x    bin_w = size_w / PW
    start_y = y1 * scale - 0.5 + gamma * size_h * offset_y    bin_h = size_h / PH

with size = (x2 - x1) * scale; the kernels' derivative directions
(``box_parameter`` 1 to 4) give the pooled tensor's derivative with respect
to one of them for every bin at once, so the JVP is

    pooled_dot = forward(features_dot) + sum_j D_j(features) * theta_dot_j

with theta_dot [K, PH, PW, 4] (:func:`parameter_tangents`, jax.numpy,
linear in the tangents of the boxes and offsets) scaled onto each bin's
outputs; reverse mode transposes the jax.numpy and the D_j (to the
backward's derivative directions). Second derivatives in the RoIs or the
offsets raise NotImplementedError. A vmap axis folds into the images and
RoIs (one launch). Over a device mesh, the calls split as the plain
operators' do (_partitioning.py), the offsets like the RoIs. Native
kernels on CPU and CUDA; every other platform, and
``implementation="xla"``, runs the XLA path (_xla_path.deformable:
gathers and scatter-adds of each bin's taps).

Parameters, all static: ``pooled_size`` on the forward, ``input_shape`` on
the backward; on both ``spatial_scale``, ``sampling_ratio``, ``gamma``,
``data_format``, ``channel_order`` ("shared" for deform_roi_align, else a
position-sensitive order), ``image_groups``, ``implementation`` and
``box_parameter`` (0: the values).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, xla

from jax_psroi import (
    _arguments,
    _box_derivatives,
    _extension,
    _image_groups,
    _implementation,
    _partitioning,
    _rules,
    _xla_path,
    reference_deformable,
)


class Primitives(NamedTuple):
    forward: Primitive
    backward: Primitive


def _kernel_attributes(channel_order: str) -> dict:
    """The plain operator's attribute, as the deformable kernels take it."""
    if channel_order == "shared":
        return {"aligned": 1}
    return {"channel_order": _arguments.CHANNEL_ORDERS.index(channel_order)}


def _native_call(name, platform, direction, operand, rois, offset, result_shape, *,
                 spatial_scale, sampling_ratio, gamma, data_format, channel_order,
                 image_groups, box_parameter, first_bin_row=0, bin_rows=None):
    """One kernel call; rows [first_bin_row, first_bin_row + PH) of grids
    of `bin_rows` rows (a device's share of a bin-major map split over
    channels, with its rows of the offsets)."""
    dtype = jnp.dtype(operand.dtype)
    _, pooled = _arguments.features_and_pooled(direction, operand.shape, result_shape)
    pooled_h, _ = _arguments.pooled_size_of(pooled, data_format)
    row = _extension.DEFORM_KERNELS[platform][(name, direction, data_format, dtype)]
    # The backward's gradient comes in the compute type: rounded once, here.
    result_dtype = dtype if direction == "forward" else _arguments.compute_dtype(dtype)
    rois_per_group, images_per_group = image_groups
    result = jax.ffi.ffi_call(row.name, jax.ShapeDtypeStruct(result_shape, result_dtype))(
        operand, rois, offset, spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio), gamma=float(gamma),
        **_kernel_attributes(channel_order), first_bin_row=int(first_bin_row),
        bin_rows=int(bin_rows or pooled_h), box_parameter=int(box_parameter),
        rois_per_group=int(rois_per_group), images_per_group=int(images_per_group))
    return result.astype(dtype)


def parameter_tangents(rois, rois_dot, offset, offset_dot, *, spatial_scale, pooled_size,
                       gamma):
    """The tangents [K, PH, PW, 4] of every bin's sampling parameters (x
    start, bin width, y start, bin height) for the tangents of `rois` [K, 5]
    and `offset` [K, 2, PH, PW]: the forward-mode derivative of
    reference_deformable.sampling_parameters, the kernels' geometry.

    Its conventions keep them finite where the parameters are not (a bin
    whose moved start is not finite reads nothing, and the kernels'
    derivatives there are 0), so that neither mode multiplies an infinity
    by 0."""
    def parameters(rois, offset):
        return reference_deformable.sampling_parameters(rois, offset, pooled_size,
                                                        spatial_scale, gamma)[:4]

    start_x, bin_w, start_y, bin_h = jax.jvp(parameters, (rois, offset),
                                             (rois_dot, offset_dot))[1]
    per_roi = lambda values: jnp.broadcast_to(values[:, None, None], start_x.shape)
    return jnp.stack([start_x, per_roi(bin_w), start_y, per_roi(bin_h)], axis=-1)


def per_bin(values, data_format):
    """`values` [K, PH, PW] shaped to broadcast against a pooled tensor in
    `data_format`."""
    return values[:, None] if data_format == "NCHW" else values[..., None]


def _make(operation: str) -> Primitives:
    forward_p = Primitive(operation)
    backward_p = Primitive(f"{operation}_backward")

    def forward_abstract_eval(features, rois, offset, *, pooled_size, data_format,
                              channel_order, image_groups, **params):
        ph, pw = pooled_size
        c_out = features.shape[_arguments.channel_axis(data_format)]
        if channel_order != "shared":
            c_out //= ph * pw
        shape = _arguments.pooled_shape(rois.shape[0], c_out, pooled_size, data_format)
        return _rules.typed_result("forward", features, rois, shape, data_format=data_format,
                                   channel_order=channel_order, image_groups=image_groups)

    def backward_abstract_eval(cotangent, rois, offset, *, input_shape, data_format,
                               channel_order, image_groups, **params):
        return _rules.typed_result("backward", cotangent, rois, input_shape,
                                   data_format=data_format, channel_order=channel_order,
                                   image_groups=image_groups)

    # One device's call, (operand, rois, offset, result_shape=) -> result,
    # run on every device's shards by _partitioning.lower when the program
    # is partitioned over a mesh (the offsets split like the RoIs).
    def lowering(direction, platform, ctx, operand, rois, offset, *, implementation,
                 pooled_size=None, input_shape=None, **params):
        native = _implementation.native(platform, implementation, _extension.DEFORM_KERNELS)
        call = (partial(_native_call, operation, platform, direction) if native
                else partial(_xla_path.deformable, direction))

        def local_call(operand, rois, offset, *, result_shape, **rows):
            return call(operand, rois, offset, result_shape, **params, **rows)

        blocks = _rules.image_blocks(_rules.features_shape_of(direction, ctx), ctx.avals_in[1],
                                     params["image_groups"], params["data_format"])
        return _partitioning.lower(ctx, operand, rois, offset, direction=direction,
                                   local_call=local_call, image_blocks=blocks,
                                   data_format=params["data_format"],
                                   channel_order=params["channel_order"], bin_rows_call=native,
                                   bin_operands=1)

    def jvp_rule(primitive, direction):
        def jvp(primals, tangents, **params):
            operand, rois, offset = primals
            operand_dot, rois_dot, offset_dot = tangents
            result = primitive.bind(operand, rois, offset, **params)
            result_dot = (ad.Zero(jax.typeof(result).to_tangent_aval())
                          if type(operand_dot) is ad.Zero
                          else primitive.bind(operand_dot, rois, offset, **params))
            if type(rois_dot) is ad.Zero and type(offset_dot) is ad.Zero:
                return result, result_dot
            if params["box_parameter"]:
                raise NotImplementedError(
                    f"jax_psroi.{operation}: second derivatives with respect to the boxes or "
                    "offsets are not implemented (first derivatives, and mixed ones of first "
                    "order in them, are exact)")
            pooled = result.shape if direction == "forward" else operand.shape
            theta_dot = parameter_tangents(
                rois, ad.instantiate_zeros(rois_dot), offset, ad.instantiate_zeros(offset_dot),
                spatial_scale=params["spatial_scale"], gamma=params["gamma"],
                pooled_size=_arguments.pooled_size_of(pooled, params["data_format"]))
            for j in _box_derivatives.PARAMETERS:
                box = {**params, "box_parameter": j}

                def scaled(x, j=j):
                    return _box_derivatives.scaled(
                        x, per_bin(theta_dot[..., j - 1], params["data_format"]))

                term = (scaled(primitive.bind(operand, rois, offset, **box))
                        if direction == "forward"
                        else primitive.bind(scaled(operand), rois, offset, **box))
                result_dot = term if type(result_dot) is ad.Zero else result_dot + term
            return result, result_dot
        return jvp

    def forward_transpose(cotangent, features, rois, offset, *, pooled_size, **params):
        assert ad.is_undefined_primal(features)
        assert not ad.is_undefined_primal(rois) and not ad.is_undefined_primal(offset)
        if type(cotangent) is ad.Zero:
            return ad.Zero(features.aval), None, None
        return backward_p.bind(cotangent, rois, offset, input_shape=features.aval.shape,
                               **params), None, None

    def backward_transpose(grad_features, cotangent, rois, offset, *, input_shape, **params):
        assert ad.is_undefined_primal(cotangent)
        assert not ad.is_undefined_primal(rois) and not ad.is_undefined_primal(offset)
        if type(grad_features) is ad.Zero:
            return ad.Zero(cotangent.aval), None, None
        pooled_size = _arguments.pooled_size_of(cotangent.aval.shape, params["data_format"])
        return forward_p.bind(grad_features, rois, offset, pooled_size=pooled_size,
                              **params), None, None

    def forward_batch(args, dims, *, image_groups, **params):
        size = _rules.mapped_size(args, dims)
        (features,), rois, folding = _rules.fold_maps(args[:1], dims[:1], args[1], dims[1],
                                                     size, image_groups)
        offset = _rules.fold_like_rois(args[2], dims[2], folding)
        out = forward_p.bind(features, rois, offset, image_groups=image_groups, **params)
        return _image_groups.unfold(out, folding), 0

    def backward_batch(args, dims, *, input_shape, image_groups, **params):
        size = _rules.mapped_size(args, dims)
        cotangent, rois, folding = _rules.fold_backward(args[0], dims[0], args[1], dims[1], size,
                                                       image_groups, input_shape[0])
        offset = _rules.fold_like_rois(args[2], dims[2], folding)
        grad = backward_p.bind(cotangent, rois, offset,
                               input_shape=_rules.folded_input_shape(size, input_shape),
                               image_groups=image_groups, **params)
        return grad.reshape((size, *input_shape)), 0

    forward_p.def_abstract_eval(forward_abstract_eval)
    backward_p.def_abstract_eval(backward_abstract_eval)
    for primitive, direction, transpose, batch in (
            (forward_p, "forward", forward_transpose, forward_batch),
            (backward_p, "backward", backward_transpose, backward_batch)):
        primitive.def_impl(partial(xla.apply_primitive, primitive))
        _rules.register_lowerings(primitive, partial(lowering, direction))
        ad.primitive_jvps[primitive] = jvp_rule(primitive, direction)
        ad.primitive_transposes[primitive] = transpose
        batching.primitive_batchers[primitive] = batch
    return Primitives(forward_p, backward_p)


PRIMITIVES: dict[str, Primitives] = {name: _make(name)
                                     for name in ("deform_roi_align", "deform_ps_roi_align")}


def checked_offset(offset, num_rois: int, pooled_size, dtype) -> jax.Array:
    """`offset` [K, 2, PH, PW] of real numbers in `dtype` (zeros for None),
    or a ValueError/TypeError naming what is wrong."""
    shape = (num_rois, 2, *pooled_size)
    if offset is None:
        return jnp.zeros(shape, dtype)
    held = jnp.asarray(offset)
    if not (jnp.issubdtype(held.dtype, jnp.floating) or jnp.issubdtype(held.dtype, jnp.integer)):
        raise TypeError(f"offset must be a real floating-point or integer array, got {held.dtype}")
    if held.shape != shape:
        raise ValueError(f"offset must be [K, 2, h, w] = {list(shape)} (K boxes, x then y "
                         f"offsets per bin), got {list(held.shape)}")
    return held.astype(dtype)


def apply(operation: str, input, boxes, offset, output_size, spatial_scale, sampling_ratio,
          gamma, data_format, channel_order) -> jax.Array:
    """A public call: its arguments checked, its forward primitive bound."""
    position_sensitive = channel_order != "shared"
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, sampling_ratio, data_format,
        channel_order if position_sensitive else "torchvision", _extension.SUPPORTED_DTYPES,
        position_sensitive=position_sensitive)
    params["channel_order"] = channel_order
    gamma = checked_gamma(gamma, rois.dtype)
    offset = checked_offset(offset, rois.shape[0], params["pooled_size"], rois.dtype)
    rois, groups = _image_groups.of_call(boxes, rois, features.shape[0])
    features, rois, offset = _rules.varying_alike(features, rois, offset)
    return PRIMITIVES[operation].forward.bind(
        features, rois, offset, image_groups=groups, implementation=_implementation.requested(),
        box_parameter=0, gamma=gamma, **params)


def checked_gamma(value, dtype=None) -> float:
    """`value` as a finite python float known at trace time (a TypeError for
    anything but a real number, a ValueError for one not finite); given
    `dtype` (the boxes' compute dtype, in which the kernels take it), finite
    in it too (a layer's settings, checked before any input is seen, are
    not)."""
    gamma = _arguments.static_real("gamma", value)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite real number, got {value!r}")
    if dtype is not None and abs(gamma) > float(jnp.finfo(dtype).max):
        raise ValueError(f"gamma must be finite in {jnp.dtype(dtype).name}, the dtype the "
                         f"kernels compute in for this input (|gamma| <= "
                         f"{float(jnp.finfo(dtype).max):g}), got {value!r}")
    return gamma
