"""The primitives of the averaging operators (ps_roi_align, roi_align,
ps_roi_pool): one pair per operator spec (_operators.py), named after it.

``<name>``:          (features, rois [K, 5]) -> pooled
``<name>_backward``: (cotangent (pooled), rois [K, 5]) -> like features

with features [N, C, H, W] and pooled [K, C_out, PH, PW] in NCHW, or
[N, H, W, C] and [K, PH, PW, C_out] in NHWC.

Both are linear in their first operand and adjoint to each other, which gives
their transpose rules and their JVPs in that operand (and so any order of
differentiation in the features). In the RoIs, the operators of samples
(ps_roi_align, roi_align) have exact first derivatives: their JVPs add the
terms of _box_derivatives.py, made of the same primitives with a
``box_parameter`` (1 to 4: the derivative of the pooled tensor with
respect to one sampling parameter of every RoI, or its transpose: the
kernels' box rows; on the XLA path, the forward-mode derivatives of its
taps). A second derivative in the RoIs raises NotImplementedError;
ps_roi_pool's pooled tensor is piecewise constant in its RoIs, whose
derivative is zero. Each has
a lowering to the native kernels on CPU and CUDA, a lowering to the XLA path
(_xla_path.py) for every other platform, and a vmap rule that folds the
mapped axis into the images and RoIs so a batch is one kernel launch.

Parameters, all static: ``pooled_size`` (PH, PW) on the forward,
``input_shape`` (the features' shape) on the backward; on both
``spatial_scale`` (a python float: an F64 FFI attribute), ``data_format``
("NCHW" or "NHWC": the kernel-table row), ``image_groups`` (rois_per_group,
images_per_group: which image each RoI's batch index counts from;
_image_groups.py), ``implementation`` ("native" or "xla", read from the
environment when the call was traced: _implementation.py) and the
operator's own attributes (its spec's ``attributes``: ``sampling_ratio``,
``channel_order``, ``aligned``) and ``box_parameter`` (0: the values).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, xla

from jax_psroi import (
    _arguments,
    _box_derivatives,
    _extension,
    _image_groups,
    _implementation,
    _operators,
    _partitioning,
    _rules,
    _xla_path,
)
from jax_psroi._operators import Operator


class Primitives(NamedTuple):
    """An averaging operator's forward and backward primitive."""
    forward: Primitive
    backward: Primitive


# --- Native calls -------------------------------------------------------------

def cuda_further_results(direction, dtype, features, pooled, data_format) -> list:
    """Further results of a CUDA call, which XLA allocates as temporaries for
    the kernels (only the first result is the primitive's): for a 16-bit
    backward, the gradient's partial sums between the passes of a crowded
    tile, in float32; then the schedule's int32 workspace (gpu_schedule.h)."""
    results = []
    compute = _arguments.compute_dtype(dtype)
    if direction == "backward" and compute != dtype:
        results.append(jax.ShapeDtypeStruct((math.prod(features),), compute))
    n, _, height, width = (features[axis] for axis in _arguments.LAYOUT_AXES[data_format])
    pooled_h, pooled_w = _arguments.pooled_size_of(pooled, data_format)
    if max(height, width) > np.iinfo(np.int32).max:
        # The backward keeps each RoI's span of pixels in int32.
        raise ValueError(f"the CUDA kernels take maps of fewer than 2^31 pixels a side, got "
                         f"{height} x {width}")
    elements = _extension.cuda_workspace_elements(direction == "backward", n, pooled[0], height,
                                                  pooled_h, pooled_w)
    if elements > np.iinfo(np.int32).max:
        # The schedule's lists hold positions in the workspace as int32.
        raise ValueError(
            f"the CUDA kernels' {direction} schedule indexes its lists of RoIs in 32 bits: "
            f"{pooled[0]} RoIs over a map of {height} rows take {elements} entries (the "
            "backward lists each RoI once per 4-row tile its box may touch), past 2^31 - 1; "
            "pool fewer RoIs per call")
    results.append(jax.ShapeDtypeStruct((elements,), np.int32))
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


def group_attributes(image_groups) -> dict:
    """The kernels' image-group attributes (S64) of `image_groups`."""
    rois_per_group, images_per_group = image_groups
    return dict(rois_per_group=int(rois_per_group), images_per_group=int(images_per_group))


def native_call(operator: Operator, platform, direction, operand, rois, result_shape, *,
                spatial_scale, sampling_ratio, data_format, channel_order, box_rule,
                image_groups, first_bin_row=0, bin_rows=None, updated=None, box_parameter=0):
    """One kernel call of `operator` (its settings as Operator.settings gives
    them). `updated` (a forward's only): the pooled tensor the call updates
    in place, leaving the outputs of RoIs that read nothing (multi-scale
    RoI Align, level after level). `box_parameter` > 0: the call of the
    direction's box row (_box_derivatives.py)."""
    dtype = operand.dtype
    features, pooled = _arguments.features_and_pooled(direction, operand.shape, result_shape)
    pooled_h, _ = _arguments.pooled_size_of(pooled, data_format)
    results = [jax.ShapeDtypeStruct(result_shape, dtype)]
    if platform == "cuda":
        results += cuda_further_results(direction, dtype, features, pooled, data_format)
    else:
        results += cpu_further_results(direction, operator.name, dtype, features, pooled,
                                       data_format, channel_order)
    row = f"box_{direction}" if box_parameter else direction
    name = _extension.target_name(platform, row, dtype, data_format, operator.name)
    operands, aliases = (operand, rois), {}
    if updated is not None:
        operands, aliases = (operand, rois, updated), {2: 0}
    attribute = operator.kernel_attributes(channel_order, box_rule)
    if box_parameter:
        attribute["box_parameter"] = int(box_parameter)
    return jax.ffi.ffi_call(name, results, input_output_aliases=aliases)(
        *operands, spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio), **attribute,
        first_bin_row=int(first_bin_row), bin_rows=int(bin_rows or pooled_h),
        **group_attributes(image_groups))[0]


# --- The primitives of one operator -------------------------------------------

def _make(operator: Operator) -> Primitives:
    forward_p = Primitive(operator.name)
    backward_p = Primitive(f"{operator.name}_backward")

    # Shapes only: the public functions check the arguments (_arguments.py),
    # and the rules below preserve what they checked.
    def forward_abstract_eval(features, rois, *, pooled_size, data_format, image_groups,
                              **params):
        ph, pw = pooled_size
        c_out = features.shape[_arguments.channel_axis(data_format)]
        if operator.position_sensitive:
            c_out //= ph * pw
        shape = _arguments.pooled_shape(rois.shape[0], c_out, pooled_size, data_format)
        return _rules.typed_result("forward", features, rois, shape, data_format=data_format,
                                   channel_order=operator.channel_order(params),
                                   image_groups=image_groups)

    def backward_abstract_eval(cotangent, rois, *, input_shape, data_format, image_groups,
                               **params):
        return _rules.typed_result("backward", cotangent, rois, input_shape,
                                   data_format=data_format,
                                   channel_order=operator.channel_order(params),
                                   image_groups=image_groups)

    # One device's call, (operand, rois, result_shape=) -> result: the native
    # kernel on CPU and CUDA, the XLA path on every other platform, where a
    # CUDA install lacks its kernels and where the `implementation` parameter
    # asks for it. _partitioning.lower runs it on every device's shards when
    # the program is partitioned over a mesh.
    def lowering(direction, platform, ctx, operand, rois, *, implementation, spatial_scale,
                 data_format, image_groups, box_parameter, pooled_size=None, input_shape=None,
                 **params):
        native = _implementation.native(platform, implementation)
        if native:
            call = partial(native_call, operator, platform, box_parameter=box_parameter)
        elif box_parameter:
            call = partial(_xla_path.box_derivative, box_parameter)
        else:
            call = _xla_path.pool
        settings = operator.settings(params)
        local_call = partial(call, direction, spatial_scale=spatial_scale,
                             data_format=data_format, image_groups=image_groups, **settings)
        blocks = _rules.image_blocks(_rules.features_shape_of(direction, ctx), ctx.avals_in[1],
                                     image_groups, data_format)
        return _partitioning.lower(ctx, operand, rois, direction=direction,
                                   local_call=local_call, image_blocks=blocks,
                                   data_format=data_format,
                                   channel_order=settings["channel_order"],
                                   bin_rows_call=native)

    # JVPs: linear in the first operand; in the RoIs (operators of samples,
    # first order), the sum over the four box parameters of the box calls
    # times the parameters' tangents, per RoI (_box_derivatives.py). The
    # RoIs are never transposed: their tangents enter through jax.numpy.
    def parameter_tangents(rois, rois_dot, params, pooled_size):
        if params["box_parameter"]:
            raise NotImplementedError(
                f"jax_psroi.{operator.name}: second derivatives with respect to the boxes are "
                "not implemented (first derivatives, and mixed ones of first order in the "
                "boxes, are exact)")
        return _box_derivatives.parameter_tangents(
            rois, rois_dot, spatial_scale=params["spatial_scale"], pooled_size=pooled_size,
            aligned=operator.box_rule(params).aligned)

    def jvp_rule(primitive, direction):
        # The box calls' terms: a forward's outputs scaled per RoI by the
        # parameters' tangents, or a backward's cotangents scaled alike.
        def jvp(primals, tangents, **params):
            operand, rois = primals
            operand_dot, rois_dot = tangents
            result = primitive.bind(operand, rois, **params)
            result_dot = (ad.Zero(jax.typeof(result).to_tangent_aval())
                          if type(operand_dot) is ad.Zero
                          else primitive.bind(operand_dot, rois, **params))
            if type(rois_dot) is ad.Zero or operator.box_rule(params).whole_pixels:
                return result, result_dot
            pooled = result.shape if direction == "forward" else operand.shape
            theta_dot = parameter_tangents(
                rois, rois_dot, params, _arguments.pooled_size_of(pooled, params["data_format"]))
            for j in _box_derivatives.PARAMETERS:
                box = {**params, "box_parameter": j}
                scaled = lambda x, j=j: _box_derivatives.scaled(
                    x, _box_derivatives.per_roi(theta_dot[:, j - 1], x))
                term = (scaled(primitive.bind(operand, rois, **box)) if direction == "forward"
                        else primitive.bind(scaled(operand), rois, **box))
                result_dot = term if type(result_dot) is ad.Zero else result_dot + term
            return result, result_dot
        return jvp

    def forward_transpose(cotangent, features, rois, *, pooled_size, **params):
        assert ad.is_undefined_primal(features) and not ad.is_undefined_primal(rois)
        if type(cotangent) is ad.Zero:
            return ad.Zero(features.aval), None
        return backward_p.bind(cotangent, rois, input_shape=features.aval.shape,
                               **params), None

    def backward_transpose(grad_features, cotangent, rois, *, input_shape, **params):
        assert ad.is_undefined_primal(cotangent) and not ad.is_undefined_primal(rois)
        if type(grad_features) is ad.Zero:
            return ad.Zero(cotangent.aval), None
        pooled_size = _arguments.pooled_size_of(cotangent.aval.shape, params["data_format"])
        return forward_p.bind(grad_features, rois, pooled_size=pooled_size, **params), None

    def forward_batch(args, dims, *, image_groups, **params):
        size = _rules.mapped_size(args, dims)
        (features,), rois, folding = _rules.fold_maps(args[:1], dims[:1], args[1], dims[1],
                                                     size, image_groups)
        out = forward_p.bind(features, rois, image_groups=image_groups, **params)
        return _image_groups.unfold(out, folding), 0

    def backward_batch(args, dims, *, input_shape, image_groups, **params):
        size = _rules.mapped_size(args, dims)
        cotangent, rois, _ = _rules.fold_backward(args[0], dims[0], args[1], dims[1], size,
                                                  image_groups, input_shape[0])
        grad = backward_p.bind(cotangent, rois,
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


PRIMITIVES: dict[str, Primitives] = {operator.name: _make(operator)
                                     for operator in _operators.AVERAGING}


def apply(operator: Operator, input, boxes, output_size, spatial_scale, data_format,
          **attributes) -> jax.Array:
    """A public call of averaging `operator`: its arguments checked, its
    RoIs and image groups made, its forward primitive bound."""
    features, rois, params = _arguments.call(
        input, boxes, output_size, spatial_scale, _arguments.NO_SAMPLING_RATIO, data_format,
        attributes.get("channel_order", "torchvision"), _extension.SUPPORTED_DTYPES,
        position_sensitive=operator.position_sensitive)
    del params["channel_order"]  # the operator's own attributes, below
    rois, groups = _image_groups.of_call(boxes, rois, features.shape[0])
    features, rois = _rules.varying_alike(features, rois)
    return PRIMITIVES[operator.name].forward.bind(
        features, rois, image_groups=groups, implementation=_implementation.requested(),
        box_parameter=0, **params, **operator.check(**attributes))

