"""Embeddings of video files and captions with a configured model: the library behind
`encode`, `search` and `visualize_clusters`.

Videos: any file PyAV decodes (decoded at `fps`, default 3 as the datasets), or `.npy`
arrays `[T, H, W, 3]` uint8 of already extracted frames. `config.model.max_frames`
frames are sampled uniformly (`int(tick/2 + tick*i)`, `tick = T/max_frames`; shorter
videos repeat their last frame, masked), resized (shorter side, bicubic), centre-cropped
and CLIP-normalised. The clustering keys of `config.model` apply as in training.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import tqdm

from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.data import tokenizer as tokenizer_lib
from centerclip_jax.data import video as video_lib
from centerclip_jax.models import centerclip
from centerclip_jax.weights import loading


class InputError(ValueError):
  """A user input (video, frames file, captions file) that cannot be used."""


def load_frames(path: str, *, fps: float, resolution: int) -> np.ndarray:
  """uint8 [T, H, W, 3] frames of a video file or a `.npy` frame array."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise InputError(f"{path}: no such file")
  if p.suffix.lower() == ".npy":
    try:
      frames = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise InputError(f"{path}: not a readable .npy array ({e})") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
      raise InputError(f"{path}: expected uint8 frames [T, H, W, 3] with T >= 1, "
                       f"got {frames.dtype} {frames.shape}")
    return frames
  try:
    frames, _ = video_lib.decode_video(str(p), fps=fps, short_side=resolution)
  except video_lib.VideoDecodeError as e:
    raise InputError(str(e)) from None
  return frames


def video_inputs(frames: np.ndarray, max_frames: int, resolution: int):
  """uint8 [T, H, W, 3] -> (float32 [max_frames, res, res, 3], bool mask [max_frames])."""
  idx, mask = video_lib.sample_frame_indices(len(frames), max_frames, train=False)
  return video_lib.preprocess_frames(frames[idx], resolution), mask


def read_captions(path: str) -> list[str]:
  p = pathlib.Path(path)
  if not p.is_file():
    raise InputError(f"{path}: no such captions file")
  try:
    lines = p.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: not UTF-8 text ({e})") from None
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
  config_lib.validate(config)
  model, params = loading.load_model(config)
  res = model.clip_config.image_resolution
  max_frames = model.max_frames

  # Read every input first, so that a bad file fails before any compute.
  clips = []
  for path in tqdm.tqdm(video_paths, desc="decoding videos", disable=not video_paths):
    clips.append(video_inputs(load_frames(path, fps=fps, resolution=res), max_frames, res))
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
