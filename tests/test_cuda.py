"""CUDA: checks that run without a GPU (import, export, lowering errors) and
checks marked `gpu` that run on a GPU machine (docs/guides/gpu.md)."""

import os
import pathlib
import re
import tomllib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_psroi
from jax_psroi import _averaging, _build_info, _extension, _implementation

from cases import (
    CHANNEL_ORDERS,
    DTYPES,
    LAYOUTS,
    TOLERANCE,
    crowded_rois,
    features_as,
    hostile_rois,
    native_gpu_schedule,
    random_features,
    random_rois,
)

CUDA_BUILT = bool(_extension.KERNELS["cuda"])
TARGETS = sorted(row.name for row in _extension.KERNELS["cuda"].values())
DISABLED = jax_psroi.export_safety_checks()
ROOT = pathlib.Path(__file__).parents[1]

needs_cuda_build = pytest.mark.skipif(
    not CUDA_BUILT, reason="built without CUDA (JAX_PSROI_CUDA=OFF or no nvcc)")


def _target(direction, dtype):
    return _extension.target_name("cuda", direction, dtype)


def _version(text):
    return tuple(int(part) for part in text.split(".")[:3])


def test_build_info():
    info = jax_psroi.build_info()
    if info["cuda_built"]:
        assert info["cuda_version"].startswith(str(info["cuda_runtime_version"] // 1000))
        assert info["cuda_toolkit"] in ("system", "pip")
        sass = [int(arch[3:]) for arch in info["cuda_sass"]]
        ptx = [int(arch[8:]) for arch in info["cuda_ptx"]]
        assert sass and min(sass) >= 75 and sass == sorted(sass)
        if _build_info.CUDA_ARCHITECTURES_FROM == "nvcc":
            # The default: machine code for every architecture the compiler
            # knows from sm_75 (CUDA 13: Turing to Blackwell), PTX of the
            # newest only.
            assert {75, 80, 86, 89, 90, 100, 120} <= set(sass)
            assert ptx == [max(sass)]
    assert info["ffi_api_version"][0] == 0
    # Built against the vendored FFI headers of the oldest supported jaxlib:
    # older than or as old as the running one, or the handlers would not load.
    assert info["jax_built_against"] == (ROOT / "third_party" / "xla" / "VERSION").read_text(
        ).strip()
    assert _version(info["jax_built_against"]) <= _version(info["jax_running"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"jax>={info['jax_built_against']}" in pyproject["project"]["dependencies"]
    if os.environ.get("JAX_PSROI_CUDA", "").upper() == "ON":
        # CI forces the CUDA kernels on: they must have been built.
        assert info["cuda_built"]


@needs_cuda_build
def test_cuda_module_has_every_row_of_the_kernel_table():
    # Both modules instantiate the same table: same rows, same target names.
    assert _extension.KERNELS["cuda"] == _extension.KERNELS["cpu"]
    operations = {row.operation for row in _extension.KERNELS["cpu"].values()}
    assert operations == {"ps_roi_align", "roi_align", "ps_roi_pool", "roi_pool"}
    # Forward and backward rows of each, and box rows of the two of samples.
    assert len(TARGETS) == (2 * len(operations) + 4) * len(_extension.SUPPORTED_DTYPES) * len(
        _extension.SUPPORTED_LAYOUTS)


def _data(dtype=np.float32):
    rng = np.random.default_rng(31)
    features = random_features(rng, 2, 2 * 9, 8, 10, dtype)
    rois = random_rois(rng, 5, 2, 8, 10, 0.5, dtype)
    return features, rois


def _forward(features, rois):
    return jax_psroi.ps_roi_align(features, rois, 3, 0.5, 2)


def _loss(features, rois):
    return jnp.sum(_forward(features, rois) ** 2)


def _custom_calls(exported):
    return [line for line in exported.mlir_module().splitlines()
            if "stablehlo.custom_call" in line]


@needs_cuda_build
@pytest.mark.parametrize("platforms", [["cuda"], ["cpu", "cuda"]])
def test_export_forward_for_cuda(platforms):
    features, rois = _data()
    exported = export.export(jax.jit(_forward), platforms=platforms,
                             disabled_checks=DISABLED)(features, rois)
    calls = _custom_calls(exported)
    # One call per platform branch, all to our target, with our attributes.
    assert len(calls) == len(platforms)
    for call in calls:
        assert f"@{_target('forward', np.float32)}" in call
        assert "sampling_ratio = 2 : i64" in call
        assert "spatial_scale = 5.000000e-01 : f64" in call
    assert exported.platforms == tuple(platforms)


@needs_cuda_build
def test_export_grad_for_cuda():
    features, rois = _data(np.float64)
    exported = export.export(jax.jit(jax.grad(_loss)), platforms=["cuda"],
                             disabled_checks=DISABLED)(features, rois)
    text = "\n".join(_custom_calls(exported))
    assert f"@{_target('forward', np.float64)}" in text
    assert f"@{_target('backward', np.float64)}" in text


def test_a_schedule_past_32_bit_positions_is_refused_when_lowered():
    # 1.1 million RoIs over 8192 rows: the backward lists each RoI in each of
    # the 2048 tiles of 4 rows its box may touch, 2.27e9 entries, whose
    # positions the schedule keeps in int32 (they wrapped negative).
    features, pooled = (1, 1, 8192, 4), (1_100_000, 1, 1, 1)
    with pytest.raises(ValueError, match=r"1100000 RoIs over a map of 8192 rows take "
                                         r"2271503649 entries .* past 2\^31 - 1"):
        _averaging.cuda_further_results("backward", np.float32, features, pooled, "NCHW")
    (workspace,) = _averaging.cuda_further_results("forward", np.float32, features, pooled,
                                                   "NCHW")
    assert workspace.dtype == np.int32 and workspace.shape[0] < 2**31
    # A side of 2^31 pixels: the backward's int32 spans of a box's pixels wrapped.
    with pytest.raises(ValueError, match=r"fewer than 2\^31 pixels a side, got 1 x 2147487744"):
        _averaging.cuda_further_results("backward", np.float32, (1, 1, 1, 2**31 + 4096),
                                        (1, 1, 1, 1), "NCHW")


@needs_cuda_build
@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
def test_calls_take_their_workspaces(dtype):
    # CUDA calls return the result, then temporaries XLA allocates: an int32
    # workspace (lib/gpu_schedule.h; both directions: 8 words of box per RoI,
    # 8K = 40 here; forward: RoI order by image and band of rows with
    # B = 8N + 1 buckets and S = 1 segment, 40 + 3K + B(1 + S) + 1 = 90;
    # backward: spans and lists per image and row of 4-pixel tiles,
    # B = N*TY = 4, 40 + 3K + 2K(PH + PW) + B(1 + S) + 1 + K*TY = 134) and,
    # first, for a 16-bit backward the float32 partial sums. A CPU forward
    # returns the result alone, a CPU backward its byte workspace too (its
    # passes of RoI tables; lib/cpu/average_kernels.h sizes it).
    features, rois = _data(np.float32)
    features = features.astype(dtype)
    if np.dtype(dtype) == np.float64:
        rois = rois.astype(np.float64)
    element = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}.get(
        np.dtype(dtype), "bf16")
    pooled, grad = f"tensor<5x2x3x3x{element}>", f"tensor<2x18x8x10x{element}>"
    further = {"forward": "tensor<90xi32>",
               "backward": ("tensor<2880xf32>, tensor<134xi32>" if element == "bf16"
                            else "tensor<134xi32>")}
    cpu_workspace = _extension.cpu_backward_workspace_bytes(
        "ps_roi_align", "NCHW", dtype, (2, 18, 8, 10), (5, 2, 3, 3), 0)
    assert cpu_workspace > 0
    loss = lambda f, r: jnp.sum(_forward(f, r).astype(jnp.float32) ** 2)
    for platform in ("cpu", "cuda"):
        exported = export.export(jax.jit(jax.grad(loss)), platforms=[platform],
                                 disabled_checks=DISABLED)(features, rois)
        calls = _custom_calls(exported)
        for direction, result in (("forward", pooled), ("backward", grad)):
            line, = [c for c in calls if _target(direction, dtype) in c]
            if platform == "cuda":
                expected = f"-> ({result}, {further[direction]})"
            elif direction == "backward":
                expected = f"-> ({result}, tensor<{cpu_workspace}xui8>)"
            else:
                expected = f"-> {result}"

            assert expected + " loc(" in line, (platform, line)


@needs_cuda_build
def test_export_vmap_for_cuda():
    features, rois = _data()
    batched_features = np.stack([features, features + 1])
    batched_rois = np.stack([rois, rois[::-1]])
    exported = export.export(jax.jit(jax.vmap(_forward)), platforms=["cuda"],
                             disabled_checks=DISABLED)(batched_features,
                                                       batched_rois)
    calls = _custom_calls(exported)
    assert len(calls) == 1 and f"@{_target('forward', np.float32)}" in calls[0]
    assert "while" not in exported.mlir_module()


@needs_cuda_build
def test_serialized_export_round_trips_and_runs_on_cpu():
    features, rois = _data()
    exported = export.export(jax.jit(_forward), platforms=["cpu", "cuda"],
                             disabled_checks=DISABLED)(features, rois)
    restored = export.deserialize(exported.serialize())
    cpu = jax.devices("cpu")[0]
    features, rois = jax.device_put((features, rois), cpu)  # the cpu branch
    out = restored.call(features, rois)
    assert out.devices() == {cpu}
    np.testing.assert_array_equal(out, jax.jit(_forward)(features, rois))
    assert np.abs(np.asarray(out)).max() > 0


def test_cuda_lowering_without_cuda_build_runs_the_xla_path_and_says_how_to_rebuild(
        monkeypatch):
    # As if built without CUDA: no CUDA rows in the kernel table, and no
    # warning given yet. A function of its own, so no earlier lowering for
    # cuda is reused from a cache.
    monkeypatch.setitem(_extension.KERNELS, "cuda", {})
    monkeypatch.setattr(_implementation, "_warned_cuda", [])
    features, rois = _data()

    def forward(f, r):
        return jax_psroi.ps_roi_align(f, r, 3, 0.25, 1)

    with pytest.warns(RuntimeWarning, match="JAX_PSROI_CUDA=ON"):
        text = jax.jit(forward).trace(features, rois).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "custom_call" not in text and "gather" in text
    with warnings.catch_warnings():  # once a process
        warnings.simplefilter("error")
        jax.jit(lambda f, r: forward(f, r)).trace(features, rois).lower(
            lowering_platforms=("cuda",))


@pytest.mark.parametrize("default_precision", ["default", "bfloat16", "tensorfloat32"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_contracts_at_highest_precision_for_cuda(default_precision, dtype):
    # GPUs run float32 contractions in TF32 unless told otherwise; the
    # reference asks for HIGHEST on every one, whatever the default says.
    features, rois = _data(dtype)

    def value_and_grad(f, r):
        loss = lambda x: jnp.sum(jax_psroi.ps_roi_align_reference(x, r, 3, 0.5, -1) ** 2)
        return jax.value_and_grad(loss)(f)

    with jax.default_matmul_precision(default_precision):
        text = jax.jit(value_and_grad).trace(features, rois).lower(
            lowering_platforms=("cuda",)).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 4  # contractions of the forward and their transposes
    for line in dots:
        assert "precision = [HIGHEST, HIGHEST]" in line, line


# --- On a GPU -----------------------------------------------------------------

def _on(device_kind, fn, *args):
    device = jax.devices(device_kind)[0]
    return np.asarray(jax.jit(fn)(*jax.device_put(args, device)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_gpu_forward_and_backward_match_cpu_and_reference(dtype, sampling_ratio):
    rng = np.random.default_rng(32)
    features = random_features(rng, 3, 4 * 49, 25, 42, dtype)
    rois = random_rois(rng, 200, 3, 25, 42, 1 / 16, dtype)
    fwd = lambda f, r: jax_psroi.ps_roi_align(f, r, 7, 1 / 16, sampling_ratio)
    grad = jax.grad(lambda f, r: jnp.sum(jnp.sin(fwd(f, r))))
    # The oracle on the CPU: XLA:GPU contracts its sample arithmetic into
    # fused multiply-adds, which moves a few float32 samples by an ulp
    # (about 1 output in 10,000 off by 2e-5).
    ref = _on("cpu", lambda f, r: jax_psroi.ps_roi_align_reference(
        f, r, 7, 1 / 16, sampling_ratio), features, rois)
    tol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(_on("gpu", fwd, features, rois),
                               _on("cpu", fwd, features, rois), **tol)
    np.testing.assert_allclose(_on("gpu", fwd, features, rois), ref, **tol)
    np.testing.assert_allclose(_on("gpu", grad, features, rois),
                               _on("cpu", grad, features, rois), **tol)


@pytest.mark.gpu_schedule
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data_format,channel_order",
                         [(f, o) for f in LAYOUTS for o in CHANNEL_ORDERS])
def test_gpu_runs_the_schedule_the_cpu_tests_check(data_format, channel_order, dtype):
    # The CPU's serial run of the CUDA kernels' schedule (gpu_schedule.h)
    # and the GPU sum in the same order; only the hardware's rounding of
    # each product may differ. Boxes crowd one tile so that its backward
    # takes passes; the gradient repeats bitwise.
    rng = np.random.default_rng(35)
    compute = np.float64 if dtype == np.float64 else np.float32
    features = features_as(random_features(rng, 2, 3 * 49, 20, 70, np.float32),
                           data_format, channel_order, (7, 7)).astype(dtype)
    crowd = crowded_rois(rng, 200, 1, (16.0, 2.0), 1.5, 1 / 8)
    rois = np.concatenate([random_rois(rng, 100, 2, 20, 70, 1 / 8, np.float64), crowd,
                           hostile_rois(2, 20, 70, np.float64)]).astype(compute)
    layout = dict(data_format=data_format, channel_order=channel_order)
    fwd = lambda f, r: jax_psroi.ps_roi_align(f, r, 7, 1 / 8, 2, **layout)
    out = _on("gpu", fwd, features, rois)
    cotangent = rng.normal(size=out.shape).astype(dtype)
    grad = lambda c, r: jax.linear_transpose(lambda f: fwd(f, r), features)(c)[0]
    tol = TOLERANCE.get(np.dtype(dtype), dict(atol=2.0 ** -7, rtol=2.0 ** -7))
    as_f32 = lambda a: np.asarray(a, np.float32 if dtype != np.float64 else np.float64)
    np.testing.assert_allclose(as_f32(out), as_f32(native_gpu_schedule(
        "forward", features, rois, out.shape, 1 / 8, 2, **layout)), **tol)
    gpu_grads = [_on("gpu", grad, cotangent, rois) for _ in range(3)]
    assert len({g.tobytes() for g in gpu_grads}) == 1
    np.testing.assert_allclose(as_f32(gpu_grads[0]), as_f32(native_gpu_schedule(
        "backward", cotangent, rois, features.shape, 1 / 8, 2, **layout)), **tol)
    assert np.abs(as_f32(gpu_grads[0])).max() > 1


@pytest.mark.gpu_schedule
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_out", [11, 17])
def test_gpu_nchw_threads_sum_runs_of_output_channels(dtype, channels_out):
    # An NCHW forward thread sums its RoI's bin in the planes of up to 8
    # output channels (11: 6 + 5, 17: 6 + 6 + 5; gpu_schedule.h) from taps it
    # finds once: as the CPU's run of the schedule and the CPU kernels, and
    # as the NHWC kernels, where a thread takes one channel.
    rng = np.random.default_rng(37)
    compute = np.float64 if dtype == np.float64 else np.float32
    features = random_features(rng, 2, channels_out * 49, 20, 30, np.float32).astype(dtype)
    rois = np.concatenate([random_rois(rng, 200, 2, 20, 30, 1 / 8, np.float64),
                           hostile_rois(2, 20, 30, np.float64)]).astype(compute)
    fwd = lambda f, r, data_format="NCHW": jax_psroi.ps_roi_align(
        f, r, 7, 1 / 8, 2, data_format=data_format)
    out = _on("gpu", fwd, features, rois)
    as_wide = lambda a: np.asarray(a, compute)
    tol = TOLERANCE.get(np.dtype(dtype), dict(atol=2.0 ** -7, rtol=2.0 ** -7))
    np.testing.assert_allclose(as_wide(out), as_wide(native_gpu_schedule(
        "forward", features, rois, out.shape, 1 / 8, 2)), **tol)
    np.testing.assert_allclose(as_wide(out), as_wide(_on("cpu", fwd, features, rois)), **tol)
    nhwc = _on("gpu", lambda f, r: fwd(f, r, "NHWC"), features.transpose(0, 2, 3, 1), rois)
    np.testing.assert_array_equal(out, nhwc.transpose(0, 3, 1, 2))
    assert np.abs(as_wide(out)).max() > 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gpu_hostile_rois(sampling_ratio):
    rng = np.random.default_rng(33)
    features = random_features(rng, 2, 4, 6, 7, np.float32)
    rois = hostile_rois(2, 6, 7, np.float32)
    fwd = lambda f, r: jax_psroi.ps_roi_align(f, r, 2, 1.0, sampling_ratio)
    grad = jax.grad(lambda f, r: jnp.sum(fwd(f, r)))
    gpu = _on("gpu", fwd, features, rois)
    assert np.isfinite(gpu).all()
    np.testing.assert_allclose(gpu, _on("cpu", fwd, features, rois), atol=1e-5)
    np.testing.assert_allclose(_on("gpu", grad, features, rois),
                               _on("cpu", grad, features, rois), atol=1e-5)


@pytest.mark.gpu
def test_gpu_vmap_matches_cpu():
    rng = np.random.default_rng(34)
    features = random_features(rng, 4, 2 * 49, 20, 24, np.float32).reshape(
        4, 1, 98, 20, 24)
    rois = np.stack([random_rois(rng, 30, 1, 20, 24, 1 / 8, np.float32)
                     for _ in range(4)])
    fwd = jax.vmap(lambda f, r: jax_psroi.ps_roi_align(f, r, 7, 1 / 8, -1))
    grad = jax.grad(lambda f, r: jnp.sum(fwd(f, r) ** 2))
    np.testing.assert_allclose(_on("gpu", fwd, features, rois),
                               _on("cpu", fwd, features, rois), atol=1e-5)
    np.testing.assert_allclose(_on("gpu", grad, features, rois),
                               _on("cpu", grad, features, rois), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("operator", ["roi_align", "ps_roi_pool", "roi_pool",
                                      "multi_scale_roi_align"])
def test_gpu_family_matches_cpu_and_repeats(operator, data_format):
    # The operators beyond ps_roi_align on the GPU: results as on the CPU,
    # gradients bitwise equal from run to run; multi_scale_roi_align's
    # in-place update leaves the other levels' RoIs as they were.
    rng = np.random.default_rng(36)
    to = (lambda x: x.transpose(0, 2, 3, 1)) if data_format == "NHWC" else (lambda x: x)
    rois = np.concatenate([random_rois(rng, 150, 2, 64, 96, 1.0, np.float32),
                           crowded_rois(rng, 150, 1, (30.0, 20.0), 12.0, 1.0),
                           hostile_rois(2, 64, 96, np.float32)]).astype(np.float32)
    if operator == "multi_scale_roi_align":
        features = [to(random_features(rng, 2, 8, 64 // s, 96 // s, np.float32))
                    for s in (4, 8, 16, 32)]
        fwd = lambda f, r: jax_psroi.multi_scale_roi_align(
            f, r, 7, 2, (64, 96), canonical_scale=32, data_format=data_format)
    elif operator == "roi_align":
        features = to(random_features(rng, 2, 8, 16, 24, np.float32))
        fwd = lambda f, r: jax_psroi.roi_align(f, r, 7, 1 / 4, 2, False,
                                               data_format=data_format)
    elif operator == "roi_pool":
        features = to(random_features(rng, 2, 8, 16, 24, np.float32))
        fwd = lambda f, r: jax_psroi.roi_pool(f, r, 7, 1 / 4, data_format=data_format)
    else:
        features = to(random_features(rng, 2, 2 * 49, 16, 24, np.float32))
        fwd = lambda f, r: jax_psroi.ps_roi_pool(f, r, 7, 1 / 4, data_format=data_format)
    grad = jax.grad(lambda f, r: jnp.sum(jnp.sin(fwd(f, r))))
    np.testing.assert_allclose(_on("gpu", fwd, features, rois),
                               _on("cpu", fwd, features, rois), atol=1e-5, rtol=1e-5)
    runs = [jax.tree.leaves(_on_tree("gpu", grad, features, rois)) for _ in range(3)]
    assert len({b"".join(g.tobytes() for g in run) for run in runs}) == 1
    for gpu, cpu in zip(runs[0], jax.tree.leaves(_on_tree("cpu", grad, features, rois)),
                        strict=True):
        np.testing.assert_allclose(gpu, cpu, atol=1e-4, rtol=1e-4)
        assert np.abs(cpu).max() > 0.01


def _on_tree(device_kind, fn, *args):
    device = jax.devices(device_kind)[0]
    return jax.tree.map(np.asarray, jax.jit(fn)(*jax.device_put(args, device)))


# --- Non-maximum suppression (lib/cuda/nms_handlers.cu) -----------------------

def _nms_data(images=2, n=300, seed=40):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 200, (images, 8, 2))
    picked = centres[:, rng.integers(0, 8, n)]
    size = rng.uniform(10, 60, (images, n, 2))
    jitter = rng.normal(0, 3, (images, n, 2))
    boxes = np.concatenate([picked + jitter, picked + jitter + size], axis=-1)
    scores = np.round(rng.uniform(size=(images, n)) * 16) / 16  # ties
    categories = rng.integers(0, 3, (images, n))
    return boxes.astype(np.float32), scores.astype(np.float32), categories.astype(np.int32)


def _batched_nms(boxes, scores, categories):
    return jax.vmap(lambda b, s, c: jax_psroi.batched_nms(b, s, c, 0.5, 150))(
        boxes, scores, categories)


@needs_cuda_build
def test_cuda_module_has_the_nms_targets():
    # One per dtype, named as the CPU's (exported programs name them).
    assert _extension.NMS_TARGETS["cuda"] == _extension.NMS_TARGETS["cpu"]
    assert set(_extension.NMS_TARGETS["cuda"]) == set(_extension.SUPPORTED_DTYPES)


@needs_cuda_build
def test_export_nms_for_cuda_sorts_then_calls_the_kernels_once():
    boxes, scores, categories = _nms_data()
    exported = export.export(jax.jit(_batched_nms), platforms=["cuda"],
                             disabled_checks=DISABLED)(boxes, scores, categories)
    calls = _custom_calls(exported)
    # vmap folds into one call, whose last result is the uint32 workspace of
    # 2 images x (64 x 5 x 6 / 2 mask words + 5 removed words) words.
    assert len(calls) == 1 and "@jax_psroi_nms_f32" in calls[0]
    assert "iou_threshold = 5.000000e-01 : f64" in calls[0]
    assert f"tensor<{2 * 2 * (64 * 15 + 5)}xui32>" in calls[0]
    text = exported.mlir_module()
    assert "stablehlo.sort" in text and "while" not in text


@needs_cuda_build
def test_nms_exported_for_cpu_and_cuda_runs_on_cpu():
    boxes, scores, categories = _nms_data()
    exported = export.export(jax.jit(_batched_nms), platforms=["cpu", "cuda"],
                             disabled_checks=DISABLED)(boxes, scores, categories)
    restored = export.deserialize(exported.serialize())
    cpu = jax.devices("cpu")[0]
    indices, counts = restored.call(*jax.device_put((boxes, scores, categories), cpu))
    expected = jax.jit(_batched_nms)(boxes, scores, categories)
    np.testing.assert_array_equal(indices, expected[0])
    np.testing.assert_array_equal(counts, expected[1])
    assert np.all(np.asarray(counts) > 10)


def test_nms_cuda_lowering_without_cuda_build_runs_the_xla_formulation(monkeypatch):
    monkeypatch.setitem(_extension.NMS_TARGETS, "cuda", {})
    monkeypatch.setattr(_implementation, "_warned_cuda", [])
    boxes, scores, categories = _nms_data()

    def suppress(b, s, c):
        return _batched_nms(b, s, c)

    with pytest.warns(RuntimeWarning, match="JAX_PSROI_CUDA=ON"):
        text = jax.jit(suppress).trace(boxes, scores, categories).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "custom_call" not in text and "while" in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_nms_matches_cpu_and_repeats(dtype):
    # 8 images of 3,000 crowded boxes in 3 categories: the GPU's kept
    # indices are the CPU kernel's (IoUs rounded alike: no fused
    # multiply-add), the same on every run.
    boxes, scores, categories = _nms_data(images=8, n=3000, seed=41)
    boxes, scores = boxes.astype(dtype), scores.astype(dtype)
    cpu = _on_tree("cpu", _batched_nms, boxes, scores, categories)
    runs = [_on_tree("gpu", _batched_nms, boxes, scores, categories) for _ in range(3)]
    for indices, counts in runs:
        np.testing.assert_array_equal(indices, cpu[0])
        np.testing.assert_array_equal(counts, cpu[1])
    assert np.all(cpu[1] > 20)


@pytest.mark.gpu
@pytest.mark.parametrize("data_format", LAYOUTS)
def test_gpu_box_gradient_matches_cpu(data_format):
    # The CUDA kernels' box rows (tests/test_box_derivatives.py checks the
    # CPU's against finite differences and the reference).
    rng = np.random.default_rng(44)
    features = features_as(random_features(rng, 2, 3 * 49, 25, 42, np.float64), data_format,
                           "bin_major", (7, 7))
    rois = random_rois(rng, 200, 2, 25, 42, 1 / 8, np.float64)
    loss = lambda f, r: jnp.sum(jnp.sin(jax_psroi.ps_roi_align(
        f, r, 7, 1 / 8, 2, data_format=data_format, channel_order="bin_major")))
    grads = lambda f, r: jax.grad(loss, argnums=(0, 1))(f, r)
    gpu, cpu = _on_tree("gpu", grads, features, rois), _on_tree("cpu", grads, features, rois)
    for got, want in zip(gpu, cpu, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert np.abs(cpu[1]).max() > 0.1


# --- Deformable RoI Align (lib/cuda/deformable_handlers.cu) ----------------------

def _deform_data(seed=50):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, 3 * 49, 24, 30)).astype(np.float32)
    corners = np.sort(rng.uniform(-8, 260, size=(40, 2, 2)), axis=1)
    boxes = np.concatenate([rng.integers(0, 2, (40, 1)), corners[:, :, 0], corners[:, :, 1]],
                           axis=1)[:, [0, 1, 3, 2, 4]].astype(np.float32)
    offset = rng.uniform(-1, 1, size=(40, 2, 7, 7)).astype(np.float32)
    return features, boxes, offset


def _deform_loss(features, boxes, offset):
    pooled = jax_psroi.deform_ps_roi_align(features, boxes, offset, 7, 1 / 8, 2)
    return jnp.sum(pooled * jnp.cos(pooled))


@needs_cuda_build
def test_cuda_module_has_the_deformable_targets():
    # Every CPU row, named as the CPU's (exported programs name them).
    cuda = {key: row.name for key, row in _extension.DEFORM_KERNELS["cuda"].items()}
    assert cuda == {key: row.name for key, row in _extension.DEFORM_KERNELS["cpu"].items()}
    assert len(cuda) == 2 * 2 * len(_extension.SUPPORTED_LAYOUTS) * len(
        _extension.SUPPORTED_DTYPES)


@needs_cuda_build
def test_export_deformable_for_cuda_calls_its_kernels():
    exported = export.export(jax.jit(jax.value_and_grad(_deform_loss, argnums=(0, 1, 2))),
                             platforms=["cuda"], disabled_checks=DISABLED)(*_deform_data())
    text = exported.mlir_module()
    calls = re.findall(r"custom_call @(jax_psroi_\w+)", text)
    # The forward, its four derivative directions (boxes and offsets) and
    # the backward (features).
    assert calls.count("jax_psroi_deform_ps_roi_align_forward_nchw_f32") == 5
    assert calls.count("jax_psroi_deform_ps_roi_align_backward_nchw_f32") == 1


@pytest.mark.gpu
def test_gpu_deformable_matches_cpu_and_repeats():
    grad = jax.value_and_grad(_deform_loss, argnums=(0, 1, 2))
    data = _deform_data()
    cpu = _on_tree("cpu", grad, *data)
    runs = [_on_tree("gpu", grad, *data) for _ in range(3)]
    for run in runs[1:]:  # deterministic: the same bits every run
        for a, b in zip(jax.tree.leaves(run), jax.tree.leaves(runs[0]), strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(cpu), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
