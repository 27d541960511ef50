"""User paths in a bucket: the emulator wiring and every storage component through a local
GCS emulator (tests/gcs_emulator.py; the `gcs` fixture is in conftest.py).

Through the emulator, as a TPU pod runs: convert weights into the bucket; prepare a dataset
from raw files in the bucket into the bucket; train the demo with workdir and data_dir
there, SIGTERM mid-run and resume (params equal an uninterrupted run); eval-only; `search
index` into the bucket, `query` and `serve` from it; `encode --output gs://`; two hosts
(jax.distributed on localhost) with their own TMPDIR and HOME and nothing shared but the
bucket: preemption of one host stops both at one step, resume, results written once, each
host reading its own shard.

CI runs the emulator wiring, prepare_data and the two-host run (train mode, 6 steps). The
single-host runs, eval-only, the weight conversion and search/encode are `slow` (each
`main`/CLI process costs 15-50 CPU seconds here; all of them would take the file to about
8 CPU minutes).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from centerclip_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configure_storage_sets_each_component_from_the_one_variable():
  env = {"STORAGE_EMULATOR_HOST": "127.0.0.1:9023"}
  assert paths.configure_storage(env) == {
      "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:9023",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:9023"
  assert paths.configure_storage(env) == {}  # idempotent
  mine = {"STORAGE_EMULATOR_HOST": "http://h:1/", "TENSORSTORE_GCS_HTTP_URL": "http://x:2"}
  assert paths.configure_storage(mine) == {"GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  assert mine["TENSORSTORE_GCS_HTTP_URL"] == "http://x:2"  # the user's value wins
  nothing = {"HOME": "/root"}
  assert paths.configure_storage(nothing) == {} and nothing == {"HOME": "/root"}


def test_user_path_keeps_buckets_and_expands_local(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  assert str(paths.user_path("gs://b/run/x")) == "gs://b/run/x"
  assert paths.is_uri(paths.user_path("gs://b/run"))
  assert str(paths.user_path("~/runs")) == str(tmp_path / "runs")
  assert str(paths.user_path("rel/dir")) == str(tmp_path / "rel" / "dir")
  assert not paths.is_uri(paths.user_path("rel"))


def test_tf_gfile_through_the_emulator(gcs):
  """TF's C++ GCS file system (epath, TFDS, tf.data, TensorBoard): write, list, rename."""
  import tensorflow as tf
  root = paths.user_path(gcs.url("gfile"))
  (root / "sub").mkdir(parents=True, exist_ok=True)
  payload = os.urandom(300_000)
  (root / "sub" / "a.bin").write_bytes(payload)
  assert (root / "sub" / "a.bin").read_bytes() == payload
  assert sorted(p.name for p in root.iterdir()) == ["sub"]
  (root / "sub" / "a.bin").rename(root / "b.bin")
  assert not (root / "sub" / "a.bin").exists() and (root / "b.bin").stat().length == 300_000
  with tf.io.TFRecordWriter(gcs.url("gfile/r.tfrecord")) as w:
    for i in range(5):
      w.write(bytes([i]) * (i + 1))
  got = list(tf.data.TFRecordDataset(gcs.url("gfile/r.tfrecord")).as_numpy_iterator())
  assert got == [bytes([i]) * (i + 1) for i in range(5)]


def test_orbax_checkpoint_in_the_bucket(gcs):
  """orbax: directories through epath (TF), arrays through TensorStore (its own variable)."""
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(0)
  tree = {"w": rng.standard_normal((64, 33)).astype(np.float32),
          "b": {"c": rng.standard_normal(7)}}
  where = paths.user_path(gcs.url("orbax/ckpt"))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(where, tree)
  with ocp.StandardCheckpointer() as ckptr:
    back = ckptr.restore(where)
  np.testing.assert_array_equal(back["w"], tree["w"])
  np.testing.assert_array_equal(back["b"]["c"], tree["b"]["c"])
  stored = [p.name for p in where.iterdir()]  # the objects really are in the bucket
  assert stored and all(not paths.is_uri(n) for n in stored), stored


def test_staged_output_and_local_copy_round_trip(gcs, tmp_path):
  target = gcs.url("staged/out.npz")
  with paths.staged_output(target) as local:
    assert not paths.is_uri(local)
    np.savez(os.fspath(local), x=np.arange(5))
  assert not local.exists()  # the local stage is gone
  with paths.local_copy(target) as local:
    np.testing.assert_array_equal(np.load(os.fspath(local))["x"], np.arange(5))
  assert not local.exists()
  folder = gcs.url("staged/dir")
  with paths.staged_output(folder) as local:
    (local / "deep").mkdir(parents=True)
    (local / "deep" / "f.txt").write_text("hi")
  assert paths.user_path(folder + "/deep/f.txt").read_text() == "hi"


def test_one_variable_is_enough_in_a_fresh_process(gcs, tmp_path):
  """A child with only STORAGE_EMULATOR_HOST (+ the TF proxy) saves with orbax into the bucket."""
  env = {k: v for k, v in os.environ.items()
         if k not in (paths.TENSORSTORE_URL_VAR, paths.TEST_TOKEN_VAR)}
  code = (
      "import numpy as np, orbax.checkpoint as ocp\n"
      "from centerclip_jax import paths\n"
      f"p = paths.user_path({gcs.url('fresh/ckpt')!r})\n"
      "with ocp.StandardCheckpointer() as c: c.save(p, {'x': np.arange(6.0)})\n"
      "with ocp.StandardCheckpointer() as c: print(c.restore(p)['x'].tolist())\n")
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == json.dumps([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


def _tool(name: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_convert_weights_into_the_bucket(gcs, tmp_path):
  """tools/convert_clip_weights.py --input gs://... --output gs://...; same tree as local."""
  from centerclip_jax.weights import porting
  from tests import torch_checkpoints as tc
  source = tc.write_state_dict(tc.reference_model(tc.TINY, seed=3), tmp_path / "tiny.pt")
  remote_source = paths.user_path(gcs.url("weights/tiny.pt"))
  remote_source.write_bytes(source.read_bytes())
  tool = _tool("convert_clip_weights")
  out = gcs.url("weights/vit_tiny")
  assert tool.main(["--input", str(remote_source), "--output", out]) == 0
  assert sorted(p.name for p in paths.user_path(out).iterdir()) == [
      "clip_config.json", "conversion.json", "params"]
  assert not [p for p in paths.user_path(gcs.url("weights")).iterdir() if ".tmp-" in p.name]
  assert tool.main(["--input", str(source), "--output", out]) == 2  # exists
  assert tool.main(["--input", str(source), "--output", out, "--overwrite"]) == 0
  assert tool.main(["--input", str(source), "--output", str(tmp_path / "local")]) == 0
  config, params, extras = porting.load_converted(out)
  config2, params2, _ = porting.load_converted(tmp_path / "local")
  assert config == config2 == tc.TINY and not extras
  from flax import traverse_util
  flat, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  assert sorted(flat) == sorted(flat2)
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat2[k])
  meta = json.loads(paths.user_path(out + "/conversion.json").read_text())
  assert meta["source_sha256"] == porting.file_sha256(source)


# ----------------------------------------------------------------------------- prepare_data


def test_prepare_data_from_raw_files_in_the_bucket(gcs, tmp_path, monkeypatch, capsys):
  """tools/prepare_data.py --manual_dir gs://... --data_dir gs://...: the same examples as
  a build from the local files; the pool's workers copy each video they decode to $TMPDIR
  and remove it, so nothing (nor the frame cache) is left; the report names the bucket."""
  import tempfile
  import tensorflow_datasets as tfds
  from tests import video_fixtures as vf
  raw = tmp_path / "raw"
  vf.LAYOUTS["msvd"](raw)
  vf.write_video(raw / "videos" / "not_listed.avi", num_frames=10, seed=9)  # never read
  remote_raw = gcs.url("raw/msvd")
  paths.copytree(paths.user_path(raw), paths.user_path(remote_raw))
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # this process's $TMPDIR
  tool = _tool("prepare_data")
  common = ["msvd", "--num_workers", "1", "--short_side", "32"]
  data_dir = gcs.url("tfds_msvd")
  assert tool.main(common + ["--manual_dir", remote_raw, "--data_dir", data_dir]) == 0
  out = capsys.readouterr().out
  listed = sum(1 for p in raw.rglob("*") if p.suffix in (".avi", ".mp4")) - 1
  assert f"for {listed} distinct video files" in out
  # The copies of the videos and the decoded-frame cache are gone (TFDS leaves empty folders).
  assert [p for p in scratch.rglob("*") if p.is_file()] == []
  assert not list(scratch.glob("centerclip-*"))
  report = paths.user_path(data_dir + "/msvd/fps3_32/1.0.0/build_report.txt").read_text()
  assert "undecodable, train (1):" in report and remote_raw in report
  assert str(scratch) not in report
  info = json.loads(paths.user_path(data_dir + "/msvd/fps3_32/1.0.0/metadata.json").read_text())
  assert info["manual_dir"] == remote_raw
  assert tool.main(common + ["--manual_dir", str(raw), "--data_dir", str(tmp_path / "l")]) == 0
  assert tool.main(common + ["--manual_dir", gcs.url("raw/nothing"),
                             "--data_dir", str(tmp_path / "x")]) == 2
  assert "no such folder in the bucket" in capsys.readouterr().err
  for split in ("train", "val"):
    remote = tfds.builder("msvd/fps3_32", data_dir=data_dir).as_dataset(split=split)
    local = tfds.builder("msvd/fps3_32", data_dir=str(tmp_path / "l")).as_dataset(split=split)
    a = {ex["video_id"]: ex for ex in tfds.as_numpy(remote)}
    b = {ex["video_id"]: ex for ex in tfds.as_numpy(local)}
    assert a.keys() == b.keys() and a
    for vid in a:
      np.testing.assert_array_equal(a[vid]["frames"], b[vid]["frames"], err_msg=vid)
      assert list(a[vid]["captions"]) == list(b[vid]["captions"]), vid


# ----------------------------------------------------------------------------- main, in a bucket


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  env.update(extra)
  return env


def _main(*args, timeout=900, **popen):
  cmd = [sys.executable, "-m", "centerclip_jax.main", *args]
  if popen:
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), text=True, **popen)
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _tiny(gcs, workdir):
  return ["--config", os.path.join(REPO, "configs", "demo.py"), "--workdir", workdir,
          "--config.dataset=synthetic_video_text/tiny", f"--config.data_dir={gcs.url('tfds')}",
          "--config.train.num_train_steps=6", "--config.train.global_batch_size=8",
          "--config.train.log_every_steps=1", "--config.eval.batch_size=4", "--config.val_split="]


def _params(workdir, step=6):
  import jax
  import orbax.checkpoint as ocp
  from centerclip_jax.training import checkpoints
  path = paths.user_path(workdir) / "checkpoints" / str(step) / checkpoints.STATE
  with ocp.PyTreeCheckpointer() as ckptr:  # as NumPy: the saving run may have had 2 hosts
    meta = ckptr.metadata(path)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    tree = ckptr.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


def _steps(workdir):
  return sorted(int(p.name) for p in (paths.user_path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.fixture(scope="module")
def bucket_run(gcs):
  """The demo (tiny) trained with workdir and data_dir in the bucket; nothing local."""
  workdir = gcs.url("runs/full")
  proc = _main(*_tiny(gcs, workdir))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


@pytest.mark.slow
def test_train_with_everything_in_the_bucket(gcs, bucket_run):
  workdir, proc = bucket_run
  root = paths.user_path(workdir)
  results = json.loads((root / "results.json").read_text())
  assert results["train_steps"] == 6 and 0 <= results["metrics"]["text_to_video"]["R@1"] <= 100
  assert [p.name for p in root.iterdir() if p.name.startswith("events.out.tfevents")]
  assert (root / "checkpoints" / "6").is_dir() and (root / "config.json").exists()
  built = paths.user_path(gcs.url("tfds/synthetic_video_text/tiny/1.0.0"))
  assert (built / "dataset_info.json").exists()
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # never a local folder named gs:


@pytest.mark.slow
def test_eval_only_from_the_bucket_reproduces_metrics(gcs, bucket_run):
  workdir, _ = bucket_run
  evaldir = gcs.url("runs/eval")
  proc = _main(*_tiny(gcs, evaldir), "--config.mode=eval", f"--config.init_from={workdir}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  first = json.loads(paths.user_path(workdir + "/results.json").read_text())["metrics"]
  again = json.loads(paths.user_path(evaldir + "/results.json").read_text())["metrics"]
  for direction in ("text_to_video", "video_to_text"):
    for key in ("R@1", "R@5", "R@10", "MdR", "MnR"):
      assert again[direction][key] == pytest.approx(first[direction][key], abs=1e-6)


@pytest.mark.slow
def test_sigterm_in_the_bucket_then_resume_equals_uninterrupted_run(gcs, bucket_run):
  """SIGTERM mid-run saves into the bucket first; the resumed run ends with the params of
  the uninterrupted run (bucket_run, same config)."""
  full, _ = bucket_run
  workdir = gcs.url("runs/killed")
  proc = _main(*_tiny(gcs, workdir), "--verbosity=1", stderr=subprocess.PIPE)
  killed, log = False, []
  for line in proc.stderr:
    log.append(line)
    if "step 3/6" in line and not killed:
      proc.send_signal(signal.SIGTERM)
      killed = True
  proc.wait(timeout=300)
  assert killed and proc.returncode == 143, "".join(log)[-4000:]
  saved = _steps(workdir)
  assert saved and 3 <= saved[-1] < 6, saved
  resumed = _main(*_tiny(gcs, workdir))
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f"resumed from step {saved[-1]}" in resumed.stdout
  a, b = _params(full), _params(workdir)
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- two hosts


WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
# Train only (no eval programs to compile); INFO lines on the console, for the markers.
TWO_HOST_FLAGS = ("--config.mode=train", "--verbosity=1")


def _two_hosts(gcs, workdir, scratch, sigterm_after=None, extra=()):
  """`main` as 2 hosts (tests/multihost_worker.py main): jax.distributed on localhost, each
  host with its own TMPDIR and HOME, the workdir and data only in the bucket. SIGTERMs
  host 1 alone once it logged `step <sigterm_after>/6`. Returns (rcs, logs, pids)."""
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
           "--", *_tiny(gcs, workdir), *TWO_HOST_FLAGS, *extra]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(HOME=str(home), TMPDIR=str(tmp)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = ["", ""]
  try:
    for line in procs[1].stdout:
      logs[1] += line
      if sigterm_after is not None and f"step {sigterm_after}/6" in line:
        procs[1].send_signal(signal.SIGTERM)
        sigterm_after = None
    procs[1].wait(timeout=600)
    logs[0], _ = procs[0].communicate(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], logs, [p.pid for p in procs]


def _records(path, key):
  if not path.exists():
    return []
  return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]


def _tb_pids(workdir):
  """The writer pids in the TensorBoard event file names (events.out.tfevents.T.HOST.PID.N)."""
  return {int(p.name.split(".")[-3]) for p in paths.user_path(workdir).iterdir()
          if p.name.startswith("events.out.tfevents")}


def _prepare_demo_data(gcs):
  """The tiny demo dataset in the bucket, built once here (as a pod prepares data first)."""
  from centerclip_jax import config as config_lib
  from centerclip_jax.training import trainer
  config = config_lib.base_config()
  config.dataset, config.data_dir = "synthetic_video_text/tiny", gcs.url("tfds")
  config.train_split, config.val_split, config.eval_split = "train", "", "test"
  return trainer.get_builder(config)


@pytest.fixture(scope="module")
def two_hosts(gcs, tmp_path_factory):
  """Two hosts: SIGTERM to host 1 after step 3, then both resumed to the end."""
  _prepare_demo_data(gcs)
  scratch = tmp_path_factory.mktemp("two_hosts")
  workdir = gcs.url("runs/two_hosts")
  first = _two_hosts(gcs, workdir, scratch, sigterm_after=3)
  steps_after_first = _steps(workdir)
  tb_after_first = _tb_pids(workdir)
  second = _two_hosts(gcs, workdir, scratch)
  return dict(workdir=workdir, scratch=scratch, first=first, second=second,
              steps_after_first=steps_after_first, tb_after_first=tb_after_first)


def _preempted_step(log):
  lines = [l for l in log.splitlines() if "preempted: saved step" in l]
  assert len(lines) == 1, log[-3000:]
  return int(lines[0].split("preempted: saved step")[1].split(",")[0])


@pytest.mark.slow  # CI budget: the two-host fixture is ~4 min on 2 cores
def test_two_hosts_preempted_together_and_resumed_through_the_bucket(two_hosts):
  (rcs, logs, _), (rcs2, logs2, _) = two_hosts["first"], two_hosts["second"]
  assert rcs == [143, 143], "\n".join(l[-3000:] for l in logs)
  step0, step1 = (_preempted_step(log) for log in logs)
  assert step0 == step1 and 3 <= step0 < 6  # the same step on both, mid-run
  assert two_hosts["steps_after_first"][-1] == step0  # saved in the bucket
  assert rcs2 == [0, 0], "\n".join(l[-3000:] for l in logs2)
  for log in logs2:
    assert f"resumed from step {step0}" in log, log[-3000:]
  assert _steps(two_hosts["workdir"])[-1] == 6
  results = json.loads(paths.user_path(two_hosts["workdir"] + "/results.json").read_text())
  assert results["train_steps"] == 6 and "2 host(s)" in logs[0]


@pytest.mark.slow  # CI budget: the two-host fixture is ~4 min on 2 cores
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


@pytest.mark.slow  # CI budget: the two-host fixture is ~4 min on 2 cores
def test_two_hosts_each_read_only_their_shard(gcs, two_hosts):
  import tensorflow_datasets as tfds
  builder = tfds.builder("synthetic_video_text/tiny", data_dir=gcs.url("tfds"))
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


@pytest.mark.slow
def test_two_hosts_resume_equals_uninterrupted_two_hosts(gcs, two_hosts, tmp_path):
  """Slow (one more 2-host run): the preempted + resumed 2-host run ends with the params
  of an uninterrupted 2-host run."""
  workdir = gcs.url("runs/two_hosts_full")
  rcs, logs, _ = _two_hosts(gcs, workdir, tmp_path)
  assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
  a, b = _params(workdir), _params(two_hosts["workdir"])
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- search, encode


SEARCH_FLAGS = ["--config.data.decode_short_side=32", "--config.model.max_frames=4",
                "--config.model.target_frames_blocks=(4,2)",
                "--config.model.cluster_num_blocks=(16,8)"]
CAPTIONS = ["a man is cooking", "two dogs play in the snow"]
VIDEOS = ["a.mp4", "sub/b.avi"]


def _cli(module, *args, tmpdir):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=_env(TMPDIR=str(tmpdir)), capture_output=True, text=True,
                        timeout=900)


@pytest.fixture(scope="module")
def search_runs(gcs, tmp_path_factory):
  """A tiny CLIP converted into the bucket; `search index` of a local folder into the
  bucket, `search query` from it, `encode --output gs://` of the same files."""
  import jax
  from centerclip_jax.models import clip as clip_lib
  from centerclip_jax.weights import porting
  from tests import video_fixtures as vf
  root = tmp_path_factory.mktemp("gcs_search")
  scratch = root / "tmp"
  scratch.mkdir()
  clip = gcs.url("search/clip")
  tiny = clip_lib.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2,
                            vision_width=64, vision_patch_size=8, context_length=77,
                            vocab_size=49408, transformer_width=64, transformer_heads=1,
                            transformer_layers=1)  # as tests/test_search.py
  params = jax.tree.map(np.asarray, clip_lib.init_params(tiny, jax.random.PRNGKey(0)))
  porting.save_converted(clip, tiny, params, {}, {"source": "test"})
  videos = root / "videos"
  vf.write_video(videos / "a.mp4", num_frames=30, fps=10, seed=1, pattern="moving")
  vf.write_video(videos / "sub" / "b.avi", num_frames=12, fps=10, seed=2, pattern="moving")
  model = ["--config", os.path.join(REPO, "configs", "msrvtt.py"),
           f"--config.init_from={clip}", *SEARCH_FLAGS]
  index = gcs.url("search/index")
  built = _cli("centerclip_jax.search", "index", *model, "--videos", str(videos),
               "--index", index, "--batch_size", "2", "--workers", "1", tmpdir=scratch)
  assert built.returncode == 0, built.stderr[-3000:]
  query = _cli("centerclip_jax.search", "query", "--index", index, "--json", "--top_k", "2",
               *CAPTIONS, tmpdir=scratch)
  assert query.returncode == 0, query.stderr[-3000:]
  (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
  out = gcs.url("search/emb")
  encoded = _cli("centerclip_jax.encode", *model, "--videos",
                 *[str(videos / v) for v in VIDEOS], "--captions", str(root / "captions.txt"),
                 "--batch_size", "2", "--output", out, tmpdir=scratch)
  assert encoded.returncode == 0, encoded.stderr[-3000:]
  return dict(index=index, built=built, query=json.loads(query.stdout), emb=out + ".npz",
              encoded=encoded, scratch=scratch, videos=videos)


def _emb(search_runs):
  with paths.local_copy(search_runs["emb"]) as local:
    return dict(np.load(os.fspath(local)))


@pytest.mark.slow
def test_encode_output_in_the_bucket(search_runs):
  emb = _emb(search_runs)
  assert emb["video_embeddings"].shape == (2, 32) and emb["text_embeddings"].shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(emb["video_embeddings"], axis=1), 1, atol=1e-5)
  assert list(emb["captions"]) == CAPTIONS
  assert search_runs["emb"] in search_runs["encoded"].stdout
  assert not os.path.exists(os.path.join(REPO, "gs:"))


@pytest.mark.slow
def test_search_index_in_the_bucket_and_query_from_it(search_runs):
  from centerclip_jax.search import index as index_lib
  assert "2 videos; embedded 2" in search_runs["built"].stdout
  emb = _emb(search_runs)
  with paths.staged_tree(search_runs["index"], upload=False) as local:
    manifest, rows = index_lib.load_index(local, verify=True)
  assert manifest["complete"]
  by_path = {e["path"]: rows[e["row"]] for e in manifest["entries"] if e["status"] == "ok"}
  assert sorted(by_path) == sorted(VIDEOS)
  for i, path in enumerate(VIDEOS):  # the index holds what encode computes
    np.testing.assert_allclose(by_path[path], emb["video_embeddings"][i], atol=2e-5)
  scores = emb["text_embeddings"] @ emb["video_embeddings"].T  # cosine similarity
  for q, result in enumerate(search_runs["query"]["results"]):
    assert result["query"] == CAPTIONS[q]
    hits = result["hits"]
    assert [h["path"] for h in hits] == [VIDEOS[j] for j in np.argsort(-scores[q])]
    for h in hits:
      assert h["score"] == pytest.approx(scores[q][VIDEOS.index(h["path"])], abs=1e-4)
  # The local stages are gone (only the log folder stays in $TMPDIR).
  assert [p.name for p in search_runs["scratch"].iterdir()] in ([], ["centerclip_jax"])


@pytest.mark.slow
def test_search_serve_stages_a_local_copy(search_runs):
  from centerclip_jax.search import serve
  service = serve.Service(search_runs["index"], max_batch=1)
  local = service.index_dir
  assert not paths.is_uri(local) and (local / "manifest.json").exists()
  info = service.load()
  assert info["videos"] == 2 and service.stats()["index"] == search_runs["index"]
  assert service.reload()["reloaded"] and service.index_dir != local
  assert not local.exists()  # the previous copy is removed
