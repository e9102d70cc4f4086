"""Property-based fuzzing of non-maximum suppression (hypothesis).

Random calls of jax_psroi.nms and batched_nms over the inputs where greedy
NMS is easy to get subtly wrong: random boxes, crowds (jittered copies of a
few boxes), identical boxes, degenerate (zero-size, inverted) boxes, huge
coordinates (up to float32's largest, areas that overflow), non-finite
coordinates; scores uniform, tied (+0 and -0 among them), NaN and infinite;
categories from one to a few, extreme int32 values included; every dtype;
0 to 300 boxes; max_output_size 0, 1, some, N and past N; thresholds from
below 0 to 1. The native CPU kernel, the XLA formulation and the CUDA
kernels' schedule (lib/nms_schedule.h, serially on the CPU: the test rig)
must each give exactly the indices and count of the greedy numpy loop
(loop_reference.greedy_nms, torchvision's semantics as lib/cpu/nms_kernels.h
states them), run on the values the dtype holds.

Examples: JAX_PSROI_FUZZ_EXAMPLES, as for test_fuzz.py (default 20 here;
scripts/sanitize.sh runs more under ASan and UBSan). Every example compiles
both implementations for its shapes, which dominates the run time.
"""

import os
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_psroi

from cases import nms_on_gpu_schedule
from loop_reference import greedy_nms

EXAMPLES = int(os.environ.get("JAX_PSROI_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                # A short run is the same every time; a long one explores.
                derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow])

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]
BOX_KINDS = ["random", "crowded", "identical", "degenerate", "huge", "non_finite"]
SCORE_KINDS = ["uniform", "tied", "special"]
SPECIAL_COORDINATES = [np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38, 0.0, -0.0, 1e6]
SPECIAL_SCORES = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 3e38, -3e38]
# Few sizes and thresholds, so that compiled programs are reused across
# examples. The first, hypothesis's simplest draw (a short derandomized run
# starts from its simplest examples), spans three of the CUDA schedule's
# 64-box blocks.
SIZES = [130, 0, 1, 2, 3, 5, 8, 13, 32, 64, 65, 300]
THRESHOLDS = [-0.5, 0.0, 0.3, 0.5, 0.7, 1.0]


def _boxes(rng, n, kinds):
    """[n, 4] float64 boxes, each of one of `kinds`."""
    corners = rng.uniform(0, 100, (n, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 50, (n, 2))], axis=1)
    objects = boxes[:3].copy() if n else boxes
    kind = rng.choice(kinds, n)
    for i in range(n):
        if kind[i] == "crowded":
            boxes[i] = objects[rng.integers(len(objects))] + rng.normal(0, 2, 4)
        elif kind[i] == "identical":
            boxes[i] = objects[rng.integers(len(objects))]
        elif kind[i] == "degenerate":
            # Zero width or height, or inverted.
            axis = rng.integers(2)
            boxes[i, 2 + axis] = boxes[i, axis] - rng.choice([0.0, rng.uniform(0, 5)])
        elif kind[i] == "huge":
            boxes[i] *= 10.0 ** rng.integers(6, 37)
            boxes[i, :2] *= rng.choice([-1, 1])
        elif kind[i] == "non_finite":
            boxes[i, rng.integers(4)] = rng.choice(SPECIAL_COORDINATES)
    return boxes


def _scores(rng, n, kinds):
    """[n] float64 scores, each of one of `kinds`."""
    scores = rng.uniform(-1, 1, n)
    kind = rng.choice(kinds, n)
    tied = rng.choice([-0.0, 0.0, 0.5, 1.0], n)
    special = rng.choice(SPECIAL_SCORES, n)
    return np.where(kind == "tied", tied, np.where(kind == "special", special, scores))


@st.composite
def problems(draw):
    n = draw(st.sampled_from(SIZES))
    return dict(
        n=n,
        seed=draw(st.integers(0, 2**32 - 1)),
        box_kinds=draw(st.lists(st.sampled_from(BOX_KINDS), min_size=1, max_size=3,
                                unique=True)),
        score_kinds=draw(st.lists(st.sampled_from(SCORE_KINDS), min_size=1, max_size=2,
                                  unique=True)),
        dtype=draw(st.sampled_from(DTYPES)),
        threshold=draw(st.sampled_from(THRESHOLDS)),
        max_output=draw(st.sampled_from([None, 0, 1, max(n // 3, 1), n, n + 5])),
        # None: nms; else batched_nms over this many categories.
        categories=draw(st.sampled_from([None, 1, 3, "extreme"])),
    )


def _call(problem, boxes, scores, categories, implementation):
    with mock.patch.dict(os.environ, {"JAX_PSROI_IMPLEMENTATION": implementation}):
        if categories is None:
            return jax_psroi.nms(boxes, scores, problem["threshold"], problem["max_output"])
        return jax_psroi.batched_nms(boxes, scores, categories, problem["threshold"],
                                     problem["max_output"])


def _check(problem, implementations):
    rng = np.random.default_rng(problem["seed"])
    n, dtype = problem["n"], problem["dtype"]
    with np.errstate(over="ignore"):  # huge values become inf in 16 bits: a case
        boxes = jnp.asarray(_boxes(rng, n, problem["box_kinds"]), dtype)
        scores = jnp.asarray(_scores(rng, n, problem["score_kinds"]), dtype)
    categories = problem["categories"]
    if categories == "extreme":
        categories = rng.choice(np.array([-2**31, -1, 0, 2**31 - 1], np.int32), n)
    elif categories is not None:
        categories = rng.integers(0, categories, n).astype(np.int32)
    # The reference on the values the dtype holds, in its compute type.
    compute = jnp.float64 if dtype == jnp.float64 else jnp.float32
    expected = greedy_nms(np.asarray(boxes.astype(compute)), np.asarray(scores.astype(compute)),
                          problem["threshold"], categories, problem["max_output"])
    size = n if problem["max_output"] is None else problem["max_output"]
    for implementation in implementations:
        indices, count = _call(problem, boxes, scores, categories, implementation)
        assert indices.shape == (size,) and indices.dtype == jnp.int32, implementation
        assert int(count) == len(expected), (implementation, int(count), expected)
        np.testing.assert_array_equal(indices[:len(expected)], expected,
                                      err_msg=implementation)
        np.testing.assert_array_equal(indices[len(expected):], -1, err_msg=implementation)


@FUZZ
@given(problems())
def test_fuzzed_nms_equals_the_greedy_loop(problem):
    _check(problem, ("native", "xla"))


@pytest.mark.gpu_schedule
@FUZZ
@given(problems())
def test_fuzzed_nms_on_the_gpu_schedule_equals_the_greedy_loop(problem):
    with nms_on_gpu_schedule():
        _check(problem, ("native",))
