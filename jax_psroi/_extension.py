"""Loading of the compiled modules, registration of their FFI targets, and the
kernel table as Python sees it.

``_cpu`` is always built. ``_cuda`` exists when the package was built with
CUDA (docs/guides/building.md); its targets are registered for the CUDA
platform even on machines without a GPU, which is what ``jax.export`` for
``cuda`` needs.

Every target is a row of the kernel table (``lib/kernel_table.h``): the
modules list their rows with the target names, so the supported dtypes and
layouts below, and the tests' matrix, come from the compiled code itself.
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from typing import NamedTuple

import jax
import numpy as np


def _missing_extension_message(error) -> str:
    here = pathlib.Path(__file__).resolve().parent
    if any(here.glob("_cpu*")):
        return (f"jax_psroi's compiled extension in {here} failed to load ({error}). "
                "Rebuild it against the installed jax (pip install --force-reinstall "
                "--no-cache-dir .; see docs/guides/building.md).")
    installed = [
        str(path / "jax_psroi") for path in map(pathlib.Path, sys.path)
        if (path / "jax_psroi").resolve() != here
        and any((path / "jax_psroi").glob("_cpu*"))]
    lines = [
        f"jax_psroi was imported from {here}, which holds no compiled "
        "extension (_cpu).",
    ]
    if installed:
        lines.append(
            f"An installed copy is at {installed[0]}, but the source folder "
            "came first on sys.path: Python puts the current directory first "
            "for `python -c`, a REPL and `python -m pytest`. Run from another "
            "directory, use `pytest` rather than `python -m pytest`, or "
            "install in editable mode (`pip install -e .`), which makes the "
            "source folder importable.")
    else:
        lines.append(
            "Install the package first (`pip install .`, or `pip install -e .` "
            "to work on the source; see docs/guides/building.md).")
    return " ".join(lines)


try:
    from jax_psroi import _build_info, _cpu
except ImportError as error:
    # A pure-Python install: every operator runs the XLA path (_xla_path.py).
    _build_info = _cpu = None
    warnings.warn(f"{_missing_extension_message(error)} Until then every operator runs "
                  "its XLA formulation (docs/guides/sharp_bits.md), "
                  "slower than the native kernels.", RuntimeWarning, stacklevel=2)

_cuda = None
if _cpu is not None:
    try:
        from jax_psroi import _cuda
    except ImportError as error:
        if _build_info.CUDA_VERSION:  # it was built, but does not load
            warnings.warn(f"jax_psroi's CUDA kernels were built but failed to load "
                          f"({error}); only the CPU kernels are available", RuntimeWarning,
                          stacklevel=2)


class KernelTarget(NamedTuple):
    """One row of the kernel table with its FFI target name."""
    name: str
    operation: str   # "ps_roi_align"
    direction: str   # "forward" or "backward"
    layout: str      # "NCHW"
    dtype: np.dtype


def _register(module_targets, platform) -> dict:
    """Registers `module_targets` for `platform`; returns the table by key."""
    table = {}
    for name, operation, direction, layout, dtype, capsule in module_targets:
        jax.ffi.register_ffi_target(name, capsule, platform=platform)
        row = KernelTarget(name, operation, direction, layout, jax.numpy.dtype(dtype))
        table[row[1:]] = row
    return table


KERNELS = {"cpu": {} if _cpu is None else _register(_cpu.targets(), "cpu"),
           "cuda": {} if _cuda is None else _register(_cuda.targets(), "CUDA")}


# Non-maximum suppression's targets (lib/cpu/nms_handlers.cc,
# lib/cuda/nms_handlers.cu), by platform and dtype: outside the RoI kernel
# table, whose rows have layouts and directions.
def _nms_targets(module, platform) -> dict:
    if module is None:
        return {}
    return {row.dtype: row.name for row in _register(module.nms_targets(), platform).values()}


NMS_TARGETS = {"cpu": _nms_targets(_cpu, "cpu"), "cuda": _nms_targets(_cuda, "CUDA")}


# Deformable RoI Align's targets (lib/deformable_ffi.h), by platform and
# (operation, direction, layout, dtype), as KERNELS keys its rows.
def _deform_targets(module, platform) -> dict:
    return {} if module is None else _register(module.deform_targets(), platform)


DEFORM_KERNELS = {"cpu": _deform_targets(_cpu, "cpu"), "cuda": _deform_targets(_cuda, "CUDA")}

OPERATION = "ps_roi_align"
# What the operators take: the native kernels' dtypes and layouts, read off
# the table; the XLA path takes the same (all of them, without the module).
SUPPORTED_DTYPES = tuple(sorted(
    {row.dtype for row in KERNELS["cpu"].values()}
    or {jax.numpy.dtype(name) for name in ("bfloat16", "float16", "float32", "float64")},
    key=lambda dtype: (dtype.itemsize, dtype.name)))
SUPPORTED_LAYOUTS = tuple(sorted({row.layout for row in KERNELS["cpu"].values()}
                                 or {"NCHW", "NHWC"}))

CUDA_MISSING_MESSAGE = (
    "jax_psroi was built without its CUDA kernels, so on the GPU its operators "
    "run their XLA formulation, slower than the native kernels. To get the "
    "kernels, reinstall with nvcc on PATH and CUDA forced on: JAX_PSROI_CUDA=ON "
    "pip install --no-cache-dir --force-reinstall . (see docs/guides/building.md).")


def target_name(platform: str, direction: str, dtype, layout: str = "NCHW",
                operation: str = OPERATION) -> str:
    """FFI target of a kernel-table row on `platform` ('cpu' or 'cuda')."""
    table = KERNELS[platform]
    key = (operation, direction, layout, jax.numpy.dtype(dtype))
    if key not in table:
        raise NotImplementedError(
            f"jax_psroi has no {platform} kernel for {operation} {direction} "
            f"in {layout} {jax.numpy.dtype(dtype).name}")
    return table[key].name


def cuda_workspace_elements(backward: bool, num_images: int, num_rois: int, height: int,
                            pooled_h: int, pooled_w: int) -> int:
    """Int32 elements of the workspace a CUDA call takes as its last result
    (RoI buckets, lists and spans; lib/gpu_schedule.h computes it)."""
    return _cpu.cuda_workspace_elements(backward, num_images, num_rois, height, pooled_h,
                                        pooled_w)


def cpu_backward_workspace_bytes(operation: str, layout: str, dtype, features, pooled,
                                 channel_order: int, pass_rois: int = -1) -> int:
    """Bytes of the workspace a CPU backward call takes as its last result,
    for `features` (N, C, H, W) and `pooled` (K, C_out, PH, PW): what the
    lowering asks for (the RoIs in passes whose tables fit the larger of 8
    MiB and the gradient in its compute type; lib/cpu/average_kernels.h
    computes it), or with `pass_rois` room for passes of that many RoIs."""
    return _cpu.cpu_backward_workspace_bytes(operation, layout, jax.numpy.dtype(dtype).name,
                                             *features, *pooled, channel_order, pass_rois)


def export_safety_checks() -> list:
    """The ``disabled_checks`` that ``jax.export`` needs for programs that
    call jax_psroi's kernels.

    ``jax.export.export`` refuses custom calls it does not know to be
    stable; jax_psroi's targets are (their names and attributes are ABI,
    docs/design/architecture.md, "The kernel table"). This returns one
    ``jax.export.DisabledSafetyCheck.custom_call(name)`` for every FFI target
    the package registers, on every platform (the CPU and CUDA targets share
    their names)::

        exported = jax.export.export(jax.jit(f), platforms=["cpu", "cuda"],
                                     disabled_checks=jax_psroi.export_safety_checks())(*args)

    Exporting for ``cuda`` needs the CUDA build, not a GPU. A process that
    deserializes and calls the program must ``import jax_psroi`` first: the
    import registers the targets it calls.
    """
    names = sorted({row.name for tables in (KERNELS, DEFORM_KERNELS)
                    for table in tables.values() for row in table.values()}
                   | {name for table in NMS_TARGETS.values() for name in table.values()})
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in names]


def build_info() -> dict:
    """What this installation of jax_psroi was built with.

    Returns a dict with the jaxlib version whose XLA FFI headers were
    compiled in (vendored, third_party/xla: the oldest supported jaxlib, so
    the build loads in it and every newer one), the XLA FFI API version,
    whether (and with which CUDA compiler, and for which GPU architectures)
    the CUDA kernels were built, and the kernel table: the dtypes and
    layouts with native kernels. ``cuda_sass`` lists the GPUs with compiled
    machine code (``sm_XY``), ``cuda_ptx`` the virtual architectures
    embedded as PTX (``compute_XY``), which the driver compiles for newer
    GPUs on first use. Without the compiled module (every operator on the
    XLA path), only whether it is there ("native": False), the running JAX
    and the dtypes and layouts the operators take.
    """
    if _cpu is None:
        return {"native": False, "jax_running": jax.__version__, "cuda_built": False,
                "dtypes": [dtype.name for dtype in SUPPORTED_DTYPES],
                "layouts": list(SUPPORTED_LAYOUTS)}
    architectures = (_build_info.CUDA_ARCHITECTURES.split(";")
                     if _build_info.CUDA_ARCHITECTURES else [])
    info = {
        "native": True,
        "jax_built_against": _build_info.JAX_VERSION,
        "jax_running": jax.__version__,
        "ffi_api_version": tuple(_cpu.ffi_api_version),
        "cuda_option": _build_info.CUDA_OPTION,
        "cuda_built": _cuda is not None,
        "cuda_version": _build_info.CUDA_VERSION or None,
        "cuda_architectures": architectures,
        # CMake's notation: "90-real" is SASS only, "90-virtual" PTX only,
        # "90" both.
        "cuda_sass": [f"sm_{arch.split('-')[0]}" for arch in architectures
                      if not arch.endswith("-virtual")],
        "cuda_ptx": [f"compute_{arch.split('-')[0]}" for arch in architectures
                     if not arch.endswith("-real")],
        "cuda_toolkit": _build_info.CUDA_TOOLKIT or None,
        "dtypes": [dtype.name for dtype in SUPPORTED_DTYPES],
        "layouts": list(SUPPORTED_LAYOUTS),
    }
    if _cuda is not None:
        info["cuda_runtime_version"] = _cuda.cuda_runtime_version()
    return info
