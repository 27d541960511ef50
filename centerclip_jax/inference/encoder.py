"""Embeddings of video files and captions with a configured model: the library behind
`encode`, `search` and `visualize_clusters`.

Videos: any file PyAV decodes (decoded at `fps`, default 3, and shorter side
`config.data.decode_short_side`, as the datasets store them), or `.npy` arrays
`[T, H, W, 3]` uint8 of already extracted frames. Frames then take the one frame path of
`data/frames.py`, the ops eval runs: `config.model.max_frames` frames sampled uniformly
(`int(tick/2 + tick*i)`, `tick = T/max_frames`; shorter videos repeat their last frame,
masked), stored as JPEG at `config.data.jpeg_quality` as the datasets store them and read
back, resized (shorter side, bicubic) and centre-cropped to uint8 model inputs (the
model normalises them); only the sampled frames are decoded. A video file therefore
embeds as its dataset example does.
The clustering keys of `config.model` apply as in training.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import tqdm

from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.data import tokenizer as tokenizer_lib
from centerclip_jax.data import frames as frame_lib
from centerclip_jax.data import sampled_decode
from centerclip_jax.data import video as video_lib
from centerclip_jax.models import centerclip
from centerclip_jax.weights import loading


class InputError(ValueError):
  """A user input (video, frames file, captions file) that cannot be used."""


def check_fps(fps: float) -> None:
  """Rejects a decode frame rate <= 0 up front (one InputError, before any file is read)."""
  if not fps > 0:
    raise InputError(f"--fps must be > 0 (frames per second videos are decoded at), "
                     f"got {fps}")


def load_frames(path: str, *, fps: float, short_side: int,
                max_frames: int) -> sampled_decode.SampledVideo:
  """The frames the model samples from a video file or a `.npy` frame array.

  Videos are decoded at `fps`, shorter side `short_side` (`config.data.decode_short_side`,
  what the datasets store), and only the eval-sampled frames (`frames.frame_indices`) are
  decoded (`sampled_decode`): memory stays flat in the video's length. `.npy` arrays are
  uint8 `[T, H, W, 3]` frames, sampled the same way. A truncated file is used as far as it
  decodes, with a warning naming it (`.truncated` in the result).
  """
  if not short_side >= 1:
    raise InputError(f"config.data.decode_short_side must be >= 1 (the shorter side the "
                     f"datasets store, 224 for the real ones), got {short_side}")
  p = pathlib.Path(path)
  if not p.is_file():
    raise InputError(f"{path}: no such file")
  choose = lambda t: _distinct(frame_lib.eval_frame_indices(t, max_frames))
  if p.suffix.lower() == ".npy":
    try:
      frames = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise InputError(f"{path}: not a readable .npy array ({e})") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
      raise InputError(f"{path}: expected uint8 frames [T, H, W, 3] with T >= 1, "
                       f"got {frames.dtype} {frames.shape}")
    indices = choose(len(frames))
    return sampled_decode.SampledVideo(frames[indices], indices, len(frames), float(fps),
                                       len(frames), False, "npy")
  check_fps(fps)
  try:
    clip = sampled_decode.decode_sampled(str(p), fps=fps, short_side=short_side,
                                         choose=choose)
  except video_lib.VideoDecodeError as e:
    raise InputError(str(e)) from None
  if clip.truncated:
    expected = f" of the {clip.expected_frames} its header declares" if (
        clip.expected_frames) else ""
    logging.warning("%s: truncated stream; embedded from its first %d frames at %g fps%s "
                    "(frames %s used)", path, clip.num_frames, fps, expected,
                    clip.indices.tolist())
  return clip


def _distinct(sampled: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  indices, mask = sampled
  return indices[mask]


def video_inputs(frames: np.ndarray, max_frames: int, resolution: int, *,
                 jpeg_quality: int = video_lib.JPEG_QUALITY):
  """uint8 [T, H, W, 3] -> (uint8 [max_frames, res, res, 3], bool mask [max_frames]).

  Eval sampling; each sampled frame stored as the datasets store it (JPEG at
  `jpeg_quality`, `config.data.jpeg_quality`; 0 skips it), then the resize and crop of
  `frames.py`: the ops training and eval run, on the same bytes (the model normalises).
  The frames `load_frames` returns give the inputs of the whole video.
  """
  return frame_lib.model_inputs(frames, max_frames, resolution, jpeg_quality=jpeg_quality)


def file_inputs(path: str, *, fps: float, short_side: int, max_frames: int,
                resolution: int, jpeg_quality: int = video_lib.JPEG_QUALITY):
  """(uint8 [max_frames, R, R, 3], bool [max_frames], SampledVideo) of a video file."""
  clip = load_frames(path, fps=fps, short_side=short_side, max_frames=max_frames)
  frames, mask = video_inputs(clip.frames, max_frames, resolution, jpeg_quality=jpeg_quality)
  return frames, mask, clip


MAX_CAPTION_CHARS = 10_000  # far beyond any caption's 77 tokens; longer lines are refused


def read_captions(path: str) -> list[str]:
  """One caption per line (split on newlines only: other control characters such as form
  feed stay inside the caption, as text). Every caption is plain text: a literal
  `<|endoftext|>` is tokenised as characters, never as the special token."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise InputError(f"{path}: no such captions file")
  try:
    text = p.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    line = p.read_bytes()[:e.start].count(b"\n") + 1
    raise InputError(f"{path}: line {line} is not UTF-8 text (byte {e.start}); save the "
                     "file as UTF-8") from None
  lines = text.removeprefix("\ufeff").split("\n")
  for i, line in enumerate(lines, start=1):
    if len(line) > MAX_CAPTION_CHARS:
      raise InputError(f"{path}: line {i} has {len(line)} characters (more than "
                       f"{MAX_CAPTION_CHARS}); one caption per line expected")
  captions = [line.strip() for line in lines if line.strip()]
  if not captions:
    raise InputError(f"{path}: no captions (one per line expected)")
  return captions


def _batched(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  """[n, ...] -> [size, ...] (n <= size) by repeating the last row (a full static batch)."""
  if len(x) == size:
    return x
  pad = np.repeat(x[-1:], size - len(x), axis=0)
  return np.concatenate([x, pad], axis=0)


def encode(config, video_paths: Sequence[str], captions: Sequence[str], *,
           fps: float = 3.0, batch_size: int = 8):
  """Returns the dict written to the output `.npz`."""
  check_fps(fps)
  config_lib.validate(config)
  model, params = loading.load_model(config)
  res = model.clip_config.image_resolution
  max_frames = model.max_frames

  # Read every input first, so that a bad file fails before any compute.
  clips = []
  for path in tqdm.tqdm(video_paths, desc="decoding videos", disable=not video_paths):
    clips.append(file_inputs(path, fps=fps, short_side=config.data.decode_short_side,
                             max_frames=max_frames, resolution=res,
                             jpeg_quality=config.data.jpeg_quality))
  tokens = tokenizer_lib.get_tokenizer().tokenize(list(captions), config.model.max_words)

  encode_video, encode_text = parallel.jit_encoders(model)

  video_emb = np.zeros((len(clips), model.clip_config.embed_dim), np.float32)
  for start, end in tqdm.tqdm(list(_batched(len(clips), batch_size)), desc="encoding videos",
                              disable=not clips):
    frames = pad_batch(np.stack([c[0] for c in clips[start:end]]), batch_size)
    masks = pad_batch(np.stack([c[1] for c in clips[start:end]]), batch_size)
    out = encode_video(params, jnp.asarray(frames), jnp.asarray(masks))
    video_emb[start:end] = np.asarray(out)[:end - start]

  text_emb = np.zeros((len(tokens), model.clip_config.embed_dim), np.float32)
  text_batch = 32 * batch_size
  for start, end in _batched(len(tokens), text_batch):
    out = encode_text(params, jnp.asarray(pad_batch(tokens[start:end], text_batch)))
    text_emb[start:end] = np.asarray(out)[:end - start]

  return {
      "video_embeddings": video_emb,
      "text_embeddings": text_emb,
      "video_paths": np.asarray(list(video_paths), dtype=str),
      "captions": np.asarray(list(captions), dtype=str),
      "logit_scale": np.float32(np.exp(np.asarray(params["clip"]["logit_scale"]))),
  }
