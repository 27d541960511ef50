r"""Speed and memory of the video tower with and without token clustering.

  python tools/benchmark.py [--quick] [--json OUT.json] [--archs ViT-B/32,ViT-B/16]
  python tools/benchmark.py --vs-torch   # our ViT-B/32 tower vs the reference PyTorch one
  python tools/benchmark.py --long-video # decode: a 30-min vs a 10-s video (tools/long_video.py)
  python tools/benchmark.py --indexing   # `search index`: videos/s, model's wait for decoding
  python tools/benchmark.py --memory-breakdown  # what the train step's peak holds (tools/memory_breakdown.py)

For each architecture (random weights at real shapes, 12 frames, 224 px) it compares the
CLIP4Clip baseline (no clustering) with `B6 - 4, K` and `B6 - 3, K` k-medoids++ and
spectral clustering (K = 49 for B/32, 160 for B/16), all measured in one run:

- ms_per_video: median wall time of the jit-compiled video tower (frames -> meanP
  embedding) over repeats after compilation, divided by the batch size; the variants are
  timed round-robin (baseline, variant 1, ..., baseline, ...) so that the drift of a
  shared machine hits them alike;
- speedup: baseline ms_per_video / this ms_per_video;
- ideal_speedup: baseline FLOPs / these FLOPs, from XLA's cost analysis of the same programs;
- cluster_share: time of the clustering step(s) alone, jit-compiled and run on the very
  tokens the tower feeds them, over the tower's time;
- train_memory_bytes: peak memory of one compiled training step (global batch 32;
  training's own step and optimizer, `trainer.make_train_step`, state donated), from
  XLA's memory analysis (compiled, not run), in float32 and bfloat16;
  train_memory_ratio: over the baseline's of the same dtype.

Runs unchanged on GPU/TPU (the arrays go to the default device).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

from centerclip_jax import console  # pylint: disable=g-import-not-at-top
console.quiet_tensorflow()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from centerclip_jax import config as config_lib
from centerclip_jax.training import optim
from centerclip_jax.training import trainer
from centerclip_jax.clustering import segments as segments_lib
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib

KEEP = {"ViT-B/32": 49, "ViT-B/16": 160}


def variants(arch: str, quick: bool = False):
  """(name, model-config overrides) pairs: baseline and the paper's settings."""
  k = KEEP[arch]
  out = [("baseline", {"cluster_inter": 0})]
  for algo in ("kmedoids++", "spectral"):
    for segs in ((4,) if quick else (4, 3)):
      out.append((f"{algo} B6-{segs},{k}", {
          "cluster_inter": 1, "cluster_algo": algo,
          "target_frames_blocks": (12,) * 6 + (segs,) * 6,
          "cluster_num_blocks": (KEEP["ViT-B/32"] if arch == "ViT-B/32" else 196,) * 6 + (k,) * 6}))
  return out


def build(arch: str, overrides: dict, dtype: str):
  m = config_lib.model_config()
  m.arch = arch
  m.dtype = dtype
  for key, value in overrides.items():
    m[key] = value
  return centerclip.build_model(m, clip_lib.get_preset(arch))


def time_fn(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tic)
  return statistics.median(times)


def flops(compiled) -> float:
  """FLOPs of a compiled program, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def step_inputs(model, params, frames, mask):
  """The real tokens `(x, frame_mask)` entering each clustering step of `model`, as the
  model's own forward pass sows them (`mutable=['intermediates']`)."""

  def run(p, f, m):
    _, state = model.apply({"params": p}, f, m, method=model.segment_features,
                           mutable=["intermediates"])
    sown = state["intermediates"]
    return [(sown[f"cluster_step_{i}"][0]["tokens"], sown[f"cluster_step_{i}"][0]["frame_mask"])
            for i in range(len(model.steps))]

  return jax.jit(run)(params, frames, mask)


def cluster_time(model, params, frames, mask, repeats: int) -> float:
  """Seconds spent in the clustering step(s) alone, on the tokens the model feeds them."""
  total = 0.0
  if not model.steps:  # the baseline sows nothing
    return total
  for step, (x, m) in zip(model.steps, step_inputs(model, params, frames, mask)):
    fn = jax.jit(lambda x, m, step=step: segments_lib.cluster_step(x, m, step, model.settings))
    total += time_fn(fn, (x, m), repeats)
  return total


def train_memory(model, global_batch: int, words: int = 32) -> int:
  """Peak bytes of one compiled train step (XLA memory analysis, not executed).

  The step is training's own (`trainer.make_train_step`, the state donated as `_train`
  does) with the default recipe's optimizer (`optim.make_optimizer`, `config.train`),
  so the figure is that of the program `main` runs."""
  params = centerclip.abstract_params(model)
  t = config_lib.base_config().train
  tx, _ = optim.make_optimizer(
      params, lr=t.lr, coef_lr=t.coef_lr, total_steps=1000, optimizer=t.optimizer,
      warmup_proportion=t.warmup_proportion, weight_decay=t.weight_decay,
      clip_norm=t.clip_norm, freeze_layer_num=t.freeze_layer_num)
  state = jax.eval_shape(lambda p: trainer.initial_state(p, tx, jax.random.PRNGKey(0)),
                         params)
  res = model.clip_config.image_resolution
  batch = {"frames": jax.ShapeDtypeStruct((global_batch, model.max_frames, res, res, 3),
                                          jnp.uint8),
           "frame_mask": jax.ShapeDtypeStruct((global_batch, model.max_frames), jnp.bool_),
           "text": jax.ShapeDtypeStruct((global_batch, words), jnp.int32)}
  trainable = optim.trainable_mask(params, freeze_layer_num=t.freeze_layer_num)
  compiled = jax.jit(trainer.make_train_step(model, tx, trainable),
                     donate_argnums=(0,)).lower(state, batch).compile()
  mem = compiled.memory_analysis()
  return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)


def run(archs, quick: bool, batch: int, repeats: int, train_batch: int, dtypes):
  """Compiles every variant, then times them round-robin so that drift of a noisy
  machine hits all variants alike; speed-ups are ratios within this one run."""
  rows = []
  for arch in archs:
    cfg = clip_lib.get_preset(arch)
    params_clip = clip_lib.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.integers(0, 256, (batch, 12, 224, 224, 3), np.uint8))
    mask = jnp.ones((batch, 12), bool)
    entries = []
    for name, overrides in variants(arch, quick):
      model = build(arch, overrides, "float32")
      params = centerclip.init_params(model, jax.random.PRNGKey(0), params_clip)
      fn = jax.jit(lambda p, f, m, model=model: model.apply(
          {"params": p}, f, m, method=model.encode_video)).lower(params, frames, mask).compile()
      jax.block_until_ready(fn(params, frames, mask))  # warm-up
      entries.append({"name": name, "overrides": overrides, "model": model, "params": params,
                      "fn": fn, "flops": flops(fn), "times": []})
    for _ in range(repeats):
      for e in entries:
        tic = time.perf_counter()
        jax.block_until_ready(e["fn"](e["params"], frames, mask))
        e["times"].append(time.perf_counter() - tic)
    base = entries[0]
    base_seconds = statistics.median(base["times"])
    base_mem = {}
    for e in entries:
      seconds = statistics.median(e["times"])
      share = cluster_time(e["model"], e["params"], frames, mask, repeats) / seconds
      for dtype in dtypes:
        mem = train_memory(build(arch, e["overrides"], dtype), train_batch)
        base_mem.setdefault(dtype, mem)
        timed = dtype == "float32"  # speed is measured in float32 only
        row = {"arch": arch, "config": e["name"], "dtype": dtype,
               "ms_per_video": 1e3 * seconds / batch if timed else None,
               "speedup": base_seconds / seconds if timed else None,
               "ideal_speedup": base["flops"] / e["flops"] if timed else None,
               "gflops_per_video": e["flops"] / batch / 1e9 if timed else None,
               "cluster_share": share if timed else None,
               "train_memory_bytes": mem,
               "train_memory_ratio": mem / base_mem[dtype]}
        rows.append(row)
        print_row(row)
  return rows


def vs_torch(batch: int = 4, frames: int = 12, repeats: int = 5, arch: str = "ViT-B/32"):
  """Ours vs the reference PyTorch visual tower, same weights and videos, one process.

  The reference is clip-anytorch's `clip.model.VisionTransformer` (random weights at the
  real shapes, inside its `CLIP` so that `weights.porting` ports the state dict to ours);
  torch gets as many threads as this process may use (what XLA:CPU's pool uses). Timed
  round-robin: torch plain, ours plain, ours `B6-4,K`, ... Returns a dict of ms/video and
  ratios (torch plain ms / ours ms) and the feature difference of the two plain towers.
  """
  from centerclip_jax.weights import porting  # pylint: disable=g-import-not-at-top
  from centerclip_jax.weights import reference
  ref = reference.reference_clip_module()
  import torch  # pylint: disable=g-import-not-at-top
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  cfg = clip_lib.get_preset(arch)
  torch.manual_seed(0)
  torch_clip = ref.CLIP(cfg.embed_dim, cfg.image_resolution, cfg.vision_layers, cfg.vision_width,
                        cfg.vision_patch_size, cfg.context_length, cfg.vocab_size,
                        cfg.transformer_width, cfg.transformer_heads, cfg.transformer_layers)
  torch_clip = torch_clip.float().eval()
  tower = torch_clip.visual
  state = {k: v.detach().numpy() for k, v in torch_clip.state_dict().items()}
  _, params_clip, _, _ = porting.torch_to_flax(state)
  params_clip = jax.tree.map(jnp.asarray, params_clip)
  rng = np.random.default_rng(0)
  res = cfg.image_resolution
  video = rng.integers(0, 256, (batch, frames, res, res, 3), np.uint8)  # ours normalises
  mask = jnp.ones((batch, frames), bool)
  pixels = np.asarray(clip_lib.normalize_pixels(jnp.asarray(video)))  # torch's input
  images_nchw = torch.from_numpy(pixels.reshape(-1, res, res, 3).transpose(0, 3, 1, 2).copy())
  video_j = jnp.asarray(video)

  def torch_plain():
    with torch.inference_mode():
      f = tower(images_nchw).reshape(batch, frames, -1)
      f = f / f.norm(dim=-1, keepdim=True)
      f = f.mean(dim=1)
      return f / f.norm(dim=-1, keepdim=True)

  entries = [("torch plain", torch_plain)]
  for name, overrides in variants(arch, quick=True)[:2]:
    model = build(arch, overrides, "float32")
    params = centerclip.init_params(model, jax.random.PRNGKey(0), params_clip)
    fn = jax.jit(lambda p, f, m, model=model: model.apply(
        {"params": p}, f, m, method=model.encode_video))
    entries.append((f"ours {name}", lambda fn=fn, params=params: jax.block_until_ready(
        fn(params, video_j, mask))))
  ours_plain = np.asarray(entries[1][1]())
  diff = float(np.max(np.abs(ours_plain - torch_plain().numpy())))
  for _, f in entries:  # warm-up
    f()
  times = {name: [] for name, _ in entries}
  for _ in range(repeats):
    for name, f in entries:
      tic = time.perf_counter()
      f()
      times[name].append(time.perf_counter() - tic)
  ms = {name: 1e3 * statistics.median(t) / batch for name, t in times.items()}
  out = {"arch": arch, "batch": batch, "frames": frames, "repeats": repeats,
         "torch_threads": threads, "max_abs_diff_plain": diff, "ms_per_video": ms,
         "ratio_vs_torch_plain": {n: ms["torch plain"] / v for n, v in ms.items()},
         "load_average": os.getloadavg()}
  for name, v in ms.items():
    print(f"{name:28s} {v:8.1f} ms/video  {out['ratio_vs_torch_plain'][name]:5.2f}x torch plain",
          flush=True)
  print(f"plain towers: max |ours - torch| = {diff:.2e}; torch threads {threads}; "
        f"load average {out['load_average'][0]:.2f}", flush=True)
  return out


def indexing(short_n: int = 8, long_n: int = 2, long_seconds: float = 600.0,
             workers: int = 2, batch_size: int = 8) -> dict:
  """`search index` (`index.build_index`, decoding in `workers` processes) on generated
  320x240 h264 videos: `short_n` x 10 s and `long_n` x `long_seconds`, the default model
  (ViT-B/32 `B6-4,49`, 12 frames) with random weights. A warm-up index of one video
  compiles the model first (persistent compilation cache), so the timed runs measure
  decoding and the model, not XLA. Returns videos/s and the model's wait share per set."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile
  import long_video as long_video_lib  # pylint: disable=g-import-not-at-top  (tools/)
  from centerclip_jax.search import index as index_lib
  from centerclip_jax.search import videos as videos_lib
  waits = []  # per video, what `build_index` adds to its input_wait_seconds
  prefetch = videos_lib.prefetch

  def recording_prefetch(*args):
    for item, result, waited in prefetch(*args):
      waits.append(waited)
      yield item, result, waited

  out = {"workers": workers, "batch_size": batch_size, "arch": "ViT-B/32",
         "config": "default (B6-4,49 k-medoids++)", "sets": {}}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    jax.config.update("jax_compilation_cache_dir", str(tmp / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    config = config_lib.base_config()
    config.allow_random_init = True
    sets = {"warm-up": (1, 10.0), "10 s": (short_n, 10.0),
            f"{long_seconds / 60:g} min": (long_n, long_seconds)}
    for name, (count, seconds) in sets.items():
      folder = tmp / name.replace(" ", "_")
      folder.mkdir()
      # One generated video, copied: every copy is decoded and embedded on its own.
      first = long_video_lib.write_video(folder / "v0.mp4", seconds)
      for i in range(1, count):
        shutil.copyfile(first, folder / f"v{i}.mp4")
    for name, (count, seconds) in sets.items():
      folder = tmp / name.replace(" ", "_")
      waits.clear()
      videos_lib.prefetch = recording_prefetch
      try:
        s = index_lib.build_index(config, folder, tmp / f"index_{folder.name}",
                                  batch_size=batch_size, workers=workers, progress=False)
      finally:
        videos_lib.prefetch = prefetch
      if s.errors or len(s.embedded) != count:
        raise RuntimeError(f"indexing {name}: {s.errors or s.embedded}")
      if name == "warm-up":
        continue
      # The first batch also waits for the workers to start (spawned, they import the
      # package); after it, the wait is what decoding costs the model in steady state.
      first = sum(waits[:batch_size])
      row = {"videos": count, "video_seconds": seconds, "seconds": s.seconds,
             "videos_per_second": s.videos_per_second,
             "model_wait_share": s.input_wait_share,
             "first_batch_wait_seconds": first,
             "wait_share_after_first_batch":
                 (s.input_wait_seconds - first) / max(s.seconds - first, 1e-9)}
      out["sets"][name] = row
      print(f"{name:8s} {count:3d} videos  {s.seconds:7.1f} s  {s.videos_per_second:6.2f} "
            f"videos/s  model waited for decoding {100 * s.input_wait_share:4.1f}% "
            f"({first:.1f} s for the first batch; "
            f"{100 * row['wait_share_after_first_batch']:.1f}% after it)", flush=True)
  out["load_average"] = os.getloadavg()
  return out


HEADER = (f"{'arch':9s} {'config':22s} {'dtype':8s} {'ms/video':>9s} {'speedup':>8s} "
          f"{'ideal':>6s} {'GFLOP/v':>8s} {'clust%':>7s} {'train GB':>9s} {'mem ratio':>9s}")


def _fmt(value, spec: str, width: int, scale: float = 1.0, suffix: str = "") -> str:
  if value is None:
    return "-".rjust(width + len(suffix))
  return format(value * scale, f"{width}{spec}") + suffix


def print_row(row):
  print(f"{row['arch']:9s} {row['config']:22s} {row['dtype']:8s} "
        f"{_fmt(row['ms_per_video'], '.1f', 9)} {_fmt(row['speedup'], '.2f', 8)} "
        f"{_fmt(row['ideal_speedup'], '.2f', 6)} {_fmt(row['gflops_per_video'], '.1f', 8)} "
        f"{_fmt(row['cluster_share'], '.1f', 6, 100, '%')} "
        f"{row['train_memory_bytes'] / 1e9:9.2f} {row['train_memory_ratio']:9.4f}", flush=True)


def long_video(long_seconds: float, json_path: str | None) -> None:
  """Inference's decode of a long vs a 10-s video, before/after (tools/long_video.py)."""
  import long_video as long_video_lib  # pylint: disable=g-import-not-at-top  (tools/)
  result = long_video_lib.benchmark(long_s=long_seconds)
  long_video_lib.print_report(result)
  if json_path:
    pathlib.Path(json_path).write_text(json.dumps(result, indent=2))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="ViT-B/32, B6-4 only, float32 memory, batch 2 (< 5 min on 2 CPU cores)")
  parser.add_argument("--archs", default=None, help="default: ViT-B/32,ViT-B/16 "
                      "(ViT-B/32 with --quick)")
  parser.add_argument("--batch", type=int, default=None, help="videos per timed call")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--train_batch", type=int, default=32)
  parser.add_argument("--dtypes", default=None,
                      help="train-memory dtypes; default float32,bfloat16 (float32 with --quick)")
  parser.add_argument("--json", default=None, help="write the rows to this JSON file")
  parser.add_argument("--vs-torch", action="store_true",
                      help="only: our ViT-B/32 tower (plain and B6-4,49) vs the reference "
                      "PyTorch tower, same weights, 4 videos x 12 frames, round-robin")
  parser.add_argument("--long-video", action="store_true",
                      help="only: wall time and peak RSS of decoding the 12 sampled frames "
                      "of a generated long video vs a 10-s one, before/after seeking")
  parser.add_argument("--long_seconds", type=float, default=1800.0,
                      help="--long-video: length of the long video")
  parser.add_argument("--indexing", action="store_true",
                      help="only: `search index` videos/s and the share of time the model "
                      "waits for decoding, on generated 10-s and 10-min h264 videos")
  parser.add_argument("--workers", type=int, default=2, help="--indexing: decode processes")
  parser.add_argument("--memory-breakdown", action="store_true",
                      help="only: what the train step's memory peak holds, baseline vs "
                      "B6-4 (tools/memory_breakdown.py; ViT-B/32, --train_batch, float32)")
  args = parser.parse_args()
  if args.memory_breakdown:
    import memory_breakdown  # pylint: disable=g-import-not-at-top  (tools/)
    memory_breakdown.run("ViT-B/32", args.train_batch, "float32", args.json)
    return
  if args.indexing:
    out = indexing(workers=args.workers, batch_size=args.batch or 8)
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    return
  if args.long_video:
    long_video(args.long_seconds, args.json)
    return
  if args.vs_torch:
    out = vs_torch(batch=args.batch or 4, repeats=args.repeats or 5)
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    return
  archs = [a for a in (args.archs or ("ViT-B/32" if args.quick else "ViT-B/32,ViT-B/16"))
           .split(",") if a]
  dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
  for a in archs:
    if a not in KEEP:
      parser.error(f"--archs: {a!r} is not one of {sorted(KEEP)}")
  batch = args.batch or (2 if args.quick else 4)
  repeats = args.repeats or (3 if args.quick else 5)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; batch {batch}, "
        f"repeats {repeats}, train batch {args.train_batch}")
  print(HEADER)
  rows = run(archs, args.quick, batch, repeats, args.train_batch, dtypes)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
