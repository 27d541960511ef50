"""A corrupt prepared dataset: a truncated TFRecord shard, a frame that is not a JPEG.

Both faults are injected into copies of a built miniature MSR-VTT. Training and eval
reads stop with one error naming the shard and the `prepare_data` command that rebuilds
it (`pipeline.read_numpy`); `prepare_data --verify` lists every bad record.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from centerclip_jax.data import datasets, pipeline
from centerclip_jax.data.datasets import common, verify
from tests import test_datasets, video_fixtures as vf

REPO = Path(__file__).resolve().parents[1]
CONFIG = common.VideoTextConfig(fps=3, short_side=32)
VERSION_DIR = Path("msrvtt") / "fps3_32" / "1.0.0"


def load(data_dir):
  return datasets.BUILDERS["msrvtt"](data_dir=str(data_dir), config=CONFIG)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  """(manual_dir, data_dir) of a built miniature MSR-VTT, never modified."""
  root = tmp_path_factory.mktemp("corrupt")
  vf.write_msrvtt_layout(root / "raw")
  builder = datasets.BUILDERS["msrvtt"](data_dir=str(root / "clean"), config=CONFIG,
                                        num_workers=1, keep_frame_cache=False)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root / "raw"), try_download_gcs=False))
  return root / "raw", root / "clean"


def copy_of(clean, tmp_path) -> Path:
  shutil.copytree(clean[1], tmp_path / "data")
  return tmp_path / "data"


def shard(data_dir: Path, split: str) -> Path:
  (path,) = (data_dir / VERSION_DIR).glob(f"msrvtt-{split}.tfrecord-*")
  return path


def truncate(path: Path, keep: float = 0.6) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def replace_frame(path: Path, record: int, frame: int, payload: bytes = b"not a jpeg") -> str:
  """Rewrites shard `path` with frame `frame` of record `record` replaced; returns its id."""
  records = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
  example = tf.train.Example.FromString(records[record])
  frames = example.features.feature["frames"].bytes_list.value
  assert frames[frame][:3] == b"\xff\xd8\xff"  # It was a JPEG.
  frames[frame] = payload
  records[record] = example.SerializeToString()
  with tf.io.TFRecordWriter(str(path)) as writer:
    for r in records:
      writer.write(r)
  return example.features.feature["video_id"].bytes_list.value[0].decode()


def rebuild(manual_dir, data_dir) -> str:
  return (f"python tools/prepare_data.py msrvtt --manual_dir {manual_dir} --data_dir {data_dir} "
          "--short_side 32 --overwrite")


def train_batches(builder):
  return pipeline.train_dataset(builder, "train_9k", global_batch_size=2, max_frames=4,
                                max_words=8, resolution=32, seed=0)


def eval_data(builder):
  return pipeline.eval_datasets(builder, "test_1k", batch_size=2, max_frames=4, max_words=8,
                                resolution=32)


def test_clean_data_reads_and_verifies(clean):
  builder = load(clean[1])
  assert next(train_batches(builder))["frames"].shape == (2, 4, 32, 32, 3)
  assert sum(1 for _ in eval_data(builder).videos) == 1
  assert verify.scan(builder, decode=True) == []


def test_truncated_shard_stops_training_with_its_name(clean, tmp_path):
  data_dir = copy_of(clean, tmp_path)
  path = shard(data_dir, "train_9k")
  truncate(path)
  with pytest.raises(verify.CorruptDataError) as e:
    next(train_batches(load(data_dir)))
  message = str(e.value)
  assert "\n" not in message
  assert f"corrupt shard {path}: unreadable after record " in message
  assert message.endswith(f"; rebuild it with: {rebuild(clean[0], data_dir)}")
  assert "split 'train_9k'" in message


def test_truncated_shard_stops_eval_with_its_name(clean, tmp_path):
  data_dir = copy_of(clean, tmp_path)
  path = shard(data_dir, "test_1k")
  truncate(path)
  with pytest.raises(verify.CorruptDataError, match=f"corrupt shard {path}: unreadable"):
    data = eval_data(load(data_dir))
    list(data.videos)


def test_frame_not_jpeg_stops_eval_and_training(clean, tmp_path):
  data_dir = copy_of(clean, tmp_path)
  test_shard, train_shard = shard(data_dir, "test_1k"), shard(data_dir, "train_9k")
  video_id = replace_frame(test_shard, record=1, frame=0)
  builder = load(data_dir)
  data = eval_data(builder)  # Ids and captions still read; the frames fail.
  with pytest.raises(verify.CorruptDataError) as e:
    list(data.videos)
  assert str(e.value) == (
      f"msrvtt/fps3_32/1.0.0 split 'test_1k': corrupt shard {test_shard}: record 1 "
      f"(video {video_id}): frame 0 is not a JPEG (starts with b'not '); rebuild it with: "
      f"{rebuild(clean[0], data_dir)}")
  # Every frame of every train example is sampled at max_frames=8 (6 frames each).
  replace_frame(train_shard, record=0, frame=5, payload=b"\xff\xd8\xff\xe0 cut short")
  with pytest.raises(verify.CorruptDataError, match=f"corrupt shard {train_shard}: record 0 "):
    batches = pipeline.train_dataset(builder, "train_9k", global_batch_size=3, max_frames=8,
                                     max_words=8, resolution=32, seed=0)
    next(batches)


def test_other_read_errors_are_not_blamed_on_the_data(clean):
  """A failing op on clean data keeps its own error (the scan finds nothing)."""
  builder = load(clean[1])
  ds = tf.data.Dataset.from_tensors(tf.constant(b"x")).map(tf.io.decode_jpeg)
  with pytest.raises(tf.errors.InvalidArgumentError):
    list(pipeline.read_numpy(builder, "train_9k", ds))


def test_prepare_data_verify_lists_bad_records(clean, tmp_path, capsys):
  tool = test_datasets._tool()  # tools/prepare_data.py
  args = ["msrvtt", "--short_side", "32", "--verify"]
  assert tool.main(args + ["--data_dir", str(clean[1])]) == 0
  assert "7 examples in 3 splits" in capsys.readouterr().out  # train_7k 2, train_9k 3, test_1k 2
  data_dir = copy_of(clean, tmp_path)
  video_id = replace_frame(shard(data_dir, "train_7k"), record=1, frame=3)
  truncate(shard(data_dir, "test_1k"))
  assert tool.main(args + ["--data_dir", str(data_dir)]) == 1
  out = capsys.readouterr().out.splitlines()
  test_name, train_name = shard(data_dir, "test_1k").name, shard(data_dir, "train_7k").name
  assert out[0].endswith(", 2 bad")
  assert out[1].startswith(f"  test_1k: {test_name}: unreadable after record ")
  assert out[2] == (f"  train_7k: {train_name}: record 1 (video {video_id}): frame 3 is not "
                    "a JPEG (starts with b'not ')")
  assert out[3] == f"rebuild: {rebuild(clean[0], data_dir)}"
  assert len(out) == 4


@pytest.mark.parametrize("mode", ["train_and_eval", "eval"])
def test_main_stops_with_one_line(clean, tmp_path, mode):
  """`main` on a corrupt train shard (training) or eval shard (eval-only): exit != 0, one
  error line with the shard and the rebuild command, no traceback."""
  data_dir = copy_of(clean, tmp_path)
  bad = shard(data_dir, "train_9k" if mode == "train_and_eval" else "test_1k")
  truncate(bad)
  args = [sys.executable, "-m", "centerclip_jax.main", "--config", str(REPO / "configs" / "demo.py"),
          "--workdir", str(tmp_path / "run"), "--config.dataset=msrvtt/fps3_32",
          f"--config.data_dir={data_dir}", "--config.train_split=train_9k",
          "--config.val_split=", "--config.eval_split=test_1k", f"--config.mode={mode}",
          "--config.train.num_train_steps=2", "--config.train.global_batch_size=2",
          "--config.eval.batch_size=2"]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  output = proc.stdout + proc.stderr
  assert proc.returncode != 0, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and f"corrupt shard {bad}: " in errors[0], output[-3000:]
  assert errors[0].endswith(f"rebuild it with: {rebuild(clean[0], data_dir)}")
