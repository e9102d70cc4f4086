"""What deformable PS-RoI Align costs, beside the plain operator and jax.numpy.

    python benchmarks/deformable.py            # the workloads of bench.py
    python benchmarks/deformable.py --quick    # the small ones (CI)
    python benchmarks/deformable.py --device gpu --no-reference --out DIR
                                               # on the GPU (scripts/gpu_check.sh)

On bench.py's workloads and inputs (sampling ratio 2, NCHW float32, offsets
uniform in [-0.5, 0.5], gamma 0.1), under jit, medians after warm-up, in
one process:

* ``plain fwd`` / ``plain grad``: ps_roi_align's forward, and the gradient
  of a training step's loss in the features and boxes;
* ``deform fwd`` / ``deform grad``: deform_ps_roi_align's, the gradient in
  the features, boxes and offsets;
* ``xla fwd`` / ``xla grad``: deform_ps_roi_align on its XLA path (what
  platforms without native kernels run: gathers and scatter-adds of each
  bin's taps, _xla_path.py);
* ``jnp fwd`` / ``jnp grad``: the same on the jax.numpy reference of the
  deformable operator (reference_deformable.py: dense weights contracted
  with the map), differentiated by JAX.

Every native and XLA-path gradient is checked against the reference's first. Writes
deformable.md and deformable.json to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from unittest import mock

import bench  # run as a script: benchmarks/ is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import jax_psroi

RATIO = 2
GAMMA = 0.1


def _operators():
    scale = 1.0 / bench.STRIDE
    plain = lambda f, r, o: jax_psroi.ps_roi_align(f, r, bench.BINS, scale, RATIO)
    deform = lambda f, r, o: jax_psroi.deform_ps_roi_align(f, r, o, bench.BINS, scale, RATIO,
                                                           GAMMA)
    reference = lambda f, r, o: jax_psroi.deform_ps_roi_align_reference(
        f, r, o, bench.BINS, scale, RATIO, GAMMA)

    def xla(f, r, o):
        # The implementation is read when the call is traced.
        with mock.patch.dict(os.environ, {"JAX_PSROI_IMPLEMENTATION": "xla"}):
            return deform(f, r, o)

    return {"plain": (plain, (0, 1)), "deform": (deform, (0, 1, 2)),
            "xla": (xla, (0, 1, 2)), "jnp": (reference, (0, 1, 2))}


def run(workload, repeats, with_reference, device):
    features, rois, cotangent = jax.device_put(bench.make_inputs(workload), device)
    offset = np.random.default_rng(0).uniform(-0.5, 0.5,
                                              size=(rois.shape[0], 2, bench.BINS, bench.BINS))
    offset = jax.device_put(jnp.asarray(offset, jnp.float32), device)
    row = {"workload": workload.name, "features": list(workload.features),
           "rois": workload.num_rois}
    grads = {}
    for name, (op, argnums) in _operators().items():
        if name == "jnp" and not with_reference:
            continue
        forward = jax.jit(op)
        grad = jax.jit(jax.grad(lambda f, r, o, op=op: jnp.sum(op(f, r, o) * cotangent),
                                argnums=argnums))
        grads[name] = grad(features, rois, offset)
        for direction, fn in (("forward", forward), ("grad", grad)):
            row[f"{name}_{direction}"] = bench.median_seconds(
                lambda fn=fn: jax.block_until_ready(fn(features, rois, offset)),
                repeats if name != "jnp" else 3, 1.0)
    if with_reference:
        for name in ("deform", "xla"):
            for got, expected in zip(grads[name], grads["jnp"], strict=True):
                scale = float(np.abs(expected).max())
                np.testing.assert_allclose(got, expected, atol=1e-3 * scale, rtol=0)
    return row


def markdown(results):
    machine = results["machine"]
    where = (machine["device_kind"] if results.get("device") == "gpu" else
             f"{machine['cpu_model']}, {results['threads']} threads (shared with other jobs: "
             "times move by tens of percent)")
    lines = [
        f"Machine: {where}, jax {machine['jax']}.",
        "",
        "Median milliseconds under jit, sampling ratio 2, NCHW float32: the forward, and "
        "the gradient of a loss in the features and boxes (plain) or the features, boxes "
        "and offsets (deformable on native kernels and on its XLA path, and its jax.numpy "
        "reference).",
        "",
        "| workload | K | plain fwd | deform fwd | xla fwd | jnp fwd | plain grad "
        "| deform grad | xla grad | jnp grad |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        cells = [f"{row[k] * 1e3:.1f}" if k in row else "-"
                 for k in ("plain_forward", "deform_forward", "xla_forward", "jnp_forward",
                           "plain_grad", "deform_grad", "xla_grad", "jnp_grad")]
        lines.append(f"| {row['workload']} | {row['rois']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small workloads only")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the jax.numpy reference (slow on large workloads)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the operators run")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    workloads = bench.QUICK_WORKLOADS if args.quick else bench.WORKLOADS
    device = jax.devices(args.device)[0]
    rows = []
    for workload in workloads:
        rows.append(run(workload, 5, not args.no_reference, device))
        print(rows[-1], flush=True)
    results = {"machine": bench.machine_description(args.device), "device": args.device,
               "threads": len(os.sched_getaffinity(0)), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deformable.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "deformable.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
