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
#   DIR/wheel/*.whl        with --wheel: this checkout built with the CUDA
#                          kernels, for gpu_check.sh --wheel on the device
#
# Needs the package installed with its CPU module (the hashes come from
# it), nvcc, and about 10 minutes on 2 cores. DIR stays under the device
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
  JAX_PSROI_CUDA=ON "$python" -m pip wheel --no-deps -w "$dir/wheel" .
fi
du -sh "$dir"
