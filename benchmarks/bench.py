"""Speed and memory of jax_psroi against the jax.numpy reference and torchvision.

    python benchmarks/bench.py                # every workload, ~10 minutes on 2 cores
    python benchmarks/bench.py --quick        # small smoke run (CI)
    python benchmarks/bench.py --device gpu   # adds GPU-sized workloads

For each workload and sampling ratio it times, in one process and one run,
the forward, the backward alone (vjp of a stored forward) and forward +
backward of: jax_psroi under jax.jit, on its native kernels and on the XLA
path (JAX_PSROI_IMPLEMENTATION=xla); the strong jax.numpy baseline
(baselines.py: row relayout and row gather; fixed sampling ratios only),
checked against jax_psroi first; the jax.numpy reference under jax.jit; and
torchvision (when installed; on the CPU with as many threads as XLA's CPU
pool). Inputs live on the device before timing. Times are medians after
warm-up and compilation. Beside them: the memory floor (roofline.py: the
fewest bytes the pass must move over the bandwidth measured in the same
run), and the memory XLA's compiled executables need. It writes results.md,
results.json and time_vs_k.png to --out (gpu.md, gpu.json and
gpu_time_vs_k.png with --device gpu), and checks its targets
(x20 torchvision, x10 reference, adaptive <= 2x ratio 2, no temporary
larger than the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_psroi

# Run as a script, so benchmarks/ is on sys.path.
import baselines
import report
import roofline

IMAGE_HW = (800, 1344)   # input image the boxes are drawn on
STRIDE = 16              # backbone stride: spatial_scale = 1 / 16
BINS = 7
RATIOS = (2, -1)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    features: tuple[int, int, int, int]   # [N, C, H, W]
    num_rois: int


WORKLOADS = [
    Workload("lighthead_test", (1, 490, 50, 84), 1000),
    Workload("lighthead_train", (2, 490, 50, 84), 4000),
    Workload("rfcn_cls", (1, 3969, 38, 63), 300),
    Workload("rfcn_box", (1, 392, 38, 63), 300),
]
# Detector training batches as a GPU runs them (added with --device gpu).
GPU_WORKLOADS = [
    Workload("rfcn_cls_gpu", (8, 3969, 38, 63), 2400),
    Workload("lighthead_train_gpu", (8, 490, 50, 84), 16000),
]
QUICK_WORKLOADS = [
    Workload("lighthead_test_small", (1, 490, 50, 84), 100),
    Workload("rfcn_box_small", (1, 392, 38, 63), 50),
]
@dataclasses.dataclass(frozen=True)
class Variant:
    """Layout, channel order and dtype of a row (the default: torchvision's)."""
    data_format: str = "NCHW"
    channel_order: str = "torchvision"
    dtype: str = "float32"

    def as_dict(self):
        return dataclasses.asdict(self)


BASE = Variant()
# Issue 11's rows, with sampling_ratio 2 on the workloads below: NHWC in
# both channel orders and bfloat16 (jax_psroi and the strong baseline;
# neither the reference nor torchvision has them natively).
VARIANTS = (Variant("NHWC", "torchvision"), Variant("NHWC", "bin_major"),
            Variant(dtype="bfloat16"), Variant("NHWC", "bin_major", "bfloat16"))
VARIANT_WORKLOADS = {"lighthead_test", "lighthead_train", "rfcn_cls",
                     "lighthead_test_small", "rfcn_cls_gpu", "lighthead_train_gpu"}
# The smoke run's one variant: every axis off the default, so that it runs
# each code path of the variants.
QUICK_VARIANTS = (Variant("NHWC", "bin_major", "bfloat16"),)
SWEEP_K = (100, 300, 1000, 3000)   # time vs K, Light-Head test map
QUICK_SWEEP_K = (30, 100)


def in_variant(features, cotangent, variant):
    """NCHW torchvision-order float32 inputs in `variant`: the same values,
    permuted (the result is the same pooled tensor, permuted)."""
    n, c, h, w = features.shape
    bins = BINS * BINS
    if variant.channel_order == "bin_major":  # channel (c_out, bin) -> (bin, c_out)
        features = features.reshape(n, c // bins, bins, h, w).transpose(
            0, 2, 1, 3, 4).reshape(n, c, h, w)
    if variant.data_format == "NHWC":
        features = features.transpose(0, 2, 3, 1)
        cotangent = cotangent.transpose(0, 2, 3, 1)
    dtype = jnp.dtype(variant.dtype)
    return (np.ascontiguousarray(features).astype(dtype),
            np.ascontiguousarray(cotangent).astype(dtype))


def make_inputs(workload, seed=0):
    """float32 features and [K, 5] RoIs of log-uniform side 16-512 px."""
    rng = np.random.default_rng(seed)
    n = workload.features[0]
    features = rng.normal(size=workload.features).astype(np.float32)
    k = workload.num_rois
    img_h, img_w = IMAGE_HW
    side = np.exp(rng.uniform(np.log(16), np.log(512), size=(k, 2)))
    x1 = rng.uniform(0, img_w - side[:, 0])
    y1 = rng.uniform(0, img_h - side[:, 1])
    rois = np.stack([np.arange(k) % n, x1, y1, x1 + side[:, 0],
                     y1 + side[:, 1]], axis=1).astype(np.float32)
    c_out = workload.features[1] // (BINS * BINS)
    cotangent = rng.normal(size=(k, c_out, BINS, BINS)).astype(np.float32)
    return features, rois, cotangent


def median_seconds(run, min_repeats, min_seconds, budget_seconds=15.0):
    """Median wall time of `run()` (which must block until done).

    Repeats at least `min_repeats` times and for at least `min_seconds`, but
    stops after three runs once `budget_seconds` are spent (slow baselines).
    """
    run()  # warm-up (and compilation)
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if len(times) >= min_repeats and elapsed >= min_seconds:
            break
        if len(times) >= 3 and elapsed >= budget_seconds:
            break
    return statistics.median(times)


# ---------------------------------------------------------------- JAX ----

def jax_timings(op, features, rois, cotangent, ratio, repeats,
                modes=report.MODES):
    """Times `modes` (forward, backward, forward_backward) of a JAX op."""
    def forward(f, r):
        return op(f, r, BINS, 1 / STRIDE, ratio)

    def forward_backward(f, r, c):
        out, vjp = jax.vjp(lambda x: forward(x, r), f)
        return out, vjp(c)[0]  # both returned: nothing is dead code

    def backward_call():
        # The vjp function is a pytree holding the forward's residuals;
        # passed as an argument they are inputs, not constants.
        _, vjp = jax.vjp(lambda x: forward(x, rois), features)
        return jax.jit(lambda vjp_fn, c: vjp_fn(c)[0]), (vjp, cotangent)

    calls = {"forward": lambda: (jax.jit(forward), (features, rois)),
             "backward": backward_call,
             "forward_backward": lambda: (jax.jit(forward_backward),
                                          (features, rois, cotangent))}
    result = {}
    for mode in modes:
        fn, args = calls[mode]()
        compiled = fn.lower(*args).compile()
        result[mode] = median_seconds(
            lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args)),
            **repeats)
        result[f"{mode}_memory"] = memory_of(compiled)
    return result


def memory_of(compiled):
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {"temp_bytes": int(stats.temp_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes)}


# ---------------------------------------------------------- torchvision ----

def torchvision_module():
    try:
        import torch
        import torchvision.ops
    except ImportError:
        return None
    return torch, torchvision.ops.ps_roi_align, torchvision.__version__


def torchvision_timings(tv, features, rois, cotangent, ratio, repeats, device,
                        modes=report.MODES):
    torch, ps_roi_align, _ = tv
    dev = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    f = torch.from_numpy(features).to(dev)
    r = torch.from_numpy(rois).to(dev)
    c = torch.from_numpy(cotangent).to(dev)
    f_grad = f.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            ps_roi_align(f, r, BINS, 1 / STRIDE, ratio)
        sync()

    def forward_backward():
        out = ps_roi_align(f_grad, r, BINS, 1 / STRIDE, ratio)
        torch.autograd.grad(out, f_grad, c)
        sync()

    def backward():
        torch.autograd.grad(stored, f_grad, c, retain_graph=True)
        sync()

    if "backward" in modes:
        stored = ps_roi_align(f_grad, r, BINS, 1 / STRIDE, ratio)
    runs = {"forward": forward, "backward": backward,
            "forward_backward": forward_backward}
    return {mode: median_seconds(runs[mode], **repeats) for mode in modes}


# ---------------------------------------------------------------- main ----

def run_workload(workload, ratio, tv, device, repeats, skip_reference,
                 modes=report.MODES, variant=BASE):
    features, rois, cotangent = make_inputs(workload)
    features, cotangent = in_variant(features, cotangent, variant)
    dev = jax.devices(device)[0]
    features_j, rois_j, cotangent_j = (jax.device_put(a, dev)
                                       for a in (features, rois, cotangent))
    row = {"workload": workload.name, "features": list(workload.features),
           "num_rois": workload.num_rois, "sampling_ratio": ratio,
           "variant": variant.as_dict(), "output_bytes": int(cotangent.nbytes)}
    layout = dict(data_format=variant.data_format, channel_order=variant.channel_order)
    impls = {"jax_psroi": functools.partial(jax_psroi.ps_roi_align, **layout),
             "xla": on_the_xla_path(functools.partial(jax_psroi.ps_roi_align, **layout))}
    if ratio > 0:
        impls["strong"] = functools.partial(baselines.ps_roi_align_rows, **layout)
        check_strong_baseline(impls["jax_psroi"], impls["strong"], features_j, rois_j, ratio)
    if not skip_reference and variant == BASE:
        impls["reference"] = jax_psroi.ps_roi_align_reference
    for name, op in impls.items():
        row[name] = jax_timings(op, features_j, rois_j, cotangent_j, ratio,
                                repeats, modes)
    row["fewest_bytes"] = roofline.fewest_bytes(
        impls["jax_psroi"], features_j, rois_j, cotangent_j, (BINS, BINS), 1 / STRIDE, ratio)
    if tv is not None and variant == BASE:
        row["torchvision"] = torchvision_timings(tv, features, rois, cotangent,
                                                 ratio, repeats, device, modes)
    return row


def on_the_xla_path(op):
    """`op` traced with JAX_PSROI_IMPLEMENTATION=xla: the XLA path, what
    platforms without native kernels run."""
    def traced(*args, **kwargs):
        previous = os.environ.get("JAX_PSROI_IMPLEMENTATION")
        os.environ["JAX_PSROI_IMPLEMENTATION"] = "xla"
        try:
            return op(*args, **kwargs)
        finally:
            if previous is None:
                del os.environ["JAX_PSROI_IMPLEMENTATION"]
            else:
                os.environ["JAX_PSROI_IMPLEMENTATION"] = previous
    return traced


def check_strong_baseline(ours, strong, features, rois, ratio):
    """The strong baseline must compute what jax_psroi computes (up to the
    last bits of sample coordinates: XLA turns its divisions by constants
    into multiplications, which moves a few float32 samples by an ulp, and
    one 16-bit rounding step for 16-bit maps)."""
    run = lambda op: np.asarray(jax.jit(lambda f, r: op(f, r, BINS, 1 / STRIDE, ratio))(
        features, rois), np.float32)
    tolerance = 1e-4 if jnp.dtype(features.dtype).itemsize >= 4 else 2.0 ** -7
    np.testing.assert_allclose(run(strong), run(ours), rtol=tolerance, atol=tolerance)


def sweep(tv, device, repeats, ks, skip_reference):
    """Forward time vs K on the Light-Head test map, sampling_ratio 2."""
    points = []
    for k in ks:
        workload = Workload(f"sweep_k{k}", (1, 490, 50, 84), k)
        row = run_workload(workload, 2, tv, device, repeats, skip_reference,
                           modes=("forward",))
        points.append({"num_rois": k, **{
            impl: row[impl]["forward"] for impl in report.IMPLEMENTATIONS
            if impl in row}})
    return points


def machine_description(device):
    dev = jax.devices(device)[0]
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "device": str(dev),
            "device_kind": dev.device_kind,
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)),
            "jax_psroi_build": jax_psroi.build_info()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small workloads, one variant and few repeats (CI smoke test)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the (slow) jax.numpy reference")
    parser.add_argument("--gpu-only", action="store_true",
                        help="with --device gpu: only the GPU-sized workloads, no sweep")
    args = parser.parse_args(argv)

    threads = len(os.sched_getaffinity(0))
    tv = None if args.no_torchvision else torchvision_module()
    if tv is not None:
        tv[0].set_num_threads(threads)  # same threads as XLA's CPU pool
        if args.device == "gpu" and not tv[0].cuda.is_available():
            tv = None
    repeats = (dict(min_repeats=5, min_seconds=0.1) if args.quick
               else dict(min_repeats=9, min_seconds=1.0))
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    if args.device == "gpu":
        workloads = GPU_WORKLOADS if args.gpu_only else workloads + GPU_WORKLOADS
    bandwidth = roofline.measured_bandwidth(jax.devices(args.device)[0])

    rows = []
    for workload in workloads:
        for ratio in RATIOS:
            print(f"{workload.name} sampling_ratio={ratio} ...", flush=True)
            rows.append(run_workload(workload, ratio, tv, args.device, repeats,
                                     args.no_reference))
        if workload.name in VARIANT_WORKLOADS:
            for variant in QUICK_VARIANTS if args.quick else VARIANTS:
                print(f"{workload.name} sampling_ratio=2 {variant} ...", flush=True)
                rows.append(run_workload(workload, 2, tv, args.device, repeats,
                                         args.no_reference, variant=variant))
    points = [] if args.gpu_only else sweep(
        tv, args.device, repeats, QUICK_SWEEP_K if args.quick else SWEEP_K, args.no_reference)

    results = {"machine": machine_description(args.device), "threads": threads,
               "torchvision": (None if tv is None else tv[2]),
               "torch": (None if tv is None else tv[0].__version__),
               "quick": args.quick, "device": args.device,
               "bandwidth": bandwidth, "rows": rows, "sweep": points}
    results["checks"] = report.check_targets(rows, bandwidth)
    args.out.mkdir(parents=True, exist_ok=True)
    stem, plot_name = (("gpu", "gpu_time_vs_k.png") if args.device == "gpu"
                       else ("results", "time_vs_k.png"))
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    markdown = report.markdown(results)
    (args.out / f"{stem}.md").write_text(markdown)
    if points:
        report.plot(points, args.out / plot_name, report.machine_name(results))
    print(markdown)
    print(f"wrote {args.out}/{stem}.md, {stem}.json, {plot_name}")


if __name__ == "__main__":
    main()
