"""The primitive of multi-scale RoI Align and its JAX rules.

``multi_scale_roi_align``: (level_0, ..., level_{L-1}, rois [K, 5], levels [K] int32)
-> pooled [K, C, PH, PW] (NCHW; [K, PH, PW, C] in NHWC), RoI k pooled by
roi_align (aligned=False) from map ``levels[k]`` (none, giving 0, for -1).

Native lowering: one roi_align kernel call per level, each given the RoIs of
the other levels as RoIs that read nothing (_levels.level_rois) and updating
the result of the call before in place (the kernels' `updated` operand), so
each RoI is pooled from its level alone and the result is written once per
RoI. Its transpose is roi_align's backward primitive once per level (on that
level's RoIs), whose own transpose is roi_align's forward: every order of
differentiation runs on the native kernels. Elsewhere it lowers to the XLA
path (_xla_path.py), roi_align's per level.

Parameters, all static: ``pooled_size`` (PH, PW), ``spatial_scales`` (one
python float per level), ``sampling_ratio``, ``data_format``,
``image_groups`` and ``implementation`` (as the averaging operators'
primitives, _averaging.py).

Over a device mesh it splits as roi_align does (_partitioning.py): over
images (with blocks of images), RoIs or channels, every level alike and the
RoIs' levels like the RoIs; its transpose is roi_align's backward, which has
those rules too.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, xla

from jax_psroi import (
    _arguments,
    _averaging,
    _box_derivatives,
    _image_groups,
    _implementation,
    _levels,
    _operators,
    _partitioning,
    _rules,
    _xla_path,
)

multi_scale_p = Primitive("multi_scale_roi_align")
_ROI_ALIGN = _operators.ROI_ALIGN


def _abstract_eval(*operands, pooled_size, data_format, image_groups, **_):
    features, rois = operands[0], operands[-2]
    channels = features.shape[_arguments.channel_axis(data_format)]
    return _rules.typed_result(
        "forward", features, rois,
        _arguments.pooled_shape(rois.shape[0], channels, pooled_size, data_format),
        data_format=data_format, channel_order="shared", image_groups=image_groups)


multi_scale_p.def_abstract_eval(_abstract_eval)
multi_scale_p.def_impl(partial(xla.apply_primitive, multi_scale_p))


def _level_params(sampling_ratio):
    """roi_align's own parameters for every level."""
    return dict(sampling_ratio=sampling_ratio, aligned=False)


def _native(platform, *operands, result_shape, spatial_scales, sampling_ratio, data_format,
            image_groups):
    *maps, rois, levels = operands
    # RoIs of no level stay 0.
    pooled = jnp.zeros(result_shape, maps[0].dtype)
    for level, (features, scale) in enumerate(zip(maps, spatial_scales, strict=True)):
        pooled = _averaging.native_call(
            _ROI_ALIGN, platform, "forward", features, _levels.level_rois(rois, levels, level),
            result_shape, updated=pooled, spatial_scale=scale, data_format=data_format,
            image_groups=image_groups, **_ROI_ALIGN.settings(_level_params(sampling_ratio)))
    return pooled


def _lowering(platform, ctx, *operands, implementation, spatial_scales, sampling_ratio,
              data_format, image_groups, **_):
    call = (partial(_native, platform) if _implementation.native(platform, implementation)
            else _xla_path.multi_scale)
    blocks = _rules.image_blocks(ctx.avals_in[0].shape, ctx.avals_in[-2], image_groups,
                                      data_format)
    return _partitioning.lower_pyramid(
        ctx, *operands, image_blocks=blocks, data_format=data_format,
        local_call=partial(call, spatial_scales=spatial_scales,
                           sampling_ratio=sampling_ratio, data_format=data_format,
                           image_groups=image_groups))


_rules.register_lowerings(multi_scale_p, _lowering)


# --- Differentiation ---------------------------------------------------------
# Linear in the maps. In the RoIs, exact first derivatives: per level, as
# roi_align's (_box_derivatives.py) with the level's scale, from roi_align's
# box calls on the level's RoIs (the others read nothing there). Levels are
# integers.

def _jvp(primals, tangents, *, pooled_size, spatial_scales, sampling_ratio, data_format,
         image_groups, implementation):
    *maps, rois, levels = primals
    params = dict(pooled_size=pooled_size, spatial_scales=spatial_scales,
                  sampling_ratio=sampling_ratio, data_format=data_format,
                  image_groups=image_groups, implementation=implementation)
    out = multi_scale_p.bind(*primals, **params)
    map_tangents, rois_dot = tangents[:len(maps)], tangents[len(maps)]
    out_dot = ad.Zero(jax.typeof(out).to_tangent_aval())
    if not all(type(t) is ad.Zero for t in map_tangents):
        map_tangents = [ad.instantiate_zeros(t) for t in map_tangents]
        out_dot = multi_scale_p.bind(*map_tangents, rois, levels, **params)
    if type(rois_dot) is ad.Zero:
        return out, out_dot
    forward = _averaging.PRIMITIVES[_ROI_ALIGN.name].forward
    level_params = _level_params(sampling_ratio)
    aligned = _ROI_ALIGN.box_rule(level_params).aligned
    for level, (features, scale) in enumerate(zip(maps, spatial_scales, strict=True)):
        theta_dot = _box_derivatives.parameter_tangents(
            rois, rois_dot, spatial_scale=scale, pooled_size=pooled_size, aligned=aligned)
        level_rois = _levels.level_rois(rois, levels, level)
        for j in _box_derivatives.PARAMETERS:
            term = forward.bind(features, level_rois, pooled_size=pooled_size,
                                implementation=implementation, spatial_scale=scale,
                                data_format=data_format, image_groups=image_groups,
                                box_parameter=j, **level_params)
            term = _box_derivatives.scaled(
                term, _box_derivatives.per_roi(theta_dot[:, j - 1], term))
            out_dot = term if type(out_dot) is ad.Zero else out_dot + term
    return out, out_dot


def _transpose(cotangent, *operands, pooled_size, spatial_scales, sampling_ratio,
               data_format, image_groups, implementation):
    *maps, rois, levels = operands
    assert not ad.is_undefined_primal(rois) and not ad.is_undefined_primal(levels)
    grads = []
    for level, (features, scale) in enumerate(zip(maps, spatial_scales, strict=True)):
        if not ad.is_undefined_primal(features):
            grads.append(None)
        elif type(cotangent) is ad.Zero:
            grads.append(ad.Zero(features.aval))
        else:
            grads.append(_averaging.PRIMITIVES[_ROI_ALIGN.name].backward.bind(
                cotangent, _levels.level_rois(rois, levels, level),
                input_shape=features.aval.shape, implementation=implementation,
                spatial_scale=scale, data_format=data_format, image_groups=image_groups,
                box_parameter=0, **_level_params(sampling_ratio)))
    return [*grads, None, None]


ad.primitive_jvps[multi_scale_p] = _jvp
ad.primitive_transposes[multi_scale_p] = _transpose


# --- Batching ----------------------------------------------------------------
# As for roi_align's primitives: a mapped axis of size B folds into the
# images of every level, in the same image groups, or, with only the RoIs
# mapped, the B RoI sets are concatenated over one set of maps.

def _batch(args, dims, *, image_groups, **params):
    *maps, rois, levels = args
    *map_dims, rois_dim, levels_dim = dims
    size = _rules.mapped_size(args, dims)
    maps, rois, folding = _rules.fold_maps(maps, map_dims, rois, rois_dim, size, image_groups)
    levels = _rules.fold_like_rois(levels, levels_dim, folding)
    out = multi_scale_p.bind(*maps, rois, levels, image_groups=image_groups, **params)
    return _image_groups.unfold(out, folding), 0


batching.primitive_batchers[multi_scale_p] = _batch
