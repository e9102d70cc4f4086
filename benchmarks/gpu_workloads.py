"""Writes the cases of the GPU driver (benchmarks/gpu_driver.cu): a manifest,
the boxes, and the hashes of the outputs the CUDA kernels must reproduce
bitwise, computed here on the CPU.

    python benchmarks/gpu_workloads.py --out DIR [--quick]

Each case is one operator call: the benchmark's GPU workloads (bench.py's
GPU_WORKLOADS, with its own box generator) in the layouts, channel orders,
dtypes and sampling ratios the GPU benchmark reports, every other operator
on a map of their own, and small cases (marked `host`) with crowded and
hostile boxes that the driver's `--host` mode also runs on the CPU. The
expected outputs are those of the CPU's serial run of the CUDA kernels'
schedule (the test-only targets of the CPU module, which the tests check
against the reference); `native_*_hash` are those of the CPU kernels, for
the record: they sum in other orders (the forward separably, in tiles), so
most differ in the last bits.

Feature maps and cotangents are not written: both sides compute them from
the element index (`workload_values`, gpu_driver.cu's `workload_value`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import numpy as np

jax.config.update("jax_platforms", "cpu")

# Run as a script, so benchmarks/ is on sys.path.
import bench  # noqa: E402

import jax_psroi  # noqa: E402
from jax_psroi import _extension  # noqa: E402

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
CHANNEL_ORDERS = ("torchvision", "bin_major")


def _mix64(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def workload_values(count: int, seed: int) -> np.ndarray:
    """float32 [count]: element i of the map (seed 1) or the cotangent (seed
    2), a multiple of 1/128 in [-1, 1) that every dtype holds exactly."""
    index = np.arange(count, dtype=np.uint64) + np.uint64(seed * GOLDEN & MASK)
    top = (_mix64(index) >> np.uint64(56)).astype(np.int32)
    return ((top - 128).astype(np.float32)) / np.float32(128)


def output_hash(array) -> int:
    """The sum (mod 2^64) of mix64(word + position * GOLDEN) over the
    array's little-endian 8-byte words, zero-padded, xor its byte count."""
    raw = np.ascontiguousarray(np.asarray(array)).view(np.uint8).ravel()
    words = np.concatenate([raw, np.zeros(-raw.size % 8, np.uint8)]).view("<u8")
    position = np.arange(1, words.size + 1, dtype=np.uint64) * np.uint64(GOLDEN)
    total = int(_mix64(words + position).sum(dtype=np.uint64))
    return total ^ raw.size


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: str
    features: tuple[int, int, int, int]   # [N, C, H, W]
    rois: str                              # the boxes' file
    data_format: str = "NCHW"
    channel_order: str = "torchvision"
    dtype: str = "float32"
    sampling_ratio: int = 2
    spatial_scale: float = 1 / bench.STRIDE
    pooled: int = bench.BINS
    host: bool = False

    @property
    def attribute(self) -> int:
        if self.op == "roi_align":
            return 1  # aligned=True
        if self.op == "roi_pool":
            return 0
        return CHANNEL_ORDERS.index(self.channel_order)


def _gpu_cases() -> tuple[list[Case], list[bench.Workload]]:
    """The GPU benchmark's rows, and every other operator's."""
    cases = []
    variants = [("NCHW", "torchvision", "float32"), ("NHWC", "torchvision", "float32"),
                ("NHWC", "bin_major", "float32"), ("NCHW", "torchvision", "bfloat16"),
                ("NHWC", "bin_major", "bfloat16")]
    for workload in bench.GPU_WORKLOADS:
        for data_format, order, dtype in variants:
            ratios = (2, -1) if (data_format, dtype) in {("NCHW", "float32"),
                                                         ("NHWC", "bfloat16")} else (2,)
            for ratio in ratios:
                cases.append(Case(
                    f"{workload.name}-{data_format}-{order}-{dtype}-sr{ratio}", "ps_roi_align",
                    workload.features, f"{workload.name}.rois", data_format, order, dtype,
                    ratio))
    cls = bench.GPU_WORKLOADS[0]
    cases.append(Case(f"{cls.name}-ps_roi_pool-NCHW", "ps_roi_pool", cls.features,
                      f"{cls.name}.rois"))
    # A detector's shared-channel heads: 256 channels, 8 images.
    shared = bench.Workload("shared_gpu", (8, 256, 50, 84), 4000)
    for data_format in ("NCHW", "NHWC"):
        cases.append(Case(f"roi_align-{data_format}", "roi_align", shared.features,
                          f"{shared.name}.rois", data_format))
        cases.append(Case(f"roi_pool-{data_format}", "roi_pool", shared.features,
                          f"{shared.name}.rois", data_format))
    return cases, [*bench.GPU_WORKLOADS, shared]


def _host_cases() -> list[Case]:
    """Small maps with crowded and hostile boxes, every kind of row the
    driver has: what its --host mode checks every tuning on."""
    cases = []
    ps = (2, 3 * 49, 20, 30)
    for data_format in ("NCHW", "NHWC"):
        for order in CHANNEL_ORDERS:
            for dtype in ("float32", "bfloat16"):
                for ratio in (2, -1):
                    cases.append(Case(f"small-{data_format}-{order}-{dtype}-sr{ratio}",
                                      "ps_roi_align", ps, "small.rois", data_format, order,
                                      dtype, ratio, 1 / 16, 7, True))
        shared = (2, 12, 20, 30)
        for op in ("roi_align", "roi_pool"):
            cases.append(Case(f"small-{op}-{data_format}", op, shared, "small.rois",
                              data_format, host=True))
        cases.append(Case(f"small-ps_roi_pool-{data_format}", "ps_roi_pool", ps, "small.rois",
                          data_format, host=True))
    return cases


def small_rois(rng) -> np.ndarray:
    """float32 [K, 5] on a 320 x 480 image of two: boxes as the benchmark
    draws them, 300 crowding one spot (so backward tiles take passes), and
    hostile ones (bad batch indices, NaN and infinite coordinates, huge; one
    past the image whose adaptive bins take tens of samples on the map)."""
    k = 100
    side = np.exp(rng.uniform(np.log(16), np.log(320), size=(k, 2)))
    x1 = rng.uniform(0, 480 - side[:, 0])
    y1 = rng.uniform(0, 320 - side[:, 1])
    spread = np.stack([np.arange(k) % 2, x1, y1, x1 + side[:, 0], y1 + side[:, 1]], axis=1)
    jitter = rng.uniform(-8, 8, size=(300, 4))
    crowd = np.concatenate([np.zeros((300, 1)),
                            np.array([100.0, 80.0, 260.0, 200.0]) + jitter], axis=1)
    nan, inf = np.nan, np.inf
    hostile = np.array([[-1, 10, 10, 50, 50], [2, 10, 10, 50, 50], [0, nan, 10, 50, 50],
                        [1, 10, 10, inf, 50], [0, -inf, -inf, inf, inf],
                        [1, -1e30, -1e30, 1e30, 1e30], [0, 470, 310, 480, 320],
                        [1, 30, 40, 30, 40], [0, -2000, -2000, 2400, 2400]])
    return np.concatenate([spread, crowd, hostile]).astype(np.float32)


def _schedule_targets():
    """The test rig's targets (the CUDA schedule, serially, on the CPU; a
    build with JAX_PSROI_TESTING=ON), by (operation, direction, data_format,
    dtype)."""
    from jax_psroi import _gpu_schedule_testing

    rows = _extension._register(_gpu_schedule_testing.targets(), "cpu")
    return {key: row.name for key, row in rows.items()}


def _layout_shape(shape, data_format):
    n, c, h, w = shape
    return (n, h, w, c) if data_format == "NHWC" else (n, c, h, w)


def expected_outputs(case: Case, rois: np.ndarray, targets) -> dict:
    """The hashes of the forward and backward outputs, by the CPU's run of
    the CUDA schedule and by the CPU kernels."""
    dtype = jax.numpy.dtype(case.dtype)
    shape = _layout_shape(case.features, case.data_format)
    features = workload_values(int(np.prod(shape)), 1).reshape(shape).astype(dtype)
    c = case.features[1]
    bins = case.pooled * case.pooled
    c_out = c if case.op in ("roi_align", "roi_pool") else c // bins
    pooled = _layout_shape((rois.shape[0], c_out, case.pooled, case.pooled), case.data_format)
    cotangent = workload_values(int(np.prod(pooled)), 2).reshape(pooled).astype(dtype)
    groups = dict(rois_per_group=0, images_per_group=0)
    scale = float(case.spatial_scale)

    def call(direction, results, *operands, **attributes):
        name = targets[(case.op, direction, case.data_format, dtype)]
        return jax.ffi.ffi_call(name, results)(*operands, **attributes, **groups)

    if case.op == "roi_pool":
        out, pixels = call("forward", [jax.ShapeDtypeStruct(pooled, dtype),
                                       jax.ShapeDtypeStruct(pooled, np.int32)],
                           features, rois, spatial_scale=scale)
        grad = call("backward", [jax.ShapeDtypeStruct(shape, dtype)], cotangent, rois, pixels,
                    spatial_scale=scale)[0]
    else:
        attribute = {"aligned" if case.op == "roi_align" else "channel_order": case.attribute}
        common = dict(spatial_scale=scale, sampling_ratio=int(case.sampling_ratio),
                      first_bin_row=0, bin_rows=case.pooled, **attribute)
        out = call("forward", [jax.ShapeDtypeStruct(pooled, dtype)], features, rois,
                   **common)[0]
        grad = call("backward", [jax.ShapeDtypeStruct(shape, dtype)], cotangent, rois,
                    **common)[0]

    op = getattr(jax_psroi, case.op)
    kwargs = dict(data_format=case.data_format)
    if case.op in ("ps_roi_align", "ps_roi_pool"):
        kwargs["channel_order"] = case.channel_order
    if case.op == "roi_align":
        kwargs["aligned"] = True
    args = (case.pooled, scale) if case.op in ("roi_pool", "ps_roi_pool") else (
        case.pooled, scale, case.sampling_ratio)
    native, vjp = jax.vjp(lambda f: op(f, rois, *args, **kwargs), features)
    native_grad = vjp(cotangent)[0]
    return dict(forward_hash=output_hash(out), backward_hash=output_hash(grad),
                native_forward_hash=output_hash(native),
                native_backward_hash=output_hash(native_grad))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--quick", action="store_true",
                        help="only the small cases (what the driver's --host mode runs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = _schedule_targets()

    boxes = {"small.rois": small_rois(np.random.default_rng(7))}
    cases = _host_cases()
    if not args.quick:
        gpu_cases, workloads = _gpu_cases()
        cases += gpu_cases
        for workload in workloads:  # the benchmark's boxes (seed 0, as bench.py)
            boxes[f"{workload.name}.rois"] = bench.make_inputs(workload)[1]
    for name, rois in boxes.items():
        rois.astype(np.float32).tofile(args.out / name)

    lines = ["# gpu_workloads.py: one case a line, key=value (gpu_driver.cu reads it)"]
    for case in cases:
        start = time.perf_counter()
        rois = boxes[case.rois]
        hashes = expected_outputs(case, rois, targets)
        n, c, h, w = case.features
        fields = dict(name=case.name, op=case.op, data_format=case.data_format,
                      channel_order=case.channel_order, dtype=case.dtype, N=n, C=c, H=h, W=w,
                      K=rois.shape[0], PH=case.pooled, PW=case.pooled,
                      spatial_scale=repr(float(case.spatial_scale)),
                      sampling_ratio=case.sampling_ratio, attribute=case.attribute,
                      rois=case.rois, **{k: f"{v:016x}" for k, v in hashes.items()})
        if case.host:
            fields["host"] = 1
        lines.append(" ".join(f"{k}={v}" for k, v in fields.items()))
        same = ("forward " + ("=" if hashes["forward_hash"] == hashes["native_forward_hash"]
                              else "!=") + " native, backward " +
                ("=" if hashes["backward_hash"] == hashes["native_backward_hash"] else "!="))
        print(f"{case.name}: {time.perf_counter() - start:.1f} s ({same})", file=sys.stderr)
    (args.out / "manifest.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(cases)} cases in {args.out / 'manifest.txt'}")


if __name__ == "__main__":
    main()
