#!/usr/bin/env bash
# Builds benchmarks/gpu_driver.cu, the GPU benchmark that needs no JAX.
#
#   scripts/build_gpu_driver.sh [--host-only] [OUTPUT]   (default build/gpu_driver)
#
# With nvcc, for sm_90 (H100, H200; ARCH overrides) and the CUDA module's
# flags: --fmad=false, so the GPU rounds as the CPU's run of the schedule
# does, and the CUDA runtime static, so the binary needs only a driver.
# --host-only: the same file as C++ (CXX, default g++), which is the driver's
# --host check alone and builds without a CUDA toolkit. The XLA FFI headers
# (call_dims checks each case's shapes as the handlers do) are the vendored
# ones the package builds with. ptxas's report of every kernel goes to
# OUTPUT.ptxas.log.
set -euo pipefail
cd "$(dirname "$0")/.."
host_only=0
out=build/gpu_driver
for arg in "$@"; do
  case "$arg" in
    --host-only) host_only=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) out="$arg" ;;
  esac
done
mkdir -p "$(dirname "$out")"
xla_include=third_party/xla
start=$SECONDS
if [ "$host_only" = 1 ]; then
  "${CXX:-g++}" -O2 -std=c++17 -Wall -Wextra -x c++ -I lib -isystem "$xla_include" \
    benchmarks/gpu_driver.cu -o "$out"
else
  nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
  # 20014: the host-only serial executor called from the schedule's
  # host-and-device functions, which it instantiates for the host alone.
  # ptxas -v: every kernel's registers, spills and shared memory, for
  # benchmarks/kernel_resources.py (OUTPUT.ptxas.log).
  "$nvcc" -O3 -std=c++17 --fmad=false -arch="${ARCH:-sm_90}" -cudart static \
    -diag-suppress 20014 -I lib -isystem "$xla_include" -Xcompiler -Wall -Xptxas -v \
    benchmarks/gpu_driver.cu -o "$out" 2> "$out.ptxas.log" || { cat "$out.ptxas.log"; exit 1; }
fi
echo "built $out in $((SECONDS - start)) s"
