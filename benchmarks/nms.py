"""Speed and memory of jax_psroi.nms against the jax.numpy formulation users
write and torchvision's CPU nms.

    python benchmarks/nms.py            # N = 1,000 / 6,000 / 12,000
    python benchmarks/nms.py --quick    # N = 1,000 only (CI)
    python benchmarks/nms.py --device gpu --out DIR   # on the GPU (scripts/gpu_check.sh)

Workload: 8 images of N RPN-like proposals each on an 800 x 1344 image
(boxes jittered around N / 20 objects, uniform scores), IoU threshold 0.7,
every survivor kept (max_output_size = N, as torchvision returns them all),
and again keeping the best 1,000 (an RPN's post-NMS count), which the
native kernel stops at. Timed, as medians after warm-up, in one process:

* ``native``: ``jax.vmap(jax_psroi.nms)`` under jit, one kernel call (on
  the GPU: XLA's sort, then the mask and scan kernels);
* ``xla``: the same on the XLA formulation (JAX_PSROI_IMPLEMENTATION=xla),
  what platforms without a kernel run;
* ``jnp``: the formulation of examples/light_head_rcnn.py before this
  operator, vmapped: an [N, N] IoU matrix and a fori_loop of N steps;
* ``torchvision``: ``torchvision.ops.nms`` on each image in turn (its CPU
  kernel is serial), when installed; on the CPU whatever --device is.

Every implementation's kept indices are checked against the native ones
first. Writes nms.md and nms.json to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from functools import partial

import bench  # run as a script: benchmarks/ is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

import jax_psroi

IMAGES, THRESHOLD, POST_NMS = 8, 0.7, 1000
SIZES, QUICK_SIZES = (1000, 6000, 12000), (1000,)


def proposals(rng, n):
    """[n, 4] boxes and [n] scores like an RPN's before NMS."""
    height, width = bench.IMAGE_HW
    objects = max(1, n // 20)
    cx, cy = rng.uniform(0, width, objects), rng.uniform(0, height, objects)
    w, h = rng.uniform(30, 300, (2, objects))
    which = rng.integers(0, objects, n)
    jitter = rng.normal(0, 0.15, (n, 4)) * np.stack([w, h, w, h], 1)[which]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)[which] + jitter
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes.astype(np.float32), rng.uniform(size=n).astype(np.float32)


def jnp_nms(boxes, scores, threshold, keep):
    """The usual jax.numpy NMS (examples/light_head_rcnn.py's before
    jax_psroi.nms): an [N, N] IoU matrix and N sequential steps."""
    order = jnp.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    iou = jax_psroi.box_iou(boxes, boxes)
    n = boxes.shape[0]

    def visit(i, alive):
        later = jnp.arange(n) > i
        return alive & ~(alive[i] & later & (iou[i] > threshold))

    alive = jax.lax.fori_loop(0, n, visit, jnp.isfinite(scores))
    ranked = jnp.argsort(~alive, stable=True)[:keep]
    return jnp.where(alive[ranked], order[ranked], -1)


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def temp_bytes(executable):
    stats = executable.memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def time_rows(n, keep, boxes, scores, torch_ops):
    """Median seconds and temporary memory of each implementation."""
    rows = {}
    native = compiled(jax.vmap(partial(jax_psroi.nms, iou_threshold=THRESHOLD,
                                       max_output_size=keep)), boxes, scores)
    expected = np.asarray(native(boxes, scores)[0])
    rows["native"] = (bench.median_seconds(
        lambda: jax.block_until_ready(native(boxes, scores)), 5, 1.0), temp_bytes(native))
    os.environ["JAX_PSROI_IMPLEMENTATION"] = "xla"
    try:
        xla = compiled(jax.vmap(partial(jax_psroi.nms, iou_threshold=THRESHOLD,
                                        max_output_size=keep)), boxes, scores)
    finally:
        del os.environ["JAX_PSROI_IMPLEMENTATION"]
    np.testing.assert_array_equal(np.asarray(xla(boxes, scores)[0]), expected)
    rows["xla"] = (bench.median_seconds(
        lambda: jax.block_until_ready(xla(boxes, scores)), 3, 1.0), temp_bytes(xla))
    formulation = compiled(jax.vmap(partial(jnp_nms, threshold=THRESHOLD, keep=keep)),
                           boxes, scores)
    # The same kept set (argsort's ties may order equal scores differently).
    got = np.asarray(formulation(boxes, scores))
    assert all(set(a[a >= 0]) == set(b[b >= 0]) for a, b in zip(got, expected, strict=True))
    rows["jnp"] = (bench.median_seconds(
        lambda: jax.block_until_ready(formulation(boxes, scores)), 3, 1.0),
        temp_bytes(formulation))
    if torch_ops is not None and keep == n:
        torch, ops = torch_ops
        tboxes = [torch.from_numpy(np.array(b)) for b in boxes]
        tscores = [torch.from_numpy(np.array(s)) for s in scores]
        for b, s, e in zip(tboxes, tscores, expected, strict=True):
            np.testing.assert_array_equal(ops.nms(b, s, THRESHOLD).numpy(), e[e >= 0])
        rows["torchvision"] = (bench.median_seconds(
            lambda: [ops.nms(b, s, THRESHOLD) for b, s in zip(tboxes, tscores, strict=True)],
            3, 1.0), None)
    kept = float(np.mean(np.sum(expected >= 0, axis=1)))
    return rows, kept


def markdown(results):
    machine = results["machine"]
    where = (f"{machine['device_kind']} (torchvision on the host's CPU)"
             if results.get("device") == "gpu" else machine["cpu_model"])
    lines = [
        f"Machine: {where}, {results['threads']} CPU threads (shared with other "
        f"jobs: times move by tens of percent), jax {machine['jax']}, "
        + (f"torchvision {results['torchvision']}." if results["torchvision"]
           else "torchvision not installed."),
        "",
        f"Median milliseconds for {IMAGES} images (vmapped; torchvision image by image), IoU "
        f"threshold {THRESHOLD}. `temp MB`: XLA's temporary buffers of the compiled program "
        "(the native kernel's own scratch, not counted there, is O(N): about 30 bytes a box "
        "per image in flight). "
        "`x jnp`, `x tv`: how many times faster native is than the jax.numpy formulation "
        "and torchvision.",
        "",
        "| N | keep | kept | native | xla | jnp | torchvision | x jnp | x tv "
        "| temp MB native | temp MB jnp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ms(row, name):
        return f"{row[name][0] * 1e3:.2f}" if name in row else "-"

    def mb(row, name):
        value = row.get(name, (None, None))[1]
        return "-" if value is None else f"{value / 2**20:.1f}"

    for entry in results["rows"]:
        row = entry["times"]
        native = row["native"][0]
        x_tv = f"{row['torchvision'][0] / native:.1f}" if "torchvision" in row else "-"
        lines.append(
            f"| {entry['n']} | {entry['keep']} | {entry['kept']:.0f} | {ms(row, 'native')} "
            f"| {ms(row, 'xla')} | {ms(row, 'jnp')} | {ms(row, 'torchvision')} "
            f"| {row['jnp'][0] / native:.1f} | {x_tv} | {mb(row, 'native')} | {mb(row, 'jnp')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000 only")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the JAX implementations run")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    try:
        import torch
        import torchvision
        import torchvision.ops
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        torch_ops, tv_version = (torch, torchvision.ops), torchvision.__version__
    except ImportError:
        torch_ops, tv_version = None, None
    device = jax.devices(args.device)[0]
    rng = np.random.default_rng(0)
    rows = []
    for n in QUICK_SIZES if args.quick else SIZES:
        data = [proposals(rng, n) for _ in range(IMAGES)]
        boxes = jax.device_put(np.stack([b for b, _ in data]), device)
        scores = jax.device_put(np.stack([s for _, s in data]), device)
        for keep in sorted({n, min(n, POST_NMS)}, reverse=True):
            times, kept = time_rows(n, keep, boxes, scores, torch_ops)
            rows.append({"n": n, "keep": keep, "kept": kept, "times": times})
            print(f"N {n} keep {keep}: kept {kept:.0f}, "
                  + ", ".join(f"{k} {v[0] * 1e3:.2f} ms" for k, v in times.items()), flush=True)
    results = {"machine": bench.machine_description(args.device), "device": args.device,
               "threads": len(os.sched_getaffinity(0)), "torchvision": tv_version,
               "images": IMAGES, "threshold": THRESHOLD, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nms.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "nms.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
