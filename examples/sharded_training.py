"""Data-parallel training of the Light-Head R-CNN over a device mesh.

The detector of light_head_rcnn.py, trained with its batch of scenes split
over the devices of a mesh (axis "data") and its parameters replicated:
plain ``jax.jit`` with shardings, the same per-scene code. Each device runs
the backbone, the RPN (its NMS included) and jax_psroi's pooling (forward
and backward) on its own scenes; the only communication of the step is the
all-reduce of the gradients (and of the loss). The script prints the shape
each device holds, the kernels' per-device shapes and the collectives of the
compiled step, then trains a few steps and checks the first one against the
same step on one device.

Run on one machine, with the CPU split into simulated devices:

    python examples/sharded_training.py --devices 8 [--steps 30] [--batch 16]

On GPUs, leave --devices out: the mesh takes every device JAX sees. Across
hosts, run the same script on every host after
``jax.distributed.initialize()`` (docs/guides/sharding.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=None,
                        help="simulate this many CPU devices (default: the devices JAX sees)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--batch", type=int, default=16,
                        help="scenes per step, a multiple of the devices (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of scenes and init")
    return parser.parse_args(argv)


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")


def main(argv=None) -> dict:
    args = parse(argv)
    if args.devices:
        # Before JAX starts its CPU backend.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import light_head_rcnn as lh

    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    scenes = NamedSharding(mesh, P("data"))      # split over the batch
    replicated = NamedSharding(mesh, P())        # every device holds it all
    if args.batch % mesh.size:
        raise SystemExit(f"--batch {args.batch} is not a multiple of {mesh.size} devices")

    rng = np.random.default_rng(args.seed)
    train_scans, _ = lh.load_scans(args.seed)
    model = lh.Detector()
    first_batch = lh.make_batch(rng, train_scans, args.batch)
    params = model.init(jax.random.key(args.seed), first_batch[0][0])
    optimizer = optax.chain(optax.clip_by_global_norm(10.0),
                            optax.adamw(2e-3, weight_decay=1e-4))
    opt_state = optimizer.init(params)

    def batch_loss(params, images, boxes, classes):
        per_scene = jax.vmap(lambda i, b, c: lh.scene_loss(model, params, i, b, c))
        return per_scene(images, boxes, classes).mean()

    def step(params, opt_state, images, boxes, classes):
        loss, grads = jax.value_and_grad(batch_loss)(params, images, boxes, classes)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    sharded_step = jax.jit(step, in_shardings=(replicated, replicated, scenes, scenes, scenes),
                           out_shardings=(replicated, replicated, replicated))
    params, opt_state = jax.device_put((params, opt_state), replicated)
    batch = jax.device_put(first_batch, scenes)
    compiled = sharded_step.lower(params, opt_state, *batch).compile()
    text = compiled.as_text()

    print(f"mesh: {mesh.size} devices on axis 'data' ({jax.devices()[0].platform})")
    for name, array in zip(("images", "boxes", "classes"), batch, strict=True):
        shard = array.addressable_shards[0]
        print(f"  {name}: global {array.shape}, each device {shard.data.shape}")
    # The kernels' calls in the partitioned program, with their per-device
    # shapes (a call's first result; the backward's further result is its
    # workspace; the RPN's NMS: boxes and scores -> kept indices).
    kernels = sorted(set(re.findall(
        r"= \(?(\w+\[[\d,]*\])\S*(?: \w+\[[\d,]*\]\S*)* custom-call\([^)]*\), "
        r"custom_call_target=\"(jax_psroi_\w+)\", "
        r"operand_layout_constraints=\{(\w+\[[\d,]*\])\S*, (\w+\[[\d,]*\])", text)))
    if not kernels:
        raise SystemExit("the compiled step does not call jax_psroi's kernels")
    for result, target, operand, second in kernels:
        second_name = "scores" if "_nms_" in target else "rois"
        print(f"  {target}: {operand}, {second_name} {second} -> {result} on each device")
    collectives = {name: len(re.findall(rf"\b{name}(?:-start)?\(", text))
                   for name in COLLECTIVES}
    print("collectives of the compiled step:",
          ", ".join(f"{name} {count}" for name, count in collectives.items()))

    # The first step, sharded and on one device (the unsharded program).
    one_device = jax.jit(step)(*jax.device_put((params, opt_state, *first_batch),
                                               jax.devices()[0]))
    params, opt_state, loss = compiled(params, opt_state, *batch)
    difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one_device[0]),
                                     strict=True))
    print(f"step 1: loss {float(loss):.4f} (one device: {float(one_device[2]):.4f}); "
          f"parameters differ by at most {difference:.1e}")
    losses = [float(loss)]
    for _ in range(args.steps - 1):
        batch = jax.device_put(lh.make_batch(rng, train_scans, args.batch), scenes)
        params, opt_state, loss = compiled(params, opt_state, *batch)
        losses.append(float(loss))
    print(f"{args.steps} steps: loss {np.mean(losses[:3]):.3f} -> {np.mean(losses[-3:]):.3f}")
    return dict(collectives=collectives, kernels=kernels, losses=losses,
                first_step_difference=difference)


if __name__ == "__main__":
    main()
