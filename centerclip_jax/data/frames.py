"""The one frame path: sample -> resize -> crop, as TF ops; the model normalises.

Training and eval run these inside tf.data on the JPEG frames the datasets store
(`load_jpegs`); `encode`, search and the cluster visualiser store the frames `video.py`
decodes the same way and run the same functions eagerly (`model_inputs`), so the model
sees the same inputs from a video file as from the dataset built from it.

* Sampling (`frame_indices`): eval takes the centre rule `int(tick / 2 + tick * i)`,
  `tick = T / max_frames` (float64, this operation order, as CLIP4Clip); train takes one
  random frame from each of `max_frames` equal segments (TSN). A video with
  T <= max_frames gives all T frames, then the last one repeated and masked out.
* Shorter side -> `resolution` (bicubic as PIL's, within one uint8 level; skipped when
  the size already matches), centre crop (offsets rounded half to even, as torchvision's
  CenterCrop). The path ends in uint8 pixels: the model maps them to [0, 1] and CLIP
  mean/std itself (`models.clip.normalize_pixels`, the one place that normalises), so a
  batch goes to the device at a quarter of float32's size.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from centerclip_jax.data import video

def frame_indices(num_frames: tf.Tensor, max_frames: int, *, train: bool,
                  seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
  """Which frames of a video of `num_frames` to feed: (int32 [max_frames], bool [max_frames]).

  `seed` is a stateless seed (int64 [2]), required when `train`. The valid entries
  (mask True) are distinct and increasing.
  """
  t = tf.cast(num_frames, tf.int64)
  positions = tf.range(max_frames, dtype=tf.int64)
  short_indices = tf.minimum(positions, t - 1)
  tick = tf.cast(t, tf.float64) / float(max_frames)
  i = tf.cast(positions, tf.float64)
  if train:
    if seed is None:
      raise ValueError("frame_indices(train=True) needs a stateless seed")
    starts = tf.cast(tick * i, tf.int64)
    ends = tf.concat([tf.cast(tick * (i[:-1] + 1.0), tf.int64), t[None]], axis=0)
    lengths = tf.maximum(ends - starts, 1)
    u = tf.random.stateless_uniform([max_frames], seed=seed, dtype=tf.float64)
    offsets = tf.minimum(tf.cast(u * tf.cast(lengths, tf.float64), tf.int64), lengths - 1)
    long_indices = starts + offsets
  else:
    long_indices = tf.cast(tick / 2.0 + tick * i, tf.int64)
  is_long = t > max_frames
  indices = tf.where(is_long, long_indices, short_indices)
  mask = tf.logical_or(is_long, positions < t)
  return tf.cast(indices, tf.int32), mask


def eval_frame_indices(num_frames: int, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """`frame_indices(train=False)` evaluated now: (int32 [max_frames], bool [max_frames])."""
  if num_frames < 1 or max_frames < 1:
    raise ValueError(f"need num_frames >= 1 and max_frames >= 1, got {num_frames}, "
                     f"{max_frames}")
  indices, mask = frame_indices(tf.constant(num_frames, tf.int64), max_frames, train=False)
  return indices.numpy(), mask.numpy()


def resize_and_crop(frames: tf.Tensor, resolution: int) -> tf.Tensor:
  """Shorter side -> resolution, centre crop: uint8 [n, H, W, 3] -> uint8 [n, R, R, 3].

  PIL's bicubic with the longer side floored. Shrinking follows PIL's two antialiased
  passes (width, then height, rounding to uint8 in between); enlarging is one plain bicubic
  pass (Keys a=-0.5, half-pixel centres; 5-10x faster than antialiased passes). Either way
  a pixel is at most one uint8 level from PIL's (shrinking: well under 1% of pixels off,
  enlarging: about 20%). Frames that already have the target size are only cropped.
  """
  shape = tf.shape(frames)
  h, w = shape[1], shape[2]
  hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  long_h = tf.maximum(1, tf.cast(resolution * hf / wf, tf.int32))
  long_w = tf.maximum(1, tf.cast(resolution * wf / hf, tf.int32))
  new_h = tf.where(h <= w, resolution, long_h)
  new_w = tf.where(h <= w, long_w, resolution)

  def to_uint8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

  def shrink():
    x = tf.cond(new_w < w, lambda: to_uint8(tf.image.resize(
        frames, tf.stack([h, new_w]), method="bicubic", antialias=True)), lambda: frames)
    return tf.cond(new_h < h, lambda: to_uint8(tf.image.resize(
        x, tf.stack([new_h, new_w]), method="bicubic", antialias=True)), lambda: x)

  def enlarge():
    return to_uint8(tf.image.resize(frames, tf.stack([new_h, new_w]), method="bicubic"))

  def keep():
    return frames

  frames = tf.case([(tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w)), keep),
                    (new_h < h, shrink)], default=enlarge)
  # Python's round() (half to even) of (n - R) / 2, as torchvision's CenterCrop.
  top = tf.cast(tf.round(tf.cast(new_h - resolution, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - resolution, tf.float32) / 2.0), tf.int32)
  crop = frames[:, top:top + resolution, left:left + resolution, :]
  return tf.ensure_shape(crop, [None, resolution, resolution, 3])


def sampled_inputs(chosen: tf.Tensor, mask: tf.Tensor, resolution: int) -> tf.Tensor:
  """The distinct sampled frames, uint8 [n, H, W, 3] with n = sum(mask) -> model input
  uint8 [max_frames, R, R, 3]: resized once each, the last repeated where masked."""
  distinct = tf.reduce_sum(tf.cast(mask, tf.int32))
  repeat_last = tf.minimum(tf.range(tf.size(mask)), distinct - 1)
  return tf.gather(resize_and_crop(chosen, resolution), repeat_last)


def load_jpegs(jpegs: tf.Tensor, indices: tf.Tensor, mask: tf.Tensor,
               resolution: int) -> tf.Tensor:
  """JPEG frames string [T] -> uint8 [max_frames, R, R, 3]; decodes only the sampled ones."""
  distinct = tf.reduce_sum(tf.cast(mask, tf.int32))  # Valid entries are distinct frames.
  decoded = tf.map_fn(
      lambda b: tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_ACCURATE"),
      tf.gather(jpegs, indices[:distinct]),
      fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  return sampled_inputs(decoded, mask, resolution)


def model_inputs(frames: np.ndarray, max_frames: int, resolution: int, *,
                 jpeg_quality: int = video.JPEG_QUALITY) -> tuple[np.ndarray, np.ndarray]:
  """Decoded uint8 frames [T, H, W, 3] -> (uint8 [max_frames, R, R, 3], bool [max_frames]),
  eval sampling, computed as eval computes them from a dataset built from these frames.

  Each sampled frame is stored as the builders store it (`video.encode_jpeg` at
  `jpeg_quality`) and read back by `load_jpegs`, the op training and eval run, so a video
  file gives the inputs (and embeddings) of its dataset example. `jpeg_quality=0` skips
  the storing step and feeds the decoded frames.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} "
                     f"{frames.shape}")
  if not 0 <= jpeg_quality <= 100:
    raise ValueError(f"jpeg_quality must be in 0..100 (0: no JPEG step), got {jpeg_quality}")
  indices, mask = eval_frame_indices(len(frames), max_frames)
  chosen = frames[indices[mask]]
  if not jpeg_quality:
    return sampled_inputs(tf.constant(chosen), tf.constant(mask), resolution).numpy(), mask
  jpegs = tf.constant([video.encode_jpeg(f, jpeg_quality) for f in chosen])
  positions = tf.range(max_frames, dtype=tf.int32)  # jpegs[i] is the i-th distinct frame.
  return load_jpegs(jpegs, positions, tf.constant(mask), resolution).numpy(), mask
