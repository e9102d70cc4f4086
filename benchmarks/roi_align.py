"""Speed of jax_psroi.roi_align against its jax.numpy reference and
torchvision's roi_align, on Mask R-CNN's RoI Align (issue 15).

    python benchmarks/roi_align.py [--quick] [--device cpu|gpu] [--out DIR]

Workloads: one FPN level of an 800 x 1344 image with 256 channels and 1,000
RoIs of the benchmark's box distribution, pooled 7 x 7 (the box head) and
14 x 14 (the mask head), sampling_ratio 2 and aligned=True (Detectron2's
RoIAlignV2). Levels P2 (stride 4, 200 x 336) and P4 (stride 16, 50 x 84)
bracket MultiScaleRoIAlign, which pools every RoI from one of P2-P5.
Forward and backward (the vjp of a stored forward), medians of calls on
device-resident inputs, all in one process. Writes roi_align.md and
roi_align.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform

import bench  # run as a script: benchmarks/ is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import jax_psroi

CHANNELS, NUM_ROIS, RATIO, ALIGNED = 256, 1000, 2, True
LEVELS = {"P2": 4, "P4": 16}
SIZES = (7, 14)


def jax_cpu_threads() -> int:
    """Threads of this process (XLA's CPU pool, and torchvision's)."""
    return len(os.sched_getaffinity(0))


def _inputs(stride, num_rois, rng):
    height, width = bench.IMAGE_HW[0] // stride, bench.IMAGE_HW[1] // stride
    features = rng.normal(size=(1, CHANNELS, height, width)).astype(np.float32)
    side = np.exp(rng.uniform(np.log(16), np.log(512), size=(num_rois, 2)))
    x1 = rng.uniform(0, bench.IMAGE_HW[1] - side[:, 0])
    y1 = rng.uniform(0, bench.IMAGE_HW[0] - side[:, 1])
    rois = np.stack([np.zeros(num_rois), x1, y1, x1 + side[:, 0], y1 + side[:, 1]],
                    axis=1).astype(np.float32)
    return features, rois


def _jax_times(op, features, rois, size, scale, repeats):
    forward = jax.jit(lambda f, r: op(f, r, size, scale, RATIO, ALIGNED))
    out, vjp = jax.vjp(lambda f: op(f, rois, size, scale, RATIO, ALIGNED), features)
    cotangent = jnp.ones_like(out)
    backward = jax.jit(lambda fn, c: fn(c)[0])
    return {
        "forward": bench.median_seconds(
            lambda: jax.block_until_ready(forward(features, rois)), **repeats),
        "backward": bench.median_seconds(
            lambda: jax.block_until_ready(backward(vjp, cotangent)), **repeats),
    }


def _torchvision_times(features, rois, size, scale, repeats, device):
    try:
        import torch
        from torchvision.ops import roi_align
    except ImportError:
        return None
    dev = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.set_num_threads(jax_cpu_threads())
    f = torch.from_numpy(features).to(dev).requires_grad_(True)
    r = torch.from_numpy(rois).to(dev)

    def forward():
        with torch.no_grad():
            roi_align(f, r, size, scale, RATIO, ALIGNED)
        sync()

    stored = roi_align(f, r, size, scale, RATIO, ALIGNED)
    ones = torch.ones_like(stored)

    def backward():
        torch.autograd.grad(stored, f, ones, retain_graph=True)
        sync()

    return {"forward": bench.median_seconds(forward, **repeats),
            "backward": bench.median_seconds(backward, **repeats)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 RoIs, P4 only")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    device = jax.devices(args.device)[0]
    repeats = dict(min_repeats=3, min_seconds=0.2) if args.quick else dict(
        min_repeats=5, min_seconds=1.0)
    levels = {"P4": 16} if args.quick else LEVELS
    num_rois = 100 if args.quick else NUM_ROIS
    rng = np.random.default_rng(0)
    rows = []
    for level, stride in levels.items():
        features, rois = _inputs(stride, num_rois, rng)
        placed = [jax.device_put(x, device) for x in (features, rois)]
        for size in SIZES:
            scale = 1 / stride
            ours = _jax_times(jax_psroi.roi_align, *placed, size, scale, repeats)
            ref = _jax_times(jax_psroi.roi_align_reference, *placed, size, scale, repeats)
            tv = _torchvision_times(features, rois, size, scale, repeats, args.device)
            rows.append(dict(level=level, shape=list(features.shape), num_rois=num_rois,
                             output_size=size, jax_psroi=ours, reference=ref,
                             torchvision=tv))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_gpu" if args.device == "gpu" else ""
    (args.out / f"roi_align{suffix}.json").write_text(json.dumps(rows, indent=1))
    try:
        import torchvision
        versions = f", torchvision {torchvision.__version__}"
    except ImportError:
        versions = ", torchvision not installed"
    lines = [f"Machine: {platform.processor() or platform.machine()}, {device.device_kind}, "
             f"{jax_cpu_threads()} threads, jax {jax.__version__}{versions}.", "",
             "Median milliseconds; `x ref` and `x tv`: how many times faster jax_psroi is "
             f"than the jitted jax.numpy reference and torchvision. {num_rois} RoIs, "
             f"{CHANNELS} channels, sampling_ratio {RATIO}, aligned={ALIGNED}.", "",
             "| level | output | pass | jax_psroi | reference | torchvision | x ref | x tv |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for mode in ("forward", "backward"):
            ours, ref = row["jax_psroi"][mode], row["reference"][mode]
            tv = row["torchvision"][mode] if row["torchvision"] else None
            lines.append(
                f"| {row['level']} {row['shape']} | {row['output_size']} | {mode} | "
                f"{ours * 1e3:.2f} | {ref * 1e3:.2f} | "
                f"{'-' if tv is None else f'{tv * 1e3:.2f}'} | {ref / ours:.1f} | "
                f"{'-' if tv is None else f'{tv / ours:.1f}'} |")
    (args.out / f"roi_align{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
