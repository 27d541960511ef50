"""User paths in a bucket, part 1: the emulator wiring and the in-process tools through a
local GCS emulator (tests/gcs_emulator.py; the `gcs` fixture is in conftest.py).

TensorFlow's file system, orbax (TensorStore + epath), staged outputs, a fresh process that
is given only STORAGE_EMULATOR_HOST; the weight converter into the bucket; prepare_data
from raw files in the bucket into the bucket. The whole-command runs are in the files
beside this one, one per fixture, so that pytest-xdist (`--dist loadfile`) can run them on
both workers: test_gcs_train.py (the demo trained, SIGTERM + resume, eval-only, one host),
test_gcs_hosts.py (two hosts, nothing shared but the bucket) and test_gcs_search.py
(`search index/query/serve`, `encode`). All of them run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from centerclip_jax import paths
from tests import gcs_runs

REPO = gcs_runs.REPO


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


def test_convert_weights_into_the_bucket(gcs, tmp_path):
  """tools/convert_clip_weights.py --input gs://... --output gs://...; same tree as local."""
  from centerclip_jax.weights import porting
  from tests import torch_checkpoints as tc
  source = tc.write_state_dict(tc.reference_model(tc.TINY, seed=3), tmp_path / "tiny.pt")
  remote_source = paths.user_path(gcs.url("weights/tiny.pt"))
  remote_source.write_bytes(source.read_bytes())
  tool = gcs_runs.tool("convert_clip_weights")
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
  tool = gcs_runs.tool("prepare_data")
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
