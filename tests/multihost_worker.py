"""Subprocess helper for the multi-device, multi-process and resume tests.

Run as a script (the tests launch it), never imported by pytest itself: it sets
XLA_FLAGS=--xla_force_host_platform_device_count=N *before* importing JAX.

  parity: a few AdamW steps of a tiny CLIP (mean-pooled frames + a new linear head,
          symmetric InfoNCE, make_optimizer) on one fixed global batch, jit over a mesh
          (params replicated, batch sharded). Each process feeds its slice of the batch.
          Writes losses, final params and the gathered video embeddings to --out (.npz).
  resume: the same model trained with a Checkpointer, a PreemptionWatch, an RNG
          augmentation and a shuffling data position; resumes from --workdir if it holds
          a checkpoint. Prints 'step <k> loss <x>' per step and 'PREEMPTED <k> ...' when
          it saved and stopped on a preemption notice (SIGTERM to any process: with
          several processes, JAX's preemption sync point makes all stop at one step).
          --kill_in_save K: SIGKILLs itself while the async save of step K is being
          written (after some items, before the commit). Writes final params and losses.
  main:   `python -m centerclip_jax.main` itself, with the arguments after `--`, as one
          host of --num_processes (jax.distributed through JAX_COORDINATOR_ADDRESS & co,
          as a launcher sets them). Records, as JSON lines in --out: every training
          caption this host tokenized ({"caption": ...}: what it read of its shard) and
          every results file it wrote ({"wrote": path}).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
  """The worker's flags; in `main` mode the arguments after `--` go to main (`.rest`)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=["parity", "resume", "main"])
  p.add_argument("--num_devices", type=int, default=1, help="simulated CPU devices")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--coordinator", default=None, help="host:port of process 0")
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--workdir", default=None)
  p.add_argument("--step_sleep", type=float, default=0.0)
  p.add_argument("--kill_in_save", type=int, default=0)
  args = p.parse_args(argv)
  args.rest = rest
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
  # Backend optimisation level 0 halves the CPU compile time of the tiny model; every
  # configuration compared in a test runs with the same flags (main: the flags main has).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.num_devices}" +
                             ("" if ARGS.mode == "main" else " --xla_backend_optimization_level=0"))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

GLOBAL_BATCH = 16
FRAMES = 2
TEXT_LEN = 8
EMBED = 32


def tiny_config():
  from centerclip_jax.models.clip import CLIPConfig
  return CLIPConfig(embed_dim=EMBED, image_resolution=32, vision_layers=2, vision_width=64,
                    vision_patch_size=16, context_length=16, vocab_size=1000,
                    transformer_width=64, transformer_heads=1, transformer_layers=2)


def make_dataset(n, seed=0):
  """n synthetic (video [F, 32, 32, 3], text [L]) pairs; EOT (max id) at a varying place."""
  rng = np.random.default_rng(seed)
  video = rng.normal(size=(n, FRAMES, 32, 32, 3)).astype(np.float32)
  text = rng.integers(1, 900, size=(n, TEXT_LEN)).astype(np.int32)
  eot = rng.integers(2, TEXT_LEN, size=n)
  text[np.arange(n), eot] = 999
  text[np.arange(TEXT_LEN)[None, :] > eot[:, None]] = 0
  return {"video": video, "text": text}


def init_params(seed=0):
  """Random params of the tiny CLIP (+ a new 'frame_head'), filled with NumPy.

  The structure comes from `jax.eval_shape` of the Flax init, so no init program is
  compiled (that compile costs seconds in every subprocess).
  """
  import jax
  import jax.numpy as jnp
  from centerclip_jax.models import clip as clip_lib
  model = clip_lib.CLIP(tiny_config())
  shapes = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, TEXT_LEN), jnp.int32)),
      jax.random.key(0))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(leaf.shape, np.float32)
    if name.endswith("['logit_scale']"):
      return np.asarray(np.log(1 / 0.07), np.float32)
    std = 0.02 if leaf.ndim < 2 else float(np.prod(leaf.shape[:-1])) ** -0.5
    return (std * rng.normal(size=leaf.shape)).astype(np.float32)

  clip_params = jax.tree_util.tree_map_with_path(fill, shapes)
  head = {"kernel": (np.eye(EMBED) + 0.02 * rng.normal(size=(EMBED, EMBED))).astype(np.float32),
          "bias": np.zeros((EMBED,), np.float32)}
  return {"clip": clip_params, "frame_head": head}


def make_optimizer(params, total_steps, grad_accum_steps=1):
  from centerclip_jax.training import optim
  return optim.make_optimizer(params, lr=1e-3, coef_lr=0.5, total_steps=total_steps,
                              warmup_proportion=0.0, weight_decay=0.2, clip_norm=1.0,
                              grad_accum_steps=grad_accum_steps)


def make_train_step(tx, mesh):
  """The reusable test train step: jit over `mesh`, params replicated, batch sharded.

  step(params, opt_state, batch, noise_key) -> (params, opt_state, loss, video_emb);
  video_emb stays sharded on 'batch' (gathered with global_to_host).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from centerclip_jax import parallel
  from centerclip_jax.training import losses
  from centerclip_jax.models import clip as clip_lib

  model = clip_lib.CLIP(tiny_config())
  repl, batch_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def embed(params, batch, noise_key):
    video = batch["video"]
    if noise_key is not None:
      video = video + 0.05 * jax.random.normal(noise_key, video.shape)
    frames = model.apply({"params": params["clip"]}, video, method=clip_lib.CLIP.encode_image)
    pooled = clip_lib.l2_normalize(frames).mean(axis=1)  # meanP over frames
    video_emb = clip_lib.l2_normalize(pooled @ params["frame_head"]["kernel"]
                                      + params["frame_head"]["bias"])
    text = model.apply({"params": params["clip"]}, batch["text"], method=clip_lib.CLIP.encode_text)
    return video_emb, clip_lib.l2_normalize(text)

  def loss_fn(params, batch, noise_key):
    v, t = embed(params, batch, noise_key)
    return losses.symmetric_infonce(v, t, params["clip"]["logit_scale"]), v

  def step(params, opt_state, batch, noise_key):
    (loss, v), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, noise_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, v

  return jax.jit(step, in_shardings=(repl, repl, batch_sh, repl),
                 out_shardings=(repl, repl, repl, batch_sh), donate_argnums=(0, 1))


def flat_params(params):
  import jax
  from centerclip_jax import parallel
  host = parallel.global_to_host(params)
  return {"param" + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]}


def run_parity(args):
  import jax
  from centerclip_jax import parallel
  if args.num_processes > 1:
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  mesh = parallel.make_mesh()
  assert mesh.devices.size == args.num_devices * args.num_processes, mesh
  parallel.check_batch_divisible(GLOBAL_BATCH, mesh)
  data = make_dataset(GLOBAL_BATCH)
  rows = GLOBAL_BATCH // jax.process_count()
  local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows]
           for k, v in data.items()}
  batch = parallel.host_batch_to_global(local, mesh)
  try:
    parallel.check_batch_divisible(GLOBAL_BATCH + 4, mesh)
    divisible_error = ""
  except ValueError as e:
    divisible_error = str(e)
  init = init_params()
  tx, _ = make_optimizer(init, total_steps=10)
  opt_state = parallel.replicate(tx.init(init), mesh)
  params = parallel.replicate(init, mesh)
  noise = parallel.replicate(jax.random.key_data(jax.random.key(7)), mesh)
  step = make_train_step(tx, mesh)
  losses, emb = [], None
  for _ in range(args.steps):
    params, opt_state, loss, v = step(params, opt_state, batch,
                                      jax.random.wrap_key_data(noise))
    losses.append(float(parallel.global_to_host(loss)))
    if emb is None:
      emb = parallel.global_to_host(v)
  final = flat_params(params)
  delta = max(float(np.abs(final[k] - v).max()) for k, v in flat_params(init).items())
  out = {"losses": np.asarray(losses), "video_emb": emb, **final,
         "param_delta_max": np.asarray(delta), "divisible_error": np.asarray(divisible_error),
         "num_devices": np.asarray(mesh.devices.size),
         "num_processes": np.asarray(jax.process_count())}
  if jax.process_index() == 0:
    np.savez(args.out, **out)
  print(f"process {jax.process_index()} done losses {losses}", flush=True)


def _kill_during_save(step):
  """SIGKILL this process from orbax's background thread, mid-way through saving `step`:
  when the first item (or the step) of it is about to be committed."""
  import signal
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def killing_finalize(self):
    if f"/checkpoints/{step}" in str(self._final_path):
      print(f"KILLING in save {step}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize


def run_resume(args):
  import jax
  from centerclip_jax import parallel
  from centerclip_jax.training import checkpoints
  if args.num_processes > 1:
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  if args.kill_in_save:
    _kill_during_save(args.kill_in_save)
  n_examples, batch_size, accum = 24, 8, 2
  rows = batch_size // jax.process_count()
  data = make_dataset(n_examples, seed=1)
  mesh = parallel.make_mesh()
  params = init_params(seed=3)
  tx, _ = make_optimizer(params, total_steps=args.steps // accum, grad_accum_steps=accum)
  opt_state = parallel.replicate(tx.init(params), mesh)
  params = parallel.replicate(params, mesh)
  step_fn = make_train_step(tx, mesh)

  ckpt = checkpoints.Checkpointer(args.workdir, max_to_keep=2, keep_best=True,
                                  best_metric="neg_loss", async_save=True)
  preemption = checkpoints.PreemptionWatch()
  abstract = checkpoints.abstract_tree({"params": params, "opt_state": opt_state})
  restored = ckpt.restore_latest(abstract)
  if restored is None:
    step, rng, position = 0, jax.random.key(11), {"epoch": 0, "index": 0}
  else:
    step, state, position, rng = restored
    params, opt_state = state["params"], state["opt_state"]
    print(f"RESUMED {step} {position}", flush=True)

  def next_batch(position):
    """Epoch-shuffled batches; the position is where the next batch starts. Each process
    takes its rows of the global batch."""
    order = np.random.default_rng(100 + position["epoch"]).permutation(n_examples)
    idx = order[position["index"]:position["index"] + batch_size]
    idx = idx[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    nxt = position["index"] + batch_size
    new = {"epoch": position["epoch"], "index": nxt} if nxt < n_examples else \
        {"epoch": position["epoch"] + 1, "index": 0}
    return {k: v[idx] for k, v in data.items()}, new

  losses = {}
  while step < args.steps:
    if preemption.reached(step):  # Read once per step, before fetching the next batch.
      ckpt.save(step, {"params": params, "opt_state": opt_state}, data_position=position,
                rng=rng)  # No-op if this step was just saved.
      ckpt.close()
      print(f"PREEMPTED {step} process {jax.process_index()}", flush=True)
      return
    local, position = next_batch(position)
    rng, sub = jax.random.split(rng)
    params, opt_state, loss, _ = step_fn(params, opt_state,
                                         parallel.host_batch_to_global(local, mesh), sub)
    step += 1
    losses[step] = float(parallel.global_to_host(loss))
    print(f"step {step} loss {losses[step]:.8f}", flush=True)
    if step % 2 == 0:
      ckpt.save(step, {"params": params, "opt_state": opt_state}, data_position=position,
                rng=rng, metrics={"neg_loss": -losses[step]})
    time.sleep(args.step_sleep)
  ckpt.close()
  if jax.process_index() == 0:
    np.savez(args.out, loss_steps=np.asarray(list(losses)),
             losses=np.asarray(list(losses.values())), **flat_params(params))
  print("FINISHED", flush=True)


def run_main(args):
  """centerclip_jax.main as host `process_id`, recording what it reads and writes."""
  import json
  import threading
  if args.num_processes > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS=args.coordinator,
                      JAX_NUM_PROCESSES=str(args.num_processes),
                      JAX_PROCESS_ID=str(args.process_id))
  from absl import app
  from centerclip_jax import config as config_lib
  from centerclip_jax import console
  from centerclip_jax import main as main_lib
  from centerclip_jax.data import pipeline
  from centerclip_jax.training import trainer
  lock, record = threading.Lock(), open(args.out, "a", encoding="utf-8")

  def log(**item):
    with lock:
      record.write(json.dumps(item) + "\n")
      record.flush()

  train_tf_dataset = pipeline.train_tf_dataset

  def recording_train_tf_dataset(*a, tokenize=None, **kw):
    inner = tokenize or pipeline._default_tokenize()  # pylint: disable=protected-access

    def recording_tokenize(texts, max_words):
      for text in texts:
        log(caption=text)
      return inner(texts, max_words)

    return train_tf_dataset(*a, tokenize=recording_tokenize, **kw)

  pipeline.train_tf_dataset = recording_train_tf_dataset
  write_json = trainer.checkpoints_lib.write_json

  def recording_write_json(path, obj):
    log(wrote=str(path))
    return write_json(path, obj)

  trainer.checkpoints_lib.write_json = recording_write_json
  app.run(main_lib.main, argv=["centerclip_jax.main", *args.rest],
          flags_parser=console.flags_parser("config", config_lib.normalize_switches))


if __name__ == "__main__":
  {"parity": run_parity, "resume": run_resume, "main": run_main}[ARGS.mode](ARGS)
