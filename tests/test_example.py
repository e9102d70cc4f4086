"""The main example, examples/light_head_rcnn.py: its box helpers on
hand-made cases, and short runs (training, saving, --eval-only, bfloat16)."""

import importlib.util
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "light_head_rcnn.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("light_head_rcnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    # Registered as an imported module is: dataclasses (Flax modules) look
    # their string annotations up in it.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_box_iou(example):
    a = jnp.array([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    b = jnp.array([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    np.testing.assert_allclose(example.box_iou(a, b),
                               [[1 / 7, 1, 0], [0, 1 / 4, 0]], rtol=1e-6)


def test_encode_and_decode(example):
    reference = jnp.array([[10.0, 20, 30, 60]])       # centre (20, 40), 20 x 40
    same = example.encode(reference, reference)
    np.testing.assert_allclose(same, [[0, 0, 0, 0]], atol=1e-7)
    moved = jnp.array([[20.0, 20, 40, 60]])          # half a width right
    np.testing.assert_allclose(example.encode(moved, reference), [[0.5, 0, 0, 0]], atol=1e-6)
    doubled = jnp.array([[0.0, 0, 40, 80]])          # twice the size, same centre
    np.testing.assert_allclose(example.encode(doubled, reference, (10, 10, 5, 5)),
                               [[0, 0, 5 * np.log(2), 5 * np.log(2)]], rtol=1e-6)
    boxes = jnp.array([[3.0, 4, 17, 50], [0, 0, 128, 128]])
    anchors = jnp.array([[0.0, 0, 16, 16], [40, 40, 88, 88]])
    for weights in ((1, 1, 1, 1), (10, 10, 5, 5)):
        np.testing.assert_allclose(
            example.decode(example.encode(boxes, anchors, weights), anchors, weights), boxes,
            rtol=1e-5, atol=1e-4)


def test_proposals_are_the_nms_survivors_that_are_not_small(example):
    def anchor(row, column, size):  # example.anchors()'s order; sizes 16, 28, 48
        return (row * 16 + column) * 3 + size

    # Every anchor shrunk to under 4 pixels (no proposal: score -inf) but four.
    anchors = np.asarray(example.anchors())
    a28, a48, b28, c48 = anchor(5, 5, 1), anchor(5, 5, 2), anchor(10, 3, 1), anchor(2, 12, 2)
    deltas = np.tile(np.array([0, 0, np.log(1 / 24), np.log(1 / 24)], np.float32),
                     (len(anchors), 1))
    deltas[[a48, b28, c48]] = 0
    deltas[a28, 2:] = np.log(48 / 28)  # grown into anchor a48's box
    objectness = np.random.default_rng(0).uniform(-1, 1, len(anchors)).astype(np.float32)
    objectness[[a28, a48, b28, c48]] = [5, 4, 3, 2]
    boxes, real = example.proposals(jnp.asarray(objectness), jnp.asarray(deltas), 6)
    # a48 is suppressed by a28 (the same box); the small boxes survive NMS
    # but are not real, nor are the pads.
    np.testing.assert_array_equal(real, [True, True, True, False, False, False])
    np.testing.assert_allclose(boxes[:3], [[20, 20, 68, 68], [14, 70, 42, 98],
                                           [76, 0, 124, 44]], atol=1e-4)
    assert np.isfinite(np.asarray(boxes)).all()


def test_training_run_saves_and_reloads(example, tmp_path):
    summary = example.main(["--steps", "30", "--batch", "2", "--eval-scenes", "8",
                            "--out", str(tmp_path)])
    assert "jax_psroi_ps_roi_align_forward_nhwc_f32" in summary["custom_calls"]
    assert "jax_psroi_ps_roi_align_backward_nhwc_f32" in summary["custom_calls"]
    losses = summary["losses"]
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert (tmp_path / "params.npz").exists() and (tmp_path / "detections.png").exists()
    assert 0 <= summary["map_50"] <= 1 and 0 <= summary["map"] <= summary["map_50"]
    # The saved parameters, reloaded, detect the same.
    reloaded = example.main(["--eval-only", "--eval-scenes", "8", "--out", str(tmp_path)])
    assert reloaded["map_50"] == summary["map_50"] and reloaded["map"] == summary["map"]


def test_deformable_head_learns_its_offsets(example, tmp_path):
    summary = example.main(["--steps", "30", "--batch", "2", "--eval-scenes", "4",
                            "--head", "deformable", "--out", str(tmp_path)])
    for direction in ("forward", "backward"):
        assert f"jax_psroi_deform_ps_roi_align_{direction}_nhwc_f32" in summary["custom_calls"]
    assert np.isfinite(summary["losses"]).all()
    assert np.mean(summary["losses"][-5:]) < np.mean(summary["losses"][:5])
    saved = np.load(tmp_path / "params.npz")
    offset_kernels = [saved[name] for name in saved.files if "offset_map" in name]
    # Zero at initialization; the offsets' gradient moved them.
    assert offset_kernels and max(np.abs(k).max() for k in offset_kernels) > 0


def test_bfloat16_run_uses_the_16_bit_kernels(example, tmp_path):
    summary = example.main(["--steps", "2", "--batch", "2", "--eval-scenes", "4",
                            "--dtype", "bfloat16", "--out", str(tmp_path)])
    assert "jax_psroi_ps_roi_align_forward_nhwc_bf16" in summary["custom_calls"]
    assert "jax_psroi_ps_roi_align_backward_nhwc_bf16" in summary["custom_calls"]
    assert np.isfinite(summary["losses"]).all()


def test_help_explains_the_flags(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--batch", "--seed", "--out", "--dtype", "--head", "--eval-only"):
        assert flag in text
