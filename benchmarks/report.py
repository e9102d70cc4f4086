"""Targets, Markdown table and plot of benchmarks/bench.py results."""

from __future__ import annotations

# What bench.py times of each implementation, and the implementations.
MODES = ("forward", "backward", "forward_backward")
IMPLEMENTATIONS = ("jax_psroi", "xla", "strong", "reference", "torchvision")
TARGETS = {"torchvision": 20.0, "reference": 10.0}
ADAPTIVE_SLOWDOWN = 2.0
# Issue 11: against the default layout in the same run, and the strong
# jax.numpy baseline.
NHWC_TORCHVISION_SLOWDOWN = 1.25
# Issue 18, on the GPU-sized workloads.
GPU_FLOOR_FACTOR = {"forward": 3.0, "backward": 4.0}
GPU_SPEEDUPS = {"strong": 2.0, "torchvision": 3.0}
NHWC_BIN_MAJOR_SPEEDUP = 2.0   # on the R-FCN class map
STRONG_BASELINE_SPEEDUP = 10.0
DEFAULT_VARIANT = {"data_format": "NCHW", "channel_order": "torchvision", "dtype": "float32"}


def _variant(row):
    return row.get("variant", DEFAULT_VARIANT)


def variant_label(row):
    """'' for the default (NCHW, torchvision order, float32), else e.g.
    'NHWC bin_major bfloat16'."""
    v = _variant(row)
    parts = [v["data_format"] if v["data_format"] != "NCHW" else "",
             v["channel_order"] if v["channel_order"] != "torchvision" else "",
             v["dtype"] if v["dtype"] != "float32" else ""]
    return " ".join(part for part in parts if part)


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _speedup(row, baseline, mode):
    if baseline not in row:
        return None
    return row[baseline][mode] / row["jax_psroi"][mode]


def check_targets(rows, bandwidth=None):
    """Every speed and memory target this run can check, with its value."""
    checks = []
    for row in rows:
        label = " ".join(filter(None, [row["workload"], f"sr={row['sampling_ratio']}",
                                       variant_label(row)]))
        for baseline, target in TARGETS.items():
            for mode in ("forward", "backward"):
                value = _speedup(row, baseline, mode)
                if value is not None:
                    checks.append({"check": f"{label} {mode} vs {baseline}",
                                   "value": value, "target": f">= {target:g}x",
                                   "ok": value >= target})
        for mode in MODES:
            memory = row["jax_psroi"][f"{mode}_memory"]
            if memory is not None:
                # The output of a backward is the feature gradient; a 16-bit
                # backward also sums in a float32 copy of it (2x its bytes).
                allowed = 1 if mode == "forward" or _variant(row)["dtype"] in (
                    "float32", "float64") else 3
                output_bytes = max(memory["output_bytes"], 1)
                checks.append({"check": f"{label} {mode} temp memory",
                               "value": memory["temp_bytes"] / output_bytes,
                               "target": f"<= {allowed}x output",
                               "ok": memory["temp_bytes"] <= allowed * output_bytes})
        if "strong" in row:
            for mode in ("forward", "backward"):
                value = _speedup(row, "strong", mode)
                checks.append({"check": f"{label} {mode} vs strong jax.numpy", "value": value,
                               "target": f">= {STRONG_BASELINE_SPEEDUP:g}x",
                               "ok": value >= STRONG_BASELINE_SPEEDUP})
    checks += _layout_checks(rows)
    checks += _gpu_checks(rows, bandwidth)
    by_key = {(r["workload"], r["sampling_ratio"]): r for r in rows
              if _variant(r) == DEFAULT_VARIANT}
    for (workload, ratio), row in by_key.items():
        fixed = by_key.get((workload, 2))
        if ratio > 0 or fixed is None:
            continue
        for mode in MODES:
            value = row["jax_psroi"][mode] / fixed["jax_psroi"][mode]
            checks.append({"check": f"{workload} {mode} adaptive / sr=2",
                           "value": value, "target": f"<= {ADAPTIVE_SLOWDOWN:g}x",
                           "ok": value <= ADAPTIVE_SLOWDOWN})
    return checks


def _gpu_checks(rows, bandwidth):
    """Issue 18's targets on the GPU-sized workloads (sampling_ratio 2, the
    default layout): time over the floor (fewest bytes over the bandwidth
    measured in the same run), and speedups over the strong jax.numpy
    baseline and torchvision."""
    checks = []
    for row in rows:
        if not (row["workload"].endswith("_gpu") and row["sampling_ratio"] == 2
                and _variant(row) == DEFAULT_VARIANT):
            continue
        for mode in ("forward", "backward"):
            label = f"{row['workload']} {mode}"
            if bandwidth and "fewest_bytes" in row:
                over = row["jax_psroi"][mode] / (row["fewest_bytes"][mode] / bandwidth)
                checks.append({"check": f"{label} time / floor", "value": over,
                               "target": f"<= {GPU_FLOOR_FACTOR[mode]:g}x",
                               "ok": over <= GPU_FLOOR_FACTOR[mode]})
            for baseline, target in GPU_SPEEDUPS.items():
                value = _speedup(row, baseline, mode)
                if value is not None:
                    checks.append({"check": f"{label} vs {baseline} (GPU)", "value": value,
                                   "target": f">= {target:g}x", "ok": value >= target})
    return checks


def _layout_checks(rows):
    """Issue 11's targets: each variant against the default layout's row of
    the same workload (sampling_ratio 2) in this run."""
    checks = []
    base = {r["workload"]: r for r in rows
            if r["sampling_ratio"] == 2 and _variant(r) == DEFAULT_VARIANT}
    for row in rows:
        default = base.get(row["workload"])
        v = _variant(row)
        if default is None or row["sampling_ratio"] != 2 or v == DEFAULT_VARIANT:
            continue
        label = f"{row['workload']} {variant_label(row)}"
        for mode in ("forward", "backward"):
            speedup = default["jax_psroi"][mode] / row["jax_psroi"][mode]
            if v == dict(DEFAULT_VARIANT, data_format="NHWC"):
                checks.append({"check": f"{label} {mode} time / NCHW", "value": 1 / speedup,
                               "target": f"<= {NHWC_TORCHVISION_SLOWDOWN:g}x",
                               "ok": 1 / speedup <= NHWC_TORCHVISION_SLOWDOWN})
            elif v == dict(DEFAULT_VARIANT, data_format="NHWC", channel_order="bin_major") \
                    and row["workload"].startswith("rfcn_cls"):
                checks.append({"check": f"{label} {mode} speedup over NCHW", "value": speedup,
                               "target": f">= {NHWC_BIN_MAJOR_SPEEDUP:g}x",
                               "ok": speedup >= NHWC_BIN_MAJOR_SPEEDUP})
            elif v == dict(DEFAULT_VARIANT, dtype="bfloat16") \
                    and row["workload"].startswith("rfcn_cls"):
                checks.append({"check": f"{label} {mode} speedup over float32", "value": speedup,
                               "target": "> 1x", "ok": speedup > 1})
    return checks


def machine_name(results):
    """The card's name on a GPU run, the CPU's model otherwise."""
    machine = results["machine"]
    return machine["device_kind"] if results.get("device") == "gpu" else machine["cpu_model"]


def _ratio(value):
    return "-" if value is None else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def markdown(results):
    machine = results["machine"]
    threads = ("" if results.get("device") == "gpu" else
               f", {results['threads']} threads (XLA CPU pool; torchvision set to the same)")
    bandwidth = results.get("bandwidth")
    lines = [
        f"Machine: {machine_name(results)}{threads}, {machine['device']}, "
        f"Python {machine['python']}, jax {machine['jax']}, "
        + (f"torchvision {results['torchvision']} (torch {results['torch']})."
           if results["torchvision"] else "torchvision not installed."),
        "",
        "Median milliseconds. `jax_psroi` runs the native kernels, `xla` the "
        "XLA path (what platforms without native kernels run; "
        "JAX_PSROI_IMPLEMENTATION=xla), `strong` is the strong jax.numpy baseline "
        "(row relayout and row gather, fixed sampling ratios only), `reference` "
        "the jitted jax.numpy reference; `x xla`, `x strong`, `x ref` and `x tv` "
        "are how many times faster jax_psroi is than each. `floor` is the fewest "
        "bytes the "
        "pass must move over the bandwidth measured in the same run"
        + (f" ({bandwidth / 1e9:.0f} GB/s, read + write of a negate)"
           if bandwidth else "")
        + "; `temp` is XLA's temporary buffer of the compiled executable (MiB), "
        "`xla temp` and `ref temp` those of the XLA path and the reference.",
        "",
        "| workload | sr | pass | jax_psroi | xla | strong | reference | torchvision "
        "| x xla | x strong | x ref | x tv | floor | temp | xla temp | ref temp | output |",
        "|" + " --- |" * 17,
    ]
    for row in results["rows"]:
        n, c, h, w = row["features"]
        for mode in MODES:
            ours = row["jax_psroi"]
            times = {impl: (row[impl][mode] if impl in row else None)
                     for impl in IMPLEMENTATIONS}
            memory = ours[f"{mode}_memory"] or {}
            ref_memory = (row.get("reference") or {}).get(f"{mode}_memory") or {}
            xla_memory = (row.get("xla") or {}).get(f"{mode}_memory") or {}
            floor = (row["fewest_bytes"][mode] / bandwidth
                     if bandwidth and "fewest_bytes" in row else None)
            variant = variant_label(row)
            lines.append(
                f"| {row['workload']} [{n},{c},{h},{w}] K={row['num_rois']}"
                f"{' ' + variant if variant else ''} "
                f"| {row['sampling_ratio']} | {mode.replace('_', '+')} "
                + "".join(f"| {_ms(times[impl])} " for impl in IMPLEMENTATIONS)
                + "".join(f"| {_ratio(_speedup(row, impl, mode))} "
                          for impl in ("xla", "strong", "reference", "torchvision"))
                + f"| {_ms(floor)} "
                f"| {_mb(memory.get('temp_bytes'))} "
                f"| {_mb(xla_memory.get('temp_bytes'))} "
                f"| {_mb(ref_memory.get('temp_bytes'))} "
                f"| {_mb(memory.get('output_bytes'))} |")
    failed = [c for c in results["checks"] if not c["ok"]]
    lines += ["", f"Targets: {len(results['checks']) - len(failed)} of "
              f"{len(results['checks'])} met."]
    for check in failed:
        lines.append(f"- MISSED {check['check']}: {check['value']:.2f} "
                     f"(target {check['target']})")
    return "\n".join(lines) + "\n"


def plot(points, path, machine):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [p["num_rois"] for p in points]
    for impl in IMPLEMENTATIONS:
        if all(impl in p for p in points):
            ax.plot(ks, [p[impl] * 1e3 for p in points], "o-", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("RoIs (K)")
    ax.set_ylabel("forward, median ms")
    ax.set_title(f"PS-RoI Align forward, [1, 490, 50, 84], 7x7, sr=2\n{machine}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
