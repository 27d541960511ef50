"""`train_and_evaluate(config, workdir)`: fine-tune CenterCLIP and evaluate it.

One jit-compiled step over a mesh of every device of every host (`parallel.py`): params
and optimizer state replicated, the global batch sharded on the `batch` axis, the
contrastive loss written on the global batch. Checkpoints (orbax) keep the last N and
the best by text->video R@1; a run resumes exactly from the latest readable one (step,
params, optimizer state, RNG, data position); a preemption notice (SIGTERM; on several
hosts JAX's preemption sync point) saves first. A non-finite loss or gradient is never
applied: the run stops, or skips it with `config.train.skip_nonfinite`. Writes
TensorBoard scalars and `results.json` to the workdir.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from clu import metric_writers
import tqdm

from centerclip_jax.training import checkpoints as checkpoints_lib
from centerclip_jax import config as config_lib
from centerclip_jax import console
from centerclip_jax.evaluation import evaluate as evaluate_lib
from centerclip_jax.training import losses
from centerclip_jax.training import optim
from centerclip_jax import parallel
from centerclip_jax import paths
from centerclip_jax.data import pipeline
from centerclip_jax.weights import loading

SELECTION_METRIC = ("text_to_video", "R@1")


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.dataset`, prepared (the synthetic demo builds itself)."""
  import centerclip_jax.data.datasets  # pylint: disable=g-import-not-at-top,unused-import
  data_dir = os.fspath(paths.user_path(config.data_dir)) if config.data_dir else None
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset: unknown dataset {config.dataset!r} ({e})") from None
  if not builder.is_prepared():
    if config.dataset.split("/")[0] == "synthetic_video_text":
      console.say(f"building the synthetic demo dataset in {builder.data_dir} (once)")
      with console.quiet_stdout():
        tfds.display_progress_bar(False)
        builder.download_and_prepare()
        tfds.display_progress_bar(True)
    else:
      raise FileNotFoundError(
          f"config.data_dir: dataset {config.dataset!r} is not prepared at "
          f"{builder.data_dir}. Build it with `python tools/prepare_data.py {config.dataset} "
          f"--manual_dir RAW --data_dir {data_dir or '~/tensorflow_datasets'}` (see README).")
  for field in ("train_split", "val_split", "eval_split"):
    split = config.get(field)
    if split and split not in builder.info.splits:
      raise ValueError(f"config.{field}: {split!r} is not a split of {config.dataset} "
                       f"(it has {sorted(builder.info.splits)})")
  return builder


def initial_state(params, tx, rng) -> dict:
  """The train state `make_train_step` takes, before the first step."""
  zero = jnp.zeros((), jnp.int32)
  return {"step": zero, "params": params, "opt_state": tx.init(params), "rng": rng,
          "nonfinite": zero, "first_nonfinite": zero}


def make_train_step(model, tx, trainable=None):
  """(state, batch) -> (state, metrics); state = {step, params, opt_state, rng, nonfinite,
  first_nonfinite}: `step` counts micro-steps; `nonfinite` the updates dropped for a
  non-finite loss or gradient, `first_nonfinite` the micro-step of the first (0: none).

  `trainable` (bools, the params' tree; `optim.trainable_mask`; None: all) marks the
  params that get gradients. Frozen ones get none, as `requires_grad=False` in PyTorch: no
  backward for them (conv1's weight gradient and the token-embedding scatter are never
  computed, nor their inputs kept), and `grad_norm` is that of the trainable params, the
  norm `clip_grad_norm_` clips and returns."""

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state["rng"])

    def loss_fn(params):
      if trainable is not None:
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p),
                              params, trainable)
      video, text, logit_scale = model.apply(
          {"params": params}, batch["frames"], batch["frame_mask"], batch["text"],
          train=True, rngs={"cluster": step_rng})
      return losses.symmetric_infonce(video, text, logit_scale)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    grad_norm = optax.global_norm(grads)

    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optim.clamp_logit_scale(optax.apply_updates(params, updates)), opt_state

    # A non-finite loss or gradient never reaches params or optimizer state: the update
    # is dropped and counted (the host reads the count when it logs or saves). A `cond`,
    # not a `where` per leaf: the select made XLA copy every donated moment and param
    # at the start of the step, ~1 GB alive through the backward pass at ViT-B/32.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o),
                                     state["params"], state["opt_state"])
    bad = state["nonfinite"] + (~finite).astype(jnp.int32)
    first = jnp.where((state["nonfinite"] == 0) & ~finite, state["step"] + 1,
                      state["first_nonfinite"])
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": rng, "nonfinite": bad, "first_nonfinite": first}
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "logit_scale": jnp.exp(new_state["params"]["clip"]["logit_scale"]),
               "nonfinite_updates": bad}
    return new_state, metrics

  return train_step


class NonFiniteError(ValueError):
  """Training met a non-finite loss or gradient (and config.train.skip_nonfinite is off)."""


class NonFiniteCheck:
  """Reads the train state's count of dropped non-finite updates when the host syncs
  anyway (logging, saving): stops the run, or with `skip` logs the new skips."""

  def __init__(self, skip: bool, ckpt, accum: int):
    self.skip, self.ckpt, self.accum, self.count = bool(skip), ckpt, accum, 0

  def check(self, count, state) -> None:
    count = int(count)
    if count == self.count:
      return
    first = (int(state["first_nonfinite"]) - 1) // self.accum + 1
    if self.skip:
      logging.warning("skipped %d non-finite update(s) so far (first at step %d; "
                      "config.train.skip_nonfinite=True)", count, first)
      self.count = count
      return
    self.ckpt.wait()
    good = self.ckpt.latest_step()
    where = (f"the last good checkpoint is step {good} ({self.ckpt.directory.parent}@{good})"
             if good is not None else "no checkpoint was saved before it")
    raise NonFiniteError(
        f"step {first}: non-finite loss or gradients (the update was not applied); training "
        f"stops, {where}. Lower config.train.lr, or set config.train.skip_nonfinite=True to "
        "skip such updates")


def _num_train_steps(config, builder, counts=None) -> tuple[int, int]:
  """(total optimizer updates, updates per epoch); an epoch is every video
  (`data.train_examples='videos'`) or every (video, caption) pair ('captions') once,
  `counts` the captions per training video (`pipeline.caption_counts`)."""
  examples = config.data.get("train_examples", "videos")
  n = pipeline.num_train_examples(builder, config.train_split, examples, counts)
  steps_per_epoch = n // config.train.global_batch_size
  if steps_per_epoch < 1:
    what = "videos" if examples == "videos" else "(video, caption) pairs"
    raise ValueError(f"config.train.global_batch_size ({config.train.global_batch_size}) is "
                     f"larger than the {n} training {what} of {config.train_split}")
  total = (config.train.num_train_steps if config.train.num_train_steps > 0
           else steps_per_epoch * config.train.num_epochs)
  return total, steps_per_epoch


class StepTimer:
  """Seconds per FINISHED train step: `lap(outputs)` blocks on the latest step's outputs
  and returns the wall time since the previous lap (or reset) over the steps counted
  by `step()`, leaving out the time between `pause(outputs)` and `resume()`."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.busy, self.steps, self.start = 0.0, 0, time.perf_counter()

  def step(self):
    self.steps += 1

  def pause(self, outputs):
    jax.block_until_ready(outputs)
    self.busy += time.perf_counter() - self.start

  def resume(self):
    self.start = time.perf_counter()

  def lap(self, outputs) -> float:
    self.pause(outputs)
    dt = self.busy / max(self.steps, 1)
    self.reset()
    return dt


def _flat(results: dict[str, Any], prefix: str) -> dict[str, float]:
  return {f"{prefix}/{d}/{k}": float(v) for d, m in results.items() if isinstance(m, dict)
          for k, v in m.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (mode train / train_and_eval) and evaluates; returns the results dict."""
  start_time = time.time()
  config_lib.validate(config)
  parallel.initialize_distributed()
  workdir_path = paths.user_path(workdir)  # local or gs://
  workdir_path.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  say = console.say if is_main else logging.info
  mesh = parallel.make_mesh()
  config_lib.validate_mesh(config, jax.device_count(), jax.process_count())
  say(f"devices: {jax.device_count()} x {jax.devices()[0].platform} on "
      f"{jax.process_count()} host(s)")
  if config.model.remat and jax.devices()[0].platform == "cpu":
    logging.warning("config.model.remat saves no memory on CPU: XLA:CPU drops the barriers "
                    "that keep the recomputed blocks apart and merges them back into the "
                    "forward pass (it does on TPU and GPU)")
  logging.info("workdir %s; config:\n%s", workdir_path, config)

  builder = get_builder(config)
  say(f"dataset {config.dataset} ({builder.data_dir}): " + ", ".join(
      f"{s} {builder.info.splits[s].num_examples} videos" for s in
      dict.fromkeys(x for x in (config.train_split, config.val_split, config.eval_split) if x)))
  model, params = loading.load_model(config)
  logging.info("model: %s; clustering steps: %s", model.clip_config, model.steps or "none")
  if is_main:
    (workdir_path / loading.CLIP_CONFIG_FILE).write_text(model.clip_config.to_json())
    (workdir_path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
  res = model.clip_config.image_resolution
  select_split = config.val_split or config.eval_split
  writer = metric_writers.create_default_writer(str(workdir_path), just_logging=not is_main)
  results: dict[str, Any] = {"config": config.to_dict(), "dataset": config.dataset,
                             "selection_split": select_split,
                             "selection_note": ("" if config.val_split else
                                                "no validation split: model selection on the "
                                                "eval split, as the original code does")}

  eval_results = None
  if config.mode in ("train", "train_and_eval"):
    params, train_info, eval_results = _train(config, workdir_path, builder, model, params,
                                              mesh, writer, res, select_split)
    results.update(train_info)
  if config.mode in ("eval", "train_and_eval"):
    if eval_results is None:
      eval_results = evaluate_lib.evaluate_split(model, params, builder, config.eval_split,
                                                 config, mesh)
    else:
      logging.info("the final step is the best on %s, the eval split: reusing its metrics",
                   config.eval_split)
    writer.write_scalars(int(results.get("train_steps", 0)),
                         _flat(eval_results, f"eval_{config.eval_split}"))
    results["eval_split"] = config.eval_split
    results["metrics"] = {k: v for k, v in eval_results.items()
                          if k not in ("counts", "warning")}
    results["counts"] = eval_results.get("counts")
    results["warning"] = eval_results.get("warning", "")
    say(f"\n{config.dataset} / {config.eval_split}\n" + evaluate_lib.format_table(eval_results))
  results["wall_time_s"] = time.time() - start_time
  writer.flush()
  if is_main:
    checkpoints_lib.write_json(workdir_path / "results.json", results)
    say(f"results: {workdir_path / 'results.json'}; checkpoints: {workdir_path / 'checkpoints'}; "
        f"TensorBoard: tensorboard --logdir {workdir_path}")
  return results


def _train(config, workdir, builder, model, params, mesh, writer, res, select_split):
  """The training loop; returns (final params, info for results.json, and the metrics of
  the final params on the eval split when the selection eval already computed them)."""
  t = config.train
  examples = config.data.get("train_examples", "videos")
  counts = (pipeline.caption_counts(builder, config.train_split) if examples == "captions"
            else None)
  total_steps, steps_per_epoch = _num_train_steps(config, builder, counts)
  tx, schedules = optim.make_optimizer(
      params, lr=t.lr, coef_lr=t.coef_lr, total_steps=total_steps,
      optimizer=t.get("optimizer", "adamw"), warmup_proportion=t.warmup_proportion,
      weight_decay=t.weight_decay, clip_norm=t.clip_norm,
      grad_accum_steps=t.grad_accum_steps, freeze_layer_num=t.freeze_layer_num)
  state = initial_state(params, tx, jax.random.PRNGKey(config.seed + 1))
  ckpt = checkpoints_lib.Checkpointer(
      str(workdir), max_to_keep=t.keep_checkpoints,
      best_metric="/".join(SELECTION_METRIC), best_mode="max")
  start_step, data_position = 0, {"step": 0}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    start_step, state, data_position, _ = restored
    if jax.process_index() == 0:
      console.say(f"resumed from step {start_step}")
    else:
      logging.info("resumed from step %d", start_step)
  state = parallel.replicate(state, mesh)

  micro_bs = t.global_batch_size // t.grad_accum_steps
  host_batches = pipeline.train_dataset(
      builder, config.train_split, global_batch_size=micro_bs,
      max_frames=model.max_frames, max_words=config.model.max_words, resolution=res,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), start_step=int(data_position["step"]),
      shuffle_buffer=config.data.shuffle_buffer, examples=examples,
      max_captions=None if counts is None else int(counts.max()))
  # Global batches, the next ones already on their way to the devices.
  train_iter = parallel.prefetch_to_mesh(host_batches, mesh,
                                         size=config.data.get("device_prefetch", 2))
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  trainable = optim.trainable_mask(params, freeze_layer_num=t.freeze_layer_num)
  step_fn = jax.jit(make_train_step(model, tx, trainable), in_shardings=(rep, shard),
                    out_shardings=(rep, rep), donate_argnums=(0,))
  preemption = checkpoints_lib.PreemptionWatch()
  nonfinite = NonFiniteCheck(t.skip_nonfinite, ckpt, accum=t.grad_accum_steps)
  lr_fn = schedules.get("new", next(iter(schedules.values())))

  micro_step = int(data_position["step"])
  timer, compile_done = StepTimer(), False
  step_times = []
  last_selection = None
  accum = t.grad_accum_steps
  if jax.process_index() == 0:
    console.say(f"train: {total_steps} steps ({steps_per_epoch} per epoch) of "
                f"{t.global_batch_size} examples")
  bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  for step in range(start_step, total_steps):
    for _ in range(accum):
      batch = next(train_iter)
      tic = time.time()
      state, metrics = step_fn(state, batch)
      micro_step += 1
    timer.step()
    bar.update(1)
    if not compile_done:
      jax.block_until_ready(metrics)
      compile_done = True
      logging.info("first step (incl. compile) took %.1f s", time.time() - tic)
      timer.reset()
    elif (step + 1) % t.log_every_steps == 0 or step + 1 == total_steps:
      dt = timer.lap(metrics)  # Blocks: s/step of the steps finished since the last lap.
      metrics = jax.device_get(metrics)
      nonfinite.check(metrics["nonfinite_updates"], state)
      step_times.append(dt)
      scalars = {k: float(v) for k, v in metrics.items()}
      scalars.update({"lr": float(lr_fn(step)), "step_time_s": dt,
                      "videos_per_s": t.global_batch_size / dt})
      writer.write_scalars(step + 1, scalars)
      logging.info("step %d/%d: loss %.4f, %.3f s/step", step + 1, total_steps,
                   scalars["loss"], dt)
      bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
    end_of_epoch = (step + 1) % steps_per_epoch == 0
    epoch = (step + 1) // steps_per_epoch
    do_eval = (end_of_epoch and epoch % t.eval_every_epochs == 0) or step + 1 == total_steps
    eval_metrics = None
    paused = do_eval or (step + 1) % t.checkpoint_every_steps == 0
    if paused:  # Eval and checkpoint time stay out of the step time.
      timer.pause(state)
    if do_eval and (config.mode == "train_and_eval" or config.val_split):
      sel = evaluate_lib.evaluate_split(model, state["params"], builder, select_split, config, mesh)
      last_selection = sel
      writer.write_scalars(step + 1, _flat(sel, f"select_{select_split}"))
      value = sel[SELECTION_METRIC[0]][SELECTION_METRIC[1]]
      eval_metrics = {"/".join(SELECTION_METRIC): value}
      logging.info("epoch %d: %s R@1 (t2v) on %s = %.2f", epoch, config.dataset,
                   select_split, value)
      if jax.process_index() == 0:
        bar.write(f"epoch {epoch}, step {step + 1}: text_to_video R@1 on {select_split} "
                  f"= {value:.2f}")
    preempted = preemption.reached(step + 1)  # read once per step, the same on every host
    if (do_eval or (step + 1) % t.checkpoint_every_steps == 0 or preempted
        or step + 1 == total_steps):
      nonfinite.check(state["nonfinite"], state)  # never save past a dropped update
      ckpt.save(step + 1, state, data_position={"step": micro_step}, rng=state["rng"],
                metrics=eval_metrics)
    if paused:
      timer.resume()
    if preempted:
      ckpt.wait()
      logging.warning("preempted: saved step %d, exiting", step + 1)
      raise SystemExit(143)
  bar.close()
  ckpt.wait()
  final = state["params"]
  best_step = ckpt.best_step()  # over every checkpoint of the run, before a resume too
  if best_step is not None and best_step != total_steps:
    logging.info("restoring the best checkpoint (step %d) for the final eval", best_step)
    final = ckpt.restore(best_step, state)[1]["params"]
  best_metrics = (ckpt.metrics(best_step) or {}) if best_step is not None else {}
  ckpt.close()
  info = {"train_steps": total_steps, "steps_per_epoch": steps_per_epoch,
          "best_step": best_step,
          "best_selection_R@1": best_metrics.get("/".join(SELECTION_METRIC)),
          "median_step_time_s": float(np.median(step_times)) if step_times else None,
          "nonfinite_skipped": nonfinite.count,
          "global_batch_size": t.global_batch_size}
  reuse = (last_selection if best_step == total_steps and select_split == config.eval_split
           else None)
  return final, info, reuse
