"""The memory floor of a workload: the fewest bytes it must move, over the
bandwidth the device shows in the same run.

Fewest bytes: the forward reads every input element that some bin weighs
(once), the RoIs, and writes the output once; the backward reads the
cotangent and the RoIs and writes the whole gradient map once.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def measured_bandwidth(device, nbytes=2**29, repeats=20) -> float:
    """Bytes per second of an element-wise negate on `device` (read + write)."""
    x = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), device)
    negate = jax.jit(lambda v: -v)
    jax.block_until_ready(negate(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(negate(x))
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def fewest_bytes(op, features, rois, cotangent, output_size, spatial_scale,
                 sampling_ratio) -> dict:
    """Fewest bytes of the forward, the backward and both, for one workload
    of `op` (jax_psroi.ps_roi_align, in the workload's layout).

    The input elements the forward must read are those some bin weighs:
    bilinear weights are non-negative, so they are exactly the non-zero
    entries of the gradient for an all-ones cotangent.
    """
    def forward(f):
        return op(f, rois, output_size, spatial_scale, sampling_ratio)

    _, vjp = jax.vjp(forward, features)
    weighed = jax.jit(lambda c: jnp.count_nonzero(vjp(c)[0]))(
        jnp.ones_like(cotangent))
    item = np.dtype(features.dtype).itemsize
    output = cotangent.size * item
    boxes = rois.size * np.dtype(rois.dtype).itemsize
    read = int(weighed) * item + boxes + output
    write_grad = features.size * item + boxes + output
    return {"forward": read, "backward": write_grad,
            "forward_backward": read + write_grad}
