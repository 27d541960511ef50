r"""Wall time of one jit-compiled ViT-B/32 training step, with and without clustering.

  python tools/train_step_time.py [--batch 8]

Random weights and inputs (12 frames, 224 px, 32 words), the real train step of
`centerclip_jax.training.trainer` (CenterCLIP model, symmetric InfoNCE, the CLIP4Clip AdamW), on the
default device. Prints the first call (compile + run) and the best of two later steps.
For the compiled memory of the same step at global batch 32, see tools/benchmark.py.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from centerclip_jax import config as config_lib
from centerclip_jax.training import optim
from centerclip_jax.training import trainer as train
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8, help="global batch size")
  args = parser.parse_args()
  b = args.batch
  rng = np.random.default_rng(0)
  text = np.zeros((b, 32), np.int32)
  text[:, :20] = rng.integers(1, 49000, (b, 20))
  text[:, 20] = 49407
  batch = {"frames": jnp.asarray(rng.standard_normal((b, 12, 224, 224, 3)), jnp.float32),
           "frame_mask": jnp.ones((b, 12), bool), "text": jnp.asarray(text)}
  for name, inter in (("baseline", 0), ("kmedoids++ B6-4,49", 1)):
    m = config_lib.model_config()
    m.cluster_inter = inter
    model = centerclip.build_model(m, clip_lib.get_preset("ViT-B/32"))
    params = centerclip.init_params(model, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(params, lr=5e-3, coef_lr=1e-3, total_steps=100)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(params), "rng": jax.random.PRNGKey(1)}
    step = jax.jit(train.make_train_step(model, tx), donate_argnums=(0,))
    tic = time.time()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.time() - tic
    times = []
    for _ in range(2):
      tic = time.time()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.time() - tic)
    print(f"{name}: global batch {b}: first step (compile + run) {first:.1f} s, "
          f"step {min(times):.2f} s (best of 2), loss {float(metrics['loss']):.3f}",
          flush=True)


if __name__ == "__main__":
  main()
