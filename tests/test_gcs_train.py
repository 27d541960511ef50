"""User paths in a bucket, part 2: `main` on one host with its workdir and data_dir only in
the GCS emulator's bucket (tests/gcs_runs.py): the demo trained from scratch on the tiny
dataset (built by that run into the bucket), eval-only from its checkpoint, and a run
SIGTERMed mid-way that resumes to the uninterrupted run's params, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from centerclip_jax import paths
from tests import gcs_runs, watch_processes

KILL_AFTER = 3  # SIGTERM once the run logged this step
DATA = "tfds_one_host"  # its own data_dir in the bucket, built by the first run


@pytest.fixture(scope="module")
def runs(gcs):
  """The uninterrupted run (it builds the dataset into the bucket); then, side by side,
  eval-only from its checkpoint and a run SIGTERMed after step KILL_AFTER; then that run
  resumed by the same command."""
  full, evaldir, killed = (gcs.url(f"runs/{name}") for name in ("full", "eval", "killed"))
  data_dir = gcs.url(DATA)
  done = gcs_runs.main(*gcs_runs.tiny(data_dir, full))
  assert done.returncode == 0, done.stderr[-4000:]
  pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  evaluating = gcs_runs.main(*gcs_runs.tiny(data_dir, evaldir), "--config.mode=eval",
                             f"--config.init_from={full}", **pipes)
  killing = gcs_runs.main(*gcs_runs.tiny(data_dir, killed), "--verbosity=1", **pipes)
  (eval_rc, kill_rc), (eval_log, kill_log) = watch_processes.run(
      [evaluating, killing], lambda line: f"step {KILL_AFTER}/{gcs_runs.STEPS}" in line)
  assert eval_rc == 0, eval_log[-4000:]
  saved = gcs_runs.steps(killed)
  resumed = gcs_runs.main(*gcs_runs.tiny(data_dir, killed))
  return dict(full=full, done=done, evaldir=evaldir, killed=killed, kill_rc=kill_rc,
              kill_log=kill_log, saved=saved, resumed=resumed)


def test_train_with_everything_in_the_bucket(gcs, runs):
  root = paths.user_path(runs["full"])
  results = gcs_runs.results(runs["full"])
  assert results["train_steps"] == gcs_runs.STEPS
  assert 0 <= results["metrics"]["text_to_video"]["R@1"] <= 100
  assert [p.name for p in root.iterdir() if p.name.startswith("events.out.tfevents")]
  assert (root / "checkpoints" / str(gcs_runs.STEPS)).is_dir()
  assert json.loads((root / "config.json").read_text())["mode"] == "train_and_eval"
  built = paths.user_path(gcs.url(DATA + "/synthetic_video_text/tiny/1.0.0"))
  assert (built / "dataset_info.json").exists()  # built by the run, into the bucket
  assert not os.path.exists(os.path.join(gcs_runs.REPO, "gs:"))  # never a local folder gs:


def test_eval_only_from_the_bucket_reproduces_metrics(runs):
  first = gcs_runs.results(runs["full"])["metrics"]
  again = gcs_runs.results(runs["evaldir"])
  assert again["config"]["mode"] == "eval" and "train_steps" not in again  # nothing trained
  for direction in ("text_to_video", "video_to_text"):
    for key in ("R@1", "R@5", "R@10", "MdR", "MnR"):
      assert again["metrics"][direction][key] == pytest.approx(first[direction][key], abs=1e-6)


def test_sigterm_in_the_bucket_then_resume_equals_uninterrupted_run(runs):
  """SIGTERM mid-run saves into the bucket first and exits 143; the same command resumes
  from that step and ends with the params of the uninterrupted run."""
  assert runs["kill_rc"] == 143, runs["kill_log"][-4000:]
  saved = runs["saved"]
  assert saved and KILL_AFTER <= saved[-1] < gcs_runs.STEPS, saved
  resumed = runs["resumed"]
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f"resumed from step {saved[-1]}" in resumed.stdout
  assert gcs_runs.steps(runs["killed"])[-1] == gcs_runs.STEPS
  gcs_runs.assert_same_params(runs["full"], runs["killed"])
