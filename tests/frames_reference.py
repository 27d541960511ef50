"""Independent NumPy / PIL reference of the frame path, for tests only.

The library has one frame path (TF ops, `centerclip_jax/data/frames.py`); this is the
original NumPy/PIL formulation it is checked against: CLIP4Clip's sampling expression in
Python floats and PIL's bicubic resize with torchvision's centre crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# OpenAI CLIP's constants, written out here rather than taken from the code under test.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
  if height <= width:
    return short_side, max(1, int(short_side * width / height))
  return max(1, int(short_side * height / width)), short_side


def sample_frame_indices(
    num_frames: int,
    max_frames: int,
    *,
    train: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Which of `num_frames` frames to feed the model.

  Eval (or train with num_frames <= max_frames): with tick = T / max_frames,
  frame i is int(tick / 2 + tick * i) (float64, this exact operation order) when
  T > max_frames; otherwise all T frames then the last index repeated, masked.
  Train with T > max_frames: TSN-style, one uniformly random frame from each of
  max_frames equal segments [int(tick * i), int(tick * (i + 1))).

  Returns:
    (indices int32 [max_frames], mask bool [max_frames]).
  """
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if max_frames < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  mask = np.ones([max_frames], dtype=bool)
  if num_frames <= max_frames:
    indices = np.minimum(np.arange(max_frames), num_frames - 1)
    mask[num_frames:] = False
    return indices.astype(np.int32), mask
  tick = num_frames / max_frames
  i = np.arange(max_frames, dtype=np.float64)
  if not train:
    return (tick / 2 + tick * i).astype(np.int32), mask
  rng = np.random.default_rng() if rng is None else rng
  starts = (tick * i).astype(np.int64)
  ends = (tick * (i + 1)).astype(np.int64)
  ends[-1] = num_frames
  offsets = rng.integers(0, np.maximum(ends - starts, 1))
  return (starts + offsets).astype(np.int32), mask


def resize_and_crop_frames(frames: np.ndarray, resolution: int = 224) -> np.ndarray:
  """uint8 frames [T, H, W, 3] -> uint8 [T, res, res, 3]: shorter side to `resolution`
  (PIL bicubic, longer side floored), centre crop (offsets rounded as torchvision's
  CenterCrop)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(
        f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
  out = np.empty([frames.shape[0], resolution, resolution, 3], np.uint8)
  for t, frame in enumerate(frames):
    h, w = frame.shape[:2]
    nh, nw = _resized_shape(h, w, resolution)
    if (nh, nw) != (h, w):
      frame = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BICUBIC))
    top = int(round((nh - resolution) / 2.0))
    left = int(round((nw - resolution) / 2.0))
    out[t] = frame[top:top + resolution, left:left + resolution]
  return out


def normalize_frames(frames: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - CLIP_MEAN) / CLIP_STD, computed in float64."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8, got {frames.dtype}")
  x = frames.astype(np.float64) / 255.0
  return ((x - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)


def preprocess_frames(frames: np.ndarray, resolution: int = 224) -> np.ndarray:
  """CLIP preprocessing of uint8 frames [T, H, W, 3] -> float32 [T, res, res, 3]:
  `resize_and_crop_frames`, then `normalize_frames`."""
  return normalize_frames(resize_and_crop_frames(frames, resolution))
