"""Registers, spills and shared memory of every kernel of the GPU driver, one
row per kernel, from ptxas's report (scripts/build_gpu_driver.sh writes it
to OUTPUT.ptxas.log):

    python benchmarks/kernel_resources.py build/gpu_driver.ptxas.log

A kernel's template arguments name its tuning (the driver's name for it, or
`default`), storage type, layout and, for the averaging kernels, whether it
carries the large-grid sums.
"""

from __future__ import annotations

import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                            text=True, check=True)
    return result.stdout.splitlines()


def short(name: str) -> str:
    """jax_psroi::cuda::forward_kernel<jax_psroi::driver::Nhwc64::Tune, float, ...>
    as forward_kernel<nhwc64, float, ...>."""
    name = re.sub(r"jax_psroi::gpu_schedule::Tuning<128, 4, 16, 8, 32, 0, 2048, 5, 7, 128>",
                  "default", name)
    name = re.sub(r"jax_psroi::driver::(\w+)::Tune", lambda m: m.group(1).lower(), name)
    name = re.sub(r"jax_psroi::(cuda|gpu_schedule|driver)::|jax_psroi::", "", name)
    name = re.sub(r"\(.*\)$", "", name).removeprefix("void ")  # return type, parameters
    return name.replace("WeightedCotangent", "Weighted").replace("CotangentAtMaximum", "AtMax")


def rows(log: str):
    entries = []
    current = None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2)}
            entries.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current["spill"] = int(m.group(2)) + int(m.group(3))
            current["stack"] = int(m.group(1))
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    for entry, name in zip(entries, demangle([e["mangled"] for e in entries]), strict=True):
        entry["name"] = short(name)
    return sorted(entries, key=lambda e: e["name"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(__doc__)
    with open(argv[0]) as log:
        table = rows(log.read())
    print("| kernel | arch | registers | spill bytes (stores + loads) | stack | smem |")
    print("|---|---|---|---|---|---|")
    for e in table:
        print(f"| `{e['name']}` | {e['arch']} | {e.get('registers', '?')} | "
              f"{e.get('spill', '?')} | {e.get('stack', '?')} | {e.get('smem', 0)} |")


if __name__ == "__main__":
    main()
