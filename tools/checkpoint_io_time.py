r"""Save and restore time of a ViT-B/32 training checkpoint, to local disk and to a bucket.

  python tools/checkpoint_io_time.py --workdir /tmp/ckpt_local --workdir gs://bucket/ckpt
  python tools/checkpoint_io_time.py --workdir /tmp/ckpt_local --emulator   # + local GCS emulator

The state is the real training state's abstract shapes (CenterCLIP ViT-B/32 params, the
CLIP4Clip AdamW state, step, RNG), filled with random float32 values, written and read
back with the trainer's `Checkpointer` (orbax). `--emulator` starts tests/gcs_emulator.py
(in-memory, 127.0.0.1; needs a checkout of the repository) and adds a workdir in it. Each
workdir (and the emulator's folder) is removed afterwards. The load average is printed
with each result: on a shared machine the times are only as good as the idle CPUs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

from centerclip_jax import console  # pylint: disable=g-import-not-at-top
console.quiet_tensorflow()

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from centerclip_jax import config as config_lib
from centerclip_jax import paths
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.training import checkpoints
from centerclip_jax.training import optim

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_state(seed: int = 0):
  """(state, abstract_state, number of floats) of a ViT-B/32 training state."""
  model = centerclip.build_model(config_lib.model_config(), clip_lib.get_preset("ViT-B/32"))
  shapes = jax.eval_shape(lambda: centerclip.init_params(model, jax.random.PRNGKey(0)))
  tx, _ = optim.make_optimizer(shapes, lr=1e-7, coef_lr=1.0, total_steps=100)
  abstract = {"step": jax.ShapeDtypeStruct((), np.int32), "params": shapes,
              "opt_state": jax.eval_shape(tx.init, shapes)}
  rng = np.random.default_rng(seed)

  def fill(s):
    if np.issubdtype(s.dtype, np.floating):
      return rng.standard_normal(s.shape, dtype=np.float32).astype(s.dtype)
    return np.zeros(s.shape, s.dtype)

  state = jax.tree.map(fill, abstract)
  floats = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(abstract)
               if np.issubdtype(s.dtype, np.floating))
  return state, abstract, floats


def time_one(workdir: str, state, abstract) -> tuple[float, float]:
  """(save seconds, restore seconds); the restored state is checked against `state`."""
  root = paths.user_path(workdir)
  paths.rmtree(root)
  try:
    with checkpoints.Checkpointer(root, async_save=False) as ckpt:
      tic = time.perf_counter()
      ckpt.save(1, state, data_position={"epoch": 0, "index": 0}, rng=jax.random.PRNGKey(0))
      ckpt.wait()
      saved = time.perf_counter() - tic
    with checkpoints.Checkpointer(root, async_save=False) as ckpt:
      tic = time.perf_counter()
      _, back, _, _ = ckpt.restore(1, abstract)
      jax.block_until_ready(back)
      restored = time.perf_counter() - tic
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return saved, restored
  finally:
    paths.rmtree(root)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", action="append", default=[], help="local or gs:// (repeat)")
  parser.add_argument("--emulator", action="store_true", help="also a local GCS emulator")
  parser.add_argument("--repeats", type=int, default=2, help="best of N per workdir")
  args = parser.parse_args()
  emulator = None
  workdirs = list(args.workdir)
  if args.emulator:
    spec = importlib.util.spec_from_file_location("gcs_emulator", REPO / "tests" / "gcs_emulator.py")
    gcs_emulator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gcs_emulator  # its dataclass looks itself up there
    spec.loader.exec_module(gcs_emulator)
    import tempfile  # pylint: disable=g-import-not-at-top
    emulator_dir = pathlib.Path(tempfile.mkdtemp(prefix="gcs-"))
    emulator = gcs_emulator.start("bench", emulator_dir)
    emulator.apply()
    workdirs.append(emulator.url("ckpt"))
  state, abstract, floats = random_state()
  print(f"ViT-B/32 training state: {floats / 1e6:.1f}M floats, "
        f"{sum(x.nbytes for x in jax.tree.leaves(state)) / 2**30:.2f} GiB", flush=True)
  try:
    for workdir in workdirs:
      runs = [time_one(workdir, state, abstract) for _ in range(args.repeats)]
      save, restore = min(r[0] for r in runs), min(r[1] for r in runs)
      each = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in runs)
      load = " ".join(f"{x:.2f}" for x in os.getloadavg())
      print(f"{workdir}: save {save:.1f} s, restore {restore:.1f} s (best of {args.repeats}; "
            f"save/restore per run: {each}; load average {load} on {os.cpu_count()} CPUs)",
            flush=True)
  finally:
    if emulator is not None:
      emulator.stop()
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(emulator_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
