"""Fault injection for training: kill -9 mid-run and mid-save, a corrupt newest checkpoint,
non-finite loss/gradients, and failing writes (ENOSPC/EIO) of checkpoints and results.json.

Each test injects its fault and checks that the run continues or stops with one line, and
that no finished work is lost (resumed params equal an uninterrupted run's; the previous
checkpoint or results file still reads).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import threading

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax.training import checkpoints
from tests.test_checkpoints import REPO, TOTAL_STEPS, _assert_trees_equal, _cmd, _env, _state
from tests.test_resolver import truncate_state


def _params_equal(a, b):
  keys = [k for k in a if k.startswith("param")]
  assert keys and set(keys) == {k for k in b if k.startswith("param")}
  return max(float(np.abs(a[k] - b[k]).max()) for k in keys)


def _start(cmd, env, marker=None, sig=signal.SIGKILL):
  """Starts a worker, read by a thread that sends `sig` when a line starts with `marker`;
  `_finish` of the result waits for it: (returncode, log)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  log = []

  def read():
    nonlocal marker
    for line in proc.stdout:
      log.append(line)
      if marker and line.startswith(marker):
        proc.send_signal(sig)
        marker = None

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  return proc, reader, log


def _finish(started, timeout=900):
  proc, reader, log = started
  try:
    proc.wait(timeout=timeout)
    reader.join(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, "".join(log)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
  """An uninterrupted run, a run SIGKILLed after step 7, a run SIGKILLed while its async
  save of step 4 is being written; then each killed run resumed (plus a copy of the first
  with its newest checkpoint truncated)."""
  tmp = tmp_path_factory.mktemp("faults")
  # The session's persistent XLA cache (tests/conftest.py): every run after the first
  # anywhere reuses the compiled step. The three first runs go at once, then the resumes.
  env = _env(os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp / "xla_cache")
  full = _start(_cmd(tmp / "full", tmp / "full.npz"), env)
  # kill -9 mid-run: 1 s per step so that the kill lands between steps 7 and 8.
  train = _start(_cmd(tmp / "train", tmp / "x.npz", step_sleep=1.0), env, marker="step 7 ")
  save = _start(_cmd(tmp / "save", tmp / "y.npz") + ["--kill_in_save", "4"], env)
  (rc_train, log_train), (rc_save, log_save) = _finish(train), _finish(save)
  rc_full, full_log = _finish(full)
  assert rc_full == 0, full_log[-3000:]
  assert rc_train == -signal.SIGKILL, log_train[-3000:]
  assert rc_save == -signal.SIGKILL and "KILLING in save 4" in log_save, log_save[-3000:]
  after_kill = {
      "train": sorted(os.listdir(tmp / "train" / "checkpoints")),
      "save": sorted(os.listdir(tmp / "save" / "checkpoints"))}
  shutil.copytree(tmp / "train", tmp / "corrupt")
  newest = max(int(d) for d in after_kill["train"] if d.isdigit())
  truncate_state(tmp / "corrupt" / "checkpoints" / str(newest))
  out = {"full": dict(np.load(tmp / "full.npz")), "after_kill": after_kill, "newest": newest}
  resumed = {name: _start(_cmd(tmp / name, tmp / f"{name}.npz"), env)
             for name in ("train", "save", "corrupt")}
  for name, started in resumed.items():
    rc, log = _finish(started)
    assert rc == 0, log[-3000:]
    out[name] = dict(np.load(tmp / f"{name}.npz"))
    out[name + "_log"] = log
  out["tmp"] = tmp
  return out


def _resumed_from(log):
  lines = [l for l in log.splitlines() if l.startswith("RESUMED ")]
  return int(lines[0].split()[1]) if lines else 0


def test_kill9_during_training_resumes_exactly(killed_runs):
  r = killed_runs
  # Saved every 2 steps (each save waits for the one before), killed after step 7: step 4
  # is complete, step 6 too unless its async write had not finished (then it is a
  # temporary folder, not a step).
  assert r["newest"] in (4, 6) and "4" in r["after_kill"]["train"]
  start = _resumed_from(r["train_log"])
  assert start == r["newest"]
  np.testing.assert_array_equal(r["train"]["loss_steps"], np.arange(start + 1, TOTAL_STEPS + 1))
  np.testing.assert_array_equal(r["train"]["losses"], r["full"]["losses"][start:])
  assert _params_equal(r["full"], r["train"]) == 0.0


def test_kill9_during_async_save_resumes_from_last_complete(killed_runs):
  r = killed_runs
  # Step 4 was half-written (a temporary folder, never committed): it is not a step.
  left = r["after_kill"]["save"]
  assert "2" in left and "4" not in left, left
  assert any(d.startswith("4.orbax-checkpoint-tmp") for d in left), left
  assert _resumed_from(r["save_log"]) == 2
  assert _params_equal(r["full"], r["save"]) == 0.0
  assert not glob.glob(str(r["tmp"] / "save" / "checkpoints" / "*tmp*"))  # cleaned up


def test_corrupt_newest_checkpoint_falls_back_and_continues(killed_runs):
  r = killed_runs
  log, newest = r["corrupt_log"], r["newest"]
  assert f"checkpoint step {newest} in" in log and "is unreadable" in log, log[-3000:]
  assert _resumed_from(log) == newest - 2 > 0, log[-3000:]
  assert _params_equal(r["full"], r["corrupt"]) == 0.0
  steps = sorted(os.listdir(r["tmp"] / "corrupt" / "checkpoints"))
  assert f"corrupt.{newest}" in steps  # set aside, kept for a post-mortem


def test_corrupt_newest_checkpoint_in_process(tmp_path, caplog):
  """The same fallback in one process: a warning naming the step, then saving continues."""
  with checkpoints.Checkpointer(tmp_path, max_to_keep=3, async_save=False) as c:
    c.save(1, _state(1), data_position={"step": 1}, rng=None)
    c.save(2, _state(2), data_position={"step": 2}, rng=None)
  os.remove(tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt")
  with checkpoints.Checkpointer(tmp_path, max_to_keep=3, async_save=False) as c:
    with caplog.at_level("WARNING"):
      step, state, position, _ = c.restore_latest(_state(0))
    assert step == 1 and position == {"step": 1}
    _assert_trees_equal(state, _state(1))
    assert any("checkpoint step 2" in m and "unreadable" in m for m in caplog.messages)
    assert c.all_steps() == [1]
    assert c.save(2, _state(3), data_position={"step": 2}, rng=None)  # writes step 2 again
    assert c.all_steps() == [1, 2]
  # A structure that matches no checkpoint is an error, and nothing is set aside.
  with checkpoints.Checkpointer(tmp_path, max_to_keep=3, async_save=False) as c:
    with pytest.raises(ValueError, match="no checkpoint .* can be read"):
      c.restore_latest({"params": {"other": jnp.zeros(2)}})
    assert c.all_steps() == [1, 2]


# ----------------------------------------------------------------------------- write faults


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_checkpoint_write_error_names_the_path(tmp_path, monkeypatch, code):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top
  with checkpoints.Checkpointer(tmp_path, max_to_keep=3) as c:
    c.save(4, _state(4), data_position={"step": 4}, rng=None)
    c.wait()
    orig = json_checkpoint_handler.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

    async def failing(self, x, directory):
      if "checkpoints/5" in str(directory):
        raise OSError(code, os.strerror(code), str(directory / "metadata"))
      return await orig(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing)
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
      c.save(5, _state(5), data_position={"step": 5}, rng=None)
      c.wait()  # async: the error of the background write surfaces here
    msg = str(info.value)
    print(msg)
    assert "\n" not in msg and "writing checkpoint step 5 failed" in msg
    assert str(tmp_path / "checkpoints" / "5") in msg and os.strerror(code) in msg
    assert "previous checkpoint (step 4) is intact" in msg
    monkeypatch.undo()
    assert c.all_steps() == [4]
  with checkpoints.Checkpointer(tmp_path, max_to_keep=3) as c:
    step, state, _, _ = c.restore_latest(_state(0))
    assert step == 4
    _assert_trees_equal(state, _state(4))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_results_json_write_error_keeps_the_old_file(tmp_path, monkeypatch, code):
  path = tmp_path / "results.json"
  checkpoints.write_json(path, {"metrics": {"R@1": 1.0}})
  write_text = epath.Path.write_text

  def failing(self, *args, **kwargs):
    if self.name.endswith(".tmp"):
      write_text(self, "{\"metr")  # a partial write, then the error
      raise OSError(code, os.strerror(code), str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(type(epath.Path(path)), "write_text", failing)
  with pytest.raises(checkpoints.CheckpointWriteError) as info:
    checkpoints.write_json(path, {"metrics": {"R@1": 2.0}})
  msg = str(info.value)
  assert msg.startswith(f"writing {path} failed: {os.strerror(code)}")
  assert "previous version is unchanged" in msg
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {"metrics": {"R@1": 1.0}}
  assert sorted(os.listdir(tmp_path)) == ["results.json"]  # no temporary left


# ----------------------------------------------------------------------------- non-finite


class _TinyModel:
  """Stands in for CenterCLIP in `make_train_step`: mean-pooled frames and a bag of
  tokens through one matrix each; params['clip']['logit_scale'] as CLIP has it."""

  def apply(self, variables, frames, frame_mask, text, train, rngs):
    del frame_mask, train, rngs
    p = variables["params"]
    video = frames.reshape(frames.shape[0], -1) @ p["clip"]["v"]
    words = jax.nn.one_hot(text, 8).sum(1) @ p["clip"]["t"]
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return norm(video), norm(words), jnp.exp(p["clip"]["logit_scale"])


def test_nonfinite_update_is_dropped_and_counted_in_the_step():
  from centerclip_jax.training import optim, trainer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {"clip": {"v": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32),
                     "t": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                     "logit_scale": jnp.float32(np.log(10.0))}}
  tx, _ = optim.make_optimizer(params, lr=1e-2, coef_lr=1.0, total_steps=10)
  step = jax.jit(trainer.make_train_step(_TinyModel(), tx))
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(0), "nonfinite": jnp.int32(0),
           "first_nonfinite": jnp.int32(0)}
  batch = {"frames": jnp.asarray(rng.normal(size=(4, 1, 2, 2, 3)), jnp.float32),
           "frame_mask": jnp.ones((4, 1), bool),
           "text": jnp.asarray(rng.integers(0, 8, size=(4, 5)), jnp.int32)}
  state, m = step(state, batch)
  assert int(m["nonfinite_updates"]) == 0 and np.isfinite(float(m["loss"]))
  before = jax.device_get(state)
  poisoned = dict(batch, frames=batch["frames"].at[1, 0, 0, 0, 0].set(jnp.nan))
  state, m = step(state, poisoned)
  assert np.isnan(float(m["loss"])) and int(m["nonfinite_updates"]) == 1
  assert int(state["first_nonfinite"]) == 2 and int(state["step"]) == 2
  after = jax.device_get(state)
  _assert_trees_equal(after["params"], before["params"])      # not applied
  _assert_trees_equal(after["opt_state"], before["opt_state"])  # moments untouched
  state, m = step(state, batch)  # training goes on with finite batches
  assert int(m["nonfinite_updates"]) == 1 and int(state["first_nonfinite"]) == 2
  moved = jax.device_get(state["params"])["clip"]["v"]
  assert np.abs(moved - before["params"]["clip"]["v"]).max() > 1e-4


def _poison_batch(monkeypatch, index):
  """Makes the `index`-th training batch of a fresh run non-finite: every frame masked out
  (frames are uint8, so no NaN pixel; meanP of no frame is 0 / 0)."""
  from centerclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  orig = pipeline.train_dataset

  def poisoned(*args, **kwargs):
    for i, b in enumerate(orig(*args, **kwargs)):
      if i + kwargs.get("start_step", 0) == index:
        b = dict(b, frame_mask=np.zeros_like(b["frame_mask"]))
      yield b

  monkeypatch.setattr(pipeline, "train_dataset", poisoned)


def _tiny_config(tmp_path, **train):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config()
  c.dataset = "synthetic_video_text/tiny"
  c.data_dir = str(tmp_path.parent / "tfds")
  c.val_split = ""
  c.eval.batch_size = 4
  c.train.global_batch_size = 8
  c.train.num_train_steps = 6
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.train.update(train)
  return c


def test_nonfinite_loss_stops_naming_step_and_checkpoint(tmp_path, monkeypatch):
  from centerclip_jax.training import trainer  # pylint: disable=g-import-not-at-top
  _poison_batch(monkeypatch, 2)  # the 3rd step
  workdir = tmp_path / "run"
  with pytest.raises(trainer.NonFiniteError) as info:
    trainer.train_and_evaluate(_tiny_config(tmp_path), str(workdir))
  msg = str(info.value)
  print(msg)
  assert msg.startswith("step 3: non-finite loss or gradients")
  assert f"last good checkpoint is step 2 ({workdir}@2)" in msg and "skip_nonfinite" in msg
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # nothing saved after it


def test_skip_nonfinite_counts_skips(tmp_path, monkeypatch, caplog):
  """Also runs the whole loop with `model.remat` on (recomputed blocks, donated state),
  which on CPU warns that it saves no memory there."""
  from centerclip_jax.training import trainer  # pylint: disable=g-import-not-at-top
  _poison_batch(monkeypatch, 2)
  workdir = tmp_path / "run"
  config = _tiny_config(tmp_path, skip_nonfinite=True)
  config.model.remat = True
  with caplog.at_level("WARNING"):
    results = trainer.train_and_evaluate(config, str(workdir))
  assert any(m.startswith("skipped 1 non-finite update(s) so far (first at step 3")
             for m in caplog.messages), caplog.messages
  assert any(m.startswith("config.model.remat saves no memory on CPU")
             for m in caplog.messages), caplog.messages
  assert results["nonfinite_skipped"] == 1
  assert json.loads((workdir / "results.json").read_text())["nonfinite_skipped"] == 1
  assert np.isfinite(results["metrics"]["text_to_video"]["R@1"])
