#!/usr/bin/env bash
# Memory-safety proof of the CPU kernels (and of the CUDA kernels' schedule,
# which the test rig _gpu_schedule_testing runs on the CPU): builds them
# with AddressSanitizer and UndefinedBehaviorSanitizer (JAX_PSROI_SANITIZE=ON,
# every report fatal) into a throwaway virtual environment, then runs the
# kernel tests (non-maximum suppression's included) and the property-based
# fuzz tests (test_fuzz.py, test_fuzz_nms.py, test_fuzz_deformable.py) with
# EXAMPLES examples each under the sanitizers. Exits non-zero on any report
# or failure.
#
#   bash scripts/sanitize.sh [EXAMPLES] [TEST_FILE ...]   # default 10000
#
# TEST_FILEs (names in tests/, e.g. test_nms.py) run only those, in that
# order: the whole list takes hours on two cores, so a run can be split.
#
# Python is not instrumented, so the sanitizer runtimes are preloaded
# (LD_PRELOAD) into the test process only. Leak checking is off (CPython and
# XLA keep memory until exit by design). The fuzz test compares with the
# jax.numpy reference on its first REFERENCE_EXAMPLES examples (default 300:
# the reference compiles once per shape) and checks its other properties on
# every example (the NMS fuzz test compares every example with its reference).
set -euo pipefail
examples="${1:-10000}"
shift $(($# > 0 ? 1 : 0))
reference_examples="${REFERENCE_EXAMPLES:-300}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install --quiet "jax==0.10.2" "jaxlib==0.10.2" nanobind scikit-build-core "cmake>=3.18" ninja \
  "pytest>=8" "chex>=0.1.90" "flatbuffers>=24" "hypothesis>=6.100" numpy \
  "flax>=0.10"  # test_deformable.py's Flax modules
echo "=== building the sanitized CPU extension"
# Unstripped, so that reports name files and lines.
JAX_PSROI_CUDA=OFF JAX_PSROI_SANITIZE=ON JAX_PSROI_TESTING=ON pip install --quiet --no-build-isolation \
  -Cbuild-dir="$work/build" -Cinstall.strip=false "$repo"
for extension in "$work"/venv/lib/python*/site-packages/jax_psroi/{_cpu,_gpu_schedule_testing}*.so; do
  grep -q __asan_report "$extension" && grep -q __ubsan_handle "$extension" \
    || { echo "$extension was not built with the sanitizers" >&2; exit 1; }
done

runtimes="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libubsan.so)"
reports="$work/reports"
mkdir -p "$reports"
tests=(test_fuzz.py test_fuzz_nms.py test_fuzz_deformable.py test_nms.py test_box_derivatives.py
       test_deformable.py test_forward.py
       test_grad.py test_vmap.py test_layouts.py
       test_low_precision.py test_golden.py test_gpu_schedule.py test_roi_align.py
       test_ps_roi_pool.py test_roi_pool.py test_multi_scale_roi_align.py)
if [ $# -gt 0 ]; then
  tests=("$@")
fi
for name in "${tests[@]}"; do
  [ -f "$repo/tests/$name" ] || { echo "no test file tests/$name" >&2; exit 2; }
done
echo "=== ${tests[*]} under ASan + UBSan; fuzz examples: $examples" \
     "(first $reference_examples against the reference)"
start=$SECONDS
status=0
(
  cd "$work"   # not the checkout: import the installed, sanitized package
  env LD_PRELOAD="$runtimes" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:log_path=$reports/asan" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$reports/ubsan" \
    JAX_PLATFORMS=cpu JAX_PSROI_FUZZ_EXAMPLES="$examples" \
    JAX_PSROI_FUZZ_REFERENCE_EXAMPLES="$reference_examples" \
    python -m pytest -q -p no:cacheprovider --hypothesis-show-statistics \
      "${tests[@]/#/$repo/tests/}"
) || status=$?
echo "=== $((SECONDS - start)) s"
if compgen -G "$reports/*" >/dev/null; then
  echo "=== sanitizer reports:"
  cat "$reports"/*
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "=== sanitize: FAILED (status $status)"
  exit 1
fi
echo "=== sanitize: clean"
