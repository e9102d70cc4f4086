"""A Light-Head R-CNN that learns to detect handwritten digits, in Flax.

A complete two-stage detector whose second stage pools proposals with
jax_psroi's position-sensitive RoI Align:

  * data: scenes of 128 x 128 pixels composed from the 1,797 real
    handwritten-digit scans that scikit-learn ships (no download): 3 to 6
    digits per scene, 16 to 48 pixels tall, on noise with clutter (strokes
    and dots that are not digits). The held-out scenes are made from a
    held-out fifth of the scans, with their own seed.
  * model: a small convolutional backbone (NHWC, stride 8); a region
    proposal network (3 anchor sizes per position, objectness and box
    deltas, top-k and ``jax_psroi.nms`` under jit); and a
    Light-Head R-CNN head: a thin position-sensitive score map (10 x 7 x 7
    channels) pooled by ``jax_psroi.flax.linen.PSRoIAlign`` (7 x 7 bins,
    sampling ratio 2), then one hidden layer and class and box layers. With
    ``--head deformable``, a Deformable R-FCN-style head instead: a second
    position-sensitive map of 2 x 7 x 7 channels, pooled by PSRoIAlign,
    gives every bin of every proposal an offset (zero at initialization),
    and ``jax_psroi.flax.linen.DeformPSRoIAlign`` pools the thin map from
    the moved bins; the offsets learn through the operator's exact
    derivatives with respect to them.
  * training: the detector is written per image and ``jax.vmap``-ed over the
    batch; one step is ``jax.jit(jax.value_and_grad(...))`` with optax's
    AdamW. The pooling and its gradient run as jax_psroi's native kernels
    (checked on the compiled step).
  * evaluation: the held-out scenes scored by pycocotools' COCO evaluator;
    the last line printed is ``mAP@.5 = ...``.

It writes to --out: ``params.npz`` (reload with --eval-only), and
``detections.png`` (the loss curve and held-out scenes with true boxes in
green and detections in red).

Run:  python examples/light_head_rcnn.py [--steps N] [--batch B] [--dtype bfloat16]
                                         [--head light|deformable]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_psroi
from jax_psroi.flax.linen import DeformPSRoIAlign, PSRoIAlign

CANVAS = 128            # scenes are CANVAS x CANVAS, one channel
STRIDE = 8              # backbone stride
MAX_DIGITS = 6          # digits per scene: 3 .. MAX_DIGITS
NUM_CLASSES = 10        # digits 0-9; the head adds a background class
ANCHOR_SIZES = (16.0, 28.0, 48.0)
POOL = 7                # PS-RoI Align bins
THIN = 10               # channels per bin of the thin score map
PRE_NMS = 200           # RPN proposals kept before NMS
POST_NMS_TRAIN = 48     # and after it, when training ...
POST_NMS_TEST = 32      # ... and when detecting
DETECTIONS = 16         # detections kept per scene
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # scales of the head's box deltas


# --- Boxes -----------------------------------------------------------------------
# Boxes are (x1, y1, x2, y2) in pixels; deltas (dx, dy, dw, dh) as in
# Faster R-CNN: centre shifts in units of the reference box's size and log
# size ratios, multiplied by `weights`.

def box_iou(a, b):
    """IoU of every box in a [A, 4] with every box in b [B, 4]: [A, B]."""
    area = lambda x: jnp.clip(x[..., 2] - x[..., 0], 0) * jnp.clip(x[..., 3] - x[..., 1], 0)
    lo = jnp.maximum(a[:, None, :2], b[None, :, :2])
    hi = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = jnp.prod(jnp.clip(hi - lo, 0), axis=-1)
    return inter / jnp.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-6)


def _sizes(boxes):
    # At least 1e-3: padding boxes are empty, and their (unused) deltas must
    # stay finite, or a masked loss and its gradient turn NaN.
    return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 1e-3),
            jnp.maximum(boxes[..., 3] - boxes[..., 1], 1e-3))


def encode(boxes, reference, weights=(1.0, 1.0, 1.0, 1.0)):
    """Deltas that take `reference` boxes to `boxes` ([..., 4] each)."""
    w, h = _sizes(reference)
    cx, cy = reference[..., 0] + 0.5 * w, reference[..., 1] + 0.5 * h
    tw, th = _sizes(boxes)
    tx, ty = boxes[..., 0] + 0.5 * tw, boxes[..., 1] + 0.5 * th
    wx, wy, ww, wh = weights
    return jnp.stack([wx * (tx - cx) / w, wy * (ty - cy) / h,
                      ww * jnp.log(tw / w), wh * jnp.log(th / h)], axis=-1)


def decode(deltas, reference, weights=(1.0, 1.0, 1.0, 1.0)):
    """Boxes that `deltas` make of `reference` boxes (the inverse of encode);
    size ratios are clipped at 1000 / 16, as torchvision does."""
    w, h = _sizes(reference)
    cx, cy = reference[..., 0] + 0.5 * w, reference[..., 1] + 0.5 * h
    wx, wy, ww, wh = weights
    limit = np.log(1000.0 / 16)
    dw = jnp.minimum(deltas[..., 2] / ww, limit)
    dh = jnp.minimum(deltas[..., 3] / wh, limit)
    x, y = cx + deltas[..., 0] / wx * w, cy + deltas[..., 1] / wy * h
    half_w, half_h = 0.5 * w * jnp.exp(dw), 0.5 * h * jnp.exp(dh)
    return jnp.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=-1)


def anchors():
    """[A, 4] anchors: every size at every feature pixel's centre."""
    cells = (np.arange(CANVAS // STRIDE) + 0.5) * STRIDE
    cy, cx = np.meshgrid(cells, cells, indexing="ij")
    centres = np.stack([cx, cy], axis=-1).reshape(-1, 1, 2)
    half = np.array(ANCHOR_SIZES).reshape(1, -1, 1) / 2
    boxes = np.concatenate([centres - half, centres + half], axis=-1)
    return jnp.asarray(boxes.reshape(-1, 4), jnp.float32)


# --- Data ------------------------------------------------------------------------

def load_scans(seed):
    """The scikit-learn digit scans in [0, 1], split 4:1 into training and
    held-out scans: ((images [n, 8, 8], labels), (images, labels))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    images = digits.images[order].astype(np.float32) / 16.0
    labels = digits.target[order]
    cut = len(order) * 4 // 5
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def resize(image, size):
    """Bilinear resize of a square image to size x size."""
    n = image.shape[0]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    t = coords - lo
    rows = image[lo] * (1 - t)[:, None] + image[hi] * t[:, None]
    return rows[:, lo] * (1 - t)[None] + rows[:, hi] * t[None]


def make_scene(rng, scans):
    """One scene: image [CANVAS, CANVAS, 1], boxes [MAX_DIGITS, 4], labels
    [MAX_DIGITS] (-1 pads)."""
    images, labels = scans
    canvas = rng.normal(0.0, 0.08, size=(CANVAS, CANVAS)).astype(np.float32)
    # Clutter: strokes and dots that are not digits.
    for _ in range(rng.integers(2, 6)):
        x0, y0 = rng.uniform(0, CANVAS, size=2)
        angle, length = rng.uniform(0, np.pi), rng.uniform(6, 30)
        t = np.linspace(0, 1, 40)
        xs = np.clip((x0 + t * length * np.cos(angle)).astype(int), 0, CANVAS - 1)
        ys = np.clip((y0 + t * length * np.sin(angle)).astype(int), 0, CANVAS - 1)
        canvas[ys, xs] += rng.uniform(0.3, 0.8)
    boxes = np.zeros((MAX_DIGITS, 4), np.float32)
    classes = np.full(MAX_DIGITS, -1, np.int32)
    placed = []
    for i in range(rng.integers(3, MAX_DIGITS + 1)):
        for _ in range(20):  # a free spot, or fewer digits
            size = int(rng.integers(16, 49))
            x, y = rng.integers(0, CANVAS - size + 1, size=2)
            box = np.array([x, y, x + size, y + size], np.float32)
            if all(box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1]
                   for b in placed):
                break
        else:
            break
        k = rng.integers(len(images))
        digit = resize(images[k], size)
        canvas[y:y + size, x:x + size] = np.maximum(canvas[y:y + size, x:x + size], digit)
        # The true box is the ink's extent, not the scan's frame.
        ys, xs = np.nonzero(digit > 0.2)
        boxes[i] = [x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1]
        classes[i] = labels[k]
        placed.append(box)
    return canvas[..., None], boxes, classes


def make_batch(rng, scans, size):
    scenes = [make_scene(rng, scans) for _ in range(size)]
    return tuple(np.stack(parts) for parts in zip(*scenes, strict=True))


# --- Model -----------------------------------------------------------------------

class Backbone(nn.Module):
    """Stride-8 features of a [H, W, 1] scene: [H / 8, W / 8, 128]."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for features, stride in ((32, 2), (64, 2), (96, 2), (128, 1)):
            x = nn.relu(nn.Conv(features, (3, 3), strides=stride, dtype=self.dtype)(x))
        return x


class Detector(nn.Module):
    """RPN and Light-Head R-CNN head over one scene; `head` "deformable":
    its bins moved by learned offsets (Deformable R-FCN)."""

    dtype: jnp.dtype = jnp.float32
    head_kind: str = "light"

    def setup(self):
        self.backbone = Backbone(self.dtype)
        self.rpn_conv = nn.Conv(128, (3, 3), dtype=self.dtype)
        self.rpn_objectness = nn.Conv(len(ANCHOR_SIZES), (1, 1), dtype=self.dtype)
        self.rpn_deltas = nn.Conv(4 * len(ANCHOR_SIZES), (1, 1), dtype=self.dtype)
        # Light-Head's large separable convolution, reduced: (k x 1, 1 x k)
        # and (1 x k, k x 1) branches summed into the thin map.
        self.thin_a = (nn.Conv(64, (7, 1), dtype=self.dtype),
                       nn.Conv(THIN * POOL * POOL, (1, 7), dtype=self.dtype))
        self.thin_b = (nn.Conv(64, (1, 7), dtype=self.dtype),
                       nn.Conv(THIN * POOL * POOL, (7, 1), dtype=self.dtype))
        self.pool = PSRoIAlign(POOL, 1 / STRIDE, 2)  # NHWC
        if self.head_kind == "deformable":
            # Per-bin (x, y) offsets, position-sensitive like the thin map
            # (Deformable R-FCN's offset branch); zero at initialization.
            self.offset_map = nn.Conv(2 * POOL * POOL, (3, 3), dtype=self.dtype,
                                      kernel_init=nn.initializers.zeros)
            self.deform_pool = DeformPSRoIAlign(POOL, 1 / STRIDE, 2, gamma=0.1)
        self.hidden = nn.Dense(256, dtype=self.dtype)
        self.classify = nn.Dense(NUM_CLASSES + 1, dtype=self.dtype)
        self.regress = nn.Dense(4, dtype=self.dtype)

    def features(self, image):
        """Backbone features [h, w, 128], RPN objectness [A] and deltas [A, 4],
        and the thin position-sensitive map [1, h, w, THIN * 49] (deformable head:
        and its offset map, 2 * 49 channels more)."""
        x = self.backbone(image[None].astype(self.dtype))
        r = nn.relu(self.rpn_conv(x))
        objectness = self.rpn_objectness(r).reshape(-1).astype(jnp.float32)
        deltas = self.rpn_deltas(r).reshape(-1, 4).astype(jnp.float32)
        thin = self.thin_a[1](self.thin_a[0](x)) + self.thin_b[1](self.thin_b[0](x))
        if self.head_kind == "deformable":  # the offset map rides along
            thin = jnp.concatenate([thin, self.offset_map(x)], axis=-1)
        return objectness, deltas, thin

    def head(self, thin, proposals):
        """Class logits [P, NUM_CLASSES + 1] (0: background) and box deltas
        [P, 4] of proposals [P, 4] on the thin map."""
        if self.head_kind == "deformable":
            thin, offset_map = thin[..., :-2 * POOL * POOL], thin[..., -2 * POOL * POOL:]
            # [P, 7, 7, 2] -> [P, 2, 7, 7]: bin (i, j)'s (x, y) offset.
            offset = self.pool(offset_map, [proposals]).transpose(0, 3, 1, 2)
            pooled = self.deform_pool(thin, [proposals], offset)  # [P, 7, 7, THIN]
        else:
            pooled = self.pool(thin, [proposals])        # [P, 7, 7, THIN]
        h = nn.relu(self.hidden(pooled.reshape(pooled.shape[0], -1)))
        return (self.classify(h).astype(jnp.float32), self.regress(h).astype(jnp.float32))

    def __call__(self, image):
        """Every layer once (what `init` needs): the head on a few anchors."""
        thin = self.features(image)[2]
        return self.head(thin, anchors()[:4])


def proposals(objectness, deltas, keep):
    """RPN proposals of one scene: [keep, 4] boxes and whether each is real."""
    boxes = jnp.clip(decode(deltas, anchors()), 0, CANVAS)
    # The PRE_NMS best, as lax.top_k picks them (ties: lower index first), by
    # a stable sort: XLA's SPMD partitioner splits a sort over its batch but
    # gathers a top_k's operand to every device (sharded_training.py).
    top = jnp.argsort(-objectness, stable=True)[:PRE_NMS]
    scores = objectness[top]
    boxes = boxes[top]
    small = (boxes[:, 2] - boxes[:, 0] < 4) | (boxes[:, 3] - boxes[:, 1] < 4)
    scores = jnp.where(small, -jnp.inf, scores)
    index, count = jax_psroi.nms(boxes, scores, 0.7, keep)
    # Small boxes (score -inf) survive NMS after every other, as in
    # torchvision, but are no proposals; pads (-1) take box 0 and are none
    # either.
    index = jnp.where(index < 0, 0, index)
    real = (jnp.arange(keep) < count) & jnp.isfinite(scores[index])
    # Detached, as torchvision's R-CNNs detach their proposals: jax_psroi's
    # RoI operators differentiate their boxes, which would otherwise pass
    # the head's loss back into the RPN's box deltas.
    return jax.lax.stop_gradient(boxes[index]), real


def smooth_l1(x, beta=1.0 / 9):
    x = jnp.abs(x)
    return jnp.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def scene_loss(model, params, image, true_boxes, true_classes):
    """RPN and head losses of one scene (true_classes -1 pads)."""
    objectness, deltas, thin = model.apply(params, image, method=Detector.features)
    real = true_classes >= 0
    grid = anchors()

    # RPN: anchors overlapping a digit by >= 0.5 IoU, and each digit's best
    # anchor, are positive; those under 0.3 negative. Positives and negatives
    # weigh half each.
    iou = jnp.where(real[None], box_iou(grid, true_boxes), -1.0)
    best = iou.max(axis=1)
    matched = iou.argmax(axis=1)
    is_best = (iou == iou.max(axis=0, keepdims=True)) & real[None] & (iou > 0.1)
    positive = (best >= 0.5) | is_best.any(axis=1)
    negative = (best < 0.3) & ~positive
    bce = optax.sigmoid_binary_cross_entropy(objectness, positive.astype(jnp.float32))
    rpn_class = (jnp.sum(bce * positive) / jnp.maximum(positive.sum(), 1)
                 + jnp.sum(bce * negative) / jnp.maximum(negative.sum(), 1)) / 2
    targets = encode(true_boxes[matched], grid)
    box_error = smooth_l1(deltas - targets).sum(-1)
    rpn_box = jnp.sum(jnp.where(positive, box_error, 0)) / jnp.maximum(positive.sum(), 1)

    # Head: the proposals plus the true boxes; >= 0.5 IoU with a digit takes
    # its class, under 0.4 is background, in between is not trained.
    boxes, proposed = proposals(objectness, deltas, POST_NMS_TRAIN)
    boxes = jnp.concatenate([boxes, jnp.where(real[:, None], true_boxes, 0.0)])
    valid = jnp.concatenate([proposed, real])
    iou = jnp.where(real[None], box_iou(boxes, true_boxes), -1.0)
    best, matched = iou.max(axis=1), iou.argmax(axis=1)
    foreground = valid & (best >= 0.5)
    background = valid & (best < 0.4)
    labels = jnp.where(foreground, true_classes[matched] + 1, 0)
    logits, box_deltas = model.apply(params, thin, boxes, method=Detector.head)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    trained = foreground | background
    head_class = jnp.sum(jnp.where(trained, ce, 0)) / jnp.maximum(trained.sum(), 1)
    targets = encode(true_boxes[matched], boxes, BOX_WEIGHTS)
    box_error = smooth_l1(box_deltas - targets).sum(-1)
    head_box = jnp.sum(jnp.where(foreground, box_error, 0)) / jnp.maximum(foreground.sum(), 1)
    return rpn_class + rpn_box + head_class + head_box


def detect(model, params, image):
    """Detections of one scene: boxes [DETECTIONS, 4], scores, labels (0-9);
    score 0 pads."""
    objectness, deltas, thin = model.apply(params, image, method=Detector.features)
    boxes, real = proposals(objectness, deltas, POST_NMS_TEST)
    logits, box_deltas = model.apply(params, thin, boxes, method=Detector.head)
    probs = jax.nn.softmax(logits)[:, 1:]
    labels = probs.argmax(axis=1)
    scores = jnp.where(real, probs.max(axis=1), -jnp.inf)
    boxes = jnp.clip(decode(box_deltas, boxes, BOX_WEIGHTS), 0, CANVAS)
    # Per-class NMS: boxes of different classes never suppress each other.
    index, _ = jax_psroi.batched_nms(boxes, scores, labels, 0.5, DETECTIONS)
    # Padding proposals (score -inf) come last and are no detections.
    kept = (index >= 0) & jnp.isfinite(scores[index])
    return boxes[index], jnp.where(kept, scores[index], 0.0), labels[index]


# --- Evaluation --------------------------------------------------------------------

def coco_map(true_boxes, true_classes, boxes, scores, labels):
    """COCO mAP@[.5:.95] and mAP@.5 of detections on scenes (pycocotools)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    images, annotations, detections = [], [], []
    for i in range(len(true_boxes)):
        images.append({"id": i, "width": CANVAS, "height": CANVAS})
        for box, cls in zip(true_boxes[i], true_classes[i], strict=True):
            if cls >= 0:
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append({"id": len(annotations) + 1, "image_id": i,
                                    "category_id": int(cls) + 1, "bbox": xywh(box),
                                    "area": float(w * h), "iscrowd": 0})
        for box, score, label in zip(boxes[i], scores[i], labels[i], strict=True):
            if score > 0:
                detections.append({"image_id": i, "category_id": int(label) + 1,
                                   "bbox": xywh(box), "score": float(score)})
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations,
                     "categories": [{"id": c + 1, "name": str(c)} for c in range(10)]}
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        found = truth.loadRes(detections) if detections else COCO()
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


# --- Saving and the picture ----------------------------------------------------------

def save_params(params, path):
    flat = {"/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(v)
            for keys, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(path, **flat)


def load_params(template, path):
    stored = np.load(path)
    leaves = [stored["/".join(str(getattr(k, "key", k)) for k in keys)]
              for keys, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    return jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(v) for v in leaves])


def draw(path, losses, scenes, found, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, true_boxes, true_classes = scenes
    boxes, scores, labels = found
    fig = plt.figure(figsize=(13, 7))
    grid = fig.add_gridspec(2, 5)
    ax = fig.add_subplot(grid[:, :2])
    if len(losses):
        ax.plot(losses, alpha=0.3, color="C0")
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, color="C0")
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    for n in range(min(6, len(images))):
        ax = fig.add_subplot(grid[n // 3, 2 + n % 3])
        ax.imshow(images[n, ..., 0], cmap="gray")
        for box, cls in zip(true_boxes[n], true_classes[n], strict=True):
            if cls >= 0:
                ax.add_patch(plt.Rectangle(box[:2], *(box[2:] - box[:2]), fill=False,
                                           color="lime", lw=1))
        for box, score, label in zip(boxes[n], scores[n], labels[n], strict=True):
            if score > 0.5:
                ax.add_patch(plt.Rectangle(box[:2], *(box[2:] - box[:2]), fill=False,
                                           color="red", lw=1))
                ax.text(box[0], box[1] - 2, f"{label} {score:.2f}", color="white", fontsize=7,
                        bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "lw": 0})
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- Main --------------------------------------------------------------------------

def parse(argv=None):
    parser = argparse.ArgumentParser(
        description="Train and evaluate a Light-Head R-CNN on scenes of handwritten digits "
                    "(scikit-learn's scans); its second stage pools with jax_psroi.")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--batch", type=int, default=8, help="scenes per step (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of scenes, split and init")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("light_head_rcnn_out"),
                        help="where params.npz and detections.png go "
                             "(default ./light_head_rcnn_out)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the network, the thin map and its pooling "
                             "(parameters stay float32)")
    parser.add_argument("--head", choices=("light", "deformable"), default="light",
                        help="the second stage: Light-Head R-CNN's (default) or a Deformable "
                             "R-FCN-style one whose bins learn offsets")
    parser.add_argument("--eval-only", action="store_true",
                        help="load --out/params.npz and evaluate it, without training")
    parser.add_argument("--eval-scenes", type=int, default=300,
                        help="held-out scenes to evaluate (default 300)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    train_scans, held_out_scans = load_scans(args.seed)
    held_out = make_batch(np.random.default_rng(args.seed + 10_000), held_out_scans,
                          args.eval_scenes)
    model = Detector(dtype, args.head)
    params = model.init(jax.random.key(args.seed), held_out[0][0])
    args.out.mkdir(parents=True, exist_ok=True)
    losses = []
    summary = {}

    if args.eval_only:
        params = load_params(params, args.out / "params.npz")
    else:
        warmup = max(1, min(100, args.steps // 10))
        schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup,
                                                      max(args.steps, warmup + 1), 1e-5)
        optimizer = optax.chain(optax.clip_by_global_norm(10.0),
                                optax.adamw(schedule, weight_decay=1e-4))
        opt_state = optimizer.init(params)

        def batch_loss(params, images, boxes, classes):
            per_scene = jax.vmap(lambda i, b, c: scene_loss(model, params, i, b, c))
            return per_scene(images, boxes, classes).mean()

        @jax.jit
        def train_step(params, opt_state, images, boxes, classes):
            loss, grads = jax.value_and_grad(batch_loss)(params, images, boxes, classes)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        batch = make_batch(rng, train_scans, args.batch)
        hlo = train_step.lower(params, opt_state, *batch).as_text()
        targets = sorted(set(re.findall(r"custom_call @(jax_psroi_\w+)", hlo)))
        if not any("_forward_" in t for t in targets) or not any("_backward_" in t
                                                               for t in targets):
            raise SystemExit("the compiled step does not call jax_psroi's kernels")
        summary["custom_calls"] = targets
        print("compiled step calls", ", ".join(targets))

        from tqdm import tqdm

        start = time.perf_counter()
        with tqdm(range(args.steps), unit="step", ncols=90) as bar:
            for _ in bar:
                params, opt_state, loss = train_step(params, opt_state, *batch)
                batch = make_batch(rng, train_scans, args.batch)  # while the step runs
                losses.append(float(loss))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        seconds = time.perf_counter() - start
        print(f"{args.steps} steps of {args.batch} scenes in {seconds:.0f} s; loss "
              f"{np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")
        save_params(params, args.out / "params.npz")

    found = jax.jit(jax.vmap(lambda image: detect(model, params, image)))(held_out[0])
    found = tuple(np.asarray(x) for x in found)
    map_all, map_50 = coco_map(held_out[1], held_out[2], *found)
    picture = args.out / "detections.png"
    draw(picture, losses, held_out, found,
         f"{args.steps if not args.eval_only else 'loaded'} steps, batch {args.batch}, "
         f"{args.dtype}, {args.head} head: mAP@.5 = {map_50:.3f} on {args.eval_scenes} "
         "held-out scenes")
    print(f"saved {args.out / 'params.npz'} and {picture}")
    print(f"mAP@[.5:.95] = {map_all:.3f}")
    print(f"mAP@.5 = {map_50:.3f}")
    summary.update(losses=losses, map=map_all, map_50=map_50)
    return summary


if __name__ == "__main__":
    main()
