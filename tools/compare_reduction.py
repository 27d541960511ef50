r"""One table of the token-reduction family: cost at ViT-B/32 shapes, accuracy on the demo.

  python tools/compare_reduction.py --workdir runs/compare [--epochs 10] [--repeats 3]

For none, pooling, sparse_sampling, kmedoids++, spectral, tome (merge each segment to the
step's K) and tome_r (ToMe's own schedule: r tokens merged before every block after the
step), all at the paper's `B6 - 4, 49` budget (12 frames, 4 segments after block 6):
  * GFLOPs/video (XLA cost analysis) and ms/video of the video tower at ViT-B/32 shapes,
    4 videos x 12 frames at 224 px, random weights, timed round-robin in this process;
  * the demo task (configs/demo.py) trained with the same seed and steps for each method:
    test text->video and video->text R@1 (one `main` run each) and the train step time of
    the demo's real step (global batch 64), timed round-robin in this process after the
    runs, so that every method is timed under the same machine load.
ToMe's constant schedule cannot reach the 49-token budget (a round merges at most half a
row): tome_r uses the largest constant r that is valid (21 at ViT-B/32, 10 on the demo),
so its GFLOPs column is higher; the table shows what each method really costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchmark  # tools/benchmark.py, beside this script
from centerclip_jax import parallel
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.training import optim
from centerclip_jax.training import trainer

B32 = {"target_frames_blocks": (12,) * 6 + (4,) * 6, "cluster_num_blocks": (49,) * 12}
DEMO = {"target_frames_blocks": (8, 4, 4), "cluster_num_blocks": (16, 8, 8)}


def methods():
  """(name, ViT-B/32 overrides, demo overrides)."""
  out = [("none", {"cluster_inter": 0}, {"cluster_inter": 0})]
  for algo in ("pooling", "sparse_sampling", "kmedoids++", "spectral", "tome"):
    out.append((algo, dict(B32, cluster_inter=1, cluster_algo=algo),
                dict(DEMO, cluster_inter=1, cluster_algo=algo)))
  out.append(("tome_r", dict(cluster_inter=1, cluster_algo="tome",
                             target_frames_blocks=B32["target_frames_blocks"],
                             cluster_num_blocks=(49,) * 6 + (147,) * 6,
                             tome_r=(0,) * 6 + (21,) * 6),
              dict(cluster_inter=1, cluster_algo="tome", target_frames_blocks=(8, 4, 4),
                   cluster_num_blocks=(16, 32, 32), tome_r=(0, 10, 10))))
  return out


def tower_costs(repeats: int, batch: int = 4):
  """{name: (GFLOPs/video, ms/video)} at ViT-B/32 shapes, timed round-robin."""
  params_clip = clip_lib.init_params(clip_lib.get_preset("ViT-B/32"), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.integers(0, 256, (batch, 12, 224, 224, 3), np.uint8))
  mask = jnp.ones((batch, 12), bool)
  entries = []
  for name, overrides, _ in methods():
    model = benchmark.build("ViT-B/32", overrides, "float32")
    params = centerclip.init_params(model, jax.random.PRNGKey(0), params_clip)
    fn = jax.jit(lambda p, f, m, model=model: model.apply(
        {"params": p}, f, m, method=model.encode_video)).lower(params, frames, mask).compile()
    jax.block_until_ready(fn(params, frames, mask))
    entries.append((name, fn, params, benchmark.flops(fn), []))
    print(f"compiled {name}", file=sys.stderr)
  for _ in range(repeats):
    for _, fn, params, _, times in entries:
      tic = time.perf_counter()
      jax.block_until_ready(fn(params, frames, mask))
      times.append(time.perf_counter() - tic)
  return {name: (fl / batch / 1e9, 1e3 * statistics.median(t) / batch)
          for name, _, _, fl, t in entries}


def demo_step_times(repeats: int, steps: int = 3) -> dict:
  """{name: s/step} of the demo's train step (configs/demo.py shapes, global batch 64),
  the trainer's own `make_train_step`, random inputs; timed round-robin."""
  spec = importlib.util.spec_from_file_location(
      "demo_config", pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  base = demo.get_config()
  mesh = parallel.make_mesh()
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  b, m = base.train.global_batch_size, base.model
  arch = clip_lib.CLIPConfig.from_dict(m.clip_dims.to_dict())
  rng = np.random.default_rng(0)
  text = np.zeros((b, m.max_words), np.int32)
  text[:, :10] = rng.integers(1, 49000, (b, 10))
  text[:, 10] = 49407
  batch = parallel.host_batch_to_global({
      "frames": rng.standard_normal((b, m.max_frames, arch.image_resolution,
                                     arch.image_resolution, 3)).astype(np.float32),
      "frame_mask": np.ones((b, m.max_frames), bool), "text": text}, mesh)
  entries = []
  for name, _, overrides in methods():
    cfg = base.model.copy_and_resolve_references()
    for key, value in overrides.items():
      cfg[key] = value
    model = centerclip.build_model(cfg, arch)
    params = centerclip.init_params(model, jax.random.PRNGKey(0))
    tx, _ = optim.make_optimizer(params, lr=base.train.lr, coef_lr=base.train.coef_lr,
                                 total_steps=1000, freeze_layer_num=-1)
    state = parallel.replicate(trainer.initial_state(params, tx, jax.random.PRNGKey(1)), mesh)
    fn = jax.jit(trainer.make_train_step(model, tx), in_shardings=(rep, shard),
                 out_shardings=(rep, rep), donate_argnums=(0,))
    state, _ = jax.block_until_ready(fn(state, batch))  # compile
    entries.append([name, fn, state, []])
  for _ in range(repeats):
    for entry in entries:
      tic = time.perf_counter()
      for _ in range(steps):
        entry[2], metrics = entry[1](entry[2], batch)
      jax.block_until_ready(metrics)
      entry[3].append((time.perf_counter() - tic) / steps)
  return {name: min(times) for name, _, _, times in entries}


def _override_flags(overrides: dict) -> list[str]:
  flags = []
  for key, value in overrides.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    flags.append(f"--config.model.{key}={value}")
  return flags


def demo_run(name: str, overrides: dict, workdir: pathlib.Path, epochs: int) -> dict:
  """Trains the demo with one method; returns its results.json."""
  out = workdir / name
  cmd = [sys.executable, "-m", "centerclip_jax.main", "--config", "configs/demo.py",
         "--workdir", str(out), f"--config.train.num_epochs={epochs}",
         f"--config.data_dir={workdir / 'data'}"] + _override_flags(overrides)
  print("+", " ".join(cmd), file=sys.stderr)
  subprocess.run(cmd, check=True)
  return json.loads((out / "results.json").read_text())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="demo runs and the dataset go here")
  parser.add_argument("--epochs", type=int, default=10, help="demo epochs per method")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per method")
  parser.add_argument("--json", default=None, help="also write the rows here")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).expanduser()
  rows = []
  for name, _, demo_overrides in methods():
    res = demo_run(name, demo_overrides, workdir, args.epochs)
    m = res["metrics"]
    rows.append({"method": name, "t2v_R@1": m["text_to_video"]["R@1"],
                 "v2t_R@1": m["video_to_text"]["R@1"],
                 "steps": res.get("train_steps")})
  step_times = demo_step_times(args.repeats)
  costs = tower_costs(args.repeats)
  header = (f"{'method':16s} {'GFLOP/v':>8s} {'ms/video':>9s} {'demo t2v R@1':>13s} "
            f"{'v2t R@1':>8s} {'step s':>7s}")
  print(header)
  for row in rows:
    row["gflops_per_video"], row["ms_per_video"] = costs[row["method"]]
    row["step_s"] = step_times[row["method"]]
    print(f"{row['method']:16s} {row['gflops_per_video']:8.1f} {row['ms_per_video']:9.1f} "
          f"{row['t2v_R@1']:13.1f} {row['v2t_R@1']:8.1f} {row['step_s']:7.3f}")
  print(f"(demo: {rows[0]['steps']} steps per method, same seed; ViT-B/32 tower: 4 videos x 12 "
        "frames, random weights)")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
