"""The runs scripts/gpu_check.sh makes, each a subcommand.

    python scripts/gpu_runs.py smoke                 # forward, gradient, vmap; hostile boxes
    python scripts/gpu_runs.py determinism --device gpu --runs 5
    python scripts/gpu_runs.py profile               # one forward and one backward, GPU-sized
    python scripts/gpu_runs.py ncu-summary FILE.csv  # time, DRAM bytes, % of peak, atomics

Each prints what it found and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_psroi

# The tests' hostile boxes, one list for both.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import cases

# The R-FCN class map and the Light-Head map of a batch of 8 images, with the
# RoIs the GPU benchmark gives them.
PROFILE_WORKLOADS = (((8, 3969, 38, 63), 2400), ((8, 490, 50, 84), 16000))


def _rois(rng, num_rois, num_images, height, width, scale):
    extent = np.array([width, height]) / scale
    corners = rng.uniform(-0.2 * extent, 1.2 * extent, size=(num_rois, 2, 2))
    x1, x2 = np.sort(corners[:, :, 0], axis=1).T
    y1, y2 = np.sort(corners[:, :, 1], axis=1).T
    batch = np.arange(num_rois) % num_images
    return np.stack([batch, x1, y1, x2, y2], axis=1).astype(np.float32)


def _crowd(rng, num_rois, image, y, x, scale):
    """Boxes inside the backward tile at map pixel (y, x) of `image`."""
    return cases.crowded_rois(rng, num_rois, image, (x + 16, y + 2), 1.5, scale).astype(
        np.float32)


# Layouts and dtypes the smoke run checks (the determinism run checks all).
SMOKE_VARIANTS = (("NCHW", "torchvision", "float32"), ("NHWC", "bin_major", "bfloat16"))


def smoke(_args) -> int:
    """Forward, gradient and vmap on the default device with hostile and
    crowded boxes, compared with the CPU. Run under compute-sanitizer by
    gpu_check.sh."""
    rng = np.random.default_rng(0)
    rois = np.concatenate([_rois(rng, 40, 2, 12, 40, 0.5),
                           _crowd(rng, 150, 1, 4, 0, 0.5),
                           cases.hostile_rois(2, 12, 40, np.float32)])
    failures = 0
    for data_format, order, dtype in SMOKE_VARIANTS:
        shape = (2, 12, 40, 4 * 49) if data_format == "NHWC" else (2, 4 * 49, 12, 40)
        features = jnp.asarray(rng.normal(size=shape), dtype)
        tolerance = 1e-4 if dtype == "float32" else 2e-2
        for ratio in (-1, 2):
            forward = lambda f, r, ratio=ratio, data_format=data_format, order=order: (
                jax_psroi.ps_roi_align(f, r, 7, 0.5, ratio, data_format=data_format,
                                       channel_order=order))
            grad = jax.grad(lambda f, r, forward=forward: jnp.sum(
                jnp.sin(forward(f, r).astype(jnp.float32))))
            batched = jax.vmap(forward, in_axes=(0, None))
            for name, fn, args in (("forward", forward, (features, rois)),
                                   ("gradient", grad, (features, rois)),
                                   ("vmap", batched, (features[:, None], rois))):
                results = {}
                for kind in ("default", "cpu"):
                    device = jax.devices()[0] if kind == "default" else jax.devices("cpu")[0]
                    results[kind] = np.asarray(
                        jax.jit(fn)(*jax.device_put(args, device)), np.float32)
                ok = (np.isfinite(results["default"]).all()
                      and np.allclose(results["default"], results["cpu"], atol=tolerance,
                                      rtol=tolerance))
                failures += not ok
                print(f"{name:9s} {data_format} {order} {dtype} sampling_ratio={ratio:2d} "
                      f"on {jax.devices()[0].platform}: "
                      f"{'ok' if ok else 'DIFFERS FROM THE CPU'}")
    return 1 if failures else 0


def determinism(args) -> int:
    """The same gradient `--runs` times on one device, compared bitwise, for
    every layout, channel order and dtype, with spread and crowded boxes."""
    jax.config.update("jax_enable_x64", True)  # float64 too
    device = jax.devices(args.device)[0]
    rng = np.random.default_rng(1)
    n, c, h, w = (2, 81 * 49, 38, 63) if args.device == "gpu" else (1, 8 * 49, 38, 63)
    rois = np.concatenate([_rois(rng, 600, n, h, w, 1 / 16),
                           _crowd(rng, 300, n - 1, 8, 32, 1 / 16)])
    base_features = rng.normal(size=(n, c, h, w)).astype(np.float32)
    base_cotangent = rng.normal(size=(len(rois), c // 49, 7, 7)).astype(np.float32)
    failures = 0
    for data_format in jax_psroi.build_info()["layouts"]:
        for order in ("torchvision", "bin_major"):
            for dtype in map(jnp.dtype, jax_psroi.build_info()["dtypes"]):
                features, cotangent = base_features, base_cotangent
                if data_format == "NHWC":
                    features = features.transpose(0, 2, 3, 1)
                    cotangent = cotangent.transpose(0, 2, 3, 1)
                features, cotangent = (jax.device_put(jnp.asarray(a, dtype), device)
                                       for a in (features, cotangent))
                r = jax.device_put(rois.astype(np.float64 if dtype == np.float64
                                               else np.float32), device)

                @jax.jit
                def gradient(f, r, ct, data_format=data_format, order=order):
                    _, vjp = jax.vjp(lambda x: jax_psroi.ps_roi_align(
                        x, r, 7, 1 / 16, 2, data_format=data_format, channel_order=order), f)
                    return vjp(ct)[0]

                runs = [np.asarray(gradient(features, r, cotangent), np.float64)
                        for _ in range(args.runs)]
                distinct = len({run.tobytes() for run in runs})
                spread = max(float(np.abs(run - runs[0]).max()) for run in runs)
                failures += distinct != 1
                print(f"{args.runs} gradients {data_format} {order} {np.dtype(dtype).name} "
                      f"on {device}: {distinct} distinct, largest difference {spread:.3g}")
    return 1 if failures else 0


def profile(args) -> int:
    """One forward and one backward on each GPU-sized workload, for ncu, in
    each of --variants (DATA_FORMAT:CHANNEL_ORDER:DTYPE, comma-separated)."""
    rng = np.random.default_rng(2)
    for shape, num_rois in PROFILE_WORKLOADS:
        n, c, h, w = shape
        features = rng.normal(size=shape).astype(np.float32)
        rois = jax.device_put(_rois(rng, num_rois, n, h, w, 1 / 16))
        cotangent = rng.normal(size=(num_rois, c // 49, 7, 7)).astype(np.float32)
        for variant in args.variants.split(","):
            data_format, order, dtype = variant.split(":")
            # The same values in another layout or order are another map; the
            # profile is about bytes and instructions, not values.
            f = features if data_format == "NCHW" else features.transpose(0, 2, 3, 1)
            ct = cotangent if data_format == "NCHW" else cotangent.transpose(0, 2, 3, 1)
            f = jax.device_put(np.ascontiguousarray(f).astype(dtype))
            ct = jax.device_put(np.ascontiguousarray(ct).astype(dtype))
            op = functools.partial(jax_psroi.ps_roi_align, output_size=7, spatial_scale=1 / 16,
                                   sampling_ratio=2, data_format=data_format,
                                   channel_order=order)
            forward = jax.jit(lambda x, r, op=op: op(x, r))
            backward = jax.jit(lambda c, r, x=f, op=op: jax.linear_transpose(
                lambda y: op(y, r), x)(c)[0])
            jax.block_until_ready(forward(f, rois))
            jax.block_until_ready(backward(ct, rois))
            print(f"profiled {shape} K={num_rois} {variant}: one forward, one backward")
    return 0


# ncu metrics: name in the CSV -> column of the summary, scale.
NCU_METRICS = {
    "gpu__time_duration.sum": ("time us", 1e-3),
    "dram__bytes.sum": ("DRAM MB", 1e-6),
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": ("% peak DRAM", 1.0),
    "smsp__inst_executed_op_global_red.sum": ("atomic red (warp)", 1.0),
    "smsp__inst_executed_op_global_atom.sum": ("atomic (warp)", 1.0),
    "launch__registers_per_thread": ("registers", 1.0),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("% occupancy", 1.0),
}


def ncu_summary(args) -> int:
    """A Markdown table per kernel from `ncu --csv --page raw` output."""
    text = pathlib.Path(args.file).read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith('"ID"')), None)
    if start is None:
        print("no ncu results in", args.file)
        return 1
    rows = list(csv.DictReader(text[start:]))
    print("| kernel | " + " | ".join(col for col, _ in NCU_METRICS.values()) + " |")
    print("| --- |" + " --- |" * len(NCU_METRICS))
    for row in rows:
        if not row.get("Kernel Name") or not row.get("ID", "").isdigit():
            continue  # the units row
        name = row["Kernel Name"].split("(")[0].split("<")[0].split()[-1]
        cells = []
        for metric, (_, scale) in NCU_METRICS.items():
            value = row.get(metric, "").replace(",", "")
            cells.append(f"{float(value) * scale:,.1f}" if value else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("smoke", help=smoke.__doc__.splitlines()[0])
    det = commands.add_parser("determinism", help=determinism.__doc__)
    det.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    det.add_argument("--runs", type=int, default=5)
    prof = commands.add_parser("profile", help=profile.__doc__)
    prof.add_argument("--variants", default="NCHW:torchvision:float32")
    summary = commands.add_parser("ncu-summary", help=ncu_summary.__doc__)
    summary.add_argument("file")
    args = parser.parse_args(argv)
    run = {"smoke": smoke, "determinism": determinism, "profile": profile,
           "ncu-summary": ncu_summary}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
