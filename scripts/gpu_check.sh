#!/usr/bin/env bash
# One command for a GPU machine: checks everything jax_psroi claims there.
#
#   scripts/gpu_check.sh [--out DIR] [--full] [--wheel FILE] [--reinstall]
#                        [--skip STEP,...]
#
#   --out DIR     logs and results (default gpu_check_out)
#   --full        the full benchmark instead of the quick one
#   --wheel FILE  install this wheel (e.g. one built with CUDA on a CPU
#                 machine, which saves the build) before checking
#   --reinstall   build and install this checkout even if an installed
#                 jax_psroi already has the CUDA kernels
#   --skip LIST   steps not to run, e.g. test_suite,golden_on_gpu when a
#                 lease is short (they are reported as SKIP)
#
# Steps, each with its own time limit and its log in DIR: install (the
# wheel; or this checkout, built with the CUDA kernels, when a GPU is present
# and the installed package lacks them, or with --reinstall); the tests
# marked gpu; the whole suite; the torchvision golden fixtures on the GPU;
# the benchmarks on the GPU (bench.py, family.py, nms.py); compute-sanitizer's memcheck over a small
# forward, gradient and vmap run with hostile boxes, and memcheck and
# racecheck over the fuzz test on the GPU; gradient determinism
# (the same gradient 5 times, compared bitwise) on the CPU and on the GPU;
# and, where ncu is present, one profile of each kernel on a GPU-sized
# workload, in NCHW and in NHWC bin-major. A summary table comes last, with
# the installed package it checked. Without a GPU it runs what it can and
# says what it skipped. Exits 0 only if every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."

out=gpu_check_out
bench_mode=--quick
wheel=""
reinstall=0
skipped=","
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --full) bench_mode=""; shift ;;
    --wheel) wheel="$(realpath "$2")"; shift 2 ;;
    --reinstall) reinstall=1; shift ;;
    --skip) skipped=",$2,"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
started=$SECONDS

names=(); verdicts=(); seconds=(); notes=()
record() {  # name verdict seconds note
  names+=("$1"); verdicts+=("$2"); seconds+=("$3"); notes+=("$4")
  printf '=== %-22s %-7s %4ss  %s\n' "$1" "$2" "$3" "$4"
}
# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output in DIR/NAME.log.
step() {
  local name="$1" limit="$2" start=$SECONDS rc
  shift 2
  if [[ "$skipped" == *",$name,"* ]]; then
    record "$name" SKIP 0 "--skip"
    return 0
  fi
  # Through bash, so that a step may be one of the functions below.
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >"$out/$name.log" 2>&1
  rc=$?
  local verdict=PASS note="log: $name.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    verdict=TIMEOUT; note="over ${limit}s; log: $name.log"
  elif [ $rc -ne 0 ]; then
    verdict=FAIL; note="exit $rc; log: $name.log"
  fi
  record "$name" "$verdict" $((SECONDS - start)) "$note"
  return $rc
}
skip() { record "$1" SKIP 0 "$2"; }

# `python -P` keeps the checkout off sys.path, so the installed package is
# imported rather than the source folder (which holds no compiled module).
cuda_built() {
  python -P -c "import sys, jax_psroi; sys.exit(0 if jax_psroi.build_info()['cuda_built'] else 1)" \
    >/dev/null 2>&1
}
install_wheel() {
  python -m pip install --no-deps --force-reinstall "$1"
}
install_checkout() {
  # GPU machines have the build tools but no network: build with what is
  # installed; elsewhere fall back to an isolated build.
  local cuda=OFF
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then cuda=ON; fi
  # JAX_PSROI_TESTING: with the test rig, which the suite's gpu_schedule tests need.
  PATH="$PATH:/usr/local/cuda/bin" JAX_PSROI_CUDA=$cuda JAX_PSROI_TESTING=ON \
    python -m pip install --no-build-isolation --no-deps . ||
    PATH="$PATH:/usr/local/cuda/bin" JAX_PSROI_CUDA=$cuda JAX_PSROI_TESTING=ON \
    python -m pip install ".[test]"
}
export -f install_wheel install_checkout

gpu=""
if python -P -c "import jax; assert jax.devices('gpu')" >/dev/null 2>&1; then
  gpu="$(python -P -c "import jax; print(jax.devices('gpu')[0].device_kind)")"
fi
no_gpu="no GPU visible to JAX"

# --- install ---------------------------------------------------------------
if [ -n "$wheel" ]; then
  step install 300 install_wheel "$wheel"
elif [ $reinstall = 1 ] || ! python -P -c "import jax_psroi" >/dev/null 2>&1 ||
    { [ -n "$gpu" ] && ! cuda_built; }; then
  step install 420 install_checkout
elif cuda_built; then
  skip install "installed package has the CUDA kernels (--reinstall to rebuild)"
else
  skip install "no GPU: the installed package is checked as it is"
fi
python -P -c "import jax_psroi, json; print(json.dumps(jax_psroi.build_info()))" \
  >"$out/build_info.json" 2>&1
checked="$(python -P -c "import jax_psroi, os; print(os.path.dirname(jax_psroi.__file__))" 2>&1)"

# A GPU the driver shows but JAX does not see is a failure, not a skip.
if [ -z "$gpu" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  record jax_sees_gpu FAIL 0 "nvidia-smi lists a GPU but JAX sees none (jax[cuda13] missing?)"
fi

# --- tests -------------------------------------------------------------------
# A wheel has no test rig (JAX_PSROI_TESTING): its tests are deselected.
rig=gpu_schedule
if ! python -P -c "import importlib.util as u, sys
sys.exit(0 if u.find_spec('jax_psroi._gpu_schedule_testing') else 1)" >/dev/null 2>&1; then
  rig="not gpu_schedule"
fi
if [ -n "$gpu" ]; then
  step gpu_tests 300 pytest -m "gpu and ($rig or not gpu_schedule)" -p no:cacheprovider tests
else
  skip gpu_tests "$no_gpu"
fi
# The default device is the GPU where there is one.
step test_suite 420 pytest -m "$rig or not gpu_schedule" -p no:cacheprovider tests
if [ -n "$gpu" ]; then
  step golden_on_gpu 180 pytest -p no:cacheprovider tests/test_golden.py
else
  skip golden_on_gpu "$no_gpu"
fi

# --- benchmark -----------------------------------------------------------------
if [ -n "$gpu" ]; then
  # shellcheck disable=SC2086
  step benchmark 600 python benchmarks/bench.py --device gpu $bench_mode --out "$out/bench" \
    --no-reference
  # The rest of the RoI family (roi_align, multi_scale_roi_align, ps_roi_pool,
  # roi_pool) on a training batch, beside their XLA path and torchvision.
  # shellcheck disable=SC2086
  step family_benchmark 420 python benchmarks/family.py --device gpu $bench_mode \
    --out "$out/bench" --no-reference
  step nms_benchmark 300 python benchmarks/nms.py --device gpu --out "$out/bench"
  step deformable_benchmark 300 python benchmarks/deformable.py --device gpu --no-reference \
    --out "$out/bench"
else
  skip benchmark "$no_gpu"
  skip family_benchmark "$no_gpu"
  skip nms_benchmark "$no_gpu"
  skip deformable_benchmark "$no_gpu"
fi

# --- memory safety -------------------------------------------------------------
if [ -z "$gpu" ]; then
  for name in memcheck fuzz_memcheck fuzz_racecheck; do skip "$name" "$no_gpu"; done
elif ! command -v compute-sanitizer >/dev/null; then
  for name in memcheck fuzz_memcheck fuzz_racecheck; do
    skip "$name" "compute-sanitizer not found"
  done
else
  # The platform allocator gives every XLA buffer its own allocation, so an
  # access past one is caught rather than landing in a neighbour.
  step memcheck 420 env XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
    python scripts/gpu_runs.py smoke
  # The fuzz test (tests/test_fuzz.py: hostile boxes, tiny maps, every
  # layout, order and dtype) on the GPU's kernels: out-of-bounds accesses
  # (memcheck), then shared-memory races in the blocks' lists and tiles
  # (racecheck, much slower: fewer examples).
  step fuzz_memcheck 600 env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    XLA_PYTHON_CLIENT_ALLOCATOR=platform JAX_PSROI_FUZZ_EXAMPLES=200 \
    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
    pytest -q -p no:cacheprovider tests/test_fuzz.py
  step fuzz_racecheck 600 env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    XLA_PYTHON_CLIENT_ALLOCATOR=platform JAX_PSROI_FUZZ_EXAMPLES=30 \
    compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    pytest -q -p no:cacheprovider tests/test_fuzz.py
fi

# --- determinism -----------------------------------------------------------------
step determinism_cpu 180 python scripts/gpu_runs.py determinism --device cpu --runs 5
if [ -n "$gpu" ]; then
  step determinism_gpu 180 python scripts/gpu_runs.py determinism --device gpu --runs 5
else
  skip determinism_gpu "$no_gpu"
fi

# --- profile -----------------------------------------------------------------------
metrics="gpu__time_duration.sum,dram__bytes.sum"
metrics+=",gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"
metrics+=",smsp__inst_executed_op_global_red.sum,smsp__inst_executed_op_global_atom.sum"
metrics+=",launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active"
if [ -z "$gpu" ]; then
  skip ncu_profile "$no_gpu"
elif ! command -v ncu >/dev/null; then
  skip ncu_profile "ncu not found"
# Without preallocation: a replayed kernel's memory is saved and restored,
# and XLA otherwise holds most of the card, which makes each replay slow.
elif step ncu_profile 420 env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    ncu --clock-control none --csv --page raw --print-units base \
    --kernel-name regex:"roi_info|segment_kernel|start_kernel|forward_kernel|backward_kernel" \
    --metrics "$metrics" python scripts/gpu_runs.py profile \
    --variants NCHW:torchvision:float32,NHWC:bin_major:float32; then
  python scripts/gpu_runs.py ncu-summary "$out/ncu_profile.log" >"$out/ncu_summary.md" 2>&1
fi

# --- summary -----------------------------------------------------------------------
failed=0
{
  echo "jax_psroi GPU check: ${gpu:-no GPU}, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - started)) s"
  echo "checked: $checked"
  echo "build: $(cat "$out/build_info.json")"
  echo
  echo "| step | verdict | seconds | note |"
  echo "| --- | --- | --- | --- |"
  for i in "${!names[@]}"; do
    echo "| ${names[$i]} | ${verdicts[$i]} | ${seconds[$i]} | ${notes[$i]} |"
    case "${verdicts[$i]}" in FAIL|TIMEOUT) failed=1 ;; esac
  done
  if [ -s "$out/ncu_summary.md" ]; then
    echo
    cat "$out/ncu_summary.md"
  fi
} | tee "$out/summary.md"
exit $failed
