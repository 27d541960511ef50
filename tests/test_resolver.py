"""Tests for centerclip_jax.weights.resolver: a workdir means its best step (not its last),
`DIR@latest` / `DIR@STEP` pick others, every consumer (load_model, the search fingerprint,
eval-only through main, encode) loads the step the training run reported, and an unreadable
step is refused with the fallback to use."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from centerclip_jax.training import checkpoints
from centerclip_jax.weights import resolver

REPO = pathlib.Path(__file__).resolve().parents[1]
METRIC = "text_to_video/R@1"
# step -> selection metric (None: saved without, like a periodic or preemption save).
RUN = {2: 31.0, 4: 43.1, 6: 40.0, 7: None}


def _params(step):
  return {"w": jnp.full((4, 3), float(step), jnp.float32), "b": jnp.arange(3.0) + step}


def make_workdir(path, run=RUN, max_to_keep=5):
  """A workdir written by the training Checkpointer; params of step s are all s."""
  with checkpoints.Checkpointer(path, max_to_keep=max_to_keep, best_metric=METRIC) as c:
    for step, value in run.items():
      c.save(step, {"params": _params(step), "step": jnp.int32(step)},
             data_position={"step": step}, rng=None,
             metrics=None if value is None else {METRIC: value})
  return pathlib.Path(path)


def truncate_state(step_dir):
  """Cuts every array data file of a step in half (a copy or download that stopped)."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files, step_dir
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("resolver") / "run")


def test_workdir_means_its_best_step_not_its_last(workdir):
  r = resolver.resolve(str(workdir))
  assert (r.kind, r.step) == ("trained", 4)
  assert r.reason == f"best by {METRIC} = 43.1"
  assert r.path == workdir / "checkpoints" / "4" and r.spec == f"{workdir}@4"
  assert r.describe() == f"step 4 of {workdir} (best by {METRIC} = 43.1)"
  np.testing.assert_array_equal(resolver.load_params_only(workdir, _params(0))["w"],
                                np.full((4, 3), 4.0))


def test_latest_and_step_suffixes(workdir):
  assert resolver.resolve(f"{workdir}@latest").step == 7
  r = resolver.resolve(f"{workdir}@6")
  assert (r.step, r.reason) == (6, "asked for")
  assert resolver.resolve(str(workdir / "checkpoints" / "2")).step == 2  # a step directory
  params = resolver.load_params_only(f"{workdir}@latest", _params(0))
  np.testing.assert_array_equal(params["b"], np.arange(3.0) + 7)
  with pytest.raises(ValueError, match=r"no complete checkpoint at step 5; it has steps "
                                       r"\[2, 4, 6, 7\]"):
    resolver.resolve(f"{workdir}@5")
  with pytest.raises(ValueError, match="picks a step of a training workdir"):
    resolver.resolve(f"{workdir / 'checkpoints'}@4")
  with pytest.raises(FileNotFoundError, match="config.init_from: .* does not exist"):
    resolver.resolve(f"{workdir}_missing@4")
  assert resolver.split_spec("gs://b/run@12") == ("gs://b/run", "12")
  assert resolver.split_spec("/data/me@home/run") == ("/data/me@home/run", None)


def test_no_selection_metric_means_latest(tmp_path):
  w = make_workdir(tmp_path / "w", {1: None, 3: None})
  r = resolver.resolve(w)
  assert (r.step, r.reason) == (3, f"latest (no step has {METRIC})")


def test_ranking_follows_orbax_best(tmp_path):
  w = make_workdir(tmp_path / "w", {1: 5.0, 2: 9.0, 3: 9.0, 4: 1.0})
  with checkpoints.Checkpointer(w, max_to_keep=5, best_metric=METRIC) as c:
    best = c.best_step()  # what train_and_evaluate reports as best_step
  ranked = resolver.ranked_steps(w)
  assert ranked[0][0] == best == 3 and [s for s, _ in ranked] == [3, 2, 1, 4]


def test_load_model_and_fingerprint_use_the_resolved_step(workdir, monkeypatch):
  from centerclip_jax.search import fingerprint  # pylint: disable=g-import-not-at-top
  from centerclip_jax.weights import loading  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"init_from": str(workdir), "seed": 0,
                                      "model": {"arch": "ViT-B/32"}})
  ident = fingerprint.checkpoint_identity(config)
  assert ident["kind"] == "trained" and ident["step"] == 4
  config.init_from = f"{workdir}@4"
  assert fingerprint.checkpoint_identity(config) == ident  # pinned = the same weights
  config.init_from = f"{workdir}@latest"
  other = fingerprint.checkpoint_identity(config)
  assert other["step"] == 7 and other["digest"] != ident["digest"]
  assert loading.resolve_path(f"{workdir}@6", "init_from") == workdir


def test_unreadable_step_is_refused_with_the_fallback(tmp_path):
  w = make_workdir(tmp_path / "w")
  truncate_state(w / "checkpoints" / "4")  # the best step
  best = resolver.resolve(w)
  with pytest.raises(resolver.CorruptCheckpointError) as info:
    resolver.load_params(best, _params(0))
  msg = str(info.value)
  assert "\n" not in msg and info.value.step == 4
  assert f"checkpoint step 4 of {w} is unreadable" in msg
  assert f"--config.init_from={w}@6" in msg  # the next best
  truncate_state(w / "checkpoints" / "7")
  with pytest.raises(resolver.CorruptCheckpointError, match=f"step 7 .*{w}@6 "):
    resolver.load_params(resolver.resolve(f"{w}@latest"), _params(0))
  # The fallback it names loads.
  np.testing.assert_array_equal(resolver.load_params_only(f"{w}@6", _params(0))["w"],
                                np.full((4, 3), 6.0))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_main_eval_only_and_encode_use_the_reported_step(tmp_path):
  """Train through main (evaluating every epoch), then eval-only and encode from the
  workdir: they load results.json's best_step, and eval-only reproduces its metrics."""
  from tests.test_main import run_main, tiny_args  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  # 2 epochs of 3 steps, evaluated after each; only the last checkpoint plus the best kept.
  train_args = tiny_args(tmp_path, workdir)[:-1] + [
      "--config.train.num_train_steps=6", "--config.train.keep_checkpoints=1",
      "--config.train.eval_every_epochs=1", "--config.val_split="]
  proc = run_main(*train_args, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((workdir / "results.json").read_text())
  best, per_epoch = results["best_step"], results["steps_per_epoch"]
  evaluated = sorted(set(range(per_epoch, 7, per_epoch)) | {6})
  assert best in evaluated
  print(f"evaluated at steps {evaluated}; best step {best} (R@1 {results['best_selection_R@1']})")
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == sorted({best, 6})

  evaldir = tmp_path / "eval"
  proc = run_main(*tiny_args(tmp_path, evaldir), "--config.mode=eval",
                  f"--config.init_from={workdir}", timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"checkpoint: step {best} of {workdir} (best by {METRIC} =" in proc.stdout
  again = json.loads((evaldir / "results.json").read_text())["metrics"]
  assert again == results["metrics"]  # exactly

  captions = tmp_path / "captions.txt"
  captions.write_text("a red square moves left\n")
  out = tmp_path / "emb.npz"
  proc = subprocess.run(
      [sys.executable, "-m", "centerclip_jax.encode", "--config", str(REPO / "configs" / "demo.py"),
       f"--config.init_from={workdir}", "--captions", str(captions), "--output", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"checkpoint: step {best} of {workdir}" in proc.stdout

  # A corrupt best step: eval-only and encode refuse it in one line naming the fallback.
  truncate_state(workdir / "checkpoints" / str(best))
  other = 6 if best != 6 else None
  proc = run_main(*tiny_args(tmp_path, tmp_path / "eval2"), "--config.mode=eval",
                  f"--config.init_from={workdir}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and f"checkpoint step {best} of {workdir} is unreadable" in err[0]
  if other is not None:
    assert f"--config.init_from={workdir}@{other}" in err[0]
  proc = subprocess.run(
      [sys.executable, "-m", "centerclip_jax.encode", "--config", str(REPO / "configs" / "demo.py"),
       f"--config.init_from={workdir}", "--captions", str(captions), "--output", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert f"checkpoint step {best} of {workdir} is unreadable" in proc.stderr
