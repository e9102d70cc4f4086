"""What the gradient with respect to the boxes costs (docs/guides/differentiation.md).

    python benchmarks/box_gradient.py            # the workloads of bench.py
    python benchmarks/box_gradient.py --quick    # the small ones (CI)

For ps_roi_align (sampling ratio 2, NCHW float32, bench.py's workloads and
inputs) under jit, medians after warm-up, in one process:

* ``features``: the gradient in the features alone (the backward kernel),
  what torchvision-style training runs with detached boxes;
* ``both``: the gradients in the features and the boxes (the backward
  kernel, the four box-forward calls and their jax.numpy contraction);
* ``box share``: (both - features) / both, the box gradient's share of the
  operator's backward;
* ``jnp``: the same two on the jax.numpy reference, differentiated by JAX.

Every native box gradient is checked against the reference's first.
Writes box_gradient.md and box_gradient.json to --out (default
benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import bench  # run as a script: benchmarks/ is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import jax_psroi

RATIO = 2


def _gradients(op, cotangent, argnums):
    loss = lambda f, r: jnp.sum(op(f, r) * cotangent)
    return jax.jit(jax.grad(loss, argnums=argnums))


def _op(reference):
    pool = jax_psroi.ps_roi_align_reference if reference else jax_psroi.ps_roi_align
    return lambda f, r: pool(f, r, bench.BINS, 1.0 / bench.STRIDE, RATIO)


def run(workload, repeats, with_reference):
    features, rois, cotangent = bench.make_inputs(workload)
    row = {"workload": workload.name, "features": list(workload.features),
           "rois": workload.num_rois}
    native = {name: _gradients(_op(False), cotangent, argnums)
              for name, argnums in (("features", 0), ("both", (0, 1)))}
    box_grad = np.asarray(native["both"](features, rois)[1])
    for name, fn in native.items():
        row[name] = bench.median_seconds(lambda fn=fn: jax.block_until_ready(
            fn(features, rois)), repeats, 1.0)
    if with_reference:
        reference = {name: _gradients(_op(True), cotangent, argnums)
                     for name, argnums in (("features", 0), ("both", (0, 1)))}
        expected = np.asarray(reference["both"](features, rois)[1])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(box_grad, expected, atol=1e-3 * scale, rtol=0)
        for name, fn in reference.items():
            row[f"jnp_{name}"] = bench.median_seconds(lambda fn=fn: jax.block_until_ready(
                fn(features, rois)), 3, 1.0)
    return row


def markdown(results):
    lines = [
        f"Machine: {results['machine']['cpu_model']}, {results['threads']} threads (shared "
        "with other jobs: times move by tens of percent), jax "
        f"{results['machine']['jax']}.",
        "",
        "ps_roi_align, sampling ratio 2, NCHW float32, median milliseconds of jit(grad): in "
        "the features alone and in the features and boxes; `box share` is the box "
        "gradient's share of the latter.",
        "",
        "| workload | K | features | both | box share | jnp features | jnp both |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        share = (row["both"] - row["features"]) / row["both"]
        jnp_cells = [f"{row[k] * 1e3:.1f}" if k in row else "-"
                     for k in ("jnp_features", "jnp_both")]
        lines.append(f"| {row['workload']} | {row['rois']} | {row['features'] * 1e3:.1f} "
                     f"| {row['both'] * 1e3:.1f} | {share:.0%} | " + " | ".join(jnp_cells)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small workloads only")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the jax.numpy reference (slow on large workloads)")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    workloads = bench.QUICK_WORKLOADS if args.quick else bench.WORKLOADS
    rows = []
    for workload in workloads:
        rows.append(run(workload, 5, not args.no_reference))
        print(rows[-1], flush=True)
    results = {"machine": bench.machine_description("cpu"),
               "threads": len(os.sched_getaffinity(0)), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "box_gradient.json").write_text(json.dumps(results, indent=1, default=str)
                                                + "\n")
    (args.out / "box_gradient.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
