"""Tests for centerclip_jax.training.checkpoints: round trip, retention (last N + best), params-only
load, the preemption flag (one process; two processes agreeing through JAX's preemption sync
point), and an exact kill-and-resume of a small training run."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax.training import checkpoints, optim
from centerclip_jax.weights import resolver
from tests import watch_processes

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
TOTAL_STEPS = 8
KILL_AFTER_STEP = 3


@functools.lru_cache(maxsize=None)
def _state(seed=0):
  """A train state with a real (MultiSteps + param groups) optimizer state."""
  rng = np.random.default_rng(seed)
  params = {"clip": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                     "logit_scale": jnp.float32(2.5),
                     "ln_final": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
  tx, _ = optim.make_optimizer(params, lr=0.1, coef_lr=0.5, total_steps=10,
                               grad_accum_steps=2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  update = jax.jit(tx.update)
  for _ in range(3):  # Non-trivial moments, counters and accumulators.
    upd, opt_state = update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, upd)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(3)}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_rng_data_position(tmp_path):
  state = _state()
  key = jax.random.key(123)
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.restore_latest(state) is None
    assert ckpt.latest_step() is None and ckpt.best_step() is None
    ckpt.save(7, state, data_position={"epoch": 2, "index": 96, "order_seed": 5}, rng=key,
              metrics={"text_to_video/R@1": np.float32(41.5)})
    ckpt.wait()
  # A fresh object (a new process after a restart) sees the same checkpoint.
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    step, restored, position, rng = ckpt.restore_latest(checkpoints.abstract_tree(state))
    assert step == 7 and ckpt.latest_step() == 7 and ckpt.best_step() == 7
    assert position == {"epoch": 2, "index": 96, "order_seed": 5}
    assert ckpt.metrics(7) == {"text_to_video/R@1": 41.5}
    _assert_trees_equal(restored, state)
    assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(key))
    np.testing.assert_array_equal(jax.random.uniform(rng, (3,)), jax.random.uniform(key, (3,)))
    # Restore by path, and a raw uint32 key.
    ckpt.save(8, state, data_position={"i": 1}, rng=jax.random.PRNGKey(4))
    ckpt.wait()
    step, restored, _, raw = ckpt.restore(ckpt.step_path(8), state)
    assert step == 8
    _assert_trees_equal(restored, state)
    np.testing.assert_array_equal(raw, jax.random.PRNGKey(4))
    # Saving an existing step is a no-op unless forced.
    assert ckpt.save(8, _state(1), data_position={"i": 2}, rng=None) is False
    assert ckpt.save(8, _state(1), data_position={"i": 3}, rng=None, force=True)
    ckpt.wait()
    step, restored, position, rng = ckpt.restore(8, state)
    assert position == {"i": 3} and rng is None
    _assert_trees_equal(restored, _state(1))


def test_keeps_last_n_plus_best(tmp_path):
  state = _state()
  r1 = [10.0, 30.0, 20.0, 5.0, 7.0, 8.0]  # Best at step 2.
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2, best_metric="text_to_video/R@1") as c:
    for step, value in enumerate(r1, start=1):
      c.save(step, state, data_position={}, rng=None,
             metrics={"text_to_video/R@1": value, "video_to_text/R@1": -value})
    c.wait()
    assert c.all_steps() == [2, 5, 6]
    assert c.best_step() == 2
    # Saves without the selection metric are kept as "last N" only, never as the best.
    c.save(7, state, data_position={}, rng=None, metrics={"train/loss": 0.5})
    c.save(8, state, data_position={}, rng=None)
    c.wait()
    assert c.all_steps() == [2, 7, 8]
    assert c.best_step() == 2
    assert c.metrics(7) == {"train/loss": 0.5} and c.metrics(8) is None
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 7, 8]

  # 'min' mode on another metric.
  with checkpoints.Checkpointer(tmp_path / "min", max_to_keep=1, best_metric="loss",
                                best_mode="min") as c:
    for step, value in enumerate([3.0, 1.0, 2.0, 4.0], start=1):
      c.save(step, state, data_position={}, rng=None, metrics={"loss": value})
    c.wait()
    assert c.all_steps() == [2, 4] and c.best_step() == 2

  # keep_best=False: last N only.
  with checkpoints.Checkpointer(tmp_path / "nobest", max_to_keep=2, keep_best=False) as c:
    for step, value in enumerate(r1, start=1):
      c.save(step, state, data_position={}, rng=None, metrics={"text_to_video/R@1": value})
    c.wait()
    assert c.all_steps() == [5, 6] and c.best_step() is None


def test_load_params_only(tmp_path):
  state = _state()
  with checkpoints.Checkpointer(tmp_path, async_save=False) as c:
    c.save(1, _state(5), data_position={}, rng=None)
    c.save(4, state, data_position={}, rng=None)
    path1 = c.step_path(1)
  params = resolver.load_params_only(tmp_path, state["params"])  # No metrics: latest step.
  _assert_trees_equal(params, state["params"])
  params = resolver.load_params_only(path1, checkpoints.abstract_tree(state["params"]))
  _assert_trees_equal(params, _state(5)["params"])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    resolver.load_params_only(tmp_path / "nothing", state["params"])
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match="no complete checkpoint"):
    resolver.load_params_only(tmp_path / "empty", state["params"])


def test_preemption_watch_sets_flag():
  old = signal.getsignal(signal.SIGTERM)
  try:
    watch = checkpoints.PreemptionWatch()
    assert watch.reached(1) is False
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    step = 2
    while not watch.reached(step) and time.time() < deadline:
      time.sleep(0.01)
      step += 1
    assert watch.reached(step) is True
  finally:
    signal.signal(signal.SIGTERM, old)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="best_mode"):
    checkpoints.Checkpointer(tmp_path, best_mode="best")
  with checkpoints.Checkpointer(tmp_path / "a") as c:
    with pytest.raises(ValueError, match="data_position"):
      c.save(1, _state(), data_position=[1, 2], rng=None)
    with pytest.raises(ValueError, match="JSON"):
      c.save(1, _state(), data_position={"index": np.int64(3)}, rng=None)
    with pytest.raises(ValueError, match="metric 'r1'"):
      c.save(1, _state(), data_position={}, rng=None, metrics={"r1": [1.0, 2.0]})
    with pytest.raises(ValueError, match="rng"):
      c.save(1, _state(), data_position={}, rng=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
      c.restore(3, _state())


# ----------------------------------------------------------------------------- kill + resume


def _env(cache_dir=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  if cache_dir is not None:  # The resumed run reuses the compiled step of the first run.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _cmd(workdir, out, step_sleep=0.0):
  return [sys.executable, str(WORKER), "resume", "--workdir", str(workdir), "--out", str(out),
          "--steps", str(TOTAL_STEPS), "--step_sleep", str(step_sleep)]


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
  """Uninterrupted run || run killed by SIGTERM after step 3; then the resumed run."""
  tmp = tmp_path_factory.mktemp("resume")
  cache = tmp / "xla_cache"
  start = time.time()
  full = subprocess.Popen(_cmd(tmp / "full", tmp / "full.npz"), cwd=REPO, env=_env(cache),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # The killed run sleeps 1 s per step ("slow input") so the signal lands mid-run.
  killed = subprocess.Popen(_cmd(tmp / "killed", tmp / "unused.npz", step_sleep=1.0),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  (_, _), (full_log, killed_log) = watch_processes.run(
      [full, killed], lambda line: line.startswith(f"step {KILL_AFTER_STEP} "), timeout=300)
  assert full.returncode == 0, full_log[-4000:]
  assert killed.returncode == 0, killed_log[-4000:]
  resumed = subprocess.run(_cmd(tmp / "killed", tmp / "resumed.npz"), cwd=REPO,
                           env=_env(cache), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
  print(f"resume runs took {time.time() - start:.1f}s")
  return {"full": dict(np.load(tmp / "full.npz")), "resumed": dict(np.load(tmp / "resumed.npz")),
          "killed_log": killed_log, "resumed_log": resumed.stdout, "workdir": tmp / "killed"}


def _marker(log, word):
  lines = [l for l in log.splitlines() if l.startswith(word + " ")]
  assert len(lines) == 1, log[-3000:]
  return int(lines[0].split()[1])


def test_kill_and_resume_is_exact(resume_runs):
  stopped = _marker(resume_runs["killed_log"], "PREEMPTED")
  assert KILL_AFTER_STEP <= stopped < TOTAL_STEPS  # Stopped by the signal, mid-run.
  assert _marker(resume_runs["resumed_log"], "RESUMED") == stopped
  full, resumed = resume_runs["full"], resume_runs["resumed"]
  # The resumed process ran only the remaining steps, with the same losses.
  np.testing.assert_array_equal(resumed["loss_steps"], np.arange(stopped + 1, TOTAL_STEPS + 1))
  np.testing.assert_array_equal(resumed["losses"], full["losses"][stopped:])
  keys = [k for k in full if k.startswith("param")]
  assert keys and set(keys) == {k for k in resumed if k.startswith("param")}
  max_diff = max(float(np.abs(full[k] - resumed[k]).max()) for k in keys)
  print(f"kill at step {stopped} + resume vs uninterrupted: max |param diff| {max_diff}")
  assert max_diff == 0.0
  # Losses differ from step to step (the data position and the RNG matter).
  assert len(set(np.round(full["losses"], 6))) == TOTAL_STEPS


def test_resumed_workdir_retention(resume_runs):
  # max_to_keep=2 + best (by neg_loss, saved every 2 steps): the last two steps are kept.
  with checkpoints.Checkpointer(resume_runs["workdir"], max_to_keep=2, best_metric="neg_loss") as c:
    steps = c.all_steps()
    assert steps[-2:] == [TOTAL_STEPS - 2, TOTAL_STEPS] or steps[-2:] == [TOTAL_STEPS - 1, TOTAL_STEPS]
    losses = dict(zip(resume_runs["full"]["loss_steps"].tolist(),
                      resume_runs["full"]["losses"].tolist()))
    scored = range(2, TOTAL_STEPS + 1, 2)  # Steps saved with metrics (in either process).
    expected_best = max(scored, key=lambda s: -losses[s])
    assert c.best_step() == expected_best
    assert expected_best in steps
    assert set(steps) <= set(steps[-2:]) | {expected_best}


# ----------------------------------------------------------------------------- two hosts


def _two_process_cmds(workdir, out, step_sleep=0.0):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  return [_cmd(workdir, out, step_sleep) + ["--num_processes", "2", "--process_id", str(i),
                                            "--coordinator", f"localhost:{port}"]
          for i in range(2)]


def _run_two(cmds, env, sigterm_after=None):
  """Runs both processes; SIGTERMs process 1 only after it prints `step <k>`."""
  procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in cmds]
  return watch_processes.run(procs, None if sigterm_after is None else (
      lambda line: line.startswith(f"step {sigterm_after} ")))


@pytest.mark.slow
def test_two_hosts_stop_at_one_step_on_sigterm_to_one(resume_runs, tmp_path):
  """SIGTERM reaches process 1 only: through JAX's preemption sync point both processes
  save the same step and exit; resumed on two processes, the run ends where an
  uninterrupted one does."""
  env = _env()
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  workdir = tmp_path / "two"
  rcs, logs = _run_two(_two_process_cmds(workdir, tmp_path / "unused.npz", step_sleep=1.0),
                       env, sigterm_after=KILL_AFTER_STEP)
  assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
  stops = [[l.split() for l in log.splitlines() if l.startswith("PREEMPTED ")] for log in logs]
  assert all(len(s) == 1 for s in stops), logs
  (step0, step1) = (int(stops[0][0][1]), int(stops[1][0][1]))
  assert step0 == step1 and KILL_AFTER_STEP <= step0 < TOTAL_STEPS  # the same step on both
  assert "Reached preemption sync point" in logs[0]  # process 0 was told by the service
  with checkpoints.Checkpointer(workdir, max_to_keep=2, best_metric="neg_loss") as c:
    assert c.latest_step() == step0
  rcs, logs = _run_two(_two_process_cmds(workdir, tmp_path / "resumed.npz"), env)
  assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
  assert all(_marker(log, "RESUMED") == step0 for log in logs)
  resumed, full = dict(np.load(tmp_path / "resumed.npz")), resume_runs["full"]
  # Two processes sum the batch in another order than one: equal up to float rounding.
  np.testing.assert_allclose(resumed["losses"], full["losses"][step0:], rtol=0, atol=1e-5)
  keys = [k for k in full if k.startswith("param")]
  max_diff = max(float(np.abs(full[k] - resumed[k]).max()) for k in keys)
  print(f"2 hosts, SIGTERM to one at step {step0}, resumed vs 1 host uninterrupted: "
        f"max |param diff| {max_diff:.3g}")
  assert max_diff <= 1e-5
