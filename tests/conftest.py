"""Test configuration: float64 on, GPU tests skipped where there is no GPU.

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


def pytest_collection_modifyitems(config, items):
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
