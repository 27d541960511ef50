"""Which tokens each clustering step of a CenterCLIP model keeps, for given frames.

`cluster_medoids(model, params, frames, frame_mask)` runs the model's own forward pass
(`CenterCLIP.segment_features`) with `mutable=['intermediates']` and reads the assignment
and medoids that every clustering step sows (`cluster_step_<i>`). So the medoids are those
the model keeps, and there is no second walk over the ViT blocks.

Every point of every step is traced back to the input patch it came from (`sources`):
at the first step a segment of `d` frames with `N` patches per frame has `M = d * N`
points, point `m` being patch `m % N` of the segment's frame `m // N`; later steps
cluster tokens that earlier steps kept, which are medoid tokens of input patches. With
`aggregation='mean'` the kept tokens are cluster means, not patches: later steps then
have no `sources` (None).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from centerclip_jax.clustering import segments as segments_lib

CLUSTERING_ALGOS = ("kmedoids++", "spectral")


@dataclasses.dataclass(frozen=True)
class StepClusters:
  """The clusters of one clustering step for a batch of videos.

  Attributes:
    step: the model's `ClusterStep` (0-based `block` it runs before).
    input_frames: input frames per segment, `D = max_frames // step.frames_after`.
    tokens_per_frame: `N`, patches per input frame.
    assignment: `[B, S, M]` int32 cluster of every point of every segment.
    medoids: `[B, S, K]` int32 medoid point indices, ascending per segment.
    sources: `[B, S, M]` int32 input patch of every point, numbered inside the segment's
      input frames as `frame * N + patch` (frame in `[0, D)`); None when untraceable.
  """

  step: segments_lib.ClusterStep
  input_frames: int
  tokens_per_frame: int
  assignment: np.ndarray
  medoids: np.ndarray
  sources: Optional[np.ndarray]

  def medoid_patches(self) -> Optional[np.ndarray]:
    """`[B, S, K, 2]` (frame in segment, patch) of every medoid; None if untraceable."""
    if self.sources is None:
      return None
    src = np.take_along_axis(self.sources, self.medoids, axis=2)
    return np.stack([src // self.tokens_per_frame, src % self.tokens_per_frame], axis=-1)


def _clusters_per_step(model, params, frames, frame_mask):
  """[(assignment [B*S, M], medoids [B*S, K])] of every step, from the model's own pass."""
  _, state = model.apply({"params": params}, frames, frame_mask,
                         method=model.segment_features, mutable=["intermediates"])
  sown = state["intermediates"]
  return [(sown[f"cluster_step_{i}"][0]["assignment"], sown[f"cluster_step_{i}"][0]["kept"])
          for i in range(len(model.steps))]


def cluster_medoids(model, params: Any, frames, frame_mask) -> list[StepClusters]:
  """The clusters of every clustering step of `model` on a batch of videos.

  Args:
    model: a `CenterCLIP` (from `loading.load_model`).
    params: its params.
    frames: `[B, max_frames, H, W, 3]` uint8 frames (`encode.video_inputs`).
    frame_mask: `[B, max_frames]`.
  Returns:
    One `StepClusters` per step of `model.steps`, in order.
  Raises:
    ValueError: the model has no clustering step or does not cluster (pooling, sparse
      sampling), or the frames have the wrong shape.
  """
  if not model.steps:
    raise ValueError("this config has no clustering step (config.model.cluster_inter = 0, "
                     "or target_frames_blocks / cluster_num_blocks never reduce tokens)")
  if model.settings.algo not in CLUSTERING_ALGOS:
    raise ValueError(f"config.model.cluster_algo={model.settings.algo!r} keeps tokens "
                     f"without clustering; medoids exist only for {CLUSTERING_ALGOS}")
  frames = jnp.asarray(frames)
  res = model.clip_config.image_resolution
  if frames.ndim != 5 or frames.shape[1] != model.max_frames or frames.shape[2:] != (
      res, res, 3):
    raise ValueError(f"frames must be [B, {model.max_frames}, {res}, {res}, 3], got "
                     f"{frames.shape}")
  run = jax.jit(lambda p, f, m: _clusters_per_step(model, p, f, m))
  per_step = jax.device_get(run(params, frames, jnp.asarray(frame_mask)))

  batch, n = frames.shape[0], model.clip_config.num_patches
  out = []
  sources = None  # [B*S, M] input patch of each point, numbered within the video
  for i, (step, (assignment, medoids)) in enumerate(zip(model.steps, per_step)):
    s, m = assignment.shape
    if i == 0:
      sources = np.arange(s * m, dtype=np.int64).reshape(s, m)  # frame-major, video-wide
      sources -= (np.arange(s) // step.frames_after * step.frames_after * m)[:, None]
    elif sources is not None:
      sources = sources.reshape(s, m)
    input_frames = model.max_frames // step.frames_after
    local = None
    if sources is not None:
      first = (np.arange(s) % step.frames_after) * input_frames * n  # segment's first patch
      local = (sources - first[:, None]).astype(np.int32).reshape(batch, -1, m)
    out.append(StepClusters(step, input_frames, n,
                            np.asarray(assignment, np.int32).reshape(batch, -1, m),
                            np.asarray(medoids, np.int32).reshape(batch, -1, step.k),
                            local))
    if sources is not None:
      if model.settings.aggregation == "mean":
        sources = None
      else:
        sources = np.take_along_axis(sources, np.asarray(medoids, np.int64), axis=1)
  return out
