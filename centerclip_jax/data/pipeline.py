"""tf.data input pipeline: TFDS video-text examples -> per-host numpy batches.

Every builder writes the schema of `datasets/features.py` (frames as a sequence of JPEG
images). Frames are loaded undecoded (`tfds.decode.SkipDecoding`) and only the sampled ones
are decoded, by the one frame path of `frames.py` (the one `encode` and search use):
TSN sampling for training, the centre rule for eval; shorter side -> `resolution`, centre
crop, CLIP mean/std, the same in training and eval, as in CenterCLIP.

Training streams are infinite, deterministic given `seed`, and resumable: the stream read
from `start_step` equals the tail of the stream read from 0, and the skipped examples are
read but never decoded. All randomness is stateless, keyed by (seed, host, position in
the stream), so a video gets a fresh caption and frame sample in every epoch.

Eval streams cover every video (`videos`) and every caption as a query (`texts`) exactly
once over all hosts; each host gets the same number of full batches, padded with
`valid=False` rows, so multi-host evaluation stays in lock step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from centerclip_jax.data import frames as frame_lib

# texts, max_words -> int32 [len(texts), max_words].
TokenizeFn = Callable[[Sequence[str], int], np.ndarray]

_REQUIRED_FEATURES = ("frames", "captions", "video_id")


def _default_tokenize() -> TokenizeFn:
  from centerclip_jax.data.tokenizer import get_tokenizer  # pylint: disable=g-import-not-at-top
  return get_tokenizer().tokenize


def _derive_seed(*parts) -> int:
  """A 63-bit integer seed from any printable parts (stable across runs and hosts)."""
  digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _check_builder(builder: tfds.core.DatasetBuilder, split: str) -> None:
  names = set(builder.info.features.keys())
  missing = [k for k in _REQUIRED_FEATURES if k not in names]
  if missing:
    raise ValueError(f"dataset {builder.info.full_name!r} lacks features {missing}; video-text "
                     "builders must use datasets.features.video_text_features()")
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise ValueError(f"dataset {builder.info.full_name!r} has no split {split!r} "
                     f"(splits: {sorted(builder.info.splits.keys())}); is it prepared?") from e


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")


def _num_frames(example: dict) -> tf.Tensor:
  n = tf.shape(example["frames"])[0]
  tf.debugging.assert_positive(n, message="video without frames")
  return n


# ---------------------------------------------------------------------------- training


TRAIN_EXAMPLES = ("captions", "videos")


def read_numpy(builder: tfds.core.DatasetBuilder, split: str,
               ds: tf.data.Dataset) -> Iterator:
  """`tfds.as_numpy(ds)`, where a read error that a corrupt shard of `split` explains
  (truncated TFRecord, a frame that is not a JPEG: `datasets.verify.corrupt_error`)
  becomes one `CorruptDataError` naming the shard and the command that rebuilds it.
  Every read of a prepared dataset goes through here."""
  try:
    yield from tfds.as_numpy(ds)
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
    from centerclip_jax.data.datasets import verify  # pylint: disable=g-import-not-at-top
    if (error := verify.corrupt_error(builder, split, e)) is None:
      raise
    raise error from None


def caption_counts(builder: tfds.core.DatasetBuilder, split) -> np.ndarray:
  """int64 [num_examples]: the number of captions of each example of `split`, in order.

  Reads the split once (frames are read, not decoded).
  """
  _check_builder(builder, split)
  ds = builder.as_dataset(
      split=split, shuffle_files=False, read_config=tfds.ReadConfig(options=_options()),
      decoders=tfds.decode.PartialDecoding({"captions": True}))
  ds = ds.map(lambda ex: tf.size(ex["captions"], out_type=tf.int64)).batch(4096)
  return np.concatenate([np.zeros([0], np.int64)] + list(read_numpy(builder, split, ds)))


def num_train_examples(builder: tfds.core.DatasetBuilder, split: str, examples: str,
                       counts: np.ndarray | None = None) -> int:
  """Examples in one epoch of the training stream: videos, or (video, caption) pairs."""
  if examples not in TRAIN_EXAMPLES:
    raise ValueError(f"examples must be one of {TRAIN_EXAMPLES}, got {examples!r}")
  if examples == "videos":
    _check_builder(builder, split)
    return builder.info.splits[split].num_examples
  return int(np.sum(caption_counts(builder, split) if counts is None else counts))


def _caption_rounds(ds: tf.data.Dataset, *, videos: int, rounds: int,
                    key: tf.Tensor) -> tf.data.Dataset:
  """Every (video, caption) pair once per epoch, from an infinite stream of passes.

  An epoch is `rounds` (= the most captions of a video) passes over the `videos` videos,
  each pass in a new shuffled order; per epoch and video a random permutation pi of
  [0, rounds) sends the video's caption pi(r) < count to pass r, and skips the passes
  with pi(r) >= count. Adds 'pick' (the caption index) to each kept example.
  """

  def assign(position, example):
    passes = position // videos
    epoch, round_ = passes // rounds, passes % rounds
    video = tf.strings.to_hash_bucket_fast(example["video_id"], 2**62)
    k = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(key, epoch), video)
    u = tf.random.stateless_uniform([rounds], k, dtype=tf.float64)
    r = tf.cast(round_, tf.int32)
    ahead = tf.logical_or(u < u[r], tf.logical_and(u == u[r], tf.range(rounds) < r))
    pick = tf.reduce_sum(tf.cast(ahead, tf.int32))  # pi(r): rank of u[r].
    count = tf.size(example["captions"])
    tf.debugging.assert_positive(count, message="video without captions")
    tf.debugging.assert_less_equal(count, rounds, message="a video has more captions than "
                                   "max_captions")
    return {"frames": example["frames"], "captions": example["captions"],
            "pick": tf.where(pick < count, pick, -1)}

  return ds.enumerate().map(assign, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True).filter(lambda ex: ex["pick"] >= 0)


def train_tf_dataset(builder: tfds.core.DatasetBuilder, split: str, *, global_batch_size: int,
                     max_frames: int, max_words: int, resolution: int, seed: int,
                     process_index: int = 0, process_count: int = 1, start_step: int = 0,
                     shuffle_buffer: int = 2048, examples: str = "videos",
                     max_captions: int | None = None,
                     tokenize: TokenizeFn | None = None) -> tf.data.Dataset:
  """The infinite training stream of this host as a tf.data.Dataset (see train_dataset)."""
  _check_positive(global_batch_size=global_batch_size, max_frames=max_frames,
                  max_words=max_words, resolution=resolution, shuffle_buffer=shuffle_buffer)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if examples not in TRAIN_EXAMPLES:
    raise ValueError(f"examples must be one of {TRAIN_EXAMPLES}, got {examples!r}")
  _check_builder(builder, split)
  batch = global_batch_size // process_count
  tokenize = tokenize or _default_tokenize()
  host_split = tfds.even_splits(split, process_count)[process_index]
  num_videos = builder.info.splits[host_split].num_examples
  if num_videos == 0:
    raise ValueError(f"split {split!r} of {builder.info.full_name!r} has no examples for "
                     f"host {process_index} of {process_count}")
  if examples == "captions" and max_captions is None:
    max_captions = int(caption_counts(builder, host_split).max())

  ds = builder.as_dataset(
      split=host_split, shuffle_files=True, decoders={"frames": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=_derive_seed(seed, process_index, "files"),
                                  options=_options(), try_autocache=False))
  keep = ("frames", "captions") + (("video_id",) if examples == "captions" else ())
  ds = ds.map(lambda ex: {k: ex[k] for k in keep})
  ds = ds.shuffle(shuffle_buffer, seed=_derive_seed(seed, process_index, "shuffle"),
                  reshuffle_each_iteration=True)
  ds = ds.repeat()
  if examples == "captions":
    rounds_seed = _derive_seed(seed, process_index, "caption rounds")
    ds = _caption_rounds(ds, videos=num_videos, rounds=max_captions, key=tf.constant(
        [rounds_seed >> 32, rounds_seed & 0xFFFFFFFF], tf.int64))
  ds = ds.enumerate()  # Position in the infinite stream keys all randomness.
  ds = ds.skip(start_step * batch)  # Before decoding: resuming costs only reads.
  example_seed = _derive_seed(seed, process_index, "examples")
  host_key = tf.constant([example_seed >> 32, example_seed & 0xFFFFFFFF], tf.int64)

  def load(position, example):
    key = tf.random.experimental.stateless_fold_in(host_key, position)
    caption_key, frames_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    captions = example["captions"]
    if examples == "captions":
      pick = example["pick"]
    else:
      count = tf.size(captions)
      tf.debugging.assert_positive(count, message="video without captions")
      pick = tf.random.stateless_uniform([], caption_key, minval=0, maxval=count,
                                         dtype=tf.int32)
    indices, mask = frame_lib.frame_indices(_num_frames(example), max_frames, train=True,
                                            seed=frames_key)
    return {"frames": frame_lib.load_jpegs(example["frames"], indices, mask, resolution),
            "frame_mask": mask, "caption": captions[pick]}

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.map(_tokenizer_map(tokenize, batch, max_words))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _tokenizer_map(tokenize: TokenizeFn, batch: int, max_words: int):
  def run(texts: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokenize([t.decode("utf-8") for t in texts], max_words), np.int32)
    if tokens.shape != (len(texts), max_words):
      raise ValueError(f"tokenizer returned {tokens.shape}, expected ({len(texts)}, "
                       f"{max_words})")
    return tokens

  def apply(example):
    text = tf.numpy_function(run, [example.pop("caption")], tf.int32, stateful=False)
    example["text"] = tf.ensure_shape(text, [batch, max_words])
    return example

  return apply


def train_dataset(builder: tfds.core.DatasetBuilder, split: str, *, global_batch_size: int,
                  max_frames: int, max_words: int, resolution: int, seed: int,
                  process_index: int = 0, process_count: int = 1, start_step: int = 0,
                  shuffle_buffer: int = 2048, examples: str = "videos",
                  max_captions: int | None = None,
                  tokenize: TokenizeFn | None = None) -> Iterator[dict]:
  """Infinite iterator of this host's training batches (numpy), b = global / processes.

  Yields {'frames': uint8 [b, max_frames, R, R, 3] (pixels; the model normalises),
          'frame_mask': bool [b, max_frames], 'text': int32 [b, max_words]}.
  `examples='videos'`: one random caption per video per epoch; `'captions'`: every
  (video, caption) pair once per epoch (`_caption_rounds`; `max_captions` is the most
  captions of a video, read from the split when None). TSN frame sampling drawn anew for
  every example, a new seeded shuffle every pass; the stream from `start_step` equals the
  stream from 0 after `start_step` batches. Hosts read disjoint parts of the split
  (`tfds.even_splits`), each `b` rows per batch. `tokenize` defaults to
  `tokenizer.get_tokenizer().tokenize`.
  """
  return read_numpy(builder, split, train_tf_dataset(
      builder, split, global_batch_size=global_batch_size, max_frames=max_frames,
      max_words=max_words, resolution=resolution, seed=seed, process_index=process_index,
      process_count=process_count, start_step=start_step, shuffle_buffer=shuffle_buffer,
      examples=examples, max_captions=max_captions, tokenize=tokenize))


# -------------------------------------------------------------------------------- eval


@dataclasses.dataclass(frozen=True)
class EvalStream:
  """One host's padded eval batches; iterate it (numpy dicts) as often as you like.

  num_examples: valid examples over all hosts; num_batches: batches on every host.
  keys: for videos, the video ids; for texts, the captions; index = global index.
  """

  dataset: tf.data.Dataset
  num_examples: int
  num_batches: int
  keys: tuple[str, ...]
  read: Callable[[tf.data.Dataset], Iterator] = tfds.as_numpy  # e.g. `read_numpy`

  def __iter__(self) -> Iterator[dict]:
    return iter(self.read(self.dataset))

  def __len__(self) -> int:
    return self.num_batches


class EvalData(NamedTuple):
  videos: EvalStream
  texts: EvalStream

  @property
  def num_videos(self) -> int:
    return self.videos.num_examples

  @property
  def num_texts(self) -> int:
    return self.texts.num_examples


def _even_ranges(total: int, count: int) -> list[tuple[int, int]]:
  """[start, end) of `count` contiguous parts, the first `total % count` one longer."""
  base, extra = divmod(total, count)
  starts = [i * base + min(i, extra) for i in range(count + 1)]
  return list(zip(starts[:-1], starts[1:]))


def _pad(ds: tf.data.Dataset, count: int) -> tf.data.Dataset:
  """Appends `count` all-zero copies of the element spec with valid=False."""
  if count == 0:
    return ds
  zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  return ds.concatenate(tf.data.Dataset.from_tensors(zeros).repeat(count))


def eval_datasets(builder: tfds.core.DatasetBuilder, split: str, *, batch_size: int,
                  max_frames: int, max_words: int, resolution: int, process_index: int = 0,
                  process_count: int = 1, tokenize: TokenizeFn | None = None) -> EvalData:
  """This host's eval videos and caption queries, padded to full batches.

  videos: {'frames' uint8 [b, max_frames, R, R, 3], 'frame_mask' bool [b, max_frames],
           'video_index' int32 [b], 'valid' bool [b]}, centre frame sampling.
  texts:  {'text' int32 [b, max_words], 'video_index' int32 [b], 'valid' bool [b]}: every
          caption of every video. `video_index` is the video's index in the split, over all
          hosts; padded rows have valid=False and video_index -1. Hosts get disjoint,
          contiguous parts of the split (`tfds.even_splits`) and equal batch counts.
  """
  _check_positive(batch_size=batch_size, max_frames=max_frames, max_words=max_words,
                  resolution=resolution)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")
  _check_builder(builder, split)
  tokenize = tokenize or _default_tokenize()
  host_splits = tfds.even_splits(split, process_count)
  sizes = [builder.info.splits[s].num_examples for s in host_splits]
  offsets = np.cumsum([0] + sizes).tolist()

  # Captions and ids of the whole split (all hosts, no frames): tiny, and gives every host
  # the text count it needs to pad to the same number of batches.
  video_ids, captions, caption_video = [], [], []
  for host, sub in enumerate(host_splits):
    meta = builder.as_dataset(
        split=sub, shuffle_files=False, read_config=tfds.ReadConfig(options=_options()),
        decoders=tfds.decode.PartialDecoding({"video_id": True, "captions": True}))
    for local, example in enumerate(read_numpy(builder, split, meta)):
      video_ids.append(example["video_id"].decode("utf-8"))
      for text in example["captions"]:
        captions.append(text.decode("utf-8"))
        caption_video.append(offsets[host] + local)
  num_videos = offsets[-1]

  video_batches = math.ceil(max(sizes) / batch_size) if num_videos else 0
  offset = offsets[process_index]
  videos = builder.as_dataset(
      split=host_splits[process_index], shuffle_files=False,
      decoders={"frames": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(options=_options(), try_autocache=False))

  def load(local, example):
    indices, mask = frame_lib.frame_indices(_num_frames(example), max_frames, train=False)
    return {"frames": frame_lib.load_jpegs(example["frames"], indices, mask, resolution),
            "frame_mask": mask, "video_index": tf.cast(local + offset, tf.int32),
            "valid": tf.constant(True)}

  videos = videos.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=True)
  videos = _pad(videos, video_batches * batch_size - sizes[process_index])
  videos = videos.map(_mark_padding).batch(batch_size).prefetch(tf.data.AUTOTUNE)

  text_ranges = _even_ranges(len(captions), process_count)
  text_batches = math.ceil(max(e - s for s, e in text_ranges) / batch_size) if captions else 0
  start, end = text_ranges[process_index]
  rows = text_batches * batch_size
  tokens = np.zeros([rows, max_words], np.int32)
  if end > start:
    tokens[:end - start] = np.asarray(tokenize(captions[start:end], max_words), np.int32)
  index = np.full([rows], -1, np.int32)
  index[:end - start] = caption_video[start:end]
  texts = tf.data.Dataset.from_tensor_slices(
      {"text": tokens, "video_index": index, "valid": index >= 0}).batch(batch_size)

  return EvalData(
      videos=EvalStream(videos.with_options(_options()), num_videos, video_batches,
                        tuple(video_ids), read=lambda ds: read_numpy(builder, split, ds)),
      texts=EvalStream(texts.with_options(_options()), len(captions), text_batches,
                       tuple(captions)))


def _mark_padding(example: dict) -> dict:
  # Padding rows come in as zeros: valid False already; make their video_index -1.
  example["video_index"] = tf.where(example["valid"], example["video_index"], -1)
  return example


# ---------------------------------------------------------------------------- benchmark


def benchmark(builder: tfds.core.DatasetBuilder, split: str = "train", *, batch_size: int = 32,
              max_frames: int = 12, max_words: int = 32, resolution: int = 224,
              num_batches: int = 20, warmup_batches: int = 2, seed: int = 0,
              tokenize: TokenizeFn | None = None) -> dict:
  """Training-pipeline throughput on this host: videos/s and videos/s per CPU core.

  `videos_per_s_per_core` divides by the cores this process may use;
  `videos_per_cpu_s` divides by the CPU time the process used, which stays meaningful when
  other jobs share the machine.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  stream = train_dataset(builder, split, global_batch_size=batch_size, max_frames=max_frames,
                         max_words=max_words, resolution=resolution, seed=seed,
                         tokenize=tokenize)
  for _ in range(warmup_batches):
    next(stream)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(stream)
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  rate = num_batches * batch_size / seconds
  return {"videos_per_s": rate, "videos_per_s_per_core": rate / cores, "cores": cores,
          "videos_per_cpu_s": num_batches * batch_size / cpu_seconds, "seconds": seconds,
          "batches": num_batches, "batch_size": batch_size, "max_frames": max_frames,
          "resolution": resolution}
