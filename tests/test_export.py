"""jax.export of programs that call jax_psroi's kernels, with the public
jax_psroi.export_safety_checks(): every operator and its gradient export for
the CPU (and, with the CUDA build, for CPU and CUDA in one program), and the
deserialized program computes what the direct call computes; the README's
example runs as written, in two processes."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_psroi
from jax_psroi import _extension

from cases import random_features, random_rois

README = pathlib.Path(__file__).parents[1] / "README.md"
CUDA_BUILT = bool(_extension.KERNELS["cuda"])

# Every operator on a [2, 8, 12, 10] map (the multi-scale one on it and its
# every other row and column, levels of an image of 24 x 20).
OPERATORS = {
    "ps_roi_align": lambda f, r: jax_psroi.ps_roi_align(f, r, 2, 0.5, 2),
    "roi_align": lambda f, r: jax_psroi.roi_align(f, r, 2, 0.5, -1, True),
    "ps_roi_pool": lambda f, r: jax_psroi.ps_roi_pool(f, r, 2, 0.5),
    "roi_pool": lambda f, r: jax_psroi.roi_pool(f, r, 2, 0.5),
    "multi_scale_roi_align": lambda f, r: jax_psroi.multi_scale_roi_align(
        [f, f[:, :, ::2, ::2]], r, 2, 2, (24, 20), canonical_scale=8),
    "deform_roi_align": lambda f, r: jax_psroi.deform_roi_align(
        f, r, jnp.full((r.shape[0], 2, 2, 2), 0.3, r.dtype), 2, 0.5, 2),
    "deform_ps_roi_align": lambda f, r: jax_psroi.deform_ps_roi_align(
        f, r, jnp.full((r.shape[0], 2, 2, 2), -0.2, r.dtype), 2, 0.5, 2),
}


def test_the_checks_name_every_registered_target_once():
    checks = jax_psroi.export_safety_checks()
    names = [check.is_custom_call() for check in checks]
    expected = ({row.name for tables in (_extension.KERNELS, _extension.DEFORM_KERNELS)
                 for table in tables.values() for row in table.values()}
                | {name for table in _extension.NMS_TARGETS.values() for name in table.values()})
    assert sorted(names) == sorted(expected)
    # The RoI kernel table's rows (a forward and a backward per operator,
    # and the box rows of the two of samples), the deformable operators' (a
    # forward and a backward each) and one NMS target per dtype.
    assert len(names) == (2 * 4 + 2 * 2 + 2 * 2) * len(_extension.SUPPORTED_DTYPES) * len(
        _extension.SUPPORTED_LAYOUTS) + len(_extension.NMS_TARGETS["cpu"])


@pytest.mark.parametrize("platforms", [
    pytest.param(["cpu"], id="cpu"),
    pytest.param(["cpu", "cuda"], id="cpu+cuda", marks=pytest.mark.skipif(
        not CUDA_BUILT, reason="built without CUDA (JAX_PSROI_CUDA=OFF or no nvcc)"))])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_exported_program_computes_what_the_direct_call_computes(name, platforms):
    op = OPERATORS[name]
    rng = np.random.default_rng(41)
    cpu = jax.devices("cpu")[0]
    features, rois = jax.device_put((random_features(rng, 2, 8, 12, 10, np.float32),
                                     random_rois(rng, 9, 2, 12, 10, 0.5, np.float32)), cpu)
    program = jax.jit(lambda f, r: (op(f, r), jax.grad(lambda f: jnp.sum(op(f, r) ** 2))(f)))
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        export.export(program, platforms=platforms)(features, rois)
    exported = export.export(program, platforms=platforms,
                             disabled_checks=jax_psroi.export_safety_checks())(features, rois)
    assert exported.platforms == tuple(platforms)
    calls = re.findall(r"stablehlo.custom_call @(\w+)", exported.mlir_module())
    assert calls and all(call.startswith("jax_psroi_") for call in calls)
    restored = export.deserialize(exported.serialize())
    out, grad = restored.call(features, rois)  # the cpu branch: the inputs live there
    expected_out, expected_grad = program(features, rois)
    assert np.abs(np.asarray(expected_out)).max() > 0.01
    assert np.abs(np.asarray(expected_grad)).max() > 0.01
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_array_equal(grad, expected_grad)


def _readme_example():
    """The two Python blocks after the README's export-example marker."""
    text = README.read_text().split("<!-- export-example -->", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return blocks[0], blocks[1]


def _run(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_readme_example_exports_and_another_process_calls_it(tmp_path):
    export_code, load_code = _readme_example()
    # The exporting process also keeps the direct call's result to compare.
    result = _run(export_code + "np.save('expected.npy', np.asarray(pool(features, boxes)))\n",
                  tmp_path)
    assert result.returncode == 0, result.stderr
    result = _run(load_code + "np.save('out.npy', np.asarray(out))\n", tmp_path)
    assert result.returncode == 0, result.stderr
    out, expected = np.load(tmp_path / "out.npy"), np.load(tmp_path / "expected.npy")
    assert out.shape == (1, 2, 7, 7) and np.abs(expected).max() > 0.01
    np.testing.assert_array_equal(out, expected)
    # Without the import, XLA does not know the kernels the program calls.
    without_import = load_code.replace("import jax_psroi", "pass  # import jax_psroi")
    result = _run(without_import, tmp_path)
    assert result.returncode != 0
    assert "No FFI handler registered" in result.stderr, result.stderr
