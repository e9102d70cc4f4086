"""Speed of the RoI family's native operators against their jax.numpy
references and torchvision.

    python benchmarks/family.py [--quick] [--device cpu|gpu] [--only OPERATOR ...]
                                [--out DIR]

Workloads, on an 800 x 1344 image with 1,000 RoIs of the benchmark's box
distribution:
  * roi_align, Mask R-CNN's RoI Align: one FPN level with 256 channels,
    pooled 7 x 7 (the box head) and 14 x 14 (the mask head), sampling_ratio 2,
    aligned=True (Detectron2's RoIAlignV2); levels P2 (stride 4, 200 x 336)
    and P4 (stride 16, 50 x 84);
  * multi_scale_roi_align, torchvision's MultiScaleRoIAlign over P2-P5 (each
    RoI pooled from its own level), 7 x 7 and 14 x 14, sampling_ratio 2;
  * ps_roi_pool, R-FCN's position-sensitive RoI Pool on a stride-16 map of
    10 x 7 x 7 channels, 7 x 7;
  * roi_pool, Fast/Faster R-CNN's RoI Pool on a VGG-16 conv5 map (stride 16,
    512 channels), 7 x 7.
On a GPU (--device gpu) the rows are a training batch: 8 images with
BATCH_ROIS RoIs each. Forward and backward (the vjp of a stored forward),
medians of calls on device-resident inputs, all in one process, of
jax_psroi's native kernels, its XLA path (JAX_PSROI_IMPLEMENTATION=xla: the
gather formulation platforms without kernels run, the strong jax.numpy
baseline of these operators), the jitted jax.numpy reference (unless
--no-reference) and torchvision. Writes family.md and family.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
from collections import OrderedDict

import bench  # run as a script: benchmarks/ is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import jax_psroi

CHANNELS, NUM_ROIS, RATIO, ALIGNED = 256, 1000, 2, True
LEVELS = {"P2": 4, "P4": 16}
PYRAMID = {"P2": 4, "P3": 8, "P4": 16, "P5": 32}
SIZES = (7, 14)
PS_CHANNELS_OUT, PS_STRIDE, PS_SIZE = 10, 16, 7
POOL_CHANNELS, POOL_STRIDE, POOL_SIZE = 512, 16, 7
GPU_IMAGES, BATCH_ROIS = 8, 512


def jax_cpu_threads() -> int:
    """Threads of this process (XLA's CPU pool, and torchvision's)."""
    return len(os.sched_getaffinity(0))


def _map(stride, channels, rng, images=1):
    height, width = bench.IMAGE_HW[0] // stride, bench.IMAGE_HW[1] // stride
    return rng.normal(size=(images, channels, height, width)).astype(np.float32)


def _rois(num_rois, rng, images=1):
    side = np.exp(rng.uniform(np.log(16), np.log(512), size=(num_rois, 2)))
    x1 = rng.uniform(0, bench.IMAGE_HW[1] - side[:, 0])
    y1 = rng.uniform(0, bench.IMAGE_HW[0] - side[:, 1])
    return np.stack([np.arange(num_rois) % images, x1, y1, x1 + side[:, 0],
                     y1 + side[:, 1]], axis=1).astype(np.float32)


def _jax_times(pool, features, rois, repeats):
    """pool(features, rois) -> pooled; features an array or a list of them."""
    forward = jax.jit(pool)
    out, vjp = jax.vjp(lambda f: pool(f, rois), features)
    cotangent = jnp.ones_like(out)
    backward = jax.jit(lambda fn, c: fn(c)[0])
    return {
        "forward": bench.median_seconds(
            lambda: jax.block_until_ready(forward(features, rois)), **repeats),
        "backward": bench.median_seconds(
            lambda: jax.block_until_ready(backward(vjp, cotangent)), **repeats),
    }


def _torchvision_times(pool, features, rois, repeats, device):
    """pool(torch features (a list for a pyramid), torch rois) -> pooled."""
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if device == "gpu" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        return None
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.set_num_threads(jax_cpu_threads())
    as_torch = lambda x: torch.from_numpy(x).to(dev).requires_grad_(True)
    f = [as_torch(x) for x in features] if isinstance(features, list) else as_torch(features)
    r = torch.from_numpy(rois).to(dev)

    def forward():
        with torch.no_grad():
            pool(f, r)
        sync()

    stored = pool(f, r)
    ones = torch.ones_like(stored)

    def backward():
        torch.autograd.grad(stored, f, ones, retain_graph=True)
        sync()

    return {"forward": bench.median_seconds(forward, **repeats),
            "backward": bench.median_seconds(backward, **repeats)}


def _torchvision_ops():
    """torchvision's operators as pool(features, rois, ...) callables, or None."""
    try:
        from torchvision import ops
    except ImportError:
        return None
    return ops


def _workloads(quick, rng, images=1):
    """(operator, level, features, rois, output_size, ours, reference,
    torchvision) of every row; the pools take (features, rois). `images` > 1:
    a batch of that many images, BATCH_ROIS RoIs each."""
    num_rois = 100 if quick else (NUM_ROIS if images == 1 else images * BATCH_ROIS)
    rois = _rois(num_rois, rng, images)
    tv = _torchvision_ops()
    sizes = SIZES[:1] if quick else SIZES
    for level, stride in ({"P4": 16} if quick else LEVELS).items():
        features = _map(stride, CHANNELS, rng, images)
        for size in sizes:
            args = (size, 1 / stride, RATIO, ALIGNED)
            yield ("roi_align", level, features, rois, size,
                   lambda f, r, a=args: jax_psroi.roi_align(f, r, *a),
                   lambda f, r, a=args: jax_psroi.roi_align_reference(f, r, *a),
                   tv and (lambda f, r, a=args: tv.roi_align(f, r, *a)))
    pyramid = [_map(stride, CHANNELS, rng, images) for stride in PYRAMID.values()]
    for size in sizes:
        pools = _multi_scale_pools(size, images, tv)
        yield ("multi_scale_roi_align", "P2-P5", pyramid, rois, size, *pools)
    features = _map(PS_STRIDE, PS_CHANNELS_OUT * PS_SIZE * PS_SIZE, rng, images)
    args = (PS_SIZE, 1 / PS_STRIDE)
    yield ("ps_roi_pool", "stride 16", features, rois, PS_SIZE,
           lambda f, r: jax_psroi.ps_roi_pool(f, r, *args),
           lambda f, r: jax_psroi.ps_roi_pool_reference(f, r, *args),
           tv and (lambda f, r: tv.ps_roi_pool(f, r, *args)))
    features = _map(POOL_STRIDE, POOL_CHANNELS, rng, images)
    args = (POOL_SIZE, 1 / POOL_STRIDE)
    yield ("roi_pool", "stride 16", features, rois, POOL_SIZE,
           lambda f, r: jax_psroi.roi_pool(f, r, *args),
           lambda f, r: jax_psroi.roi_pool_reference(f, r, *args),
           tv and (lambda f, r: tv.roi_pool(f, r, *args)))


def _multi_scale_pools(size, images, tv):
    args = (size, RATIO, bench.IMAGE_HW)
    ours = lambda f, r: jax_psroi.multi_scale_roi_align(f, r, *args)
    reference = lambda f, r: jax_psroi.multi_scale_roi_align_reference(f, r, *args)
    if not tv:
        return ours, reference, None
    module = tv.MultiScaleRoIAlign(list(PYRAMID), size, RATIO)

    def theirs(features, rois):  # boxes per image, as torchvision takes them
        boxes = [rois[rois[:, 0] == image, 1:] for image in range(images)]
        return module(OrderedDict(zip(PYRAMID, features, strict=True)), boxes,
                      [bench.IMAGE_HW] * images)
    return ours, reference, theirs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 RoIs, P4 only, 7 x 7")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--only", nargs="+", metavar="OPERATOR",
                        help="rows of these operators only (the file names say which)")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the jax.numpy reference (its dense temporaries)")
    args = parser.parse_args(argv)
    device = jax.devices(args.device)[0]
    repeats = dict(min_repeats=3, min_seconds=0.2) if args.quick else dict(
        min_repeats=5, min_seconds=1.0)
    rows = []
    images = GPU_IMAGES if args.device == "gpu" else 1
    for operator, level, features, rois, size, ours, ref, tv in _workloads(
            args.quick, np.random.default_rng(0), images):
        if args.only and operator not in args.only:
            continue
        placed = jax.device_put((features, rois), device)
        rows.append(dict(
            operator=operator, level=level,
            shape=[list(x.shape) for x in features] if isinstance(features, list)
            else list(features.shape),
            num_rois=len(rois), output_size=size,
            jax_psroi=_jax_times(ours, *placed, repeats),
            xla=_jax_times(bench.on_the_xla_path(ours), *placed, repeats),
            reference=None if args.no_reference else _jax_times(ref, *placed, repeats),
            torchvision=tv and _torchvision_times(tv, features, rois, repeats, args.device)))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("_gpu" if args.device == "gpu" else "") + (
        "_" + "_".join(args.only) if args.only else "")
    (args.out / f"family{suffix}.json").write_text(json.dumps(rows, indent=1))
    try:
        import torchvision
        versions = f", torchvision {torchvision.__version__}"
    except ImportError:
        versions = ", torchvision not installed"
    lines = [f"Machine: {platform.processor() or platform.machine()}, {device.device_kind}, "
             f"{jax_cpu_threads()} threads, jax {jax.__version__}{versions}.", "",
             "Median milliseconds; `x xla`, `x ref` and `x tv`: how many times faster "
             "jax_psroi's kernels are than its XLA path (the gather formulation), the jitted "
             f"jax.numpy reference and torchvision. {images} image(s), {rows[0]['num_rois']} "
             f"RoIs; roi_align: {CHANNELS} channels, sampling_ratio {RATIO}, "
             f"aligned={ALIGNED}; multi_scale_roi_align: the same over P2-P5 (aligned=False, "
             f"torchvision's MultiScaleRoIAlign); ps_roi_pool: {PS_CHANNELS_OUT} x "
             f"{PS_SIZE} x {PS_SIZE} channels; roi_pool: {POOL_CHANNELS} channels.", "",
             "| operator | level | output | pass | jax_psroi | xla | reference | torchvision | "
             "x xla | x ref | x tv |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    milliseconds = lambda t: "-" if t is None else f"{t * 1e3:.2f}"
    faster = lambda t, ours: "-" if t is None else f"{t / ours:.1f}"
    for row in rows:
        for mode in ("forward", "backward"):
            ours, xla = row["jax_psroi"][mode], row["xla"][mode]
            ref = row["reference"][mode] if row["reference"] else None
            tv = row["torchvision"][mode] if row["torchvision"] else None
            lines.append(
                f"| {row['operator']} | {row['level']} | {row['output_size']} | {mode} | "
                f"{milliseconds(ours)} | {milliseconds(xla)} | {milliseconds(ref)} | "
                f"{milliseconds(tv)} | {faster(xla, ours)} | {faster(ref, ours)} | "
                f"{faster(tv, ours)} |")
    (args.out / f"family{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
