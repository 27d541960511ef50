r"""Wall time of one jit-compiled ViT-B/32 training step, with and without clustering.

  python tools/train_step_time.py [--batch 8] [--steps 4] [--prefetch 1 2] [--configs baseline]

Random weights and inputs (12 frames, 224 px, 32 words), the real train step of
`centerclip_jax.training.trainer` (CenterCLIP model, symmetric InfoNCE, the default
AdamW recipe), on the default devices. Each step gets its batch as host (NumPy) arrays
through `parallel.prefetch_to_mesh`, as in training: `--prefetch 1` transfers each batch
when the step asks for it, 2 (training's default) keeps the next one in flight. The step
time is that of finished steps (`trainer.StepTimer`: wall time of `--steps` steps, then
block), after one compile step; with several `--prefetch` depths they are timed
round-robin, twice, and the best of the two is printed. For the compiled memory of the
same step at global batch 32, see tools/benchmark.py.
"""

from __future__ import annotations

import argparse
import itertools

from centerclip_jax import console  # pylint: disable=g-import-not-at-top
console.quiet_tensorflow()

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.training import optim
from centerclip_jax.training import trainer as train

CONFIGS = {"baseline": 0, "kmedoids++ B6-4,49": 1}


def host_batches(batch: int, count: int, seed: int = 0) -> list[dict]:
  """`count` different random host batches (random uint8 frames, 20-word texts)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    text = np.zeros((batch, 32), np.int32)
    text[:, :20] = rng.integers(1, 49000, (batch, 20))
    text[:, 20] = 49407
    out.append({"frames": rng.integers(0, 256, (batch, 12, 224, 224, 3), np.uint8),
                "frame_mask": np.ones((batch, 12), bool), "text": text})
  return out


def time_steps(step_fn, state, batches, mesh, prefetch: int, steps: int):
  """(state, s/step of `steps` finished steps), batches fed through prefetch_to_mesh."""
  stream = parallel.prefetch_to_mesh(itertools.cycle(batches), mesh, size=prefetch)
  timer = train.StepTimer()
  for _ in range(steps):
    state, metrics = step_fn(state, next(stream))
    timer.step()
  return state, timer.lap(metrics)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8, help="global batch size")
  parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
  parser.add_argument("--prefetch", type=int, nargs="+", default=[2],
                      help="device prefetch depths to time (1: none ahead)")
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  args = parser.parse_args()
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(args.batch, mesh)
  batches = host_batches(args.batch, 3)
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  for name in args.configs:
    m = config_lib.model_config()
    m.cluster_inter = CONFIGS[name]
    model = centerclip.build_model(m, clip_lib.get_preset("ViT-B/32"))
    params = centerclip.init_params(model, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(params, lr=5e-3, coef_lr=1e-3, total_steps=100,
                                 freeze_layer_num=0)
    state = parallel.replicate(train.initial_state(params, tx, jax.random.PRNGKey(1)), mesh)
    trainable = optim.trainable_mask(params, freeze_layer_num=0)
    step_fn = jax.jit(train.make_train_step(model, tx, trainable), in_shardings=(rep, shard),
                      out_shardings=(rep, rep), donate_argnums=(0,))
    state, first = time_steps(step_fn, state, batches, mesh, 1, 1)
    state, _ = time_steps(step_fn, state, batches, mesh, 1, 1)  # The state's own structure.
    best = {depth: float("inf") for depth in args.prefetch}
    for _ in range(2):
      for depth in args.prefetch:
        state, dt = time_steps(step_fn, state, batches, mesh, depth, args.steps)
        best[depth] = min(best[depth], dt)
    timings = ", ".join(f"prefetch {d}: {best[d]:.3f} s/step" for d in args.prefetch)
    print(f"{name}: global batch {args.batch} on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s): first step (compile + run) {first:.1f} s; "
          f"{timings} (best of 2 x {args.steps} finished steps)", flush=True)


if __name__ == "__main__":
  main()
