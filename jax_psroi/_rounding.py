"""Arithmetic rounded as the kernels (and torchvision on the CPU) round it,
where XLA would rewrite it otherwise."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def divide(x, divisor):
    """``x / divisor`` rounded as the kernels round it (correctly).

    XLA on CPU rewrites a division by a constant, or by a broadcast, into a
    multiplication by the reciprocal (float32 21 / 7 becomes 3.0000002, whose
    ceil is 4 where torchvision gets 3; a sample coordinate of -1 becomes
    -0.99999994 or -1.0000001, on the map or off it). The barrier hides a
    divisor of x's own shape from that rewrite (a barrier before the
    broadcast does not: the broadcast after it is rewritten).
    """
    divisor = jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)
    return x / lax.optimization_barrier(divisor)
