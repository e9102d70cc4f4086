#!/usr/bin/env bash
# Prepares, on a machine without a GPU, everything a GPU session runs
# (scripts/gpu_device_run.sh), so that the GPU's minutes go to running:
#
#   scripts/prepare_gpu_run.sh [DIR] [--wheel]     (default DIR build/gpu_run)
#
#   DIR/gpu_driver         benchmarks/gpu_driver.cu for sm_90, every tuning
#   DIR/resources.md       registers, spills and shared memory of each of its
#                          kernels (ptxas; benchmarks/kernel_resources.py)
#   DIR/workloads/         the driver's cases: manifest, boxes, the CPU's
#                          output hashes (benchmarks/gpu_workloads.py)
#   DIR/host_check.md      the driver's --host run: every tuning's schedule
#                          on the small cases, serially, against the CPU
#   DIR/wheel/*.whl        with --wheel: this checkout's wheels (cp311 and
#                          abi3) with the CUDA kernels for sm_90, for
#                          gpu_check.sh --wheel on the device
#
# Needs the package installed with its CPU module and test rig
# (JAX_PSROI_TESTING=ON: the hashes come from them), nvcc, and about 10 minutes on 2 cores. DIR stays under the device
# tool's carry limit (a few MB, the wheel about 10 MB more).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build/gpu_run
wheel=0
for arg in "$@"; do
  case "$arg" in
    --wheel) wheel=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) dir="$arg" ;;
  esac
done
mkdir -p "$dir"
python="${PYTHON:-$(command -v python || command -v python3)}"
start=$SECONDS
scripts/build_gpu_driver.sh "$dir/gpu_driver"
"$python" benchmarks/kernel_resources.py "$dir/gpu_driver.ptxas.log" > "$dir/resources.md"
"$python" benchmarks/gpu_workloads.py --out "$dir/workloads"
echo "=== workloads written ($((SECONDS - start)) s)"
"$dir/gpu_driver" --manifest "$dir/workloads/manifest.txt" --host | tee "$dir/host_check.md"
echo "=== host check passed ($((SECONDS - start)) s)"
if [ "$wheel" = 1 ]; then
  # The GPU machine's Python may be any from 3.11: the cp311 and the abi3
  # wheel, with sm_90's machine code only (CUDAARCHS) to stay small and fast.
  CUDAARCHS="${CUDAARCHS:-90}" scripts/build_wheels.sh --out "$dir/wheel" 3.11 3.12
fi
du -sh "$dir"
