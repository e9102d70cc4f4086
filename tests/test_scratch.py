"""The CPU kernels' memory: scratch bounded by what the RoIs touch,
and the backward's large scratch allocated by XLA.

The forward's weight tables hold, for each RoI, the pixels its bins touch
(not the whole map for every bin), and a task keeps those of one block of
RoIs within a budget (not one copy per RoI of a 32-RoI block, which on a
[1, 32, 1, 30000] map would be about 1 GB per task). The backward
takes its RoIs in passes whose tables fit its workspace, a further result
of the call, and gives the same gradient, bit for bit, whatever the passes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi
from jax_psroi import _arguments, _averaging, _extension

from cases import (
    CHANNEL_ORDERS,
    DTYPES,
    LAYOUTS,
    ONE_GROUP,
    TOLERANCE,
    features_as,
    hostile_rois,
    pooled_as,
    random_rois,
    target,
)

WIDE_ROIS = np.array([[0, 0, 0, 30000, 1], [0, 100, 0, 29900, 1]], np.float32)


def _forward_table_bound(height, width, pooled_h, pooled_w):
    """Bytes of one RoI's float32 weight tables at most: every bin row's
    touched rows (a bin's at most ceil(bin) + 3, those of neighbouring bins
    overlapping where they meet), every bin column's columns, a span and an
    offset per bin row and column, a 64-byte column tile per bin column."""
    weights = (min(pooled_h * height, height + 3 * pooled_h)
               + min(pooled_w * width, width + 3 * pooled_w))
    return 4 * weights + 24 * (pooled_h + pooled_w) + 64 * pooled_w


def _forward_task_bound(rois, channels, height, width, pooled_h, pooled_w):
    """Bytes a forward task may hold while the tables of `rois` RoIs are
    kept at once: theirs, the taps of one RoI's bins of few samples (8 of
    16 bytes per bin row and column), C_out sums and a 32-RoI block's
    geometry."""
    return (rois * _forward_table_bound(height, width, pooled_h, pooled_w)
            + 128 * (pooled_h + pooled_w) + 4 * channels + 32 * 96)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("channels", [31, 32, 33])
def test_forward_scratch_is_bounded_by_the_rois_not_the_map_or_channels(channels,
                                                                        data_format):
    # roi_align, 256 x 256 bins, 2 RoIs across a map 30,000 pixels wide: a
    # table per bin over the whole width, and 32 of them per block from 32
    # channels on, held 32 * 256 * 30,000 * 4 bytes = 983 MB per task.
    scratch = _extension._cpu.forward_scratch_bytes(
        "roi_align", data_format, 1, channels, 1, 30000, channels, 256, 256, False,
        WIDE_ROIS.ravel().tolist(), 1.0, -1)
    # Both RoIs' tables at once (one at a time below 32 channels).
    assert 0 < scratch <= _forward_task_bound(2, channels, 1, 30000, 256, 256), scratch
    assert _forward_table_bound(1, 30000, 256, 256) < 160_000


def test_forward_scratch_of_a_block_stays_within_its_budget():
    # 32 channels: blocks of 32 RoIs, each of whose tables take about 150 KB
    # here. A block stops once its tables reach 256 KiB: two RoIs at a time,
    # not 32.
    rois = np.tile(WIDE_ROIS, (16, 1))
    scratch = _extension._cpu.forward_scratch_bytes(
        "roi_align", "NCHW", 1, 32, 1, 30000, 32, 256, 256, False, rois.ravel().tolist(),
        1.0, -1)
    assert scratch <= _forward_task_bound(2, 32, 1, 30000, 256, 256), scratch


native_roi_align = jax.jit(jax_psroi.roi_align, static_argnums=(2, 3, 4, 5),
                           static_argnames=("data_format",))
reference_roi_align = jax.jit(jax_psroi.roi_align_reference, static_argnums=(2, 3, 4, 5),
                              static_argnames=("data_format",))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("channels", [31, 32, 33])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_wide_maps_match_the_reference(channels, data_format, ratio):
    # Blocks of one RoI (31 channels) and of 32 (32, 33), bins of about
    # 1,700 columns (adaptive: as many samples) and of 5 to 40 columns, on a
    # map 20,000 pixels wide: forward and gradient. In float64: float32
    # positions of thousands of pixels are rounded by up to 1e-3 pixel, and
    # the kernels and the reference, which compute them in other orders,
    # would differ by that, not by how the kernels keep their tables.
    rng = np.random.default_rng(channels)
    features = pooled_as(rng.normal(size=(1, channels, 3, 20000)), data_format)
    rois = np.array([[0, 0, 0, 20000, 3], [0, 150.5, 0.5, 17000.25, 2.5], [0, 100, 0, 140, 2],
                     [0, 19950, 1, 20600, 3], [0, 3000, 0, 3480, 3]])
    cotangent = pooled_as(rng.normal(size=(len(rois), channels, 2, 12)), data_format)
    args = ((2, 12), 1.0, ratio, False)
    out, vjp = jax.vjp(lambda f: native_roi_align(f, rois, *args, data_format=data_format),
                       features)
    ref, ref_vjp = jax.vjp(
        lambda f: reference_roi_align(f, rois, *args, data_format=data_format), features)
    assert out.dtype == np.float64
    assert np.count_nonzero(ref) > 0.75 * ref.size  # one box runs off the map
    np.testing.assert_allclose(out, ref, **TOLERANCE[np.dtype(np.float64)])
    np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0],
                               **TOLERANCE[np.dtype(np.float64)])


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("channel_order", CHANNEL_ORDERS)
def test_wide_position_sensitive_maps_match_the_reference(data_format, channel_order):
    # ps_roi_align with 32 output channels (blocks of 32 RoIs) on a wide map;
    # float64, as above.
    rng = np.random.default_rng(5)
    output_size = (1, 4)
    features = features_as(rng.normal(size=(1, 32 * 4, 2, 8000)), data_format, channel_order,
                           output_size)
    rois = np.concatenate([np.array([[0, 0, 0, 8000, 2], [0, 10.5, 0, 7000, 1.5]]),
                           random_rois(rng, 40, 1, 2, 8000, 1.0, np.float64)])
    layout = dict(data_format=data_format, channel_order=channel_order)
    op = lambda f: jax_psroi.ps_roi_align(f, rois, output_size, 1.0, 2, **layout)
    ref = lambda f: jax_psroi.ps_roi_align_reference(f, rois, output_size, 1.0, 2, **layout)
    out, vjp = jax.vjp(jax.jit(op), features)
    expected, ref_vjp = jax.vjp(jax.jit(ref), features)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expected, **TOLERANCE[np.dtype(np.float64)])
    cotangent = rng.normal(size=out.shape)
    np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0],
                               **TOLERANCE[np.dtype(np.float64)])


def _workspace_bytes(text, name):
    """The byte workspace of the custom call `name` in a lowered program."""
    lines = [line for line in text.splitlines() if f"custom_call @{name}(" in line]
    assert len(lines) == 1, lines
    result = lines[0].rsplit("-> ", 1)[1]
    assert result.endswith("xui8>)"), result
    return int(result.rsplit("tensor<", 1)[1].split("x")[0])


@pytest.mark.parametrize("dtype,data_format,channel_order", [
    (np.float32, "NCHW", "torchvision"), (np.float64, "NHWC", "bin_major"),
    (jnp.bfloat16, "NHWC", "torchvision"), (jnp.float16, "NCHW", "torchvision")])
def test_backward_workspace_is_visible_to_xla_and_bounded(dtype, data_format, channel_order):
    # A million RoIs on the Light-Head map: their tables and bin-major
    # cotangent took 1.6-2.1 KB per RoI (1.6-2.1 GB) that XLA did not see.
    # The workspace, a result XLA allocates, holds passes of them whose
    # tables fit the larger of 8 MiB and the gradient in its compute type,
    # and (16-bit types, channels-last in torchvision's order) the sums
    # carried between passes.
    k, output_size = 10**6, (7, 7)
    features = (1, 490, 50, 84) if data_format == "NCHW" else (1, 50, 84, 490)
    layout = dict(data_format=data_format, channel_order=channel_order)
    op = lambda f, r: jnp.sum(jax_psroi.ps_roi_align(f, r, output_size, 1 / 16, 2, **layout))
    text = jax.jit(jax.grad(op)).trace(
        jax.ShapeDtypeStruct(features, dtype), jax.ShapeDtypeStruct((k, 5), np.float32),
    ).lower(lowering_platforms=("cpu",)).as_text()
    workspace = _workspace_bytes(text, target("backward", dtype, data_format))
    compute = np.dtype(_arguments.compute_dtype(jnp.dtype(dtype))).itemsize
    elements = int(np.prod(features))
    budget = max(8 << 20, compute * elements)
    carried = (compute * elements * 12 // 10 if compute != np.dtype(dtype).itemsize
               or (data_format == "NHWC" and channel_order == "torchvision") else 0)
    assert budget // 2 < workspace <= budget + carried, (workspace, budget, carried)


def _backward(operation, dtype, data_format, channel_order, cotangent, rois, features_shape,
              pass_rois):
    """The CPU backward kernel, given room for passes of `pass_rois` RoIs."""
    features, pooled = _arguments.features_and_pooled("backward", cotangent.shape,
                                                      features_shape)
    axes = _arguments.LAYOUT_AXES[data_format]
    order = 0 if operation == "roi_align" else CHANNEL_ORDERS.index(channel_order)
    size = _extension.cpu_backward_workspace_bytes(
        operation, data_format, dtype, [features[a] for a in axes], [pooled[a] for a in axes],
        order, pass_rois)
    attribute = dict(aligned=1) if operation == "roi_align" else dict(channel_order=order)
    pooled_h = _arguments.pooled_size_of(pooled, data_format)[0]
    call = jax.ffi.ffi_call(target("backward", dtype, data_format, operation),
                            [jax.ShapeDtypeStruct(features_shape, dtype),
                             jax.ShapeDtypeStruct((size,), np.uint8)])
    with jax.default_device(jax.devices("cpu")[0]):
        grad = call(cotangent, rois, spatial_scale=0.5, sampling_ratio=2, **attribute,
                    first_bin_row=0, bin_rows=pooled_h, **ONE_GROUP)[0]
        return np.asarray(grad), size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("operation,channel_order", [
    ("ps_roi_align", "torchvision"), ("ps_roi_align", "bin_major"),
    ("roi_align", "torchvision"), ("ps_roi_pool", "torchvision")])
def test_backward_passes_give_the_same_gradient_bit_for_bit(dtype, data_format, operation,
                                                            channel_order):
    # 60 RoIs on 2 images (some reading nothing) in one pass, in passes of 7
    # and of 1: every unit zeroes its part in the first pass, adds each pass's
    # RoIs in order, and (16-bit, or channels-last summed bin-major) keeps its
    # sums in the workspace's accumulator until the last.
    rng = np.random.default_rng(11)
    output_size = (2, 3)
    c_out = 3
    channels = c_out if operation == "roi_align" else c_out * 6
    features_shape = pooled_as(np.zeros((2, channels, 9, 13)), data_format).shape
    rois = np.concatenate([random_rois(rng, 45, 2, 9, 13, 0.5, np.float64),
                           hostile_rois(2, 9, 13, np.float64)])[rng.permutation(60)].astype(
                               _arguments.compute_dtype(dtype))
    cotangent = jnp.asarray(pooled_as(rng.normal(size=(60, c_out, *output_size)),
                                      data_format), dtype)
    grads = {}
    for pass_rois in (60, 7, 1):
        grads[pass_rois], size = _backward(operation, dtype, data_format, channel_order,
                                           cotangent, rois, features_shape, pass_rois)
        assert size > 0
    np.testing.assert_array_equal(grads[7], grads[60])
    np.testing.assert_array_equal(grads[1], grads[60])
    # One pass is what the operator runs (its lowering asks for room for all
    # 60), and the passes really differ in size.
    assert _backward(operation, dtype, data_format, channel_order, cotangent, rois,
                     features_shape, 1)[1] < _backward(operation, dtype, data_format,
                                                       channel_order, cotangent, rois,
                                                       features_shape, 60)[1]
    pool = {"ps_roi_align": jax_psroi.ps_roi_align, "roi_align": jax_psroi.roi_align,
            "ps_roi_pool": jax_psroi.ps_roi_pool}[operation]
    args = (output_size, 0.5) + ((2, True) if operation == "roi_align" else
                                 () if operation == "ps_roi_pool" else (2,))
    layout = dict(data_format=data_format)
    if operation != "roi_align":
        layout["channel_order"] = channel_order
    _, vjp = jax.vjp(lambda f: pool(f, rois, *args, **layout), jnp.zeros(features_shape, dtype))
    assert np.abs(grads[60].astype(np.float32)).max() > 0
    np.testing.assert_array_equal(np.asarray(vjp(cotangent)[0]), grads[60])


def test_backward_rejects_a_workspace_too_small_for_one_roi():
    rng = np.random.default_rng(2)
    rois = random_rois(rng, 5, 1, 9, 13, 0.5, np.float32)
    cotangent = rng.normal(size=(5, 3, 2, 3)).astype(np.float32)
    call = jax.ffi.ffi_call(target("backward", np.float32, "NCHW"),
                            [jax.ShapeDtypeStruct((1, 18, 9, 13), np.float32),
                             jax.ShapeDtypeStruct((64,), np.uint8)])
    with pytest.raises(jax.errors.JaxRuntimeError, match="workspace of bytes of at least"):
        call(cotangent, rois, spatial_scale=0.5, sampling_ratio=2, channel_order=0,
             first_bin_row=0, bin_rows=2, **ONE_GROUP)[0].block_until_ready()


def test_lowering_asks_for_the_workspace_the_kernel_plans():
    features, pooled = (2, 18, 9, 13), (60, 3, 2, 3)
    expected = _extension.cpu_backward_workspace_bytes("ps_roi_align", "NCHW", np.float32,
                                                       features, pooled, 0)
    results = _averaging.cpu_further_results("backward", "ps_roi_align", np.float32, features,
                                              pooled, "NCHW", "torchvision")
    assert [(r.shape, r.dtype) for r in results] == [((expected,), np.uint8)]
    assert _averaging.cpu_further_results("forward", "ps_roi_align", np.float32, features,
                                           pooled, "NCHW", "torchvision") == []
