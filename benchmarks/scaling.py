"""Data-parallel scaling of the per-image head over simulated CPU devices.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--out benchmarks/results]

The Light-Head training map (8 images of [490, 50, 84], 500 RoIs each,
float32 NCHW, 7 x 7 bins, sampling ratio 2) pooled per image under
``jax.vmap``, with the images split over a mesh of 1, 2, 4 and 8 devices
(one process each, ``--xla_force_host_platform_device_count``): the median
time of the forward and of forward + backward (the vjp), per image, and the
collectives of each compiled program. Beside it, the same programs with the
call opaque to the partitioner, as before jax_psroi had sharding rules (XLA
gathers its operands). Simulated devices share this machine's cores, so the
times are only indicative; the collective counts are the real check. Writes
scaling.md and scaling.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

IMAGES, ROIS_PER_IMAGE = 8, 500
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute")


def measure(devices: int, opaque: bool) -> dict:
    """One row, in this process (which must have `devices` devices)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_psroi
    from jax_psroi import _partitioning

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from bench import Workload, make_inputs, median_seconds

    if opaque:
        # What XLA does with a custom call it cannot see into.
        _partitioning._partitioned = lambda ctx: False
    features, rois, _ = make_inputs(
        Workload("lighthead_train", (IMAGES, 490, 50, 84), IMAGES * ROIS_PER_IMAGE))
    boxes = rois[:, 1:].reshape(ROIS_PER_IMAGE, IMAGES, 4).transpose(1, 0, 2)

    def head(features, boxes):
        return jax.vmap(lambda f, b: jax_psroi.ps_roi_align(f[None], [b], 7, 1 / 16, 2))(
            features, boxes)

    def train(features, boxes):
        pooled, vjp = jax.vjp(lambda f: head(f, boxes), features)
        return vjp(pooled)[0]

    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    split = NamedSharding(mesh, P("data"))
    features, boxes = jax.device_put((features, boxes), split)
    row = dict(devices=devices, opaque=opaque)
    for name, function in (("forward", head), ("forward_backward", train)):
        compiled = jax.jit(function, out_shardings=split).lower(features, boxes).compile()
        text = compiled.as_text()
        row[name] = dict(
            ms_per_image=1e3 * median_seconds(
                lambda compiled=compiled: compiled(features, boxes).block_until_ready(),
                5, 2.0) / IMAGES,
            collectives={c: len(re.findall(rf"\b{c}(?:-start)?\(", text)) for c in COLLECTIVES})
    return row


def report(rows) -> str:
    lines = [
        "# Data-parallel scaling (simulated CPU devices)", "",
        f"Light-Head training map, {IMAGES} images [490, 50, 84], {ROIS_PER_IMAGE} RoIs "
        "each, float32 NCHW, 7 x 7 bins, sampling ratio 2, per image under `jax.vmap`, "
        "images split over the mesh. Times are medians per image; the simulated devices "
        f"share this machine's {os.cpu_count()} cores, so they are indicative only. "
        "`opaque`: the same program with the call hidden from the partitioner (as "
        "before the sharding rules).", "",
        "| devices | rules | forward ms/image | fwd+bwd ms/image | forward collectives "
        "| fwd+bwd collectives |",
        "| ---: | --- | ---: | ---: | --- | --- |"]
    for row in rows:
        def named(counts):
            return ", ".join(f"{c} {n}" for c, n in counts.items() if n) or "none"
        lines.append(
            f"| {row['devices']} | {'opaque' if row['opaque'] else 'jax_psroi'} "
            f"| {row['forward']['ms_per_image']:.2f} "
            f"| {row['forward_backward']['ms_per_image']:.2f} "
            f"| {named(row['forward']['collectives'])} "
            f"| {named(row['forward_backward']['collectives'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)   # a child process
    parser.add_argument("--opaque", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(measure(args.row, args.opaque)))
        return
    rows = []
    for devices in args.devices:
        for opaque in ((False, True) if devices > 1 else (False,)):
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            run = subprocess.run([sys.executable, __file__, "--row", str(devices)]
                                 + (["--opaque"] if opaque else []),
                                 env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(run.stdout.splitlines()[-1]))
            print(report(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=1))
    (args.out / "scaling.md").write_text(report(rows))
    print(f"wrote {args.out / 'scaling.md'}")


if __name__ == "__main__":
    main()
