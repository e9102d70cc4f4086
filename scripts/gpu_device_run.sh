#!/usr/bin/env bash
# The whole GPU session as one script with a time budget: run it on the GPU
# machine after scripts/prepare_gpu_run.sh has prepared DIR here (it
# compiles nothing, and needs no JAX for its first three steps).
#
#   scripts/gpu_device_run.sh [DIR] [--budget SECONDS] [--out OUT]
#
#   DIR        what prepare_gpu_run.sh made (default build/gpu_run)
#   --budget   seconds for everything (default 480); each step gets its
#              share and is cut at it
#   --out      where the results go (default $OUT, or DIR/results)
#
# Steps, each logged in OUT:
#   1. card      nvidia-smi's name of the GPU
#   2. driver    every case under every tuning: median times (CUDA events,
#                25 runs after 3), each output checked bitwise against the
#                CPU's, each gradient 5 times (driver.md)
#   3. winners   per case, the fastest bitwise tuning of each direction
#                (winners.md, benchmarks/gpu_winners.py)
#   4. sanitize  compute-sanitizer memcheck of the default tuning on the
#                small cases (hostile boxes included)
#   5. ncu       a profile of the default and the winning tuning of the two
#                headline cases (ncu_*.txt, speed-of-light and occupancy)
#   6. jax       with DIR/wheel: scripts/gpu_check.sh --wheel, the JAX-level
#                check of what is shipped (its gpu tests, golden fixtures,
#                determinism and benchmark), if time is left
# The summary lists each step's verdict and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=build/gpu_run
budget=480
out="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) dir="$1"; shift ;;
  esac
done
out="${out:-$dir/results}"
mkdir -p "$out"
started=$SECONDS
driver="$dir/gpu_driver"
manifest="$dir/workloads/manifest.txt"
summary=()

left() { echo $((budget - (SECONDS - started))); }
# step NAME SHARE_SECONDS COMMAND...: runs COMMAND, its output in OUT/NAME.log,
# cut at the smaller of its share and what is left of the budget.
step() {
  local name="$1" share="$2" start=$SECONDS limit rc
  shift 2
  limit=$(left)
  [ "$share" -lt "$limit" ] && limit=$share
  if [ "$limit" -lt 10 ]; then
    summary+=("| $name | not run (budget spent) | 0 |")
    return
  fi
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local verdict=passed
  [ $rc -eq 124 ] && verdict="cut at ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED (exit $rc)"
  summary+=("| $name | $verdict | $((SECONDS - start)) |")
  echo "=== $name: $verdict ($((SECONDS - start)) s)"
}

step card 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
cat "$out/card.log"
# The driver gets half the budget; it skips the cases it has no time for.
step driver $((budget / 2)) "$driver" --manifest "$manifest" \
  --budget-seconds $((budget / 2 - 20))
cp "$out/driver.log" "$out/driver.md"
tail -n 5 "$out/driver.md"

# Winners: per case and direction, the fastest tuning among bitwise rows.
python3 benchmarks/gpu_winners.py "$out/driver.md" > "$out/winners.md"
cat "$out/winners.md"

if command -v compute-sanitizer >/dev/null; then
  step sanitize 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$driver" \
    --manifest "$manifest" --cases small- --tunings default --repeats 1
else
  summary+=("| sanitize | no compute-sanitizer | 0 |")
fi

if command -v ncu >/dev/null; then
  profile() {  # case-substring
    local tuning best
    best=$(python3 benchmarks/gpu_winners.py "$out/driver.md" --best "$1")
    for tuning in default ${best/#default/}; do
      ncu --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats -k "regex:forward_kernel|backward_kernel" \
        "$driver" --manifest "$manifest" --cases "$1" --tunings "$tuning" --repeats 1 \
        > "$out/ncu_${1//[^A-Za-z0-9_-]/_}_${tuning}.txt" 2>&1
    done
  }
  step ncu 120 bash -c "$(declare -f profile); out='$out'; driver='$driver';
    manifest='$manifest'; profile rfcn_cls_gpu-NCHW-torchvision-float32-sr2;
    profile lighthead_train_gpu-NHWC-bin_major-bfloat16-sr2"
else
  summary+=("| ncu | no ncu | 0 |")
fi

# The wheel for this machine's Python: cp311 on 3.11, abi3 from 3.12.
if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  wheel=$(ls "$dir"/wheel/*-cp311-cp311-*.whl 2>/dev/null | head -n 1)
else
  wheel=$(ls "$dir"/wheel/*-abi3-*.whl 2>/dev/null | head -n 1)
fi
if [ -n "$wheel" ]; then
  step jax "$(left)" scripts/gpu_check.sh --wheel "$wheel" --out "$out/gpu_check" \
    --skip test_suite
else
  summary+=("| jax | no wheel in $dir/wheel | 0 |")
fi

{
  echo "| step | verdict | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${summary[@]}"
  echo
  echo "total: $((SECONDS - started)) s of a $budget s budget"
} | tee "$out/summary.md"
