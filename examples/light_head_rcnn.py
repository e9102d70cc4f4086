"""A Light-Head R-CNN style detection head in Flax, trained with jax_psroi.

The head maps backbone features to a thin position-sensitive score map
(10 * 7 * 7 channels), pools every proposal with ``ps_roi_align`` (7 x 7
bins, stride 16, sampling ratio 2) and classifies it. Training runs under
``jax.jit(jax.value_and_grad(...))`` with the head applied per image through
``jax.vmap``, which is how detection code is usually written; the pooling
and its gradient run as jax_psroi's native kernels (checked below on the
compiled program).

The data are synthetic so the example runs anywhere in seconds: each image
holds a few bright rectangles of one of ``NUM_CLASSES`` textures, proposals
are jittered copies of them, and the head learns to tell the textures apart.

Run:  python examples/light_head_rcnn.py
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_psroi

NUM_CLASSES = 4
POOL = 7
STRIDE = 16
IMAGE = (128, 192)          # H, W of the input images
BOXES_PER_IMAGE = 16


class LightHead(nn.Module):
    """Backbone stub + thin score map + PS-RoI Align + classifier."""

    thin_channels: int = 10

    @nn.compact
    def __call__(self, image, boxes):
        """image: [3, H, W]; boxes: [L, 4] (x1, y1, x2, y2) in image pixels.

        Returns [L, NUM_CLASSES] logits.
        """
        x = image.transpose(1, 2, 0)[None]                      # NHWC for conv
        x = nn.relu(nn.Conv(32, (4, 4), strides=4)(x))           # stride 4
        x = nn.relu(nn.Conv(64, (4, 4), strides=4)(x))           # stride 16
        # Light-Head's "large separable convolution", reduced to its shape.
        x = nn.relu(nn.Conv(64, (1, 7))(x))
        x = nn.Conv(self.thin_channels * POOL * POOL, (7, 1))(x)
        score_map = x.transpose(0, 3, 1, 2)                      # [1, C, H/16, W/16]
        pooled = jax_psroi.ps_roi_align(score_map, [boxes], POOL,
                                         spatial_scale=1 / STRIDE,
                                         sampling_ratio=2)       # [L, 10, 7, 7]
        h = nn.relu(nn.Dense(64)(pooled.reshape(pooled.shape[0], -1)))
        return nn.Dense(NUM_CLASSES)(h)


def make_batch(rng, batch_size):
    """Images with textured rectangles, jittered proposals and their labels."""
    h, w = IMAGE
    images = rng.normal(0, 0.1, size=(batch_size, 3, h, w)).astype(np.float32)
    boxes = np.zeros((batch_size, BOXES_PER_IMAGE, 4), np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(batch_size, BOXES_PER_IMAGE))
    yy, xx = np.mgrid[0:h, 0:w]
    for b in range(batch_size):
        for i in range(BOXES_PER_IMAGE):
            bw, bh = rng.uniform(32, 80), rng.uniform(32, 80)
            x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            inside = (xx >= x1) & (xx < x1 + bw) & (yy >= y1) & (yy < y1 + bh)
            texture = np.sin((xx * (labels[b, i] + 1) + yy) / 3.0)
            images[b, labels[b, i] % 3][inside] += texture[inside]
            jitter = rng.normal(0, 4, size=4)
            boxes[b, i] = np.array([x1, y1, x1 + bw, y1 + bh]) + jitter
    return jnp.asarray(images), jnp.asarray(boxes), jnp.asarray(labels)


def main():
    rng = np.random.default_rng(0)
    model = LightHead()
    images, boxes, labels = make_batch(rng, 4)
    params = model.init(jax.random.key(0), images[0], boxes[0])
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params, images, boxes, labels):
        logits = jax.vmap(lambda im, bx: model.apply(params, im, bx))(images, boxes)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, images, boxes, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, boxes, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    hlo = train_step.lower(params, opt_state, images, boxes, labels).as_text()
    assert "custom_call @jax_psroi_ps_roi_align_forward" in hlo
    assert "custom_call @jax_psroi_ps_roi_align_backward" in hlo
    print("compiled step calls the native kernels:",
          hlo.count("@jax_psroi_ps_roi_align_forward"), "forward,",
          hlo.count("@jax_psroi_ps_roi_align_backward"), "backward")

    start = time.perf_counter()
    losses = []
    for step in range(60):
        images, boxes, labels = make_batch(rng, 4)
        params, opt_state, loss = train_step(params, opt_state, images, boxes, labels)
        losses.append(float(loss))
        if step % 10 == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")
    print(f"60 steps in {time.perf_counter() - start:.1f} s; "
          f"loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")
    if not np.mean(losses[-5:]) < np.mean(losses[:5]):
        raise SystemExit("the loss did not decrease")


if __name__ == "__main__":
    main()
