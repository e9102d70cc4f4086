"""The package as installed: its kernel table, what it registers at import,
what the wheel holds, its CUDA targets in exported programs, and what
happens when Python finds the source folder instead."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi
from jax_psroi import _extension

from cases import random_features, random_rois
from test_export import OPERATORS

PACKAGE = pathlib.Path(jax_psroi.__file__).parent
SOURCE = pathlib.Path(__file__).parents[1] / "jax_psroi"


def _run(code, cwd, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_kernel_table_has_its_directions_per_operation_dtype_and_layout():
    table = _extension.KERNELS["cpu"]
    dtypes = {np.dtype(d) for d in jax_psroi.build_info()["dtypes"]}
    assert dtypes >= {np.dtype(np.float32), np.dtype(np.float64)}
    assert set(_extension.SUPPORTED_DTYPES) == dtypes
    # A forward and a backward each; the operators of samples, box rows too.
    directions = {"ps_roi_align": ("forward", "backward", "box_forward", "box_backward"),
                  "roi_align": ("forward", "backward", "box_forward", "box_backward"),
                  "ps_roi_pool": ("forward", "backward"), "roi_pool": ("forward", "backward")}
    expected = {(operation, direction, layout, dtype)
                for operation, names in directions.items() for direction in names
                for layout in _extension.SUPPORTED_LAYOUTS for dtype in dtypes}
    assert set(table) == expected
    for (operation, direction, layout, dtype), row in table.items():
        assert re.fullmatch(
            f"jax_psroi_{operation}_{direction}_{layout.lower()}_[a-z]+{8 * dtype.itemsize}",
            row.name), row.name
    assert len({row.name for row in table.values()}) == len(table)
    assert table[("ps_roi_align", "forward", "NCHW", np.dtype(np.float32))].name == (
        "jax_psroi_ps_roi_align_forward_nchw_f32")


@pytest.mark.gpu_schedule
def test_import_registers_no_test_only_targets(tmp_path):
    # The GPU-schedule targets exist for the tests only: after a plain import
    # of the package, XLA's CPU backend does not know them.
    # The same call works once the tests' own registration has run.
    tests = pathlib.Path(__file__).parent
    code = (
        "import sys, jax, numpy as np, jax_psroi\n"
        "call = jax.ffi.ffi_call(\n"
        "    'jax_psroi_testing_gpu_schedule_ps_roi_align_forward_nchw_f32',\n"
        "    jax.ShapeDtypeStruct((1, 1, 1, 1), np.float32))\n"
        "def run():\n"
        "    try:\n"
        "        out = call(np.ones((1, 1, 2, 2), np.float32),\n"
        "                   np.array([[0, 0, 0, 2, 2]], np.float32), spatial_scale=1.0,\n"
        "                   sampling_ratio=1, channel_order=0, first_bin_row=0,\n"
        "                   bin_rows=1, rois_per_group=0, images_per_group=0)\n"
        "        print('ran', float(np.asarray(out).ravel()[0]))\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e)\n"
        "run()\n"
        f"sys.path.insert(0, {str(tests)!r})\n"
        "import cases\n"
        "cases.gpu_schedule_target(('ps_roi_align', 'forward', 'NCHW', np.dtype(np.float32)))\n"
        "run()\n")
    result = _run(code, tmp_path, JAX_PLATFORMS="cpu")
    before, after = result.stdout.strip().splitlines()[-2:]
    assert "No FFI handler registered" in before, result.stdout + result.stderr
    assert after == "ran 1.0", result.stdout + result.stderr


def test_source_folder_without_extension_explains_itself(tmp_path):
    # As in a checkout's root after `pip install .`: the source folder, which
    # holds no compiled module, comes first on sys.path. Editable installs
    # redirect imports with a finder of their own, removed here. The import
    # works (every operator on the XLA path) and warns why and what to do.
    shutil.copytree(PACKAGE, tmp_path / "jax_psroi",
                    ignore=shutil.ignore_patterns("_cpu*", "_cuda*", "_build_info*",
                                                  "__pycache__"))
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if 'Editable' not in type(f).__name__\n"
        "                    and 'Redirect' not in type(f).__name__]\n"
        "import jax_psroi\n"
        "assert not jax_psroi.build_info()['native']\n")
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    message = next(line for line in result.stderr.splitlines() if "RuntimeWarning" in line)
    assert "jax_psroi was imported from" in message and "XLA formulation" in message
    assert "holds no compiled extension" in message
    assert "An installed copy is at" in message and "pip install -e ." in message
    assert "circular import" not in message


def test_the_package_declares_its_type_hints():
    # PEP 561: type checkers read the hints of a package marked py.typed.
    assert (PACKAGE / "py.typed").is_file()
    hints = typing.get_type_hints(jax_psroi.ps_roi_align)
    assert hints["input"] == jax.typing.ArrayLike and hints["return"] is jax.Array


def test_installed_package_holds_every_file_of_the_source_package():
    # The wheel takes the whole package folder (pyproject.toml,
    # wheel.packages): every module and data file, py.typed included.
    if PACKAGE == SOURCE:
        pytest.skip("imported from the source folder (an editable install)")
    source = {path.relative_to(SOURCE) for path in SOURCE.rglob("*")
              if path.is_file() and "__pycache__" not in path.parts
              and not path.name.startswith(("_cpu", "_cuda", "_build_info"))}
    installed = {path.relative_to(PACKAGE) for path in PACKAGE.rglob("*") if path.is_file()}
    assert source <= installed, sorted(map(str, source - installed))
    assert any(path.name.startswith("_cpu") for path in installed)


@pytest.mark.skipif(not _extension.KERNELS["cuda"],
                    reason="built without CUDA (JAX_PSROI_CUDA=OFF or no nvcc)")
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_cuda_export_of_every_operator_and_its_gradient_names_our_cuda_targets(name):
    # What a machine without a GPU can check of the CUDA build: the cuda
    # lowering of the forward and the gradient calls our CUDA kernels, and
    # only them (no dense jax.numpy fallback).
    op = OPERATORS[name]
    rng = np.random.default_rng(43)
    features = random_features(rng, 2, 8, 12, 10, np.float32)
    rois = random_rois(rng, 9, 2, 12, 10, 0.5, np.float32)
    program = jax.jit(lambda f, r: (op(f, r), jax.grad(lambda f: jnp.sum(op(f, r) ** 2))(f)))
    exported = jax.export.export(program, platforms=["cuda"],
                                 disabled_checks=jax_psroi.export_safety_checks())(
        features, rois)
    calls = re.findall(r"stablehlo.custom_call @(\w+)", exported.mlir_module())
    cuda_targets = {row.name: row for tables in (_extension.KERNELS, _extension.DEFORM_KERNELS)
                    for row in tables["cuda"].values()}
    assert calls and set(calls) <= set(cuda_targets), calls
    assert {cuda_targets[call].direction for call in calls} == {"forward", "backward"}


@pytest.fixture
def build_backend(monkeypatch):
    """build_backend/jax_psroi_build.py, on a machine of the test's making."""
    pytest.importorskip("scikit_build_core")
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "build_backend"))
    import jax_psroi_build
    monkeypatch.delenv("JAX_PSROI_CUDA", raising=False)
    return jax_psroi_build


@pytest.mark.parametrize("setting, nvcc, driver, expected", [
    # No setting: CUDA on a GPU machine only; pip's compiler without a system one.
    (None, None, False, ("OFF", False)),
    (None, "/usr/local/cuda/bin/nvcc", False, ("ON", False)),
    (None, None, True, ("ON", True)),
    (None, "/usr/local/cuda/bin/nvcc", True, ("ON", False)),
    ("ON", None, False, ("ON", True)),
    ("on", "/usr/local/cuda/bin/nvcc", False, ("ON", False)),
    ("OFF", None, True, ("OFF", False)),
    ("OFF", "/usr/local/cuda/bin/nvcc", True, ("OFF", False)),
])
def test_build_backend_asks_for_nvidias_compiler_only_when_it_compiles_cuda_without_one(
        build_backend, monkeypatch, setting, nvcc, driver, expected):
    if setting is not None:
        monkeypatch.setenv("JAX_PSROI_CUDA", setting)
    monkeypatch.setattr(build_backend, "system_nvcc", lambda: nvcc)
    monkeypatch.setattr(build_backend, "nvidia_driver", lambda: driver)
    cuda, extra = build_backend.cuda_build()
    assert (cuda, bool(extra)) == expected
    if extra:
        assert {requirement.split(">")[0] for requirement in extra} == {
            "nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-runtime",
            "nvidia-cuda-cccl"}


def test_build_backend_reads_the_config_setting_and_the_environment_wins(
        build_backend, monkeypatch):
    monkeypatch.setattr(build_backend, "system_nvcc", lambda: None)
    monkeypatch.setattr(build_backend, "nvidia_driver", lambda: False)
    setting = {"cmake.define.JAX_PSROI_CUDA": "ON"}
    assert build_backend.cuda_build(setting)[0] == "ON"
    monkeypatch.setenv("JAX_PSROI_CUDA", "OFF")
    assert build_backend.cuda_build(setting) == ("OFF", [])
    monkeypatch.setenv("JAX_PSROI_CUDA", "maybe")
    with pytest.raises(ValueError, match="AUTO, ON or OFF"):
        build_backend.cuda_build()
