"""User paths in a bucket: the emulator wiring and every storage component through a local
GCS emulator (tests/gcs_emulator.py; the `gcs` fixture is in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from centerclip_jax import paths

# Compile-heavy: in the slow set (`pytest -m slow`), outside CI's 25-minute budget.
pytestmark = pytest.mark.slow

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


# ----------------------------------------------------------------------------- main, in a bucket


def _main(*args, timeout=900, **popen):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "centerclip_jax.main", *args]
  if popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _tiny(gcs, workdir):
  return ["--config", os.path.join(REPO, "configs", "demo.py"), "--workdir", workdir,
          "--config.dataset=synthetic_video_text/tiny", f"--config.data_dir={gcs.url('tfds')}",
          "--config.train.num_train_steps=6", "--config.train.global_batch_size=8",
          "--config.train.log_every_steps=1", "--config.eval.batch_size=4", "--config.val_split="]


def _params(workdir, step=6):
  import jax
  import orbax.checkpoint as ocp
  from centerclip_jax.training import checkpoints
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(paths.user_path(workdir) / "checkpoints" / str(step) / checkpoints.STATE)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


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
