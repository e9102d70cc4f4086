"""The operators over a device mesh: equal results, no all-gathers (RoI
operators and non-maximum suppression).

The cases run on 8 simulated CPU devices in one process of their own
(tests/sharding_worker.py), so that the test process keeps its one device; each
test asserts on one record of that run.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_worker as worker

from jax_psroi import _arguments, _averaging, _deformable

from cases import (
    KERNELS,
    ONE_GROUP,
    deformable_kernels,
    features_as,
    native_gpu_schedule,
    pooled_as,
    random_features,
    random_rois,
    target,
)

# Largest difference from the unsharded op, as a fraction of the largest
# magnitude of its result. Forward results are the same kernel's on the
# same elements: equal. A gradient split over RoIs adds the devices' partial
# gradients: float32 and float64 round differently; 16-bit partials are each
# rounded to the dtype before the sum (about an ulp).
EXACT = 0.0
SUMMED = {"float32": 1e-6, "float64": 1e-14, "bfloat16": 2**-7, "float16": 2**-10}


@pytest.fixture(scope="module")
def worker_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, str(Path(worker.__file__))], env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def records(worker_run):
    return {(r["case"], r["direction"], r["operation"], r["layout"], r["order"], r["dtype"]): r
            for r in worker_run["pooling"]}


@pytest.mark.parametrize("combination", worker.COMBINATIONS, ids="-".join)
@pytest.mark.parametrize("direction", worker.DIRECTIONS)
@pytest.mark.parametrize("case", worker.CASES)
def test_sharded_equals_unsharded_without_all_gather(records, case, direction, combination):
    record = records[(case, direction, *combination)]
    dtype = combination[3]
    assert record["shape"] == record["expected_shape"]
    # The path the case names: the XLA path calls none of our kernels (nor
    # does the pools' box gradient, zero without a call).
    pools_boxes = direction == "box_gradient" and combination[0] in ("ps_roi_pool", "roi_pool")
    assert (record["kernel_calls"] > 0) == (not case.endswith("_xla") and not pools_boxes), record
    collectives = {name: n for name, n in record["collectives"].items() if n}
    if direction == "box_gradient":
        _check_box_gradient(record, case, combination, collectives)
        return
    assert record["max_magnitude"] > 0.5  # the case pools something
    summed = case.startswith(("rois", "shard_map_rois")) and direction == "gradient"
    # The XLA path's sums are compiled for each device's shapes: XLA may
    # vectorize and contract them (fused multiply-adds) differently from the
    # whole program's (JAX 0.12's XLA does, in the forward too: up to 17
    # float32 ulps of a sum of 16 products).
    tolerance = (8 * SUMMED[dtype] if case.endswith("_xla")
                 else SUMMED[dtype] if summed else EXACT)
    assert record["max_difference"] <= tolerance * record["max_magnitude"], record
    if case == "pixels":
        # No rule splits the map's pixels: the forward gathers the map (the
        # gradient is computed whole and sliced), and the results are right.
        if direction == "forward":
            assert collectives.get("all-gather", 0) >= 1, record
    elif case == "images_of_replicated" and direction == "gradient":
        # The features are replicated, so is their gradient: each device's
        # images' share, gathered once.
        assert collectives == {"all-gather": 1}, record
    elif summed and combination[0] == "multi_scale_roi_align":
        # Over RoIs, one all-reduce per level's gradient (XLA may combine them).
        assert set(collectives) == {"all-reduce"}, record
        assert 1 <= collectives["all-reduce"] <= worker.PYRAMID_LEVELS, record
    else:
        # Over RoIs, the gradient is one all-reduce; everything else is local.
        assert collectives == ({"all-reduce": 1} if summed else {}), record


@pytest.mark.parametrize("combination", worker.CUT_GROUPS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_split_that_cuts_channel_groups_is_gathered(worker_run, combination):
    operation, order, _ = combination
    for direction in ("forward", "gradient"):
        record = next(r for r in worker_run["cut_groups"]
                      if (r["operation"], r["order"], r["direction"])
                      == (operation, order, direction))
        assert record["max_magnitude"] > 0.5, record
        assert record["max_difference"] == 0, record
        if direction == "forward":  # the map (the gradient is computed whole, then sliced)
            assert record["collectives"]["all-gather"] >= 1, record


@pytest.mark.parametrize("operation", worker.NMS_OPERATIONS)
@pytest.mark.parametrize("case", worker.NMS_CASES)
def test_sharded_nms_equals_unsharded(worker_run, case, operation):
    record = next(r for r in worker_run["nms"]
                  if (r["case"], r["operation"]) == (case, operation))
    assert record["equal"], record
    assert (record["kernel_calls"] > 0) == (case != "images_xla"), record
    # Crowded images: every one keeps some boxes and suppresses others.
    assert 0 < min(record["counts"]) and max(record["counts"]) < worker.NMS_KEPT, record
    collectives = {name: n for name, n in record["collectives"].items() if n}
    if case == "boxes":
        # Any box may suppress any other: the boxes are gathered, the
        # results replicated.
        assert collectives.get("all-gather", 0) >= 1, record
        assert record["split"] == [None, None], record
    elif case == "images_and_boxes":
        # Gathered over the boxes' axis only; each device keeps its images.
        assert set(collectives) == {"all-gather"}, record
        assert record["split"] == ["data", "data"], record
    else:
        # Each device suppresses its own images: no communication at all.
        assert collectives == {}, record
        assert record["split"] == ["x", "x"], record


def _check_box_gradient(record, case, combination, collectives):
    operation, dtype = combination[0], combination[3]
    if operation in ("ps_roi_pool", "roi_pool"):
        # Piecewise constant in the boxes: the exact derivative is zero.
        assert record["max_magnitude"] == 0 and record["max_difference"] == 0, record
        return
    assert record["max_magnitude"] > 0.5, record
    # Each box's gradient sums over its outputs: a split of the channels
    # sums the devices' partial sums (one all-reduce), any other split is
    # local; the sums may be ordered differently (on the XLA path, in the
    # dtype: 16-bit sums of a box's 192 outputs drift further). The boxes
    # are float32: their gradient (through a deformable operator's offsets,
    # summed over the bins in float32) is no finer than float32's.
    ulps = 16 if case.endswith("_xla") else 4
    tolerance = max(SUMMED[dtype], SUMMED["float32"]) * ulps
    assert record["max_difference"] <= tolerance * record["max_magnitude"], record
    if case == "pixels":
        return
    bin_rows_split = case == "channels_explicit" and combination[2] == "bin_major"
    if operation.startswith("deform_") and bin_rows_split:
        # Each device differentiates its bin rows: under explicit mesh axes,
        # the cotangents of the replicated per-bin tangents (each bin's four
        # sampling parameters, through its box and offset) are gathered, K x
        # PH x PW values each; never the feature map.
        rois = worker.IMAGES * worker.ROIS_PER_IMAGE
        assert 0 < record["largest_gather"] <= rois * math.prod(worker.POOLED), record
        collectives.pop("all-gather")
    assert "all-gather" not in collectives, record
    if "channels" in case:
        assert set(collectives) <= {"all-reduce"}, record
    else:
        assert collectives == {}, record


# --- The kernels' bin-row ranges ----------------------------------------------
# A device's share of a bin-major map split over C holds whole bin rows, and
# its kernel computes those rows of every RoI's grid (attributes first_bin_row
# and bin_rows). Checked here, on one device, for the CPU kernels and the
# CUDA kernels' schedule: the rows of the whole call, bit for bit.

ROWS, COLUMNS, SHARES = 4, 3, 2
SPATIAL_SCALE, SAMPLING_RATIO = 0.5, -1  # adaptive: the grid follows the whole rows


def _kernel(kernels, direction, operand, rois, out_shape, data_format, first_bin_row,
            operation="ps_roi_align"):
    dtype = jnp.dtype(operand.dtype)
    if kernels == "gpu_schedule":
        return native_gpu_schedule(direction, operand, rois, out_shape, SPATIAL_SCALE,
                                   SAMPLING_RATIO, data_format, "bin_major",
                                   first_bin_row=first_bin_row, bin_rows=ROWS,
                                   operation=operation)
    # The CPU backward's further result: its workspace.
    features, pooled = _arguments.features_and_pooled(direction, operand.shape, out_shape)
    call = jax.ffi.ffi_call(target(direction, dtype, data_format, operation),
                            [jax.ShapeDtypeStruct(out_shape, dtype),
                             *_averaging.cpu_further_results(direction, operation, dtype,
                                                              features, pooled, data_format,
                                                              "bin_major")])
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(call(operand, rois, spatial_scale=SPATIAL_SCALE,
                               sampling_ratio=SAMPLING_RATIO, channel_order=1,
                               first_bin_row=first_bin_row, bin_rows=ROWS,
                               **ONE_GROUP)[0])




@pytest.mark.parametrize("operation", ["ps_roi_align", "ps_roi_pool"])
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bin_rows_of_a_grid_are_those_rows_of_the_whole_call(kernels, data_format, dtype,
                                                             operation):
    rng = np.random.default_rng(3)
    features = features_as(random_features(rng, 2, 5 * ROWS * COLUMNS, 9, 11, dtype),
                           data_format, "bin_major", (ROWS, COLUMNS))
    rois = random_rois(rng, 40, 2, 9, 11, SPATIAL_SCALE, dtype)
    # The whole call, on the same kernels.
    pooled_shape = pooled_as(np.zeros((40, 5, ROWS, COLUMNS)), data_format).shape
    pooled = _kernel(kernels, "forward", features, rois, pooled_shape, data_format, 0,
                     operation)
    cotangent = rng.normal(size=pooled.shape).astype(dtype)
    gradient = _kernel(kernels, "backward", cotangent, rois, features.shape, data_format, 0,
                       operation)
    for first, local_features, local_pooled, local_cotangent, local_gradient in _shares(
            features, pooled, cotangent, gradient, data_format):
        np.testing.assert_array_equal(
            _kernel(kernels, "forward", local_features, rois, local_pooled.shape,
                    data_format, first, operation), local_pooled)
        np.testing.assert_array_equal(
            _kernel(kernels, "backward", local_cotangent, rois, local_gradient.shape,
                    data_format, first, operation), local_gradient)


def _shares(features, pooled, cotangent, gradient, data_format):
    """Each device's share of a bin-major call split over C in SHARES:
    (its first bin row, its features, pooled tensor, cotangent, gradient)."""
    channel_axis = 1 if data_format == "NCHW" else 3
    row_axis = 2 if data_format == "NCHW" else 1
    rows = ROWS // SHARES
    channels = features.shape[channel_axis] // SHARES
    for share in range(SHARES):
        first = share * rows
        local_pooled = np.take(pooled, range(first, first + rows), axis=row_axis)
        assert np.abs(local_pooled).max() > 0.1
        yield (first,
               np.take(features, range(share * channels, (share + 1) * channels),
                       axis=channel_axis),
               local_pooled,
               np.take(cotangent, range(first, first + rows), axis=row_axis),
               np.take(gradient, range(share * channels, (share + 1) * channels),
                       axis=channel_axis))


@pytest.mark.parametrize("box_parameter", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deformable_bin_rows_are_those_rows_of_the_whole_call(kernels, data_format, dtype,
                                                              box_parameter):
    """The same for deform_ps_roi_align, whose share also holds its rows of
    the offsets; in the values and in every derivative direction."""
    rng = np.random.default_rng(4)
    features = features_as(random_features(rng, 2, 5 * ROWS * COLUMNS, 9, 11, dtype),
                           data_format, "bin_major", (ROWS, COLUMNS))
    rois = random_rois(rng, 40, 2, 9, 11, SPATIAL_SCALE, dtype)
    offset = rng.normal(scale=0.4, size=(40, 2, ROWS, COLUMNS)).astype(dtype)

    def call(direction, operand, result_shape, first, rows_offset):
        with deformable_kernels(kernels), jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(_deformable._native_call(
                "deform_ps_roi_align", "cpu", direction, operand, rois, rows_offset,
                result_shape, spatial_scale=SPATIAL_SCALE, sampling_ratio=SAMPLING_RATIO,
                gamma=0.1, data_format=data_format, channel_order="bin_major",
                image_groups=(0, 0), box_parameter=box_parameter, first_bin_row=first,
                bin_rows=ROWS))

    pooled_shape = pooled_as(np.zeros((40, 5, ROWS, COLUMNS)), data_format).shape
    pooled = call("forward", features, pooled_shape, 0, offset)
    cotangent = rng.normal(size=pooled.shape).astype(dtype)
    gradient = call("backward", cotangent, features.shape, 0, offset)
    for first, local_features, local_pooled, local_cotangent, local_gradient in _shares(
            features, pooled, cotangent, gradient, data_format):
        local_offset = offset[:, :, first:first + ROWS // SHARES]
        np.testing.assert_array_equal(
            call("forward", local_features, local_pooled.shape, first, local_offset),
            local_pooled)
        np.testing.assert_array_equal(
            call("backward", local_cotangent, local_gradient.shape, first, local_offset),
            local_gradient)


def test_a_row_range_outside_the_grid_is_an_error():
    features = np.ones((1, 2 * COLUMNS * 2, 4, 4), np.float32)
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="bin rows from row 3"):
        _kernel("cpu", "forward", features, rois, (1, 2, 2, COLUMNS), "NCHW", 3)


def test_sharded_training_example():
    """examples/sharded_training.py on 8 simulated devices: each device pools
    and suppresses (the RPN's NMS) its own scenes, the step's one collective
    is the gradients' all-reduce,
    and the first step is the one-device step."""
    example = Path(__file__).parents[1] / "examples" / "sharded_training.py"
    run = subprocess.run([sys.executable, str(example), "--devices", "8", "--steps", "2",
                          "--batch", "8"], capture_output=True, text=True, timeout=900,
                         check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout
    assert "images: global (8, 128, 128, 1), each device (1, 128, 128, 1)" in out, out
    # One scene's thin map per device, its RoIs, and back.
    assert re.search(r"forward_nhwc_f32: f32\[1,16,16,490\], rois f32\[54,5\] -> "
                     r"f32\[54,7,7,10\] on each device", out), out
    assert re.search(r"backward_nhwc_f32: f32\[54,7,7,10\], rois f32\[54,5\] -> "
                     r"f32\[1,16,16,490\] on each device", out), out
    # The RPN's NMS: one scene's 200 best boxes per device.
    assert re.search(r"jax_psroi_nms_f32: f32\[1,200,4\], scores f32\[1,200\] -> "
                     r"s32\[1,48\] on each device", out), out
    assert ("collectives of the compiled step: all-gather 0, all-reduce 1, all-to-all 0, "
            "collective-permute 0, reduce-scatter 0") in out, out
    sharded, alone = map(float, re.search(
        r"step 1: loss ([\d.]+) \(one device: ([\d.]+)\)", out).groups())
    assert abs(sharded - alone) <= 1e-4 * abs(alone), out


def test_a_jax_without_the_private_registry_only_turns_sharding_rules_off(tmp_path):
    # As in a JAX that moved jax._src.dispatch's registry: the import works,
    # and a call over a mesh is computed unpartitioned, with the same result.
    script = """
import types
import jax, numpy as np
import jax._src
real = jax._src.dispatch  # JAX's own modules keep theirs
jax._src.dispatch = types.ModuleType("jax._src.dispatch")
import jax_psroi
from jax_psroi import _partitioning
jax._src.dispatch = real
assert not _partitioning._devices_in_lowering
mesh = jax.make_mesh((2,), ("d",))
features = np.random.default_rng(0).normal(size=(2, 8, 6, 7)).astype(np.float32)
rois = np.array([[0, 1, 1, 4, 5], [1, 0.5, 2, 6, 4]], np.float32)
pool = jax.jit(lambda f: jax_psroi.ps_roi_align(f, rois, 2, 1.0, 2))
sharded = jax.device_put(features, jax.NamedSharding(mesh, jax.P("d")))
np.testing.assert_array_equal(pool(sharded), pool(features))
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    # Run elsewhere: `python -c` puts the working directory first on
    # sys.path, and the checkout's source folder would shadow the install.
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, check=False, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-4000:]
