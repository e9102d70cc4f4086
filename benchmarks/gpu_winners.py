"""The fastest tuning of each case and direction in a GPU driver table
(benchmarks/gpu_driver.cu's output), among rows whose output was bitwise the
CPU's (and, for the backward, repeated bitwise):

    python benchmarks/gpu_winners.py DRIVER.md [--best CASE-SUBSTRING]

prints a markdown table: each case's default and best time per direction,
the best tuning and its speed-up. With --best, only the name of the tuning
that wins most directions of the first matching case (for scripts).
"""

from __future__ import annotations

import argparse
import pathlib


def parse(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """{case: {direction: {tuning: milliseconds}}} of the rows that passed."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] in ("case", "") or cells[0].startswith("---"):
            continue
        case, tuning, forward_ms, backward_ms, forward, backward = cells
        directions = results.setdefault(case, {"forward": {}, "backward": {}})
        if forward == "bitwise":
            directions["forward"][tuning] = float(forward_ms)
        if backward == "bitwise":
            directions["backward"][tuning] = float(backward_ms)
    return results


def table(results) -> str:
    lines = ["| case | direction | default ms | best ms | best tuning | speed-up |",
             "|---|---|---|---|---|---|"]
    for case, directions in sorted(results.items()):
        for direction, times in directions.items():
            if not times:
                continue
            best = min(times, key=times.get)
            default = times.get("default")
            speedup = f"{default / times[best]:.2f}x" if default else "-"
            lines.append(f"| {case} | {direction} | {default if default else '-'} | "
                         f"{times[best]} | {best} | {speedup} |")
    return "\n".join(lines)


def best_tuning(results, case_substring: str) -> str:
    for case, directions in sorted(results.items()):
        if case_substring in case:
            winners = [min(times, key=times.get) for times in directions.values() if times]
            return max(set(winners), key=winners.count) if winners else "default"
    return "default"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("driver_table", type=pathlib.Path)
    parser.add_argument("--best", metavar="CASE")
    args = parser.parse_args(argv)
    results = parse(args.driver_table.read_text())
    print(best_tuning(results, args.best) if args.best else table(results))


if __name__ == "__main__":
    main()
