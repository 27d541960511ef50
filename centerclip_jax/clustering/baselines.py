"""Baselines of the paper's ablations: temporal pooling and sparse sampling.

Semantics: `shared/docs/clustering.md`, section 5.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def frame_pooling(x: jax.Array, segment_frames: int) -> jax.Array:
  """Mean of every token (CLS included) over each segment's `d` frames.

  Args:
    x: `[B*frames_before, T, W]`, frames of a video contiguous and in time order, so
      every `d` consecutive rows form one segment.
    segment_frames: `d`, frames per segment.
  Returns:
    `[B*frames_before/d, T, W]` in `x.dtype` (the mean is taken in float32).
  """
  rows, t, w = x.shape
  if segment_frames < 1 or rows % segment_frames:
    raise ValueError(f"frame_pooling: {rows} frame rows do not form segments of "
                     f"segment_frames={segment_frames} frames.")
  xs = x.reshape(rows // segment_frames, segment_frames, t, w)
  return jnp.mean(xs.astype(jnp.float32), axis=1).astype(x.dtype)


def sparse_sampling_indices(num_segments: int,
                            num_points: int,
                            k: int,
                            *,
                            train: bool = False,
                            rng: Optional[jax.Array] = None) -> jax.Array:
  """Which `K` of a segment's `M` tokens sparse sampling keeps: `[S, K]` int32.

  Eval: the centre of each of `K` strides, `int(stride/2 + stride*j)` with
  `stride = M / K` (the same for every segment). Training: one uniformly random token
  in each stride `[j*s, (j+1)*s)` with `s = M // K`, drawn per segment from `rng`.
  """
  if not 1 <= k <= num_points:
    raise ValueError(f"sparse_sampling: k={k} must be in [1, M={num_points}].")
  if not train:
    stride = num_points / k
    idx = jnp.asarray([int(stride / 2 + stride * j) for j in range(k)], jnp.int32)
    return jnp.broadcast_to(idx, (num_segments, k))
  if rng is None:
    raise ValueError("sparse_sampling in training needs an rng key (cluster_step(..., "
                     "train=True, rng=key)).")
  stride = num_points // k
  offsets = jax.random.randint(rng, (num_segments, k), 0, stride, dtype=jnp.int32)
  return jnp.arange(k, dtype=jnp.int32)[None, :] * stride + offsets
