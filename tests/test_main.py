"""A short train + eval through `python -m centerclip_jax.main` on the generated demo data,
then eval-only from the trained workdir (same numbers), and start-up errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "centerclip_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def tiny_args(tmp, workdir):
  return ["--config", str(REPO / "configs" / "demo.py"), "--workdir", str(workdir),
          "--config.dataset=synthetic_video_text/tiny", f"--config.data_dir={tmp / 'tfds'}",
          "--config.train.num_train_steps=6", "--config.train.global_batch_size=8",
          "--config.train.log_every_steps=2", "--config.eval.batch_size=4",
          # Select on the test split (as MSR-VTT does): the final eval reuses the
          # selection eval, which the eval-only test below checks against a fresh eval.
          "--config.val_split="]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("main")
  workdir = tmp / "run"
  proc = run_main(*tiny_args(tmp, workdir))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return tmp, workdir, proc


def test_train_and_eval_writes_everything(trained):
  _, workdir, proc = trained
  results = json.loads((workdir / "results.json").read_text())
  for direction in ("text_to_video", "video_to_text"):
    m = results["metrics"][direction]
    assert set(m) >= {"R@1", "R@5", "R@10", "MdR", "MnR"}
    assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
    assert 1 <= m["MdR"] <= 8 and 1 <= m["MnR"] <= 8   # 8 test videos in the tiny split
  assert "text_to_video_dsl" in results["metrics"]
  assert results["train_steps"] == 6 and results["wall_time_s"] > 0
  assert results["selection_split"] == "test" and "no validation split" in results["selection_note"]
  assert results["config"]["model"]["cluster_inter"] == 1
  assert "text_to_video" in proc.stdout and "R@1" in proc.stdout   # the printed table
  assert proc.stdout.count("text_to_video_dsl") == 1                # once, not twice
  assert "devices: 1 x cpu" in proc.stdout and "train: 6 steps" in proc.stdout
  assert str(workdir / "results.json") in proc.stdout
  assert results["counts"] == {"videos": 8, "captions": results["counts"]["captions"],
                               "expected_videos": 8} and results["warning"] == ""
  assert "scored 8 videos" in proc.stdout
  # Library INFO logs go to the log file, not the console.
  log = (workdir / "log.txt").read_text()
  assert "step 6/6" in log and "text_to_video" in log
  for noise in ("Closing _NonBlockingMetadataStore", "step 6/6", "] Finished saving",
                "Downloading and preparing", "is deprecated"):
    assert noise not in proc.stderr + proc.stdout, noise
  assert list(workdir.glob("events.out.tfevents*")), "no TensorBoard event file"
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == 6


def test_eval_only_from_workdir_reproduces_metrics(trained):
  tmp, workdir, _ = trained
  evaldir = tmp / "eval"
  proc = run_main(*tiny_args(tmp, evaldir), "--config.mode=eval", f"--config.init_from={workdir}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  first = json.loads((workdir / "results.json").read_text())["metrics"]
  again = json.loads((evaldir / "results.json").read_text())["metrics"]
  for direction in ("text_to_video", "video_to_text"):
    for key in ("R@1", "R@5", "R@10", "MdR", "MnR"):
      assert again[direction][key] == pytest.approx(first[direction][key], abs=1e-6)


def test_startup_errors_are_clear(tmp_path):
  proc = run_main("--config", str(REPO / "configs" / "msrvtt.py"), "--workdir", str(tmp_path / "w"),
                  f"--config.data_dir={tmp_path / 'nothing'}", "--config.allow_random_init=True")
  assert proc.returncode != 0
  assert "not prepared" in proc.stderr and "prepare_data.py" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = run_main("--config", str(REPO / "configs" / "msrvtt.py"), "--workdir", str(tmp_path / "w"),
                  "--config.model.target_frames_blocks=(12,12,12,12,12,12,5,5,5,5,5,5)",
                  "--config.allow_random_init=True")
  assert proc.returncode != 0 and "target_frames_blocks" in proc.stderr
  assert "Traceback" not in proc.stderr


def _final_params(workdir, step=6):
  from centerclip_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(str(workdir / "checkpoints" / str(step) / checkpoints.STATE))
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


def test_sigterm_then_resume_equals_uninterrupted_run(trained):
  """Kill mid-run (SIGTERM saves first), resume: the final params equal the
  uninterrupted run's (the `trained` fixture, same config)."""
  import signal  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  tmp, full_run, _ = trained
  workdir = tmp / "killed"
  args = [sys.executable, "-m", "centerclip_jax.main", *tiny_args(tmp, workdir),
          "--config.train.log_every_steps=1", "--verbosity=1"]  # INFO lines on stderr too
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  killed = False
  for line in proc.stderr:
    if "step 3/6" in line and not killed:
      proc.send_signal(signal.SIGTERM)
      killed = True
  proc.wait(timeout=300)
  assert killed and proc.returncode == 143
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 6
  resumed = run_main(*tiny_args(tmp, workdir))
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f"resumed from step {saved[-1]}" in resumed.stdout
  a, b = _final_params(full_run), _final_params(workdir)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
