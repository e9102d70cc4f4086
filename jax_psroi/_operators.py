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
from typing import Any, NamedTuple

from jax_psroi import _arguments, reference, reference_pools

# How each operator-specific parameter is checked when a public function is
# called (the primitives then carry it as a static parameter).
ATTRIBUTE_CHECKS: Mapping[str, Callable[[Any], Any]] = {
    "sampling_ratio": _arguments.sampling_ratio,
    "channel_order": _arguments.channel_order,
    "aligned": _arguments.aligned,
}


class BoxRule(NamedTuple):
    """How an operator turns an RoI into bins (the kernels' BoxRule,
    lib/roi_math.h)."""

    # Coordinates shifted by -0.5 pixel, sizes as they are; False: no shift,
    # RoI sizes clamped to at least 1 pixel.
    aligned: bool
    # Corners rounded to whole pixels, each bin a window of whole pixels
    # (no samples: the sampling ratio plays no part).
    whole_pixels: bool
    # With whole_pixels: both rounded corners belong to the RoI, and windows
    # may reach the last row and column (RoI Pool's).
    inclusive_corners: bool

    @classmethod
    def samples(cls, aligned: bool) -> BoxRule:
        return cls(bool(aligned), False, False)

    @classmethod
    def windows(cls, inclusive_corners: bool) -> BoxRule:
        return cls(False, True, inclusive_corners)


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
      box_rule: its BoxRule, from the primitive's parameters (its
        attributes).
      kernel_attribute: the FFI attribute its kernel rows take beyond the
        shared ones: "channel_order" (an index of
        ``_arguments.CHANNEL_ORDERS``), "aligned" (0 or 1) or None.
      reference: the ``jax.numpy`` oracle, with the public signature.
    """

    name: str
    pooling: str
    position_sensitive: bool
    attributes: tuple[str, ...]
    box_rule: Callable[[Mapping[str, Any]], BoxRule]
    kernel_attribute: str | None
    reference: Callable

    def check(self, **given) -> dict:
        """The operator's attributes `given` by a public call, checked."""
        return {name: ATTRIBUTE_CHECKS[name](given[name]) for name in self.attributes}

    def channel_order(self, params: Mapping[str, Any]) -> str:
        """The channel order of a call with the primitive's `params`
        ("shared" when not position-sensitive)."""
        return params["channel_order"] if self.position_sensitive else "shared"

    def settings(self, params: Mapping[str, Any]) -> dict:
        """What a kernel call (or the XLA path) needs to know of the
        operator from a primitive's `params`: its channel order ("shared"
        when not position-sensitive), sampling ratio (0 for windows, which
        take no samples) and box rule."""
        return dict(channel_order=self.channel_order(params),
                    sampling_ratio=params.get("sampling_ratio", 0),
                    box_rule=self.box_rule(params))

    def kernel_attributes(self, channel_order: str, box_rule: BoxRule) -> dict:
        """The FFI attribute of the kernel rows, from a call's settings."""
        if self.kernel_attribute == "channel_order":
            return dict(channel_order=_arguments.CHANNEL_ORDERS.index(channel_order))
        if self.kernel_attribute == "aligned":
            return dict(aligned=int(box_rule.aligned))
        return {}


PS_ROI_ALIGN = Operator(
    name="ps_roi_align", pooling="average", position_sensitive=True,
    attributes=("sampling_ratio", "channel_order"),
    box_rule=lambda params: BoxRule.samples(aligned=True),
    kernel_attribute="channel_order", reference=reference.ps_roi_align_reference)

ROI_ALIGN = Operator(
    name="roi_align", pooling="average", position_sensitive=False,
    attributes=("sampling_ratio", "aligned"),
    box_rule=lambda params: BoxRule.samples(params["aligned"]),
    kernel_attribute="aligned", reference=reference.roi_align_reference)

PS_ROI_POOL = Operator(
    name="ps_roi_pool", pooling="average", position_sensitive=True,
    attributes=("channel_order",),
    box_rule=lambda params: BoxRule.windows(inclusive_corners=False),
    kernel_attribute="channel_order", reference=reference_pools.ps_roi_pool_reference)

ROI_POOL = Operator(
    name="roi_pool", pooling="max", position_sensitive=False,
    attributes=(),
    box_rule=lambda params: BoxRule.windows(inclusive_corners=True),
    kernel_attribute=None, reference=reference_pools.roi_pool_reference)

OPERATORS: Mapping[str, Operator] = {
    operator.name: operator for operator in (PS_ROI_ALIGN, ROI_ALIGN, PS_ROI_POOL, ROI_POOL)}

AVERAGING = tuple(operator for operator in OPERATORS.values() if operator.pooling == "average")
