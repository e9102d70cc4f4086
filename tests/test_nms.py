"""Non-maximum suppression (jax_psroi.nms, batched_nms) and the box utilities.

The oracles: hand-computed cases, a greedy numpy loop written from
torchvision's CPU kernel, and torchvision's own results
(tests/fixtures/golden_nms.npz, made by tests/fixtures/make_golden_nms.py;
torchvision is not needed to run these tests). Every implementation is
checked: the native CPU kernel, the XLA formulation other platforms run,
and the CUDA kernels' schedule (lib/nms_schedule.h: bitmask tiles, then
the scan) that the test rig runs serially on the CPU.
"""

import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_psroi
from jax_psroi import _extension, _nms

from cases import nms_on_gpu_schedule, nms_schedule_target
from loop_reference import greedy_nms

GOLDEN = np.load(pathlib.Path(__file__).parent / "fixtures" / "golden_nms.npz")
GOLDEN_CASES = sorted({key.split("/")[0] for key in GOLDEN.files})
IMPLEMENTATIONS = ["native", "xla",
                   pytest.param("gpu_schedule", marks=pytest.mark.gpu_schedule)]
DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request, monkeypatch):
    # The rig: the CPU's native lowering runs the CUDA kernels' schedule.
    monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION",
                       "native" if request.param == "gpu_schedule" else request.param)
    if request.param != "gpu_schedule":
        yield request.param
        return
    with nms_on_gpu_schedule():
        yield request.param


def kept(indices, count):
    indices, count = np.asarray(indices), int(count)
    assert np.all(indices[count:] == -1), "padding after the kept boxes must be -1"
    assert np.all(indices[:count] >= 0)
    return indices[:count]


def random_boxes(rng, n, extent=100.0, size=(5.0, 40.0)):
    x1, y1 = rng.uniform(0, extent, (2, n))
    w, h = rng.uniform(*size, (2, n))
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def crowded_boxes(rng, n, objects=6):
    centres = random_boxes(rng, objects, size=(20.0, 60.0))
    return (centres[rng.integers(0, objects, n)]
            + rng.normal(0, 3, (n, 4))).astype(np.float32)


# --- Hand-computed cases ------------------------------------------------------

def test_hand_computed(implementation):
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]],
                     np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    # IoU(box 0 or 3, box 1) = 81 / 119 = 0.68; boxes 0 and 3 are the same.
    indices, count = jax_psroi.nms(boxes, scores, 0.5, 4)
    np.testing.assert_array_equal(indices, [3, 2, -1, -1])
    assert int(count) == 2 and indices.dtype == jnp.int32 and count.shape == ()
    indices, count = jax_psroi.nms(boxes, scores, 0.7, 4)
    np.testing.assert_array_equal(indices, [3, 1, 2, -1])
    indices, count = jax_psroi.nms(boxes, scores, 0.7, 2)
    np.testing.assert_array_equal(indices, [3, 1])
    assert int(count) == 2
    indices, count = jax_psroi.nms(boxes, scores, 0.7)
    assert indices.shape == (4,) and int(count) == 3


def test_threshold_is_strict(implementation):
    # IoU exactly 1/2: kept at threshold 0.5, suppressed below it.
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)
    scores = np.array([1.0, 0.5], np.float32)
    np.testing.assert_array_equal(jax_psroi.nms(boxes, scores, 0.5)[0], [0, 1])
    np.testing.assert_array_equal(jax_psroi.nms(boxes, scores, 0.4999)[0], [0, -1])


def test_threshold_compared_in_float64(implementation):
    # IoU 0.7f (0.699999988...) is not above 0.7 in float64, though float32(0.7)
    # equals it: torchvision compares as double.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 7, 10]], np.float32)
    scores = np.array([1.0, 0.5], np.float32)
    np.testing.assert_array_equal(jax_psroi.nms(boxes, scores, 0.7)[0], [0, 1])
    np.testing.assert_array_equal(jax_psroi.nms(boxes, scores, 0.6999999)[0], [0, -1])


@pytest.mark.parametrize("dtype, threshold", [(np.float32, -1e-40), (np.float64, -1e-310),
                                              (np.float16, -1e-40)])
def test_negative_subnormal_threshold_suppresses_boxes_of_iou_0(implementation, dtype,
                                                                threshold):
    # Disjoint boxes have IoU 0 > threshold: torchvision keeps only the best.
    # XLA's CPU runtime flushes subnormals, so the threshold read as 0 kept all.
    boxes = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [5, 5, 6, 6]], dtype)
    scores = np.array([0.5, 0.9, 0.7], dtype)
    np.testing.assert_array_equal(jax_psroi.nms(boxes, scores, threshold)[0], [1, -1, -1])
    np.testing.assert_array_equal(jax_psroi.nms(boxes, scores, -0.0)[0], [1, 2, 0])


def test_ties_nan_and_infinite_scores(implementation):
    boxes = np.array([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(7)], np.float32)
    scores = np.array([0.5, np.nan, 0.7, np.nan, -np.inf, np.inf, 0.5], np.float32)
    # NaN first in index order, then +inf, descending, ties in index order.
    np.testing.assert_array_equal(jax_psroi.nms(boxes, scores, 0.5)[0], [1, 3, 5, 2, 0, 6, 4])
    zeros = np.array([-0.0, 0.0, -0.0], np.float32)
    np.testing.assert_array_equal(jax_psroi.nms(boxes[:3], zeros, 0.5)[0], [0, 1, 2])


def test_degenerate_boxes_neither_suppress_nor_are_suppressed(implementation):
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10], [10, 0, 0, 10],
                      [0, 10, 10, 0], [0, 0, 10, 10], [np.nan, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], np.float32)
    # Box 5 is box 2 again: the only suppression.
    indices, count = jax_psroi.nms(boxes, scores, 0.0)
    np.testing.assert_array_equal(kept(indices, count), [0, 1, 2, 3, 4, 6])


def test_batched_nms_keeps_categories_apart(implementation):
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]],
                     np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    indices, count = jax_psroi.batched_nms(boxes, scores, np.array([0, 1, 0, 1]), 0.5, 4)
    np.testing.assert_array_equal(indices, [3, 0, -1, -1])
    indices, count = jax_psroi.batched_nms(boxes, scores, np.array([0, 1, 2, 3]), 0.5, 3)
    np.testing.assert_array_equal(indices, [3, 0, 1])
    assert int(count) == 3
    # 64-bit ids that an int32 cast would wrap onto each other stay apart
    # (ranked); 32-bit ones past int32 too (cast one to one).
    for ids in (np.array([0, 2**32, 0, 2**32 + 1], np.int64),
                np.array([-1, 2**32 - 1, -1, 2**40], np.int64),
                np.array([0, 2**32, 0, 2**63], np.uint64),
                np.array([0, 2**31, 0, 2**32 - 1], np.uint32)):
        indices, count = jax_psroi.batched_nms(boxes, scores, ids, 0.5)
        np.testing.assert_array_equal(indices, [3, 0, 1, -1])


def test_integer_scores_rank_exactly(implementation):
    # Overlapping boxes (IoU 0.68) and a distant one. Rounded to the boxes'
    # float, 2**24 + 1 (float32) and 2049 (float16) would tie with the score
    # below them, and the lower index would win the tie.
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    cases = [(np.float32, np.array([2**24, 2**24 + 1, 5], np.int32), [1, 2, -1]),
             (np.float16, np.array([2048, 2049, 0], np.int32), [1, 2, -1]),
             (jnp.bfloat16, np.array([-300, -299, -301], np.int16), [1, 2, -1]),
             (np.float32, np.array([7, 7, 9], np.uint8), [2, 0, -1]),  # tie: index order
             (np.float32, np.array([True, False, True]), [0, 2, -1])]
    for dtype, scores, expected in cases:
        indices, count = jax_psroi.nms(boxes.astype(dtype), scores, 0.5, 3)
        np.testing.assert_array_equal(indices, expected, err_msg=f"{dtype} {scores}")
        assert int(count) == 2
    # batched_nms ranks them too; categories 0, 1, 0 keep boxes 0 and 1 apart.
    indices, count = jax_psroi.batched_nms(
        boxes, np.array([2**24, 2**24 + 1, 2**24 + 2], np.int32), np.array([0, 1, 0]), 0.5)
    np.testing.assert_array_equal(indices, [2, 1, 0])


def test_64_bit_integers_without_x64_are_ranked_not_wrapped(implementation):
    # jnp.asarray would wrap NumPy int64 to int32 with jax_enable_x64 off:
    # 2**32 onto 0 (one category; a score below 1).
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    with jax.enable_x64(False):
        indices, _ = jax_psroi.batched_nms(boxes, np.ones(3, np.float32),
                                           np.array([0, 2**32, 0], np.int64), 0.5)
        np.testing.assert_array_equal(indices, [0, 1, 2])
        indices, _ = jax_psroi.nms(boxes, np.array([2**32, 1, 2**40], np.int64), 0.5)
        np.testing.assert_array_equal(indices, [2, 0, -1])
        indices, _ = jax_psroi.nms(boxes, [2**32 + 1, 2**32, 0], 0.5)  # Python ints
        np.testing.assert_array_equal(indices, [0, 2, -1])


def test_empty(implementation):
    indices, count = jax_psroi.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5, 3)
    np.testing.assert_array_equal(indices, [-1, -1, -1])
    assert int(count) == 0
    boxes = random_boxes(np.random.default_rng(0), 5)
    indices, count = jax_psroi.nms(boxes, np.ones(5, np.float32), 0.5, 0)
    assert indices.shape == (0,) and int(count) == 0


# --- torchvision's results ----------------------------------------------------

def test_golden_cover_the_cases():
    assert {"random", "crowded", "identical", "tied", "degenerate", "huge", "special_scores",
            "batched"} <= set(GOLDEN_CASES)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_torchvision(case, implementation):
    boxes, scores = GOLDEN[f"{case}/boxes"], GOLDEN[f"{case}/scores"]
    threshold = float(GOLDEN[f"{case}/threshold"])
    expected = GOLDEN[f"{case}/keep"]
    if f"{case}/idxs" in GOLDEN:
        indices, count = jax_psroi.batched_nms(boxes, scores, GOLDEN[f"{case}/idxs"], threshold)
    else:
        indices, count = jax_psroi.nms(boxes, scores, threshold)
    np.testing.assert_array_equal(kept(indices, count), expected)
    # Cut short: the best max_output_size of the same.
    size = max(1, len(expected) // 2)
    if f"{case}/idxs" not in GOLDEN:
        indices, count = jax_psroi.nms(boxes, scores, threshold, size)
        np.testing.assert_array_equal(kept(indices, count), expected[:size])


# --- The greedy loop on generated inputs ----------------------------------------

def _generated(kind, rng, n):
    if kind == "random":
        return random_boxes(rng, n), rng.uniform(size=n).astype(np.float32)
    if kind == "crowded":
        return crowded_boxes(rng, n), rng.uniform(size=n).astype(np.float32)
    if kind == "identical":
        return np.tile([[3.0, 4.0, 30.0, 40.0]], (n, 1)).astype(np.float32), \
            rng.uniform(size=n).astype(np.float32)
    if kind == "tied":
        return np.round(crowded_boxes(rng, n) * 4) / 4, \
            (rng.integers(0, 3, n) / 3).astype(np.float32)
    if kind == "degenerate":
        boxes = crowded_boxes(rng, n)
        boxes[::3, 2] = boxes[::3, 0] - rng.uniform(0, 5, len(boxes[::3]))
        boxes[1::5, 3] = boxes[1::5, 1]
        return boxes, rng.uniform(size=n).astype(np.float32)
    if kind == "huge":
        return random_boxes(rng, n, extent=3e7, size=(1e6, 1e7)), \
            rng.uniform(size=n).astype(np.float32)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "crowded", "identical", "tied", "degenerate",
                                  "huge"])
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_matches_greedy_loop(kind, threshold, implementation):
    # Not hash(): a string's is salted per process, so a failure would not
    # reproduce.
    rng = np.random.default_rng(zlib.crc32(f"{kind} {threshold}".encode()))
    boxes, scores = _generated(kind, rng, 257)
    for max_output in (None, 5):
        indices, count = jax_psroi.nms(boxes, scores, threshold, max_output)
        np.testing.assert_array_equal(kept(indices, count),
                                      greedy_nms(boxes, scores, threshold,
                                                       max_output=max_output))
    idxs = rng.integers(0, 4, len(scores))
    indices, count = jax_psroi.batched_nms(boxes, scores, idxs, threshold)
    np.testing.assert_array_equal(kept(indices, count),
                                  greedy_nms(boxes, scores, threshold, idxs))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dtypes_compute_in_float32_or_wider(dtype, implementation):
    rng = np.random.default_rng(7)
    boxes, scores = crowded_boxes(rng, 300), rng.uniform(size=300).astype(np.float32)
    boxes, scores = jnp.asarray(boxes, dtype), jnp.asarray(scores, dtype)
    indices, count = jax_psroi.nms(boxes, scores, 0.6)
    # The reference on the values the dtype holds.
    expected = greedy_nms(np.asarray(boxes.astype(jnp.float64 if dtype == jnp.float64
                                                        else jnp.float32)),
                                np.asarray(scores.astype(jnp.float32)), 0.6)
    np.testing.assert_array_equal(kept(indices, count), expected)


# --- Transformations ----------------------------------------------------------

def test_vmap_is_a_loop_of_calls(implementation):
    rng = np.random.default_rng(3)
    boxes = np.stack([crowded_boxes(rng, 120) for _ in range(4)])
    scores = rng.uniform(size=(4, 120)).astype(np.float32)
    idxs = rng.integers(0, 3, (4, 120))
    batched = jax.vmap(lambda b, s, i: jax_psroi.batched_nms(b, s, i, 0.5, 40))
    indices, counts = batched(boxes, scores, idxs)
    for k in range(4):
        one, count = jax_psroi.batched_nms(boxes[k], scores[k], idxs[k], 0.5, 40)
        np.testing.assert_array_equal(indices[k], one)
        assert int(counts[k]) == int(count)
    # Unmapped scores are shared; nested vmaps fold into one call.
    shared = jax.vmap(lambda b: jax_psroi.nms(b, scores[0], 0.5, 40))(boxes)
    for k in range(4):
        np.testing.assert_array_equal(shared[0][k], jax_psroi.nms(boxes[k], scores[0], 0.5,
                                                                  40)[0])
    nested = jax.vmap(jax.vmap(lambda b, s: jax_psroi.nms(b, s, 0.5, 40)))(
        boxes.reshape(2, 2, 120, 4), scores.reshape(2, 2, 120))
    np.testing.assert_array_equal(nested[0].reshape(4, 40), batched(boxes, scores, 0 * idxs)[0])


def test_vmap_is_one_kernel_call():
    boxes = jnp.zeros((8, 50, 4), jnp.float32)
    scores = jnp.zeros((8, 50), jnp.float32)
    text = jax.jit(jax.vmap(lambda b, s: jax_psroi.nms(b, s, 0.5, 10))).lower(
        boxes, scores).as_text()
    assert text.count("jax_psroi_nms_f32") == 1


def test_jit_and_static_arguments():
    rng = np.random.default_rng(4)
    boxes, scores = crowded_boxes(rng, 100), rng.uniform(size=100).astype(np.float32)
    jitted = jax.jit(jax_psroi.nms, static_argnums=(2, 3))
    np.testing.assert_array_equal(jitted(boxes, scores, 0.5, 20)[0],
                                  jax_psroi.nms(boxes, scores, 0.5, 20)[0])
    with pytest.raises(TypeError, match="iou_threshold must be a static"):
        jax.jit(jax_psroi.nms)(boxes, scores, 0.5, 20)
    with pytest.raises(TypeError, match="max_output_size must be a static"):
        jax.jit(jax_psroi.nms, static_argnums=2)(boxes, scores, 0.5, 20)


def test_argument_errors():
    boxes, scores = np.zeros((5, 4), np.float32), np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\]"):
        jax_psroi.nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        jax_psroi.nms(boxes, scores[:4], 0.5)
    with pytest.raises(TypeError, match="floating point"):
        jax_psroi.nms(boxes.astype(np.int32), scores.astype(np.int32), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        jax_psroi.nms(boxes, scores, float("nan"))
    with pytest.raises(TypeError, match="real number"):
        jax_psroi.nms(boxes, scores, "0.5")
    with pytest.raises(ValueError, match=">= 0"):
        jax_psroi.nms(boxes, scores, 0.5, -1)
    with pytest.raises(TypeError, match="must be an int"):
        jax_psroi.nms(boxes, scores, 0.5, 2.5)
    with pytest.raises(TypeError, match="must be an int"):
        jax_psroi.nms(boxes, scores, 0.5, True)
    with pytest.raises(TypeError, match="idxs must be integers"):
        jax_psroi.batched_nms(boxes, scores, scores, 0.5)
    with pytest.raises(ValueError, match="idxs must have shape"):
        jax_psroi.batched_nms(boxes, scores, np.zeros(4, np.int32), 0.5)


def test_native_and_xla_formulations_agree(monkeypatch):
    rng = np.random.default_rng(5)
    boxes = np.stack([crowded_boxes(rng, 500), random_boxes(rng, 500)])
    scores = rng.uniform(size=(2, 500)).astype(np.float32)
    idxs = rng.integers(0, 6, (2, 500))
    call = jax.jit(jax.vmap(lambda b, s, i: jax_psroi.batched_nms(b, s, i, 0.45, 100)))
    native = call(boxes, scores, idxs)
    monkeypatch.setenv("JAX_PSROI_IMPLEMENTATION", "xla")
    text = jax.jit(lambda b, s, i: jax_psroi.batched_nms(b, s, i, 0.45, 100)).lower(
        boxes[0], scores[0], idxs[0]).as_text()
    assert "jax_psroi_nms" not in text
    xla = jax.jit(jax.vmap(lambda b, s, i: jax_psroi.batched_nms(b, s, i, 0.45, 100)))(
        boxes, scores, idxs)
    np.testing.assert_array_equal(native[0], xla[0])
    np.testing.assert_array_equal(native[1], xla[1])


def test_export_for_cpu():
    rng = np.random.default_rng(6)
    boxes, scores = crowded_boxes(rng, 64), rng.uniform(size=64).astype(np.float32)
    exported = jax.export.export(
        jax.jit(lambda b, s: jax_psroi.nms(b, s, 0.5, 16)), platforms=["cpu"],
        disabled_checks=jax_psroi.export_safety_checks())(boxes, scores)
    assert "jax_psroi_nms_f32" in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    np.testing.assert_array_equal(restored.call(boxes, scores)[0],
                                  jax_psroi.nms(boxes, scores, 0.5, 16)[0])


def test_export_safety_checks_name_the_nms_targets():
    names = {str(check) for check in jax_psroi.export_safety_checks()}
    for target in _extension.NMS_TARGETS["cpu"].values():
        assert any(target in name for name in names)
    assert set(_extension.NMS_TARGETS["cpu"]) == {jnp.dtype(d) for d in DTYPES}


def test_scores_keep_gradients_through_gathered_indices():
    rng = np.random.default_rng(8)
    boxes, scores = crowded_boxes(rng, 30), jnp.asarray(rng.uniform(size=30), jnp.float32)

    def loss(scores):
        indices, _ = jax_psroi.nms(boxes, scores, 0.5, 10)
        return jnp.where(indices >= 0, scores[indices], 0).sum()

    grad = jax.grad(loss)(scores)
    indices, count = jax_psroi.nms(boxes, scores, 0.5, 10)
    expected = np.zeros(30, np.float32)
    expected[kept(indices, count)] = 1
    np.testing.assert_array_equal(grad, expected)


def test_threshold_in_rounds_down():
    assert float(_nms.threshold_in(0.7, np.float32)) <= 0.7
    assert np.nextafter(_nms.threshold_in(0.7, np.float32), np.float32(1)) > 0.7
    assert _nms.threshold_in(0.5, np.float32) == np.float32(0.5)
    assert _nms.threshold_in(0.7, np.float64) == 0.7
    # Negative subnormals become the smallest negative normal; the rest stay.
    assert _nms.threshold_in(-1e-40, np.float32) == -np.finfo(np.float32).tiny
    assert _nms.threshold_in(-1e-310, np.float64) == -np.finfo(np.float64).tiny
    assert _nms.threshold_in(-1e-40, np.float64) == -1e-40
    assert _nms.threshold_in(1e-40, np.float32) == np.float32(1e-40)


# --- Box utilities --------------------------------------------------------------

def test_box_area_and_iou():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [10, 10, 0, 0], [0, 0, 0, 0]],
                     np.float32)
    np.testing.assert_array_equal(jax_psroi.box_area(boxes), [100, 100, 100, 0])
    iou = np.asarray(jax_psroi.box_iou(boxes[:2], boxes))
    np.testing.assert_allclose(iou[0], [1, 25 / 175, 0, 0])
    np.testing.assert_allclose(iou[1], [25 / 175, 1, 0, 0])
    assert np.isnan(jax_psroi.box_iou(boxes[3:], boxes[3:])[0, 0])
    # Widened as torchvision widens them: 16-bit floats to float32, narrow
    # integers to int32 (a 300 x 300 box's area is past float16's range).
    large = np.array([[0, 0, 300, 300], [10, 10, 400, 400], [200, 200, 0, 0]])
    for dtype, wide in ((np.float16, np.float32), (jnp.bfloat16, np.float32),
                        (np.int16, np.int32), (np.uint8, np.int32), (np.int64, np.int64)):
        boxes = jnp.asarray(large if dtype != np.uint8 else large // 2, dtype)
        area = jax_psroi.box_area(boxes)
        assert area.dtype == wide
        np.testing.assert_array_equal(
            area, [90000, 152100, 40000] if dtype != np.uint8 else [22500, 38025, 10000])
    iou = jax_psroi.box_iou(jnp.asarray(large[:2], np.float16), jnp.asarray(large[:2], np.float16))
    assert iou.dtype == np.float32
    np.testing.assert_allclose(iou, [[1, 84100 / 158000], [84100 / 158000, 1]], rtol=1e-6)


def test_box_convert_round_trips():
    xyxy = np.array([[1, 2, 5, 10], [0, 0, 3, 3]], np.float32)
    np.testing.assert_array_equal(jax_psroi.box_convert(xyxy, "xyxy", "xywh"),
                                  [[1, 2, 4, 8], [0, 0, 3, 3]])
    np.testing.assert_array_equal(jax_psroi.box_convert(xyxy, "xyxy", "cxcywh"),
                                  [[3, 6, 4, 8], [1.5, 1.5, 3, 3]])
    for fmt in ("xywh", "cxcywh"):
        there = jax_psroi.box_convert(xyxy, "xyxy", fmt)
        np.testing.assert_allclose(jax_psroi.box_convert(there, fmt, "xyxy"), xyxy)
    np.testing.assert_allclose(
        jax_psroi.box_convert(jax_psroi.box_convert(xyxy, "xyxy", "xywh"), "xywh", "cxcywh"),
        jax_psroi.box_convert(xyxy, "xyxy", "cxcywh"))
    with pytest.raises(ValueError, match="in_fmt"):
        jax_psroi.box_convert(xyxy, "yxyx", "xyxy")


def test_box_convert_of_integer_boxes_gives_a_strong_float():
    # Weakly typed, the float result would take a bfloat16 operand's dtype.
    centred = jnp.array([[1000, 2000, 3, 7]], jnp.int32)
    for fmt, expected in (("xyxy", [[998.5, 1996.5, 1001.5, 2003.5]]),
                          ("xywh", [[998.5, 1996.5, 3, 7]])):
        converted = jax_psroi.box_convert(centred, "cxcywh", fmt)
        assert not converted.weak_type
        assert converted.dtype == jax_psroi.box_convert(centred, "xyxy", "cxcywh").dtype
        np.testing.assert_array_equal(converted + jnp.zeros((), jnp.bfloat16),
                                      np.asarray(expected, converted.dtype))


def test_clip_and_small_boxes():
    boxes = np.array([[-5, -5, 20, 8], [3, 4, 3.5, 30], [1, 1, 4, 4]], np.float32)
    np.testing.assert_array_equal(jax_psroi.clip_boxes_to_image(boxes, (10, 15)),
                                  [[0, 0, 15, 8], [3, 4, 3.5, 10], [1, 1, 4, 4]])
    np.testing.assert_array_equal(jax_psroi.remove_small_boxes(boxes, 1.0), [True, False, True])
    np.testing.assert_array_equal(jax_psroi.remove_small_boxes(boxes, 3.0), [True, False, True])
    np.testing.assert_array_equal(jax_psroi.remove_small_boxes(boxes, 3.5), [True, False, False])
    assert jax.jit(jax_psroi.remove_small_boxes, static_argnums=1)(boxes, 1.0).dtype == bool


def test_clip_does_not_wrap_image_sizes_past_an_integer_dtype():
    # 70000 is -25536 in int16: the boxes, all inside the image, came back
    # clipped to it. Every box of the dtype is inside a larger image.
    boxes = np.array([[-3, -4, 500, 600]], np.int16)
    clipped = jax_psroi.clip_boxes_to_image(boxes, (40000, 70000))
    assert clipped.dtype == np.int16
    np.testing.assert_array_equal(clipped, [[0, 0, 500, 600]])
    boxes = np.array([[0, 0, 250, 255]], np.uint8)
    np.testing.assert_array_equal(jax_psroi.clip_boxes_to_image(boxes, (300, 300)), boxes)
    np.testing.assert_array_equal(jax_psroi.clip_boxes_to_image(boxes, (200, 100)),
                                  [[0, 0, 100, 200]])


# --- The CUDA kernels' schedule (lib/nms_schedule.h) on the test rig ----------

def _overlap_matrix(boxes, categories, threshold):
    """[N, N] bool in float32: box j is suppressed by box i (nms_math.h)."""
    x1, y1, x2, y2 = np.asarray(boxes, np.float32).T
    area = (x2 - x1) * (y2 - y1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # np.maximum and minimum propagate NaN, as max_nan and min_nan.
        w = np.maximum(np.float32(0), np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1))
        h = np.maximum(np.float32(0), np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1))
        inter = w * h
        iou = inter / (area[:, None] + area - inter)
    return (iou.astype(np.float64) > threshold) & (categories[:, None] == categories)


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("n", [1, 63, 64, 65, 130, 200])
def test_gpu_schedule_mask_is_the_upper_triangle_of_64_box_words(n):
    # The workspace the sorted call returns: per image, row block r's rows
    # keep the words of column blocks c >= r, bit j of word (i, c) set when
    # box 64 c + j is later than i and suppressed by it; then the removed
    # bits the scan ends with.
    rng = np.random.default_rng(n)
    images, threshold = 2, 0.4
    boxes = np.stack([crowded_boxes(rng, n, objects=3) for _ in range(images)])
    boxes[0, ::7, 2] = np.nan
    categories = rng.integers(0, 2, (images, n)).astype(np.int32)
    order = np.tile(np.arange(n, dtype=np.int32), (images, 1))
    halves = _nms.workspace_halves(images, n)
    results = (jax.ShapeDtypeStruct((images, 5), jnp.int32),
               jax.ShapeDtypeStruct((images,), jnp.int32),
               jax.ShapeDtypeStruct((halves,), jnp.uint32))
    _, counts, workspace = jax.ffi.ffi_call(nms_schedule_target(np.float32), results)(
        boxes.astype(np.float32), order, categories, iou_threshold=threshold)
    words = np.asarray(workspace).view(np.uint64).reshape(images, -1)
    blocks = -(-n // 64)
    for b in range(images):
        suppressed = _overlap_matrix(boxes[b], categories[b], threshold)
        suppressed &= np.arange(n)[None, :] > np.arange(n)[:, None]
        at = 0
        for r in range(blocks):
            for row in range(64):
                for c in range(r, blocks):
                    i = 64 * r + row
                    expected = 0
                    if i < n:
                        for j in range(64 * c, min(64 * c + 64, n)):
                            expected |= int(suppressed[i, j]) << (j - 64 * c)
                        assert int(words[b, at]) == expected, (b, i, c)
                    at += 1
        assert at + blocks == len(words[b])
        assert 1 <= int(counts[b]) <= 5


@pytest.mark.gpu_schedule
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 129, 700])
def test_gpu_schedule_matches_the_cpu_kernel_across_block_edges(n):
    # Kept boxes cut off by max_output before, at and after a 64-box block's
    # end; several images and categories in one call.
    rng = np.random.default_rng(n + 1)
    boxes = np.stack([crowded_boxes(rng, n, objects=max(1, n // 20)) for _ in range(3)])
    scores = np.round(rng.uniform(size=(3, n)) * 8).astype(np.float32) / 8
    idxs = rng.integers(0, 3, (3, n)).astype(np.int32)
    call = jax.jit(jax.vmap(lambda b, s, i, m: jax_psroi.batched_nms(b, s, i, 0.5, m),
                            in_axes=(0, 0, 0, None)), static_argnums=3)
    for max_output in sorted({0, 1, 37, 63, 64, 65, n, n + 5}):
        expected = call(boxes, scores, idxs, max_output)
        with nms_on_gpu_schedule():
            scheduled = call(boxes, scores, idxs, max_output)
        np.testing.assert_array_equal(scheduled[0], expected[0])
        np.testing.assert_array_equal(scheduled[1], expected[1])


@pytest.mark.gpu_schedule
def test_gpu_schedule_checks_its_workspace():
    boxes = jnp.zeros((1, 70, 4), jnp.float32)
    order = jnp.zeros((1, 70), jnp.int32)
    results = (jax.ShapeDtypeStruct((1, 4), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
               jax.ShapeDtypeStruct((_nms.workspace_halves(1, 70) - 1,), jnp.uint32))
    with pytest.raises(Exception, match="needs a workspace of"):
        jax.ffi.ffi_call(nms_schedule_target(np.float32), results)(
            boxes, order, order, iou_threshold=0.5)
