"""Test configuration: float64 on, GPU tests skipped where there is no GPU,
the longest test files handed to pytest-xdist's workers first.

Which device a test checks: JAX's default device (the GPU where there is one)
for properties that must hold on every backend; the CPU, named explicitly
(inputs committed to jax.devices("cpu")), for CPU properties such as the
bitwise-deterministic backward and the test-only GPU-schedule targets; the
GPU only in tests marked `gpu`.

Tests marked `gpu_schedule` run the test rig (the CUDA kernels' schedule on
the CPU, built only with JAX_PSROI_TESTING=ON): without it they fail, saying
so, unless deselected with -m "not gpu_schedule".
"""

import importlib.util

import jax
import pytest

jax.config.update("jax_enable_x64", True)


def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


# The test files that take longest, longest first (by test time, as
# --junitxml reports it; reorder when a file grows). pytest-xdist's `--dist
# loadfile` hands out whole files; by default it orders them by their
# number of tests, which handed the 3 fuzz tests of deformable pooling out
# last, to run alone for minutes while the other worker idled. Handed out
# first, the long files run side by side and the short ones fill in.
LONGEST_FIRST = ("test_sharding.py", "test_deformable.py", "test_xla_path.py",
                 "test_fuzz_deformable.py", "test_box_derivatives.py", "test_nms.py",
                 "test_forward.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's controller
        config.option.loadscopereorder = False


def _file_rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: each file's own order is kept
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and jax[cuda13]")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _has_gpu_schedule():
    return importlib.util.find_spec("jax_psroi._gpu_schedule_testing") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if item.get_closest_marker("gpu_schedule") and not _has_gpu_schedule():
        from cases import GPU_SCHEDULE_MISSING
        pytest.fail(GPU_SCHEDULE_MISSING, pytrace=False)
