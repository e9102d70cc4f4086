"""The operators, one spec each: the registry the primitives, their
lowerings and batching rules, the sharding rules and the tests' matrix are
built from.

A spec says what makes an operator itself; everything shared (argument
checks, image groups, layouts, dtypes, differentiation, vmap, sharding) is
built from it. Its native kernels are the kernel table's rows of the same
name (lib/kernel_table.h), whose C++ policy holds the same facts for the
kernels. An averaging operator (a bin is a weighted average of one input
channel) needs no code beyond its spec here, its public function in ops.py
and its policy in C++; see the design guide, "Adding an operator".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jax_psroi import _arguments, reference, reference_pools

# How each operator-specific parameter is checked when a public function is
# called (the primitives then carry it as a static parameter).
ATTRIBUTE_CHECKS: Mapping[str, Callable[[Any], Any]] = {
    "sampling_ratio": _arguments.sampling_ratio,
    "channel_order": _arguments.channel_order,
    "aligned": _arguments.aligned,
}


@dataclasses.dataclass(frozen=True)
class Operator:
    """One operator of the family.

    Attributes:
      name: the public function's name, the kernel table's operation, and
        the name of the primitives (``name`` and ``name + "_backward"`` for
        an averaging operator), so a jaxpr shows which operator it calls.
      pooling: "average" (a bin is a weighted average; linear, its backward
        the transpose) or "max" (RoI Pool: a maximum and the pixel it came
        from).
      position_sensitive: whether each bin reads its own input channels
        (C = C_out * PH * PW, in a ``channel_order``) or every bin reads
        channel c for output channel c (C = C_out).
      attributes: the operator's own parameters, beyond the output size,
        spatial scale, layout and image groups every call has, as the
        public function names them (checked by ATTRIBUTE_CHECKS).
      fixed: the kernel settings the operator fixes rather than takes:
        ``sampling_ratio`` (0 for window pools, which take no samples) and
        ``aligned`` (the box geometry: a -0.5 pixel shift and no size clamp).
      kernel_attribute: the FFI attribute its kernel rows take beyond the
        shared ones: "channel_order" (an index of
        ``_arguments.CHANNEL_ORDERS``), "aligned" (0 or 1) or None.
      reference: the ``jax.numpy`` oracle, with the public signature.
    """

    name: str
    pooling: str
    position_sensitive: bool
    attributes: tuple[str, ...]
    fixed: Mapping[str, Any]
    kernel_attribute: str | None
    reference: Callable

    def check(self, **given) -> dict:
        """The operator's attributes `given` by a public call, checked."""
        return {name: ATTRIBUTE_CHECKS[name](given[name]) for name in self.attributes}

    def settings(self, params: Mapping[str, Any]) -> dict:
        """What a kernel call (or the XLA path) needs to know of the
        operator from a primitive's `params`: its channel order ("shared"
        when not position-sensitive), sampling ratio and box geometry."""
        merged = {**self.fixed, **{name: params[name] for name in self.attributes}}
        return dict(operation=self.name,
                    channel_order=merged.get("channel_order", "shared"),
                    sampling_ratio=merged.get("sampling_ratio", 0),
                    aligned=merged.get("aligned", False))

    def kernel_attributes(self, settings: Mapping[str, Any]) -> dict:
        """The FFI attribute of the kernel rows, from `settings`."""
        if self.kernel_attribute == "channel_order":
            return dict(channel_order=_arguments.CHANNEL_ORDERS.index(settings["channel_order"]))
        if self.kernel_attribute == "aligned":
            return dict(aligned=int(settings["aligned"]))
        return {}


PS_ROI_ALIGN = Operator(
    name="ps_roi_align", pooling="average", position_sensitive=True,
    attributes=("sampling_ratio", "channel_order"), fixed=dict(aligned=True),
    kernel_attribute="channel_order", reference=reference.ps_roi_align_reference)

ROI_ALIGN = Operator(
    name="roi_align", pooling="average", position_sensitive=False,
    attributes=("sampling_ratio", "aligned"), fixed={},
    kernel_attribute="aligned", reference=reference.roi_align_reference)

PS_ROI_POOL = Operator(
    name="ps_roi_pool", pooling="average", position_sensitive=True,
    attributes=("channel_order",), fixed=dict(sampling_ratio=0, aligned=False),
    kernel_attribute="channel_order", reference=reference_pools.ps_roi_pool_reference)

ROI_POOL = Operator(
    name="roi_pool", pooling="max", position_sensitive=False,
    attributes=(), fixed=dict(sampling_ratio=0, aligned=False),
    kernel_attribute=None, reference=reference_pools.roi_pool_reference)

OPERATORS: Mapping[str, Operator] = {
    operator.name: operator for operator in (PS_ROI_ALIGN, ROI_ALIGN, PS_ROI_POOL, ROI_POOL)}

AVERAGING = tuple(operator for operator in OPERATORS.values() if operator.pooling == "average")
