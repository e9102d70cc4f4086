"""Test configuration: float64 on, GPU tests skipped where there is no GPU.

Which device a test checks: JAX's default device (the GPU where there is one)
for properties that must hold on every backend; the CPU, named explicitly
(inputs committed to jax.devices("cpu")), for CPU properties such as the
bitwise-deterministic backward and the test-only GPU-schedule targets; the
GPU only in tests marked `gpu`.
"""

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
