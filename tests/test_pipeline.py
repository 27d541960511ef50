"""Tests of the tf.data input pipeline on the synthetic 'tiny' dataset."""

from __future__ import annotations

import collections
import io
import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from centerclip_jax.data import pipeline
from centerclip_jax.data import frames as frame_lib
from centerclip_jax.data.datasets import synthetic  # noqa: F401  (registers the builder)
from centerclip_jax.data.tokenizer import get_tokenizer
from centerclip_jax.models import clip as clip_lib
from tests import frames_reference as ref

MAX_FRAMES = 12
MAX_WORDS = 32
RES = 64  # = the tiny frame size: no resize, so frames can be compared almost exactly.
# OpenAI CLIP's constants, written out here rather than taken from the code under test.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
ONE_LEVEL = 1  # uint8 levels: the pipeline hands the model uint8 pixels.


def _levels(a, b) -> np.ndarray:
  """|a - b| of two uint8 arrays, in uint8 levels (int)."""
  assert a.dtype == b.dtype == np.uint8, (a.dtype, b.dtype)
  return np.abs(a.astype(np.int32) - b.astype(np.int32))


@pytest.fixture(scope="session")
def builder(tmp_path_factory):
  b = tfds.builder("synthetic_video_text/tiny", data_dir=str(tmp_path_factory.mktemp("tfds")))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return b


@pytest.fixture(scope="session")
def reference(builder):
  """Per split: videos in split order, frames decoded and preprocessed with PIL (tests/)."""
  tokenize = get_tokenizer().tokenize
  out = {}
  for split in ("train", "test"):
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"frames": tfds.decode.SkipDecoding()})
    videos = []
    for row in tfds.as_numpy(ds):
      raw = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                      for b in row["frames"]])
      captions = [c.decode() for c in row["captions"]]
      videos.append({"frames": ref.resize_and_crop_frames(raw, RES), "captions": captions,
                     "tokens": tokenize(captions, MAX_WORDS)})
    out[split] = videos
  return out


def _video_of_tokens(videos: list[dict]) -> dict[bytes, tuple[int, int]]:
  """Token row -> (video index, caption index); the tiny captions are all distinct."""
  table = {}
  for v, item in enumerate(videos):
    for c, row in enumerate(item["tokens"]):
      table[row.tobytes()] = (v, c)
  assert len(table) == sum(len(x["captions"]) for x in videos)
  return table


def _train_stream(builder, split="train", **kwargs):
  args = dict(global_batch_size=4, max_frames=MAX_FRAMES, max_words=MAX_WORDS,
              resolution=RES, seed=0)
  args.update(kwargs)
  return pipeline.train_dataset(builder, split, **args)


@pytest.fixture(scope="session")
def train_batches(builder):
  return list(itertools.islice(_train_stream(builder), 12))  # Two epochs of 24 videos.


# ------------------------------------------------------------------------- sampling rules


@tf.function
def _tf_indices(num_frames, seed, max_frames, train):
  return frame_lib.frame_indices(num_frames, max_frames, train=train, seed=seed)


def test_eval_sampling_equals_video_rule():
  for max_frames in (1, 4, 12, 64):
    for num_frames in list(range(1, 40)) + [97, 1000, 3001]:
      got_i, got_m = _tf_indices(tf.constant(num_frames), tf.constant([0, 0], tf.int64),
                                 max_frames, False)
      want_i, want_m = ref.sample_frame_indices(num_frames, max_frames, train=False)
      np.testing.assert_array_equal(got_i.numpy(), want_i, err_msg=f"{num_frames}")
      np.testing.assert_array_equal(got_m.numpy(), want_m)


def test_train_sampling_one_frame_per_segment():
  for num_frames in (5, 12, 13, 17, 30, 1000):
    seen = set()
    draws = []
    for s in range(150):
      indices, mask = _tf_indices(tf.constant(num_frames), tf.constant([7, s], tf.int64),
                                  MAX_FRAMES, True)
      indices, mask = indices.numpy(), mask.numpy()
      if num_frames <= MAX_FRAMES:  # Short videos: all frames, then the last, masked.
        want_i, want_m = ref.sample_frame_indices(num_frames, MAX_FRAMES, train=True)
        np.testing.assert_array_equal(indices, want_i)
        np.testing.assert_array_equal(mask, want_m)
        continue
      assert mask.all()
      tick = num_frames / MAX_FRAMES
      for i, j in enumerate(indices):
        end = num_frames if i == MAX_FRAMES - 1 else int(tick * (i + 1))
        assert int(tick * i) <= j < end, (num_frames, i, j)
      seen.update(indices.tolist())
      draws.append(indices)
    if num_frames == 30:  # Uniform within segments: every frame gets drawn.
      assert seen == set(range(30))
    if num_frames >= 30:  # Seeds matter.
      assert len({d.tobytes() for d in draws}) > 100
  a = _tf_indices(tf.constant(100), tf.constant([1, 2], tf.int64), MAX_FRAMES, True)[0]
  b = _tf_indices(tf.constant(100), tf.constant([1, 2], tf.int64), MAX_FRAMES, True)[0]
  np.testing.assert_array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------------------- preprocessing


def test_pipeline_keeps_pixels_and_the_model_normalises_them():
  frame = np.random.default_rng(0).integers(0, 256, [1, RES, RES, 3], dtype=np.uint8)
  got = frame_lib.resize_and_crop(tf.constant(frame), RES).numpy()
  np.testing.assert_array_equal(got, frame)  # uint8 in, the same uint8 out
  want = (frame / 255.0 - MEAN) / STD
  np.testing.assert_allclose(clip_lib.normalize_pixels(got), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, res", [((32, 45), 32), ((45, 32), 32), ((33, 48), 33),
                                        ((96, 128), 32), ((120, 90), 100), ((64, 64), 80),
                                        ((60, 90), 224)])
def test_resize_and_crop_matches_video_preprocess(shape, res):
  rng = np.random.default_rng(1)
  coarse = rng.integers(0, 256, (2, shape[0] // 4 + 1, shape[1] // 4 + 1, 3), np.uint8)
  frames = np.stack([np.asarray(Image.fromarray(f).resize(shape[::-1], Image.BILINEAR))
                     for f in coarse])
  got = frame_lib.resize_and_crop(tf.constant(frames), res).numpy()
  want = ref.resize_and_crop_frames(frames, res)
  assert got.shape == want.shape == (2, res, res, 3)
  # Pure crops are exact; resizing may put a pixel one uint8 level from PIL's: rarely
  # when shrinking (PIL's two rounded passes are mirrored), often when enlarging.
  assert _levels(got, want).max() <= (0 if min(shape) == res else ONE_LEVEL)
  off = np.mean(_levels(got, want) > 0)
  assert off < (1e-6 if min(shape) == res else 0.02 if min(shape) > res else 0.3), off


# ------------------------------------------------------------------------------ training


def _assert_tsn_frames(batch, row, ref_frames, where):
  """batch row's frames: one frame of each of MAX_FRAMES equal segments of the video
  (all frames, then the last repeated and masked, when it is shorter)."""
  t = len(ref_frames)
  np.testing.assert_array_equal(batch["frame_mask"][row], np.arange(MAX_FRAMES) < t)
  frames = batch["frames"][row]
  tick = t / MAX_FRAMES
  for i in range(MAX_FRAMES):
    if t <= MAX_FRAMES:
      candidates = [min(i, t - 1)]  # All frames in order, then the last repeated.
    else:
      end = t if i == MAX_FRAMES - 1 else int(tick * (i + 1))
      candidates = range(int(tick * i), end)
    err = min(_levels(frames[i], ref_frames[j]).max() for j in candidates)
    assert err <= ONE_LEVEL, (where, i, err)


def test_train_batches_shapes_sampling_and_captions(train_batches, reference):
  videos = reference["train"]
  table = _video_of_tokens(videos)
  per_epoch = []
  for step, batch in enumerate(train_batches):
    assert batch["frames"].dtype == np.uint8
    assert batch["frames"].shape == (4, MAX_FRAMES, RES, RES, 3)
    assert batch["frame_mask"].dtype == np.bool_ and batch["frame_mask"].shape == (4, MAX_FRAMES)
    assert batch["text"].dtype == np.int32 and batch["text"].shape == (4, MAX_WORDS)
    if step % 6 == 0:
      per_epoch.append({})
    for row in range(4):
      v, c = table[batch["text"][row].tobytes()]
      per_epoch[-1][v] = c
      _assert_tsn_frames(batch, row, videos[v]["frames"], (step, row, v))
  # Each epoch shows every video once; the caption pick changes between epochs.
  assert [sorted(e) for e in per_epoch] == [list(range(24))] * 2
  two = [v for v in range(24) if len(videos[v]["captions"]) == 2]
  assert len(two) >= 4
  assert any(per_epoch[0][v] != per_epoch[1][v] for v in two)
  assert len({per_epoch[0][v] for v in two}) == 2
  # A new shuffle in the second epoch.
  order = [[table[b["text"][r].tobytes()][0] for b in train_batches[e * 6:e * 6 + 6]
            for r in range(4)] for e in range(2)]
  assert order[0] != order[1]


def test_train_is_deterministic_and_resumable(builder, train_batches):
  again = list(itertools.islice(_train_stream(builder), 3))
  resumed = list(itertools.islice(_train_stream(builder, start_step=5), 4))  # Crosses epochs.
  other_seed = next(_train_stream(builder, seed=1))
  for a, b in zip(again + resumed, train_batches[:3] + train_batches[5:9]):
    for key in ("frames", "frame_mask", "text"):
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(other_seed["text"], train_batches[0]["text"])


def test_resuming_does_not_decode_skipped_examples(builder, monkeypatch):
  decoded = []
  original = frame_lib.load_jpegs

  def counting(*args, **kwargs):
    out = original(*args, **kwargs)
    tick = tf.py_function(lambda: decoded.append(1) or 0, [], tf.int32)
    with tf.control_dependencies([tick]):
      return tf.identity(out)

  monkeypatch.setattr(frame_lib, "load_jpegs", counting)
  stream = _train_stream(builder, resolution=16, start_step=30)  # Skips 120 examples.
  next(stream)
  assert 4 <= len(decoded) < 60  # Only the batch and some read-ahead, not the 120.


def test_bad_split_is_a_clear_error(builder):
  with pytest.raises(ValueError, match="no split 'validation'"):
    _train_stream(builder, split="validation")
  with pytest.raises(ValueError, match="no split"):
    _eval(builder, "nope")


def test_train_hosts_read_disjoint_halves(builder, reference):
  table = _video_of_tokens(reference["train"])
  seen = []
  for host in range(2):
    stream = _train_stream(builder, resolution=16, process_index=host, process_count=2)
    batches = list(itertools.islice(stream, 6))  # One epoch of this host's 12 videos.
    assert all(b["frames"].shape == (2, MAX_FRAMES, 16, 16, 3) for b in batches)
    seen.append({table[b["text"][r].tobytes()][0] for b in batches for r in range(2)})
  assert len(seen[0]) == len(seen[1]) == 12
  assert not seen[0] & seen[1]
  with pytest.raises(ValueError, match="divisible"):
    _train_stream(builder, global_batch_size=5, process_count=2)


def _rows(batches, table):
  """(video, caption) of every row of the batches, in stream order."""
  return [table[b["text"][r].tobytes()] for b in batches for r in range(len(b["text"]))]


@pytest.fixture(scope="session")
def caption_batches(builder):
  """Two epochs and a bit of the 'captions' stream (batches of 4)."""
  pairs = int(pipeline.caption_counts(builder, "train").sum())
  return pairs, list(itertools.islice(_train_stream(builder, examples="captions"),
                                      2 * pairs // 4 + 2))


def test_caption_counts(builder, reference):
  counts = pipeline.caption_counts(builder, "train")
  assert counts.dtype == np.int64
  assert counts.tolist() == [len(v["captions"]) for v in reference["train"]]
  assert pipeline.num_train_examples(builder, "train", "captions") == sum(counts)
  assert pipeline.num_train_examples(builder, "train", "videos") == 24
  with pytest.raises(ValueError, match="examples must be one of"):
    pipeline.num_train_examples(builder, "train", "pairs")


def test_captions_epoch_has_every_pair_once(caption_batches, reference):
  videos = reference["train"]
  table = _video_of_tokens(videos)
  pairs, batches = caption_batches
  every_pair = sorted(table.values())
  assert pairs == len(every_pair) > 24  # More examples per epoch than videos.
  rows = _rows(batches, table)
  epochs = [rows[:pairs], rows[pairs:2 * pairs]]
  assert [sorted(e) for e in epochs] == [every_pair] * 2  # Each pair once per epoch.
  assert epochs[0] != epochs[1]  # Shuffled anew.
  # An epoch is 2 passes over the videos (at most 2 captions each), a video at most once
  # per pass: only a batch across one of the <= 5 pass boundaries read here can hold a
  # video twice.
  repeats = sum(len({v for v, _ in rows[i:i + 4]}) < 4 for i in range(0, len(rows), 4))
  assert repeats <= 5
  # Frames: a TSN sample of the pair's video, drawn anew for every example.
  samples = collections.defaultdict(list)
  for step, batch in enumerate(batches):
    for row in range(4):
      v, c = table[batch["text"][row].tobytes()]
      _assert_tsn_frames(batch, row, videos[v]["frames"], (step, row, v))
      samples[v].append(batch["frames"][row])
  long_videos = [v for v in range(24) if len(videos[v]["frames"]) > MAX_FRAMES]
  assert long_videos
  assert any(not np.array_equal(samples[v][0], samples[v][1]) for v in long_videos)


def test_captions_stream_is_deterministic_and_resumable(builder, caption_batches):
  _, batches = caption_batches
  resumed = list(itertools.islice(_train_stream(builder, examples="captions", start_step=8),
                                  4))  # Crosses the first epoch's end (38 pairs / 4).
  given = next(_train_stream(builder, examples="captions", max_captions=2))
  for a, b in zip(resumed + [given], batches[8:12] + [batches[0]]):
    for key in ("frames", "frame_mask", "text"):
      np.testing.assert_array_equal(a[key], b[key])


def test_captions_hosts_read_disjoint_videos(builder, reference):
  table = _video_of_tokens(reference["train"])
  counts = pipeline.caption_counts(builder, "train")
  seen = []
  for host in range(2):
    host_pairs = sum(counts[12 * host:12 * host + 12])
    stream = _train_stream(builder, resolution=16, process_index=host, process_count=2,
                           examples="captions")
    batches = list(itertools.islice(stream, -(-host_pairs // 2)))
    assert all(b["frames"].shape == (2, MAX_FRAMES, 16, 16, 3) for b in batches)
    rows = _rows(batches, table)[:host_pairs]
    assert len(set(rows)) == host_pairs  # Every pair of this host's videos once.
    seen.append({v for v, _ in rows})
  assert len(seen[0]) == len(seen[1]) == 12
  assert not seen[0] & seen[1]


# ---------------------------------------------------------------------------------- eval


def _eval(builder, split, **kwargs):
  args = dict(batch_size=4, max_frames=MAX_FRAMES, max_words=MAX_WORDS, resolution=RES)
  args.update(kwargs)
  return pipeline.eval_datasets(builder, split, **args)


@pytest.fixture(scope="session")
def eval_train_single(builder):
  data = _eval(builder, "train", batch_size=5)
  return data, list(data.videos), list(data.texts)


def test_eval_single_host(eval_train_single, reference):
  data, video_batches, text_batches = eval_train_single
  videos = reference["train"]
  num_texts = sum(len(v["captions"]) for v in videos)
  assert (data.num_videos, data.num_texts) == (24, num_texts)
  assert len(video_batches) == len(data.videos) == 5  # ceil(24 / 5)
  assert len(text_batches) == len(data.texts) == -(-num_texts // 5)
  index = np.concatenate([b["video_index"] for b in video_batches])
  valid = np.concatenate([b["valid"] for b in video_batches])
  np.testing.assert_array_equal(index, list(range(24)) + [-1])
  np.testing.assert_array_equal(valid, [True] * 24 + [False])
  frames = np.concatenate([b["frames"] for b in video_batches])
  masks = np.concatenate([b["frame_mask"] for b in video_batches])
  assert frames.shape == (25, MAX_FRAMES, RES, RES, 3) and frames.dtype == np.uint8
  for v, item in enumerate(videos):
    indices, mask = ref.sample_frame_indices(len(item["frames"]), MAX_FRAMES, train=False)
    np.testing.assert_array_equal(masks[v], mask)
    assert _levels(frames[v], item["frames"][indices]).max() <= ONE_LEVEL
  texts = np.concatenate([b["text"] for b in text_batches])
  text_index = np.concatenate([b["video_index"] for b in text_batches])
  text_valid = np.concatenate([b["valid"] for b in text_batches])
  assert texts.dtype == np.int32 and text_index.dtype == np.int32
  want_index = [v for v, item in enumerate(videos) for _ in item["captions"]]
  want_tokens = np.concatenate([item["tokens"] for item in videos])
  assert text_valid.sum() == num_texts and not text_valid[num_texts:].any()
  np.testing.assert_array_equal(text_index[:num_texts], want_index)
  np.testing.assert_array_equal(texts[:num_texts], want_tokens)
  assert (text_index[num_texts:] == -1).all()
  assert list(data.texts.keys) == [c for item in videos for c in item["captions"]]
  # Re-iterating gives the same batches.
  np.testing.assert_array_equal(next(iter(data.videos))["frames"], video_batches[0]["frames"])


@pytest.mark.parametrize("process_count", [2, 3])
def test_eval_hosts_split_without_overlap(builder, eval_train_single, process_count):
  _, single_videos, single_texts = eval_train_single
  single_frames = np.concatenate([b["frames"] for b in single_videos])
  single_text_rows = collections.Counter(
      (int(i), t.tobytes()) for b in single_texts
      for i, t, ok in zip(b["video_index"], b["text"], b["valid"]) if ok)
  video_rows, text_rows, batch_counts = [], collections.Counter(), set()
  for host in range(process_count):
    data = _eval(builder, "train", batch_size=4, process_index=host,
                 process_count=process_count)
    videos, texts = list(data.videos), list(data.texts)
    batch_counts.add((len(videos), len(texts), data.num_videos, data.num_texts))
    for b in videos:
      assert b["frames"].shape[0] == 4
      assert (b["video_index"][~b["valid"]] == -1).all()
      for i in b["video_index"][b["valid"]]:
        video_rows.append(int(i))
        row = int(np.nonzero(b["video_index"] == i)[0][0])
        np.testing.assert_array_equal(b["frames"][row], single_frames[i])
    for b in texts:
      assert b["text"].shape == (4, MAX_WORDS)
      assert (b["video_index"][~b["valid"]] == -1).all()
      text_rows.update((int(i), t.tobytes()) for i, t, ok in
                       zip(b["video_index"], b["text"], b["valid"]) if ok)
  assert len(batch_counts) == 1  # Same batch counts and totals on every host.
  assert sorted(video_rows) == list(range(24))  # Disjoint and complete.
  assert text_rows == single_text_rows


def test_benchmark_reports_throughput(builder):
  result = pipeline.benchmark(builder, "train", batch_size=4, max_frames=8, resolution=16,
                              num_batches=2, warmup_batches=1)
  assert result["videos_per_s"] > 0 and result["videos_per_cpu_s"] > 0
  assert result["videos_per_s_per_core"] == pytest.approx(
      result["videos_per_s"] / result["cores"])
