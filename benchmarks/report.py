"""Targets, Markdown table and plot of benchmarks/bench.py results."""

from __future__ import annotations

# What bench.py times of each implementation.
MODES = ("forward", "backward", "forward_backward")
TARGETS = {"torchvision": 20.0, "reference": 10.0}
ADAPTIVE_SLOWDOWN = 2.0


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _speedup(row, baseline, mode):
    if baseline not in row:
        return None
    return row[baseline][mode] / row["jax_psroi"][mode]


def check_targets(rows):
    """Every target of issue 5 that this run can check, with its value."""
    checks = []
    for row in rows:
        label = f"{row['workload']} sr={row['sampling_ratio']}"
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
                # The output of a backward is the feature gradient.
                output_bytes = max(memory["output_bytes"], 1)
                checks.append({"check": f"{label} {mode} temp memory",
                               "value": memory["temp_bytes"] / output_bytes,
                               "target": "<= 1x output",
                               "ok": memory["temp_bytes"] <= output_bytes})
    by_key = {(r["workload"], r["sampling_ratio"]): r for r in rows}
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


def markdown(results):
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu_model']}, {results['threads']} threads "
        f"(XLA CPU pool; torchvision set to the same), {machine['device']}, "
        f"Python {machine['python']}, jax {machine['jax']}, "
        + (f"torchvision {results['torchvision']} (torch {results['torch']})."
           if results["torchvision"] else "torchvision not installed."),
        "",
        "Median milliseconds; `x ref` and `x tv` are how many times faster "
        "jax_psroi is than the jitted jax.numpy reference and torchvision; "
        "temp is XLA's temporary buffer size of the compiled executable (MiB).",
        "",
        "| workload | sr | pass | jax_psroi | reference | torchvision | x ref "
        "| x tv | temp | ref temp | output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        n, c, h, w = row["features"]
        for mode in MODES:
            ours = row["jax_psroi"]
            ref = row.get("reference")
            tv = row.get("torchvision")
            speed_ref = _speedup(row, "reference", mode)
            speed_tv = _speedup(row, "torchvision", mode)
            memory = ours[f"{mode}_memory"] or {}
            ref_memory = (ref or {}).get(f"{mode}_memory") or {}
            lines.append(
                f"| {row['workload']} [{n},{c},{h},{w}] K={row['num_rois']} "
                f"| {row['sampling_ratio']} | {mode.replace('_', '+')} "
                f"| {_ms(ours[mode])} | {_ms(ref and ref[mode])} "
                f"| {_ms(tv and tv[mode])} "
                f"| {'-' if speed_ref is None else f'{speed_ref:.0f}'} "
                f"| {'-' if speed_tv is None else f'{speed_tv:.0f}'} "
                f"| {_mb(memory.get('temp_bytes'))} "
                f"| {_mb(ref_memory.get('temp_bytes'))} "
                f"| {_mb(memory.get('output_bytes'))} |")
    failed = [c for c in results["checks"] if not c["ok"]]
    lines += ["", f"Targets: {len(results['checks']) - len(failed)} of "
              f"{len(results['checks'])} met."]
    for check in failed:
        lines.append(f"- MISSED {check['check']}: {check['value']:.2f} "
                     f"(target {check['target']})")
    return "\n".join(lines) + "\n"


def plot(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [p["num_rois"] for p in points]
    for impl in ("jax_psroi", "reference", "torchvision"):
        if all(impl in p for p in points):
            ax.plot(ks, [p[impl] * 1e3 for p in points], "o-", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("RoIs (K)")
    ax.set_ylabel("forward, median ms")
    ax.set_title("PS-RoI Align forward, [1, 490, 50, 84], 7x7, sr=2")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
