"""The GPU driver (benchmarks/gpu_driver.cu) without a GPU: built as C++, it
is its --host check, which runs every tuning's schedule serially on the
small cases (crowded tiles, hostile boxes) that benchmarks/gpu_workloads.py
writes, and compares each output with the CPU's by hash."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_winners  # noqa: E402

TUNINGS = ("default", "threads256", "tile2x64", "tile8x16", "cover8", "planes4", "nhwc64",
           "nhwc_planes8", "nhwc_planes4", "nhwc_staged", "unbounded")
# What each tuning changes (gpu_driver.cu, Directions): the cells it fills.
FORWARD_ONLY = {"planes4", "nhwc64", "nhwc_planes8", "nhwc_planes4", "nhwc_staged"}
# Tunings that change only the NHWC kernels (gpu_driver.cu, LayoutsOf): no
# rows for NCHW cases.
NHWC_ONLY = {"nhwc_planes8", "nhwc_staged"}
BACKWARD_ONLY = {"tile2x64", "tile8x16", "cover8"}


@pytest.fixture(scope="module")
def driver_run(tmp_path_factory):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("builds the driver's host check: needs a C++ compiler (CI's source "
                    "leg has one; its legs that test an installed wheel have none)")
    out = tmp_path_factory.mktemp("gpu_run")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_workloads.py"),
                    "--out", str(out / "workloads"), "--quick"], check=True,
                   capture_output=True)
    subprocess.run(["bash", str(ROOT / "scripts" / "build_gpu_driver.sh"), "--host-only",
                    str(out / "gpu_driver")], check=True, capture_output=True)
    return out


def _manifest(out):
    cases = []
    for line in (out / "workloads" / "manifest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            cases.append(dict(token.split("=", 1) for token in line.split()))
    return cases


def _run(out, manifest):
    return subprocess.run([str(out / "gpu_driver"), "--manifest", str(manifest), "--host"],
                          capture_output=True, text=True)


def test_every_tuning_reproduces_the_cpu_bitwise(driver_run):
    result = _run(driver_run, driver_run / "workloads" / "manifest.txt")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in result.stdout.splitlines() if line.startswith("| small-")]
    cases = _manifest(driver_run)
    assert {case["op"] for case in cases} == {"ps_roi_align", "roi_align", "ps_roi_pool",
                                              "roi_pool"}
    expected = {(case["name"], tuning) for case in cases for tuning in TUNINGS
                if case["data_format"] == "NHWC" or tuning not in NHWC_ONLY}
    assert sorted((row[0], row[1]) for row in rows) == sorted(expected)
    for name, tuning, _, _, forward, backward in rows:
        assert forward == ("-" if tuning in BACKWARD_ONLY else "bitwise"), (name, tuning)
        assert backward == ("-" if tuning in FORWARD_ONLY else "bitwise"), (name, tuning)
    assert "0 rows failed a check" in result.stdout


def test_a_wrong_output_fails_the_check(driver_run, tmp_path):
    # The check can fail: one hash off by one bit, that case's rows DIFFER.
    manifest = (driver_run / "workloads" / "manifest.txt").read_text()
    first = re.search(r"backward_hash=([0-9a-f]{16})", manifest)
    flipped = f"{int(first.group(1), 16) ^ 1:016x}"
    broken = tmp_path / "manifest.txt"
    broken.write_text(manifest.replace(first.group(0), f"backward_hash={flipped}", 1))
    for rois in (driver_run / "workloads").glob("*.rois"):
        (tmp_path / rois.name).symlink_to(rois)
    result = _run(driver_run, broken)
    assert result.returncode == 1
    failed = len(TUNINGS) - len(FORWARD_ONLY)
    assert result.stdout.count("DIFFERS") == failed
    assert f"{failed} rows failed a check" in result.stdout


def test_winners_are_the_fastest_rows_that_passed():
    # A wrong output, or a gradient that did not repeat, never wins.
    text = """device: an H100
| case | tuning | forward ms | backward ms | forward | backward |
|---|---|---|---|---|---|
| a | default | 0.58 | 0.94 | bitwise | bitwise |
| a | threads256 | 0.50 | 1.20 | bitwise | bitwise |
| a | tile2x64 | - | 0.80 | - | bitwise |
| a | planes4 | 0.40 | - | DIFFERS | - |
| a | cover8 | - | 0.70 | - | bitwise,NONDETERMINISTIC |
"""
    results = gpu_winners.parse(text)
    assert results["a"]["forward"] == {"default": 0.58, "threads256": 0.5}
    assert results["a"]["backward"] == {"default": 0.94, "threads256": 1.2, "tile2x64": 0.8}
    table = gpu_winners.table(results)
    assert "| a | forward | 0.58 | 0.5 | threads256 | 1.16x |" in table
    assert "| a | backward | 0.94 | 0.8 | tile2x64 | 1.17x |" in table
