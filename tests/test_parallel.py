"""Tests for centerclip_jax.parallel.

The multi-device tests run tests/multihost_worker.py in subprocesses (XLA_FLAGS set
before JAX starts there, never in this process): 1 device, 8 simulated devices, and two
processes x 4 devices joined by jax.distributed on localhost (gloo CPU collectives). All
train the same tiny CLIP for 3 AdamW steps on the same global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from centerclip_jax import parallel

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
TIMEOUT_S = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Launches the 1-device, 8-device and 2x4-device runs concurrently; loads their .npz."""
  out = tmp_path_factory.mktemp("parity")
  port = _free_port()
  cmds = {
      "1dev": ["--num_devices", "1", "--out", str(out / "1dev.npz")],
      "8dev": ["--num_devices", "8", "--out", str(out / "8dev.npz")],
  }
  for pid in range(2):
    cmds[f"2x4_p{pid}"] = ["--num_devices", "4", "--num_processes", "2", "--process_id",
                           str(pid), "--coordinator", f"localhost:{port}",
                           "--out", str(out / "2x4.npz")]
  start = time.time()
  procs = {name: subprocess.Popen([sys.executable, str(WORKER), "parity", *args],
                                  cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
           for name, args in cmds.items()}
  logs = {}
  try:
    for name, proc in procs.items():
      remaining = max(1.0, TIMEOUT_S - (time.time() - start))
      logs[name], _ = proc.communicate(timeout=remaining)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for name, proc in procs.items():
    assert proc.returncode == 0, f"worker {name} failed:\n{logs.get(name, '')[-4000:]}"
  results = {name: dict(np.load(out / f"{name}.npz")) for name in ("1dev", "8dev", "2x4")}
  print(f"parity workers took {time.time() - start:.1f}s")
  return results


def _max_param_diff(a, b):
  keys = [k for k in a if k.startswith("param")]
  assert keys and set(keys) == {k for k in b if k.startswith("param")}
  return max(float(np.abs(a[k] - b[k]).max()) for k in keys)


def _check_same(a, b, label):
  loss_diff = float(np.abs(a["losses"] - b["losses"]).max())
  param_diff = _max_param_diff(a, b)
  emb_diff = float(np.abs(a["video_emb"] - b["video_emb"]).max())
  print(f"{label}: max |loss diff| {loss_diff:.3g}, max |param diff| {param_diff:.3g}, "
        f"max |embedding diff| {emb_diff:.3g}")
  np.testing.assert_allclose(a["losses"], b["losses"], rtol=0, atol=1e-5)
  assert param_diff <= 1e-5
  assert emb_diff <= 1e-5


def test_runs_train_for_real(runs):
  r = runs["1dev"]
  assert int(r["num_devices"]) == 1
  assert int(runs["8dev"]["num_devices"]) == 8
  assert int(runs["2x4"]["num_devices"]) == 8 and int(runs["2x4"]["num_processes"]) == 2
  # Loss goes down over the 3 steps and the params move well beyond the tolerance.
  assert r["losses"][2] < r["losses"][0] - 0.1
  assert float(r["param_delta_max"]) > 2e-3  # 200x the 1e-5 tolerance
  assert r["video_emb"].shape == (16, 32)
  # A global batch of 20 does not split over 8 devices: a clear error, not a JAX trace.
  assert str(r["divisible_error"]) == ""
  assert "multiple of the number of devices (8" in str(runs["8dev"]["divisible_error"])


def test_eight_devices_match_one_device(runs):
  _check_same(runs["1dev"], runs["8dev"], "1 device vs 8 devices")


def test_two_processes_match_one_process(runs):
  _check_same(runs["8dev"], runs["2x4"], "1 process x 8 devices vs 2 processes x 4 devices")
  _check_same(runs["1dev"], runs["2x4"], "1 device vs 2 processes x 4 devices")


# ----------------------------------------------------------------------------- in-process


def test_detect_multiprocess_env():
  assert parallel.detect_multiprocess_env({}) is None
  assert parallel.detect_multiprocess_env({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "env"
  assert parallel.detect_multiprocess_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
  assert parallel.detect_multiprocess_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == "slurm"
  assert parallel.detect_multiprocess_env(
      {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
  assert parallel.detect_multiprocess_env({"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert parallel.detect_multiprocess_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
  for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  assert parallel.initialize_distributed() is False
  assert jax.process_count() == 1


def test_mesh_shardings_and_round_trip():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("batch",)
  assert mesh.devices.size == jax.device_count()
  n = mesh.devices.size
  batch = {"video": np.arange(4 * n * 3, dtype=np.float32).reshape(4 * n, 3),
           "text": np.arange(4 * n, dtype=np.int32)}
  g = parallel.host_batch_to_global(batch, mesh)
  assert g["video"].sharding == parallel.batch_sharding(mesh)
  assert g["video"].shape == (4 * n, 3)
  np.testing.assert_array_equal(parallel.global_to_host(g)["video"], batch["video"])
  tree = parallel.replicate({"w": np.ones((2, 2), np.float32)}, mesh)
  assert tree["w"].sharding == parallel.replicated(mesh)
  assert tree["w"].sharding.is_fully_replicated


def test_check_batch_divisible_errors():
  mesh = parallel.make_mesh(jax.devices()[:1])
  parallel.check_batch_divisible(5, mesh)
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    parallel.check_batch_divisible(0, mesh)
  with pytest.raises(ValueError, match="scalar"):
    parallel.host_batch_to_global({"x": np.float32(1.0)}, mesh)


# ------------------------------------------------------------ eval on any device count

EVAL_TIMEOUT_S = 900  # each run builds or reads the tiny split, compiles and evaluates


def _eval_run(tmp, name, devices, batch_size):
  env = _worker_env()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  workdir = tmp / name
  cmd = [sys.executable, "-m", "centerclip_jax.main", "--config",
         str(REPO / "configs" / "demo.py"), "--workdir", str(workdir), "--config.mode=eval",
         "--config.dataset=synthetic_video_text/tiny", f"--config.data_dir={tmp / 'tfds'}",
         "--config.eval_split=test", f"--config.eval.batch_size={batch_size}"]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True), workdir


@pytest.mark.slow
def test_eval_runs_on_1_6_and_8_devices_with_any_batch(tmp_path):
  """Eval-only (random demo weights, the tiny synthetic split of 8 videos) with eval
  batches that do not divide the device count (5 on 6 devices, 3 on 8): the batches are
  padded to a multiple of the devices, every video and caption is scored once, and the
  metrics equal the 1-device run's."""
  import json  # pylint: disable=g-import-not-at-top
  first, workdir = _eval_run(tmp_path, "1dev", 1, 5)  # also builds the tiny dataset
  log, _ = first.communicate(timeout=EVAL_TIMEOUT_S)
  assert first.returncode == 0, log[-4000:]
  runs = {"1dev": workdir}
  procs = {name: _eval_run(tmp_path, name, n, b) for name, n, b in
           (("6dev", 6, 5), ("8dev", 8, 3))}
  for name, (proc, wd) in procs.items():
    log, _ = proc.communicate(timeout=EVAL_TIMEOUT_S)
    assert proc.returncode == 0, f"{name}:\n{log[-4000:]}"
    assert "devices: " + name[0] + " x cpu" in log
    runs[name] = wd
  results = {n: json.loads((wd / "results.json").read_text()) for n, wd in runs.items()}
  ref = results["1dev"]
  assert ref["counts"]["videos"] == ref["counts"]["expected_videos"] == 8
  assert ref["counts"]["captions"] >= 8
  assert ref["warning"] == ""
  for name in ("6dev", "8dev"):
    assert results[name]["counts"] == ref["counts"]
    for direction in ("text_to_video", "video_to_text"):
      for key in ("R@1", "R@5", "R@10", "MdR", "MnR"):
        assert results[name]["metrics"][direction][key] == pytest.approx(
            ref["metrics"][direction][key], abs=1e-6), (name, direction, key)
