"""Where the ViT clusters its tokens, and one clustering step on a batch of videos.

Semantics: `shared/docs/clustering.md`, sections 1, 2 and 5. `plan_steps` turns the
per-block lists `target_frames_blocks` / `cluster_num_blocks` into static
`ClusterStep`s (validated before anything compiles); `cluster_step` regroups
`[B*frames_before, 1+N', W]` frame tokens into segments of `d` frames, clusters every
segment (one segment's logic `vmap`ped over all segments of all videos) and returns
`[B*frames_after, 1+K', W]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from centerclip_jax.clustering import baselines
from centerclip_jax.clustering import kmedoids
from centerclip_jax.clustering import spectral
from centerclip_jax.clustering import tome

ALGOS = ("kmedoids++", "spectral", "pooling", "sparse_sampling", "tome")
_ALGO_ALIASES = {"kmediods++": "kmedoids++"}  # the original code's spelling
AGGREGATIONS = (None, "mean")


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, numbers.Real) and not isinstance(v, bool) and
          math.isfinite(v))


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
  """How every clustering step clusters (hashable: a static jit argument).

  `threshold` is accepted for the original's configs; the loop stops exactly when no
  medoid changed (spec 3c), which is what the original's threshold test amounts to.
  """

  algo: str = "kmedoids++"
  distance: str = "euclidean"
  minkowski_norm_p: float = 2.0
  iter_limit: int = 100
  threshold: float = 1e-6
  pre_norm: bool = False
  aggregation: Optional[str] = None
  spectral_sigma: float = 2.0
  spectral_graph: str = "HeatKernel"
  spectral_knn_k: int = 1
  svd_correct_sign: bool = True
  proportional_attention: bool = True  # tome: log(size) on the attention logits

  def __post_init__(self):
    algo = _ALGO_ALIASES.get(self.algo, self.algo)
    if algo not in ALGOS:
      raise ValueError(f"ClusterSettings.algo={self.algo!r}: use one of {ALGOS} "
                       "('kmediods++' is accepted as an alias of 'kmedoids++').")
    object.__setattr__(self, "algo", algo)
    if self.distance not in kmedoids.DISTANCES:
      raise ValueError(f"ClusterSettings.distance={self.distance!r}: use one of "
                       f"{kmedoids.DISTANCES}.")
    p = self.minkowski_norm_p
    if not _is_number(p) or p <= 0:
      raise ValueError(f"ClusterSettings.minkowski_norm_p={p!r}: use a finite number "
                       "> 0 (2.0 is the Euclidean distance).")
    object.__setattr__(self, "minkowski_norm_p", float(p))
    if not _is_int(self.iter_limit) or self.iter_limit < 0:
      raise ValueError(f"ClusterSettings.iter_limit={self.iter_limit!r}: use an int "
                       ">= 0.")
    object.__setattr__(self, "iter_limit", int(self.iter_limit))
    if not _is_number(self.threshold) or self.threshold < 0:
      raise ValueError(f"ClusterSettings.threshold={self.threshold!r}: use a finite "
                       "number >= 0.")
    object.__setattr__(self, "threshold", float(self.threshold))
    for name in ("pre_norm", "svd_correct_sign", "proportional_attention"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ClusterSettings.{name}={getattr(self, name)!r}: use True "
                         "or False.")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"ClusterSettings.aggregation={self.aggregation!r}: use None "
                       "(medoid tokens) or 'mean' (cluster means).")
    if self.aggregation is not None and algo not in ("kmedoids++", "spectral"):
      raise ValueError(f"ClusterSettings.aggregation={self.aggregation!r} needs "
                       f"algo 'kmedoids++' or 'spectral', not {algo!r}.")
    if not _is_number(self.spectral_sigma) or self.spectral_sigma <= 0:
      raise ValueError(f"ClusterSettings.spectral_sigma={self.spectral_sigma!r}: use "
                       "a finite number > 0.")
    object.__setattr__(self, "spectral_sigma", float(self.spectral_sigma))
    if self.spectral_graph not in spectral.GRAPHS:
      raise ValueError(f"ClusterSettings.spectral_graph={self.spectral_graph!r}: use "
                       f"one of {spectral.GRAPHS}.")
    if not _is_int(self.spectral_knn_k) or self.spectral_knn_k < 0:
      raise ValueError(f"ClusterSettings.spectral_knn_k={self.spectral_knn_k!r}: use "
                       "an int >= 0 (below 5 picks k from the segment length).")
    object.__setattr__(self, "spectral_knn_k", int(self.spectral_knn_k))


@dataclasses.dataclass(frozen=True)
class ClusterStep:
  """One clustering step, run before block `block` (0-based)."""

  block: int
  frames_before: int
  frames_after: int
  k: int

  def __post_init__(self):
    for name in ("block", "frames_before", "frames_after", "k"):
      v = getattr(self, name)
      if not _is_int(v) or v < (0 if name == "block" else 1):
        raise ValueError(f"ClusterStep.{name}={v!r} must be an int "
                         f"{'>= 0' if name == 'block' else '>= 1'}.")
      object.__setattr__(self, name, int(v))
    if self.frames_before % self.frames_after:
      raise ValueError(f"ClusterStep: frames_after={self.frames_after} must divide "
                       f"frames_before={self.frames_before}.")

  @property
  def segment_frames(self) -> int:
    """`d`: frames per segment."""
    return self.frames_before // self.frames_after


def plan_steps(max_frames: int, target_frames_blocks: Sequence[int],
               cluster_num_blocks: Sequence[int], num_blocks: int,
               tokens_per_frame: int) -> tuple[ClusterStep, ...]:
  """The clustering steps of a ViT (spec section 1), checked before compiling.

  Block `b` (1-based) clusters iff `k_now > 1` and (`frames_before > frames_after` or
  `k_before > k_now`). Tokens per frame/segment after a step are `k_now`.

  Args:
    max_frames: `F0`, frames per video at the input.
    target_frames_blocks: per block, segments per video that the block works on.
    cluster_num_blocks: per block, tokens per segment (besides CLS) it keeps.
    num_blocks: `L`, blocks of the ViT.
    tokens_per_frame: `N`, patch tokens per frame at the input.
  Returns:
    The steps in block order.
  Raises:
    ValueError: naming the list and block of any inconsistent configuration.
  """
  for name, v in (("max_frames", max_frames), ("num_blocks", num_blocks),
                  ("tokens_per_frame", tokens_per_frame)):
    if not _is_int(v) or v < 1:
      raise ValueError(f"plan_steps: {name}={v!r} must be a positive int.")
  max_frames, num_blocks = int(max_frames), int(num_blocks)
  tokens_per_frame = int(tokens_per_frame)
  tfb, cnb = list(target_frames_blocks), list(cluster_num_blocks)
  for name, lst in (("target_frames_blocks", tfb), ("cluster_num_blocks", cnb)):
    if len(lst) != num_blocks:
      raise ValueError(f"{name} has {len(lst)} entries; it needs one per ViT block "
                       f"({num_blocks}).")
    for i, v in enumerate(lst):
      if not _is_int(v) or v < 1:
        raise ValueError(f"{name}[{i}] (block {i + 1}) = {v!r}: use a positive int.")
    lst[:] = [int(v) for v in lst]
  steps = []
  tokens = tokens_per_frame  # N': patch tokens per frame or per previous segment
  frames = [max_frames] + tfb
  for b in range(1, num_blocks + 1):
    f_before, f_after = frames[b - 1], frames[b]
    k_before, k_now = cnb[max(b - 2, 0)], cnb[b - 1]
    where = f"block {b} (target_frames_blocks[{b - 1}])"
    if f_after > f_before:
      raise ValueError(f"{where}: frames increase from {f_before} to {f_after}; "
                       "target_frames_blocks must not increase.")
    if f_before % f_after:
      raise ValueError(f"{where}: {f_after} segments do not divide {f_before} frames "
                       f"(d = {f_before}/{f_after} is not an integer).")
    if not (k_now > 1 and (f_before > f_after or k_before > k_now)):
      if f_before > f_after:
        raise ValueError(f"{where}: frames drop from {f_before} to {f_after} but "
                         f"cluster_num_blocks[{b - 1}] = {k_now} disables clustering; "
                         "use a value > 1.")
      continue
    d = f_before // f_after
    if k_now > tokens * d:
      raise ValueError(f"block {b} (cluster_num_blocks[{b - 1}]) = {k_now} clusters "
                       f"but a segment has only M = {tokens} x {d} = {tokens * d} "
                       "tokens; lower cluster_num_blocks or use longer segments.")
    steps.append(ClusterStep(block=b - 1, frames_before=f_before, frames_after=f_after,
                             k=k_now))
    tokens = k_now
  return tuple(steps)


def cluster_segments(points: jax.Array, k: int, settings: ClusterSettings,
                     segment_frames: int) -> tuple[jax.Array, jax.Array]:
  """k-medoids++ or spectral clustering of every segment.

  Args:
    points: `[S, M, W]` float32 segment tokens (frame-major inside a segment).
    k: clusters per segment.
    settings: `settings.algo` must be 'kmedoids++' or 'spectral'.
    segment_frames: `d`, frames per segment.
  Returns:
    (assignment `[S, M]` int32, medoids `[S, K]` int32, ascending per segment).
  """
  common = dict(distance=settings.distance, p=settings.minkowski_norm_p,
                iter_limit=settings.iter_limit, pre_norm=settings.pre_norm)
  if settings.algo == "kmedoids++":
    fn = functools.partial(kmedoids.kmedoids_pp, k=k, **common)
  elif settings.algo == "spectral":
    fn = functools.partial(spectral.spectral_cluster, k=k,
                           segment_frames=segment_frames,
                           sigma=settings.spectral_sigma,
                           graph=settings.spectral_graph,
                           knn_k=settings.spectral_knn_k,
                           correct_sign=settings.svd_correct_sign, **common)
  else:
    raise ValueError(f"cluster_segments: algo {settings.algo!r} does not cluster.")
  return jax.vmap(fn)(points)


def _cluster_means(points: jax.Array, assignment: jax.Array, k: int) -> jax.Array:
  """`[M, W], [M] -> [K, W]` float32 means of the clusters' members."""
  pts = points.astype(jnp.float32)
  sums = jax.ops.segment_sum(pts, assignment, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(assignment, jnp.float32), assignment,
                               num_segments=k)
  return sums / jnp.maximum(counts, 1.0)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_points(points: jax.Array, idx: jax.Array, m: int) -> jax.Array:
  """points [S, M, W], idx int [S, K] in [0, M) -> points[s, idx[s]] [S, K, W].

  `jnp.take_along_axis` forward; its VJP is a one-hot matmul instead of a scatter into
  zeros: XLA:CPU schedules that scatter's zero `[S, M, W]` buffer at the start of the
  forward pass and keeps it alive through the memory peak (58 MB at the paper's ViT-B/32
  step, batch 32), while the matmul's result appears only when its cotangent does.
  """
  del m
  return jnp.take_along_axis(points, idx[:, :, None], axis=1)


def _take_points_fwd(points, idx, m):
  return _take_points(points, idx, m), idx


def _take_points_bwd(m, idx, g):
  one_hot = jax.nn.one_hot(idx, m, dtype=g.dtype)  # [S, K, M]
  # HIGHEST: on TPU the default f32 matmul rounds g to bfloat16; this one must be exact.
  return jnp.einsum("skm,skw->smw", one_hot, g, precision=jax.lax.Precision.HIGHEST), None


_take_points.defvjp(_take_points_fwd, _take_points_bwd)


def segment_mask(frame_mask: jax.Array, frames_after: int) -> jax.Array:
  """`[B, frames_before]` frame mask -> `[B, frames_after]` segment mask.

  A segment's mask is the mask of its last frame (the original's rule). A video that
  has a valid frame but would be left with no valid segment (fewer valid frames than one
  segment holds: 1 or 2 decoded frames under `B6 - 4`) keeps its first segment valid:
  that segment holds its real frames (short videos repeat their last frame), where the
  original's rule gives a 0/0 = NaN embedding. Every other mask equals the original's;
  a video with no valid frame at all (padding) stays all invalid.
  """
  b, frames_before = frame_mask.shape
  valid = frame_mask.astype(bool)
  last = valid.reshape(b, frames_after, frames_before // frames_after)[:, :, -1]
  rescue = jnp.any(valid, axis=1) & ~jnp.any(last, axis=1)  # [B]
  first = jnp.arange(frames_after) == 0
  return (last | (rescue[:, None] & first[None, :])).astype(frame_mask.dtype)


def _check_step_inputs(x, frame_mask, step, settings, cluster_embedding, train, rng):
  if not isinstance(step, ClusterStep):
    raise ValueError(f"cluster_step: step must be a ClusterStep, got {type(step)}.")
  if not isinstance(settings, ClusterSettings):
    raise ValueError("cluster_step: settings must be a ClusterSettings, got "
                     f"{type(settings)}.")
  if x.ndim != 3 or x.shape[1] < 2:
    raise ValueError(f"cluster_step: x must be [B*frames_before, 1+N', W] with N' >= "
                     f"1, got shape {x.shape}.")
  if frame_mask.ndim != 2 or frame_mask.shape[1] != step.frames_before:
    raise ValueError(f"cluster_step: frame_mask must be [B, frames_before="
                     f"{step.frames_before}], got shape {frame_mask.shape}.")
  if x.shape[0] != frame_mask.shape[0] * step.frames_before:
    raise ValueError(f"cluster_step: x has {x.shape[0]} frame rows, expected B x "
                     f"frames_before = {frame_mask.shape[0]} x {step.frames_before}.")
  m = (x.shape[1] - 1) * step.segment_frames
  if settings.algo == "pooling":
    if cluster_embedding is not None:
      raise ValueError("cluster_step: algo 'pooling' keeps all tokens and takes no "
                       "cluster_embedding; pass None.")
    return
  if step.k > m:
    raise ValueError(f"cluster_step: k={step.k} clusters but a segment has only M = "
                     f"{x.shape[1] - 1} x {step.segment_frames} = {m} tokens.")
  if cluster_embedding is not None and tuple(cluster_embedding.shape) != (
      step.k, x.shape[2]):
    raise ValueError(f"cluster_step: cluster_embedding must be [K={step.k}, W="
                     f"{x.shape[2]}], got shape {tuple(cluster_embedding.shape)}.")
  if settings.algo == "sparse_sampling" and train and rng is None:
    raise ValueError("cluster_step: sparse_sampling in training needs rng=<PRNG key>.")


def cluster_step(x: jax.Array,
                 frame_mask: jax.Array,
                 step: ClusterStep,
                 settings: ClusterSettings,
                 *,
                 cluster_embedding: Optional[jax.Array] = None,
                 train: bool = False,
                 rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """One clustering step on a batch of videos: `cluster_step_with_info` without the info."""
  x_out, mask_out, _ = cluster_step_with_info(
      x, frame_mask, step, settings, cluster_embedding=cluster_embedding, train=train,
      rng=rng)
  return x_out, mask_out


def cluster_step_with_info(
    x: jax.Array,
    frame_mask: jax.Array,
    step: ClusterStep,
    settings: ClusterSettings,
    *,
    cluster_embedding: Optional[jax.Array] = None,
    train: bool = False,
    rng: Optional[jax.Array] = None,
    sizes: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """One clustering step on a batch of videos, and what it chose.

  Args:
    x: `[B*frames_before, 1+N', W]` tokens (CLS first), frames of a video contiguous.
    frame_mask: `[B, frames_before]` (bool or 0/1).
    step: the static step (frames before/after, `K`).
    settings: the static clustering settings.
    cluster_embedding: optional `[K, W]` added to the `K` centre tokens (not CLS).
    train: only sparse sampling behaves differently in training.
    rng: PRNG key for sparse sampling in training.
    sizes: tome only: `[B*frames_before, N']` float32 sizes of the patch tokens from an
      earlier merge (None: every token stands for one patch).
  Returns:
    (x_out `[B*frames_after, 1+K', W]` in `x.dtype`, mask_out `[B, frames_after]` in
    `frame_mask.dtype`, masks as `segment_mask` says), and info: a dict with
    'kept' `[S, K]` int32, the segment points each centre token comes from (medoids,
    ascending, or the sparse samples; absent for pooling and tome), 'sizes' `[S, K']` float32,
    the input tokens each output token stands for (cluster members; `d` for pooling;
    1 for sparse sampling; the merged patches' total size for tome), and for k-medoids++,
    spectral and tome 'assignment' `[S, M]` int32, the cluster (merged token) of every
    point. `S = B * frames_after`; points are frame-major.
  """
  x = jnp.asarray(x)
  frame_mask = jnp.asarray(frame_mask)
  _check_step_inputs(x, frame_mask, step, settings, cluster_embedding, train, rng)
  b = frame_mask.shape[0]
  d = step.segment_frames
  s = b * step.frames_after
  t, w = x.shape[1], x.shape[2]
  mask_out = segment_mask(frame_mask, step.frames_after)
  if settings.algo == "pooling":
    sizes = jnp.full((s, t - 1), float(d), jnp.float32)
    return baselines.frame_pooling(x, d), mask_out, {"sizes": sizes}

  xs = x.reshape(s, d, t, w)
  cls = jnp.mean(xs[:, :, 0].astype(jnp.float32), axis=1).astype(x.dtype)  # [S, W]
  points = xs[:, :, 1:].reshape(s, d * (t - 1), w)  # frame-major segment tokens
  if settings.algo == "sparse_sampling":
    idx = baselines.sparse_sampling_indices(s, d * (t - 1), step.k, train=train,
                                            rng=rng)
    centres = _take_points(points, idx, points.shape[1])
    info = {"kept": idx.astype(jnp.int32), "sizes": jnp.ones((s, step.k), jnp.float32)}
  elif settings.algo == "tome":
    point_sizes = (jnp.ones(points.shape[:2], jnp.float32) if sizes is None
                   else sizes.astype(jnp.float32).reshape(s, d * (t - 1)))
    centres, merged_sizes, dest = jax.vmap(
        lambda p, z: tome.merge_to_k(p, z, step.k))(points, point_sizes)
    info = {"assignment": dest, "sizes": merged_sizes}
  else:
    assignment, medoids = cluster_segments(
        jax.lax.stop_gradient(points).astype(jnp.float32), step.k, settings, d)
    if settings.aggregation == "mean":
      centres = jax.vmap(_cluster_means, in_axes=(0, 0, None))(
          points, assignment, step.k).astype(x.dtype)
    else:
      centres = _take_points(points, medoids, points.shape[1])
    sizes = jax.vmap(lambda a: jnp.bincount(a, length=step.k))(assignment)
    info = {"assignment": assignment, "kept": medoids,
            "sizes": sizes.astype(jnp.float32)}
  if cluster_embedding is not None:
    centres = (centres + cluster_embedding[None]).astype(x.dtype)
  return jnp.concatenate([cls[:, None, :], centres], axis=1), mask_out, info
