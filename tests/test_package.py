"""The package as installed: its kernel table, what it registers at import,
and what happens when Python finds the source folder instead."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import typing

import jax
import numpy as np

import jax_psroi
from jax_psroi import _extension

PACKAGE = pathlib.Path(jax_psroi.__file__).parent


def _run(code, cwd, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_kernel_table_has_a_forward_and_a_backward_per_operation_dtype_and_layout():
    table = _extension.KERNELS["cpu"]
    dtypes = {np.dtype(d) for d in jax_psroi.build_info()["dtypes"]}
    assert dtypes >= {np.dtype(np.float32), np.dtype(np.float64)}
    assert set(_extension.SUPPORTED_DTYPES) == dtypes
    expected = {(operation, direction, layout, dtype)
                for operation in ("ps_roi_align", "roi_align", "ps_roi_pool", "roi_pool")
                for direction in ("forward", "backward")
                for layout in _extension.SUPPORTED_LAYOUTS for dtype in dtypes}
    assert set(table) == expected
    for (operation, direction, layout, dtype), row in table.items():
        assert re.fullmatch(
            f"jax_psroi_{operation}_{direction}_{layout.lower()}_[a-z]+{8 * dtype.itemsize}",
            row.name), row.name
    assert len({row.name for row in table.values()}) == len(table)
    assert table[("ps_roi_align", "forward", "NCHW", np.dtype(np.float32))].name == (
        "jax_psroi_ps_roi_align_forward_nchw_f32")


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
