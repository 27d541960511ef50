"""User paths in a bucket, part 3: `main` as two hosts (jax.distributed on localhost,
tests/multihost_worker.py main), each with its own TMPDIR and HOME, nothing shared but the
GCS emulator's bucket, which holds the workdir and the data (train mode, 12 steps).

SIGTERM to one host stops both at the same step through the preemption sync point; both
save that step into the bucket and exit 143; the same command resumes both from it to the
end, with the params of an uninterrupted two-host run, bit for bit; only host 0 writes
results.json and TensorBoard events; each host reads only its own shard.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from centerclip_jax import paths
from tests import gcs_runs, watch_processes

WORKER = os.path.join(gcs_runs.REPO, "tests", "multihost_worker.py")
# Train only (no eval programs to compile); INFO lines on the console, for the markers.
TWO_HOST_FLAGS = ("--config.mode=train", "--verbosity=1")
KILL_AFTER = 3  # SIGTERM to host 1 once it logged this step
DATA = "tfds_two_hosts"


def _start_two(gcs, workdir, scratch):
  """`main` as 2 hosts: jax.distributed on localhost, each host with its own TMPDIR and
  HOME under `scratch`, the workdir and data only in the bucket. Each host records what it
  read and wrote in scratch/host<i>.jsonl. Returns the two started processes."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    home, tmp = scratch / f"home{i}", scratch / f"tmp{i}"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, WORKER, "main", "--num_processes", "2", "--process_id", str(i),
           "--coordinator", f"localhost:{port}", "--out", str(scratch / f"host{i}.jsonl"),
           "--", *gcs_runs.tiny(gcs.url(DATA), workdir), *TWO_HOST_FLAGS]
    procs.append(subprocess.Popen(
        cmd, cwd=gcs_runs.REPO, env=gcs_runs.env(HOME=str(home), TMPDIR=str(tmp)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _records(path, key):
  if not path.exists():
    return []
  return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]


def _tb_pids(workdir):
  """The writer pids in the TensorBoard event file names (events.out.tfevents.T.HOST.PID.N)."""
  return {int(p.name.split(".")[-3]) for p in paths.user_path(workdir).iterdir()
          if p.name.startswith("events.out.tfevents")}


@pytest.fixture(scope="module")
def two_hosts(gcs, tmp_path_factory):
  """Side by side: two hosts with SIGTERM to host 1 after step KILL_AFTER, and two hosts
  run uninterrupted; then the first pair resumed to the end by the same command."""
  gcs_runs.prepare_demo_data(gcs.url(DATA))  # as a pod prepares its data before training
  scratch = tmp_path_factory.mktemp("two_hosts")
  workdir, full = gcs.url("runs/two_hosts"), gcs.url("runs/two_hosts_full")
  first = _start_two(gcs, workdir, scratch / "run")
  uninterrupted = _start_two(gcs, full, scratch / "full")
  rcs, logs = watch_processes.run(
      first + uninterrupted, lambda line: f"step {KILL_AFTER}/{gcs_runs.STEPS}" in line,
      watched=1)
  out = dict(workdir=workdir, full=full, scratch=scratch / "run",
             first=(rcs[:2], logs[:2], [p.pid for p in first]),
             full_run=(rcs[2:], logs[2:]),
             steps_after_first=gcs_runs.steps(workdir), tb_after_first=_tb_pids(workdir))
  second = _start_two(gcs, workdir, scratch / "run")
  rcs, logs = watch_processes.run(second)
  out["second"] = (rcs, logs, [p.pid for p in second])
  return out


def _preempted_step(log):
  lines = [l for l in log.splitlines() if "preempted: saved step" in l]
  assert len(lines) == 1, log[-3000:]
  return int(lines[0].split("preempted: saved step")[1].split(",")[0])


def test_two_hosts_preempted_together_and_resumed_through_the_bucket(two_hosts):
  (rcs, logs, _), (rcs2, logs2, _) = two_hosts["first"], two_hosts["second"]
  assert rcs == [143, 143], "\n".join(l[-3000:] for l in logs)
  step0, step1 = (_preempted_step(log) for log in logs)
  assert step0 == step1 and KILL_AFTER <= step0 < gcs_runs.STEPS  # the same step, mid-run
  assert two_hosts["steps_after_first"][-1] == step0  # saved in the bucket
  assert rcs2 == [0, 0], "\n".join(l[-3000:] for l in logs2)
  for log in logs2:
    assert f"resumed from step {step0}" in log, log[-3000:]
  assert gcs_runs.steps(two_hosts["workdir"])[-1] == gcs_runs.STEPS
  assert gcs_runs.results(two_hosts["workdir"])["train_steps"] == gcs_runs.STEPS
  assert "2 host(s)" in logs[0]


def test_two_hosts_resume_equals_uninterrupted_two_hosts(two_hosts):
  """The preempted + resumed two-host run ends with the params of the uninterrupted one."""
  rcs, logs = two_hosts["full_run"]
  assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
  assert two_hosts["second"][0] == [0, 0]
  gcs_runs.assert_same_params(two_hosts["full"], two_hosts["workdir"])


def test_two_hosts_only_process_0_writes_results_and_tensorboard(two_hosts):
  scratch = two_hosts["scratch"]
  wrote0, wrote1 = (_records(scratch / f"host{i}.jsonl", "wrote") for i in range(2))
  assert wrote1 == [] and wrote0 == [two_hosts["workdir"] + "/results.json"]
  pid0_first, pid0_second = two_hosts["first"][2][0], two_hosts["second"][2][0]
  assert two_hosts["tb_after_first"] == {pid0_first}
  assert _tb_pids(two_hosts["workdir"]) == {pid0_first, pid0_second}
  for i in range(2):  # each host's own scratch; nothing of the run on the local disks
    assert not list((scratch / f"tmp{i}").rglob("checkpoints"))
    assert not list((scratch / f"home{i}").rglob("*.tfevents*"))


def test_two_hosts_each_read_only_their_shard(gcs, two_hosts):
  import tensorflow_datasets as tfds
  builder = tfds.builder("synthetic_video_text/tiny", data_dir=gcs.url(DATA))
  shard = []
  for split in tfds.even_splits("train", 2):
    shard.append({c.decode() for ex in tfds.as_numpy(builder.as_dataset(split=split))
                  for c in ex["captions"]})
  only = [shard[0] - shard[1], shard[1] - shard[0]]
  assert only[0] and only[1]
  for i in range(2):
    seen = set(_records(two_hosts["scratch"] / f"host{i}.jsonl", "caption"))
    assert seen and seen <= shard[i], seen - shard[i]
    assert not seen & only[1 - i]
