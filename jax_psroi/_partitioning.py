"""How the primitives split over a device mesh (``jax.sharding``): the
averaging operators' (``_averaging.py``), RoI Pool's (``_roi_pool.py``,
whose pixels operand or result splits like the pooled tensor) and
multi-scale RoI Align's forward
(``_multi_scale.py``: its levels split alike, the RoIs' levels like the
RoIs), deformable RoI Align's (``_deformable.py``: its per-bin offsets
[K, 2, PH, PW] split like the RoIs and, with a bin-major map's channels,
over their bin rows) and non-maximum suppression (``_nms.py``: over its images only, at
the end of this file).

XLA's SPMD partitioner sees a kernel as an opaque custom call and gathers its
operands onto every device. So when a program is partitioned over several
devices, a primitive lowers through ``jax.experimental.custom_partitioning``:
a Shardy rule tells sharding propagation how the axes of the operands and
results correspond, and a partition callback takes the shardings propagation
chose and returns the shardings the call runs in and the program of one
device (the same kernel, on its shard). Per mesh axis, the call splits over

* images: features sharded over N and RoIs over K by the same mesh axes,
  when the RoIs are known to come in equal blocks that read only the images
  of their block (``image_blocks``: the primitives' image groups when they
  are such blocks, as after a vmap over images or for a list of equally
  many boxes per image; _image_groups.py). Each device pools its own
  images with the same groups: batch indices count from their group's
  first image, so they are local as they are. No communication, forward or
  backward. RoIs in such blocks split over K with the features replicated
  split this way too (each device slices its images out of the replica).
* RoIs: RoIs sharded over K, features replicated over those axes. The
  forward's output is sharded over K; the backward's feature gradient is
  the sum of the devices' gradients (one all-reduce). With several image
  groups, only when each device holds whole periods of the groups
  (_image_groups.Blocks): its RoIs then read the images the whole call's
  would.
* channel groups: features sharded over C in whole groups. In torchvision
  order the PH * PW input channels of one output channel are contiguous, so
  the output is sharded over C_out; in bin-major order the C_out channels of
  one bin are, so a split holds whole bin rows and the output is sharded
  over PH (each device computes its rows of every RoI's grid). The gradient
  is sharded like the features.

Any other sharding (H or W split, a split channel group, sizes the mesh does
not divide) is resharded to one of these: a correct result, at the price of
the communication that takes. Under explicit mesh axes, where shardings are
types, each result is typed with the split the same plan gives it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from jax_psroi import _arguments, _image_groups

# One device's call: (operand, rois, *further, result_shape=) -> result
# (or results), traced with the shapes of one device's shards. A call that can
# compute a range of bin rows (`bin_rows_call` below) also takes
# first_bin_row= and bin_rows= (the rows of the whole grid;
# lib/roi_math.h: CallShape).
LocalCall = Callable[..., jax.Array]


def lower(ctx, operand, rois, *further, direction: str, local_call: LocalCall,
          image_blocks: _image_groups.Blocks, data_format: str, channel_order: str,
          bin_rows_call: bool,
          bin_operands: int = 0):
    """Lowers ``local_call`` for the whole call, partitioned when the module
    is partitioned over several devices. `bin_rows_call`: whether
    local_call takes first_bin_row= and bin_rows=. `further`: operands
    shaped like the pooled tensor (RoI Pool's recorded pixels), split as it
    is, then `bin_operands` shaped [K, X, PH, PW] (deformable offsets),
    split over K and PH as the pooled tensor is; the call may also have
    further results shaped like its first (RoI Pool's forward: the
    pixels), split as it is.

    Not partitioned: a single device, inside ``shard_map`` (the call runs
    per shard as it is), and programs for ``jax.export``, whose serialized
    form cannot carry a Python partitioning callback (XLA replicates the
    call's operands instead).
    """
    operands = (operand, rois, *further)
    whole = partial(local_call, result_shape=ctx.avals_out[0].shape)
    if not _partitioned(ctx):
        return _lower(ctx, operands, whole)
    further_results = len(ctx.avals_out) - 1
    features, pooled = _arguments.features_and_pooled(direction, ctx.avals_in[0].shape,
                                                      ctx.avals_out[0].shape)
    partitioner = _Partitioner(local_call, features, pooled, data_format, channel_order,
                               image_blocks, bin_rows_call, further_results=further_results,
                               bin_operands=bin_operands)
    devices = len(ctx.module_context.axis_context.device_assignment)
    rule = _sharding_rule(direction, data_format, channel_order, partitioner.factor_sizes(),
                          pooled_operands=len(further) - bin_operands,
                          bin_operands=bin_operands, further_results=further_results,
                          opaque_channels=not partitioner.groups_split_over(devices))
    partition = partitioner.forward if direction == "forward" else partitioner.backward
    return _lower(ctx, operands, whole, partition,
                  **_rule_options(rule, direction, channel_order, partitioner.factor_sizes()))


def lower_pyramid(ctx, *operands, local_call: LocalCall, image_blocks: _image_groups.Blocks,
                  data_format: str):
    """Lowers multi-scale RoI Align's forward, ``local_call(map_0, ...,
    map_{L-1}, rois, levels, result_shape=)``, partitioned as roi_align's
    forward when the module is partitioned: every level split alike (images,
    channels), the RoIs' levels [K] split like the RoIs."""
    whole = partial(local_call, result_shape=ctx.avals_out[0].shape)
    if not _partitioned(ctx):
        return _lower(ctx, operands, whole)
    maps = len(operands) - 2
    partitioner = _Partitioner(local_call, ctx.avals_in[0].shape, ctx.avals_out[0].shape,
                               data_format, "shared", image_blocks, bin_rows_call=False,
                               maps=maps)
    rule = _pyramid_rule(maps, data_format, partitioner.factor_sizes())
    return _lower(ctx, operands, whole, partitioner.forward,
                  **_rule_options(rule, "forward", "shared", partitioner.factor_sizes()))


def lower_nms(ctx, boxes, scores, categories, *, local_call: Callable):
    """Lowers non-maximum suppression, ``local_call(boxes [B, N, 4], scores
    [B, N], categories [B, N]) -> (indices [B, M], counts [B])``, split over
    the images B when the module is partitioned: each device suppresses its
    own images, with no communication. A split of the boxes (N) or of their
    coordinates is undone, since any box of an image may suppress any other."""
    operands = (boxes, scores, categories)
    if not _partitioned(ctx):
        return _lower(ctx, operands, local_call)
    return _lower(ctx, operands, local_call, partial(_nms_partition, local_call),
                  sharding_rule=_NMS_RULE, need_replication_factors=("n", "c", "m"))


def _lower(ctx, operands, whole: Callable, partition: Callable | None = None, **rule):
    """Lowers `whole` (the call of the whole program's operands) on
    `operands`: as it is without a `partition` callback, else through
    ``custom_partitioning`` with that callback and `rule`, def_partition's
    sharding_rule= and the rule's factor lists and sizes."""
    def call(*args):
        # Positional only: custom_partitioning resolves arguments by the
        # signature, which a partial's bound keywords confuse.
        return whole(*args)

    if partition is not None:
        call = custom_partitioning(call)
        call.def_partition(partition=partition, **rule)
    lower = mlir.lower_fun(call, multiple_results=len(ctx.avals_out) > 1)
    if not any(map(_explicit, (*ctx.avals_in, *ctx.avals_out))):
        return lower(ctx, *operands)
    # Under explicit mesh axes, the whole call is traced as one device's
    # (_Partitioner._local traces the devices' calls so): typed with the
    # mesh's shardings, a jax.numpy body (the XLA path) would be refused its
    # gathers and scatters, whose result shardings JAX cannot infer.
    with jax.sharding.use_abstract_mesh(_NO_MESH):
        unmeshed = ctx.replace(avals_in=[_unmeshed(a) for a in ctx.avals_in],
                               avals_out=[_unmeshed(a) for a in ctx.avals_out])
        return lower(unmeshed, *operands)


def _explicit(aval) -> bool:
    mesh = getattr(getattr(aval, "sharding", None), "mesh", None)
    return jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ())


def _unmeshed(aval):
    return aval.update(sharding=NamedSharding(_NO_MESH, PartitionSpec()))


def typed_result(direction: str, operand, rois, result, *, data_format: str,
                 channel_order: str, image_blocks: _image_groups.Blocks):
    """`result` (an abstract value typed like its map operand) with the
    split the partitioning gives it, when the operands live on a mesh with
    explicit axes (whose shardings are part of the types); as it is
    otherwise."""
    sharding = getattr(operand, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return result
    features, pooled = _arguments.features_and_pooled(direction, operand.shape, result.shape)
    # Typed as if the call can split bin rows (the native kernels can; the
    # reference lowering's result is resharded to this type).
    partitioner = _Partitioner(None, features, pooled, data_format, channel_order,
                               image_blocks, bin_rows_call=True)
    spec = partitioner.result_spec(direction, mesh, _axes(sharding, 4),
                                   _axes(getattr(rois, "sharding", None), 2))
    return result.update(sharding=NamedSharding(mesh, spec))


# Whether jit lowers our primitives with the program's devices in hand
# (lower_with_devices): without them there are no sharding rules.
_devices_in_lowering = True


def lower_with_devices(*primitives) -> None:
    """Has jit lower `primitives` with the program's devices in hand, which
    ``custom_partitioning`` needs to build the mesh its callbacks get.

    JAX lowers without devices unless a primitive of the program is in a
    private registry (custom_partitioning's own primitive is, but ours bind
    it only when they are lowered): the one use of a private JAX module in
    this package. A JAX without it (one that moved it) only turns the
    sharding rules off: calls are then not partitioned (XLA gathers their
    operands onto every device), still correct.
    """
    global _devices_in_lowering
    try:
        from jax._src import dispatch

        registry = dispatch.prim_requires_devices_during_lowering
    except (ImportError, AttributeError):
        _devices_in_lowering = False
        return
    registry.update(primitives)


def _partitioned(ctx) -> bool:
    if not _devices_in_lowering or ctx.module_context.lowering_parameters.for_export:
        return False
    # Only a program partitioned by XLA's SPMD partitioner (jit over a mesh)
    # has a device assignment in its axis context; shard_map and pmap bodies
    # do not.
    devices = getattr(ctx.module_context.axis_context, "device_assignment", None)
    return devices is not None and len(devices) > 1


# --- Sharding propagation (Shardy) -------------------------------------------
# Factors: n images, k RoIs, r the 5 RoI fields, d output channels, p q the bins
# (rows, columns), h w the feature map, o the second axis of a per-bin operand
# (deformable offsets). The input channel axis is the compound
# (d p q) in torchvision order and (p q d) in bin-major order. With blocks of
# images, the image and RoI axes are (b m) and (b l): one factor b, the block,
# that propagation carries from the features to the RoIs and the results.

def _dimension(factors, alone: str) -> str:
    """A dimension made of `factors` ((name, size) pairs, major first).
    Shardy takes no size-1 factor in a compound, so they are left out (a
    dimension left with none is the factor `alone`)."""
    names = [name for name, size in factors if size != 1]
    if len(names) > 1:
        return "(" + " ".join(names) + ")"
    return names[0] if names else alone


def _dimensions(data_format, channel_order, sizes, opaque_channels=False):
    """The rule's images, RoIs and channel dimensions, and its pooled tensor,
    for factors of `sizes` (b, m, l given only with blocks of images).
    `opaque_channels`: the channels are one factor c of their own, which
    propagation splits as a whole (the callback then decides what a split
    of it means): a position-sensitive map whose channel groups a split of
    the mesh may cut, where propagation would split a mesh axis across two
    factors of the compound, a sub-axis custom_partitioning cannot express."""
    channel_factors = {"torchvision": ("d", "p", "q"), "bin_major": ("p", "q", "d"),
                       "shared": ("d",)}[channel_order]
    if opaque_channels and channel_order != "shared":
        channel_factors = ()
    channels = _dimension([(f, sizes[f]) for f in channel_factors], "c")
    if "b" in sizes:
        images = _dimension([("b", sizes["b"]), ("m", sizes["m"])], "n")
        rois = _dimension([("b", sizes["b"]), ("l", sizes["l"])], "k")
    else:
        images, rois = "n", "k"
    pooled = f"{rois} d p q" if data_format == "NCHW" else f"{rois} p q d"
    return images, rois, channels, pooled


def _map_dimensions(data_format, images, channels, pixels=("h", "w")) -> str:
    height, width = pixels
    if data_format == "NCHW":
        return f"{images} {channels} {height} {width}"
    return f"{images} {height} {width} {channels}"


def _sharding_rule(direction, data_format, channel_order, sizes, pooled_operands=0,
                   bin_operands=0, further_results=0, opaque_channels=False) -> str:
    """The rule of a call whose factors have `sizes` (b, m, l given only
    with blocks of images), with further operands and results shaped like
    its pooled tensor, then operands [K, X, PH, PW]; `opaque_channels` as
    for _dimensions."""
    images, rois, channels, pooled = _dimensions(data_format, channel_order, sizes,
                                                 opaque_channels)
    features = _map_dimensions(data_format, images, channels)
    further = "".join([f", {pooled}"] * pooled_operands + [f", {rois} o p q"] * bin_operands)
    if direction == "forward":
        outputs = ", ".join([pooled] * (1 + further_results))
        return f"{features}, {rois} r{further} -> {outputs}"
    return f"{pooled}, {rois} r{further} -> {features}"


def _pyramid_rule(maps, data_format, sizes) -> str:
    """The rule of a pyramid's forward: `maps` levels, of pixels h<i> w<i>
    and shared channels, then the RoIs and their levels [K]."""
    images, rois, channels, pooled = _dimensions(data_format, "shared", sizes)
    levels = ", ".join(_map_dimensions(data_format, images, channels, (f"h{i}", f"w{i}"))
                       for i in range(maps))
    return f"{levels}, {rois} r, {rois} -> {pooled}"


def _compound_factor_sizes(rule: str, sizes: dict) -> dict:
    """The sizes Shardy must be told: those of factors that appear only
    inside compound dimensions."""
    whole = set(re.sub(r"\([^)]*\)", " ", rule).replace(",", " ").replace("->", " ").split())
    return {f: size for f, size in sizes.items() if f in rule and f not in whole}


def _rule_options(rule: str, direction: str, channel_order: str, sizes: dict) -> dict:
    """def_partition's arguments of a RoI operator's Shardy `rule`."""
    return dict(sharding_rule=rule, **_special_factors(rule, direction, channel_order),
                **_compound_factor_sizes(rule, sizes))


def _special_factors(rule: str, direction: str, channel_order: str) -> dict:
    # The map's pixels and the RoI fields are never split, nor are bins that
    # no input channel holds (shared channels); the backward sums over RoIs
    # (within a block). Shardy wants each list in the order the factors
    # first appear in the rule.
    order = list(dict.fromkeys(re.findall(r"[A-Za-z_]\w*", rule)))
    unsplit = "hwropq" if channel_order == "shared" else "hwro"
    # (A pyramid's levels have pixels h0 w0, h1 w1, ...)
    factors = {"need_replication_factors": tuple(f for f in order if f[0] in unsplit)}
    if direction == "backward":
        factors["reduction_factors"] = tuple(f for f in order if f in "kl")
    return factors


# --- Partitioning -------------------------------------------------------------

def _axes(sharding, ndim: int) -> tuple[tuple[str, ...], ...] | None:
    """The mesh axes each dimension is split over, or None when the sharding
    is not expressed over named mesh axes."""
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return tuple(() if s is None else (s,) if isinstance(s, str) else tuple(s)
                 for s in spec)


_NO_MESH = jax.sharding.AbstractMesh((), ())


def _count(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


class _Partitioner:
    """The partition callbacks of one call: what they need to know of it is
    the shapes, the layout and channel order, the RoIs' block promise and
    the call of one device."""

    def __init__(self, local_call: LocalCall, features_shape, pooled_shape, data_format,
                 channel_order, image_blocks, bin_rows_call: bool, further_results=0,
                 maps=1, bin_operands=0):
        self.local_call = local_call
        self.further_results = further_results
        self.bin_operands = bin_operands
        # The operands: `maps` feature maps (a pyramid's levels), the RoIs,
        # then anything split like them (a pyramid's levels of the RoIs) or
        # like the pooled tensor.
        self.maps = maps
        self.rois_operand = maps
        self.axes = _arguments.LAYOUT_AXES[data_format]  # N, C, H, W (K, C_out, PH, PW)
        self.num_images = features_shape[self.axes[0]]
        self.num_rois = pooled_shape[self.axes[0]]
        self.channels_out = pooled_shape[self.axes[1]]
        self.pooled_size = _arguments.pooled_size_of(pooled_shape, data_format)
        self.image_blocks, self.roi_period = image_blocks
        # A split of the features over C in whole groups: torchvision order
        # splits C_out; bin-major order splits the bins, by whole bin rows
        # (PH), when the local call can compute a range of bin rows.
        self.bin_major = channel_order == "bin_major"
        if self.bin_major:
            self.channel_groups = self.pooled_size[0] if bin_rows_call else None
            self.pooled_channel_axis = self.axes[2]
        else:
            self.channel_groups = self.channels_out
            self.pooled_channel_axis = self.axes[1]

    def factor_sizes(self) -> dict:
        """The sizes of the sharding rule's factors d, p, q (and b, m, l
        with more than one block of images)."""
        sizes = {"d": self.channels_out, "p": self.pooled_size[0], "q": self.pooled_size[1]}
        if self.image_blocks > 1 and self.num_images > 0 and self.num_rois > 0:
            sizes.update(b=self.image_blocks, m=self.num_images // self.image_blocks,
                         l=self.num_rois // self.image_blocks)
        return sizes

    def groups_split_over(self, devices: int) -> bool:
        """Whether every split of `devices` devices' mesh axes over the
        channels holds whole channel groups (their count a multiple of the
        devices: each axis's size, and any product of them, divides it)."""
        return self.channel_groups is not None and self.channel_groups % devices == 0

    def _splits(self, mesh, axes, *sizes) -> bool:
        return all(size % _count(mesh, axes) == 0 for size in sizes)

    def _splits_images(self, mesh, axes) -> bool:
        return bool(axes) and self._splits(mesh, axes, self.image_blocks, self.num_images,
                                           self.num_rois)

    def _splits_rois_alone(self, mesh, axes) -> bool:
        # Each device's RoIs must be whole periods of the image groups: the
        # kernels count a RoI's group from the first RoI of their call.
        return (self._splits(mesh, axes, self.num_rois)
                and (self.num_rois // _count(mesh, axes)) % self.roi_period == 0)

    def _plan(self, mesh, image_axes, roi_axes, channel_axes):
        """The axes the call splits over: (images, RoIs, channels), from the
        candidates the operands' (and results') shardings propose."""
        if not (self._splits_images(mesh, image_axes) and roi_axes in ((), image_axes)):
            # RoIs in blocks split without their images take their images
            # with them (a replicated map's slice costs nothing).
            image_axes = roi_axes if self._splits_images(mesh, roi_axes) else ()
        roi_axes = image_axes or (roi_axes if self._splits_rois_alone(mesh, roi_axes)
                                  else ())
        if not (self.channel_groups is not None
                and self._splits(mesh, channel_axes, self.channel_groups)
                and not set(channel_axes) & set(image_axes)):
            channel_axes = ()
        if set(channel_axes) & set(roi_axes):
            roi_axes = ()  # gather the (small) RoIs rather than the features
        return image_axes, roi_axes, channel_axes

    def _map(self, mesh, images, channels, pooled: bool) -> NamedSharding:
        """A feature map split over N and C, or a pooled tensor over K and
        the axis C's split becomes (C_out, or PH in bin-major order)."""
        spec = [None] * 4
        spec[self.axes[0]] = images or None
        spec[self.pooled_channel_axis if pooled else self.axes[1]] = channels or None
        return NamedSharding(mesh, PartitionSpec(*spec))

    def _local(self, mesh, operands, result_shape, channel_axes):
        """The call on one device's shards (operands: the map, or a
        pyramid's maps, the RoIs, then the further operands).

        Over images, a device holds whole image groups and their RoIs, whose
        batch indices count from their group's first image: the call is the
        same. A bin-major map split over C holds whole bin rows: each
        device computes its own rows of every RoI's grid, a static
        attribute of the kernel, so the program switches on the device's
        place.

        Traced without the caller's mesh: under explicit mesh axes, JAX
        would otherwise type (and annotate) the per-device values with
        shardings of the whole mesh.
        """
        with jax.sharding.use_abstract_mesh(_NO_MESH):
            if not (self.bin_major and channel_axes):
                return self.local_call(*operands, result_shape=result_shape)
            rows, shares = self.pooled_size[0], _count(mesh, channel_axes)
            branches = [partial(self.local_call, result_shape=result_shape,
                                first_bin_row=share * rows // shares, bin_rows=rows)
                        for share in range(shares)]
            return jax.lax.switch(jax.lax.axis_index(channel_axes), branches, *operands)

    def forward_plan(self, mesh, features, rois):
        """(images, RoIs, channels) axes of a forward whose features and RoIs
        are split as `features` and `rois` (_axes), or None (unknown)."""
        if features is None or rois is None:
            return (), (), ()
        return self._plan(mesh, features[self.axes[0]], rois[0], features[self.axes[1]])

    def backward_plan(self, mesh, cotangent, rois, grad):
        """The same for a backward, `grad` the split proposed for its result."""
        if cotangent is None or rois is None:
            return (), (), ()
        roi_axes = cotangent[self.axes[0]] or rois[0]
        # The images of the RoIs' devices, or those propagation chose for the
        # gradient; the same for channels.
        image_axes = roi_axes or (grad[self.axes[0]] if grad else ())
        channel_axes = (cotangent[self.pooled_channel_axis]
                        or (grad[self.axes[1]] if grad else ()))
        return self._plan(mesh, image_axes, roi_axes, channel_axes)

    def result_spec(self, direction, mesh, operand, rois) -> PartitionSpec:
        """The split of the result for operands split as `operand` and
        `rois` (_axes): the type of the result under explicit mesh axes."""
        if direction == "forward":
            _, roi_axes, channel_axes = self.forward_plan(mesh, operand, rois)
            return self._map(mesh, roi_axes, channel_axes, pooled=True).spec
        image_axes, _, channel_axes = self.backward_plan(mesh, operand, rois, None)
        return self._map(mesh, image_axes, channel_axes, pooled=False).spec

    def _further(self, mesh, count, roi_axes, channel_axes, pooled):
        """The shardings of a call's `count` operands after its RoIs: those
        shaped like the pooled tensor split as `pooled`, then the per-bin
        operands [K, X, PH, PW] over the RoIs' axes and, where a bin-major
        map's channels split its bin rows, over those rows."""
        rows = (channel_axes or None) if self.bin_major else None
        per_bin = NamedSharding(mesh, PartitionSpec(roi_axes or None, None, rows, None))
        return (pooled,) * (count - self.bin_operands) + (per_bin,) * self.bin_operands

    def forward(self, mesh, arg_shapes, result_shape):
        image_axes, roi_axes, channel_axes = self.forward_plan(
            mesh, _axes(arg_shapes[0].sharding, 4),
            _axes(arg_shapes[self.rois_operand].sharding, 2))
        pooled = self._map(mesh, roi_axes, channel_axes, pooled=True)
        results = (pooled,) * (1 + self.further_results)
        first_result = result_shape[0] if self.further_results else result_shape
        local_pooled = pooled.shard_shape(first_result.shape)

        def lower_fn(*operands):
            return self._local(mesh, operands, local_pooled, channel_axes)

        features = self._map(mesh, image_axes, channel_axes, pooled=False)
        if self.maps > 1:  # a pyramid: its levels, the RoIs and their levels
            further = (NamedSharding(mesh, PartitionSpec(roi_axes or None)),)
        else:
            further = self._further(mesh, len(arg_shapes) - 2, roi_axes, channel_axes, pooled)
        return (mesh, lower_fn, results if self.further_results else pooled,
                (*(features,) * self.maps,
                 NamedSharding(mesh, PartitionSpec(roi_axes or None, None)), *further))

    def backward(self, mesh, arg_shapes, result_shape):
        image_axes, roi_axes, channel_axes = self.backward_plan(
            mesh, _axes(arg_shapes[0].sharding, 4), _axes(arg_shapes[1].sharding, 2),
            _axes(result_shape.sharding, 4))
        # RoIs split without their images: every device's gradient is a part
        # of the sum.
        summed_axes = () if image_axes else roi_axes
        gradient = self._map(mesh, image_axes, channel_axes, pooled=False)
        local_grad = gradient.shard_shape(result_shape.shape)

        def lower_fn(*operands):
            grad = self._local(mesh, operands, local_grad, channel_axes)
            if not summed_axes:
                return grad
            with jax.sharding.use_abstract_mesh(_NO_MESH):
                return jax.lax.psum(grad, summed_axes)

        pooled = self._map(mesh, roi_axes, channel_axes, pooled=True)
        return (mesh, lower_fn, gradient,
                (pooled, NamedSharding(mesh, PartitionSpec(roi_axes or None, None)),
                 *self._further(mesh, len(arg_shapes) - 2, roi_axes, channel_axes, pooled)))


# --- Non-maximum suppression --------------------------------------------------
# Factors: b images, n boxes, c the 4 coordinates, m kept indices.
_NMS_RULE = "b n c, b n, b n -> b m, b"


def _nms_split(mesh, boxes_sharding, images: int):
    """The mesh axes an nms call splits its images over: those that split
    the boxes' images, when they divide them; None for none."""
    boxes = _axes(boxes_sharding, 3)
    split = boxes[0] if boxes else ()
    if images % _count(mesh, split):
        split = ()
    return split or None


def nms_result_shardings(boxes) -> dict:
    """The shardings of nms's abstract results (indices [B, M], counts [B])
    as ``update`` arguments: when the boxes live on a mesh with explicit
    axes (as typed_result for the RoI operators), the split its
    partitioning gives them; else none ({}: the results keep the boxes')."""
    sharding = getattr(boxes, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return {"indices": {}, "counts": {}}
    split = _nms_split(mesh, sharding, boxes.shape[0])
    return {"indices": {"sharding": NamedSharding(mesh, PartitionSpec(split, None))},
            "counts": {"sharding": NamedSharding(mesh, PartitionSpec(split))}}


def _nms_partition(local_call: Callable, mesh, arg_shapes, result_shape):
    """The split of an nms call: _nms_split's; the call of one device is the
    same call on its images."""
    del result_shape
    split = _nms_split(mesh, arg_shapes[0].sharding, arg_shapes[0].shape[0])

    def lower_fn(*operands):
        # Traced without the caller's mesh, as _Partitioner._local says.
        with jax.sharding.use_abstract_mesh(_NO_MESH):
            return local_call(*operands)

    def spec(*rest):
        return NamedSharding(mesh, PartitionSpec(split, *rest))

    return mesh, lower_fn, (spec(None), spec()), (spec(None, None), spec(None), spec(None))
