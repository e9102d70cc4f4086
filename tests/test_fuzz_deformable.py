"""Property-based fuzzing of deformable RoI Align and PS-RoI Align
(hypothesis).

Random calls over the inputs where a per-bin start is easy to get wrong:
boxes partly or wholly off the map, degenerate (zero-size, inverted), huge
and non-finite; offsets small, large (bins moved off the map), huge and
non-finite; every dtype and layout; fixed and adaptive grids; maps of one
pixel. The native CPU kernels, the CUDA kernels' code (serially on the
CPU: the test rig) and the XLA path must give the jax.numpy reference's values and
derivatives (finite); nothing may read or write out of bounds (run under
ASan and UBSan by scripts/sanitize.sh).

Examples: JAX_PSROI_FUZZ_EXAMPLES, as for test_fuzz.py (default 20 here).
"""

import functools
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_psroi

from cases import KERNELS, deformable_kernels

EXAMPLES = int(os.environ.get("JAX_PSROI_FUZZ_EXAMPLES", "20"))
# The kernels' fixture spans a test's examples on purpose (below).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

DTYPES = ["float32", "float64", "bfloat16", "float16"]
BOX_KINDS = ["random", "off_map", "degenerate", "huge", "non_finite"]
OFFSET_KINDS = ["small", "large", "huge", "non_finite"]
SPECIAL = [np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, 0.0, -0.0]
# Few shapes, so that compiled programs are reused across examples.
MAPS = [(1, 1), (5, 7), (12, 9)]
SIZES = [(1, 1), (2, 3)]


def _boxes(rng, k, n, height, width, kinds):
    corners = rng.uniform(-4, 4 + 2 * max(height, width), (k, 2, 2))
    x1, x2 = np.sort(corners[:, :, 0], axis=1).T
    y1, y2 = np.sort(corners[:, :, 1], axis=1).T
    boxes = np.stack([rng.integers(0, n, k), x1, y1, x2, y2], axis=1)
    for i, kind in enumerate(rng.choice(kinds, k)):
        if kind == "off_map":
            boxes[i, 1:] += rng.choice([-1, 1]) * 10 * (height + width)
        elif kind == "degenerate":
            boxes[i, 3:] = boxes[i, 1:3] - rng.uniform(0, 3) * rng.integers(0, 2)
        elif kind == "huge":
            boxes[i, 1:] = [-1e7, -1e7, 1e7, 1e7]
        elif kind == "non_finite":
            boxes[i, rng.integers(0, 5)] = rng.choice(SPECIAL)
    return boxes


def _offsets(rng, k, size, kinds):
    offset = rng.uniform(-0.5, 0.5, (k, 2, *size))
    for i, kind in enumerate(rng.choice(kinds, k)):
        if kind == "large":
            offset[i] *= 40
        elif kind == "huge":
            offset[i] = rng.choice([-1, 1]) * 1e30
        elif kind == "non_finite":
            offset[i].flat[rng.integers(0, offset[i].size)] = rng.choice(SPECIAL)
    return offset


@pytest.fixture
def lowering(kernels):
    """The kernels' lowering for all of a test's examples: the rig's clears
    JAX's caches when it starts and ends, which for each example would
    compile every program again."""
    with deformable_kernels("cpu" if kernels == "xla" else kernels):
        yield


def _call(fn, size, sampling_ratio, data_format):
    return lambda f, b, o: fn(f, b, o, size, 0.5, sampling_ratio, 0.1, data_format=data_format)


@functools.cache
def _gradient(kernels, operation, size, sampling_ratio, data_format):
    """The compiled gradient of a call's sum (in float32), one for each
    kernels, whose implementation it is traced with (None: the reference),
    and call: examples of the same shapes and dtype run its program again
    (an eager gradient dispatches each of the box derivatives' operations,
    seconds an example)."""
    name = operation if kernels is not None else f"{operation}_reference"
    call = _call(getattr(jax_psroi, name), size, sampling_ratio, data_format)
    loss = lambda f, b, o: jnp.sum(call(f, b, o).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("kernels", [*KERNELS, "xla"])
@pytest.mark.usefixtures("lowering")
@FUZZ
@given(seed=st.integers(0, 2**32 - 1), operation=st.sampled_from(["deform_roi_align",
                                                                  "deform_ps_roi_align"]),
       dtype=st.sampled_from(DTYPES), data_format=st.sampled_from(["NCHW", "NHWC"]),
       map_size=st.sampled_from(MAPS), size=st.sampled_from(SIZES),
       sampling_ratio=st.sampled_from([-1, 1, 3]),
       box_kinds=st.lists(st.sampled_from(BOX_KINDS), min_size=1, unique=True),
       offset_kinds=st.lists(st.sampled_from(OFFSET_KINDS), min_size=1, unique=True))
def test_fuzz_deformable(kernels, seed, operation, dtype, data_format, map_size, size,
                         sampling_ratio, box_kinds, offset_kinds):
    rng = np.random.default_rng(seed)
    height, width = map_size
    n, k, c_out = 2, 6, 2
    channels = c_out * size[0] * size[1] if operation == "deform_ps_roi_align" else c_out
    shape = (n, channels, height, width) if data_format == "NCHW" else (n, height, width,
                                                                         channels)
    features = jnp.asarray(rng.normal(size=shape), dtype)
    boxes = _boxes(rng, k, n, height, width, box_kinds)
    offset = _offsets(rng, k, size, offset_kinds)
    compute = np.float64 if dtype == "float64" else np.float32
    boxes, offset = boxes.astype(compute), offset.astype(compute)
    op = getattr(jax_psroi, operation)
    reference = getattr(jax_psroi, f"{operation}_reference")
    call = lambda fn: _call(fn, size, sampling_ratio, data_format)
    implementation = "xla" if kernels == "xla" else "native"
    with mock.patch.dict(os.environ, {"JAX_PSROI_IMPLEMENTATION": implementation}):
        out = call(op)(features, boxes, offset)  # eager; the gradient compiled
        grads = _gradient(kernels, operation, size, sampling_ratio, data_format)(
            features, boxes, offset)
    expected = call(reference)(features, boxes, offset)
    expected_grads = _gradient(None, operation, size, sampling_ratio, data_format)(
        features, boxes, offset)
    # Boxes of huge or non-finite geometry (or a bin moved by a huge
    # offset) read nothing in both; elsewhere, the reference's values; and
    # the reference's derivatives (finite) in the features, boxes and offsets.
    tolerance = 2e-2 if dtype in ("bfloat16", "float16") else (1e-4 if dtype == "float32"
                                                                else 1e-9)
    derivatives = zip(("features", "boxes", "offset"), grads, expected_grads, strict=True)
    for name, actual, wanted in (("values", out, expected), *derivatives):
        actual, wanted = np.asarray(actual, np.float64), np.asarray(wanted, np.float64)
        assert np.isfinite(actual).all(), name
        scale = max(1.0, float(np.abs(wanted).max()))
        np.testing.assert_allclose(actual, wanted, rtol=tolerance, atol=tolerance * scale,
                                   err_msg=name)
