"""Independent float64 NumPy reference of CenterCLIP's token clustering.

Written from `shared/docs/clustering.md` (sections 2-5) with plain loops; it does not
import or call `centerclip_jax`. Besides the results, every function reports how close
each of its argmin/argmax decisions came to a tie (`Margins`), so that tests can keep
to inputs whose decisions float32 cannot flip, instead of loosening their assertions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class Margins:
  """Closest call among the decisions of one run.

  rel_gap: smallest (runner-up - winner) / scale over decisions that were not exact
    ties; `inf` when there were none.
  ties: decisions decided by an exact tie (first index won).
  """
  rel_gap: float = math.inf
  ties: int = 0
  # KKZ's first seed, kept apart: with pre-norm (or on spectral's normalised rows) all
  # norms are within ~1e-6 of 1, a gap float32 only resolves through an equivalent
  # criterion (argmax of the raw norms), so tests look at it separately.
  first_seed_gap: float = math.inf
  # Spectral: relative eigenvalue gaps (see `spectral`).
  eig_boundary: float = math.inf
  eig_within: float = math.inf

  def record(self, gap: float, scale: float):
    if gap == 0.0:
      self.ties += 1
    else:
      self.rel_gap = min(self.rel_gap, gap / scale)

  def merge(self, other: "Margins"):
    self.rel_gap = min(self.rel_gap, other.rel_gap)
    self.ties += other.ties
    self.first_seed_gap = min(self.first_seed_gap, other.first_seed_gap)
    self.eig_boundary = min(self.eig_boundary, other.eig_boundary)
    self.eig_within = min(self.eig_within, other.eig_within)


def _pick(values, best: str, margins: Margins, scale: float) -> int:
  """First index of the min/max of `values`, recording the gap to the runner-up."""
  values = [float(v) for v in values]
  win = 0
  for i, v in enumerate(values):
    if (v < values[win]) if best == "min" else (v > values[win]):
      win = i
  others = [v for i, v in enumerate(values) if i != win]
  if others:
    if best == "min":
      gap = min(others) - values[win]
    else:
      gap = values[win] - max(others)
    margins.record(gap, scale)
  return win


def prenorm(x: np.ndarray) -> np.ndarray:
  out = np.empty_like(x)
  for i in range(x.shape[0]):
    out[i] = x[i] / (math.sqrt(float(np.sum(x[i] * x[i]))) + 1e-6)
  return out


def distances(x, distance: str = "euclidean", p: float = 2.0) -> np.ndarray:
  """Spec 3.1, direct form: `[M, W] -> [M, M]` float64."""
  x = np.asarray(x, np.float64)
  m = x.shape[0]
  d = np.zeros((m, m))
  if distance == "cosine":
    xn = prenorm(x)
  for i in range(m):
    for j in range(i + 1, m):
      if distance == "cosine":
        v = 1.0 - float(np.dot(xn[i], xn[j]))
      else:
        v = float(np.sum(np.abs(x[i] - x[j])**p))**(1.0 / p)
      d[i, j] = d[j, i] = v
  return d


def kmedoids(x, k: int, *, distance="euclidean", p=2.0, iter_limit=100,
             pre_norm=False):
  """Spec section 3. Returns (assignment [M], medoids [K], Margins, iterations)."""
  x = np.asarray(x, np.float64)
  m = x.shape[0]
  assert 1 <= k <= m
  if pre_norm:
    x = prenorm(x)
  d = distances(x, distance, p)
  d = d - d.max() - 1.0
  for i in range(m):
    d[i, i] -= 1.0
  scale = float(np.abs(d).max())
  margins = Margins()
  norms = [math.sqrt(float(np.sum(x[i] * x[i]))) for i in range(m)]
  seed_margins = Margins()
  medoids = [_pick(norms, "max", seed_margins, max(max(norms), 1e-30))]
  margins.first_seed_gap = seed_margins.rel_gap
  for _ in range(1, k):
    g = [min(d[c, i] for c in medoids) for i in range(m)]
    medoids.append(_pick(g, "max", margins, scale))

  def assign(meds):
    return [_pick([d[c, i] for c in meds], "min", margins, scale) for i in range(m)]

  iterations = 0
  for _ in range(iter_limit):
    iterations += 1
    a = assign(medoids)
    new = []
    for c in range(k):
      members = [i for i in range(m) if a[i] == c]
      costs = [sum(d[i, j] for j in members) for i in members]
      new.append(members[_pick(costs, "min", margins, scale)])
    changed = new != medoids
    medoids = new
    if not changed:
      break
  medoids = sorted(medoids)
  a = assign(medoids)
  return np.array(a), np.array(medoids), margins, iterations


def affinity(x, *, segment_frames: int, sigma=2.0, graph="HeatKernel", knn_k=1,
             margins: Margins | None = None) -> np.ndarray:
  """Spec 4.1: heat-kernel affinity, for 'KNN' masked by the symmetric k-NN graph."""
  x = np.asarray(x, np.float64)
  m = x.shape[0]
  margins = Margins() if margins is None else margins
  a = np.zeros((m, m))
  for i in range(m):
    for j in range(m):
      a[i, j] = math.exp(-float(np.sum((x[i] - x[j])**2)) / (2.0 * sigma**2))
  if graph == "KNN":
    n = m // segment_frames
    kk = knn_k if knn_k >= 5 else (5 * segment_frames if n < 100 else
                                   5 * segment_frames + 5)
    kk = min(kk, m)
    top = []
    for i in range(m):
      order = sorted(range(m), key=lambda j: (-a[i, j], j))
      top.append(set(order[:kk]))
      if kk < m:
        margins.record(a[i, order[kk - 1]] - a[i, order[kk]], 1.0)
    keep = np.array([[j in top[i] or i in top[j] for j in range(m)] for i in range(m)])
    a = np.where(keep, a, 0.0)
  return a


def spectral(x, k: int, *, segment_frames: int, sigma=2.0, graph="HeatKernel",
             knn_k=1, correct_sign=True, **kmedoids_kwargs):
  """Spec section 4. Returns (assignment, medoids, Margins, eig_gaps).

  eig_gaps: (boundary, within), relative to the largest eigenvalue: the gap between the
  K-th and (K+1)-th smallest eigenvalues (how well the K-dimensional subspace is
  determined) and the smallest gap between consecutive ones among the K+1 smallest
  (how well each eigenvector is determined).
  """
  m = np.asarray(x).shape[0]
  margins = Margins()
  a = affinity(x, segment_frames=segment_frames, sigma=sigma, graph=graph,
               knn_k=knn_k, margins=margins)
  deg = a.sum(axis=1)
  lap = np.diag(deg) - a
  dm = np.diag(deg**-0.5)
  lsym = dm @ lap @ dm
  u, s, vt = np.linalg.svd(lsym)
  if correct_sign:
    for c in range(m):
      cc = s[c] * vt[c]
      u[:, c] *= np.sign(np.sum(np.sign(cc) * cc**2))
  q = u[:, m - k:]
  q = q / (np.sqrt(np.sum(q * q, axis=1, keepdims=True)) + 1e-6)
  ev = np.sort(s)
  top = max(float(ev[-1]), 1e-30)
  boundary = float(ev[k] - ev[k - 1]) / top if k < m else 1.0
  within = float(np.min(np.diff(ev[:k + 1]))) / top if k > 1 else 1.0
  assignment, medoids, km_margins, _ = kmedoids(q, k, **kmedoids_kwargs)
  margins.merge(km_margins)
  margins.eig_boundary, margins.eig_within = boundary, within
  return assignment, medoids, margins, (boundary, within)


def sparse_eval_indices(m: int, k: int) -> list[int]:
  stride = m / k
  return [int(stride / 2 + stride * j) for j in range(k)]


def cluster_step(x, frame_mask, frames_after: int, k: int, *, algo="kmedoids++",
                 aggregation=None, cluster_embedding=None, kmedoids_kwargs=None,
                 spectral_kwargs=None):
  """Spec section 2 / 5 with loops over videos and segments (eval mode).

  Args:
    x: `[B*F, 1+N, W]`; frame_mask: `[B, F]`.
  Returns:
    (out `[B*frames_after, 1+K', W]` float64, mask `[B, frames_after]`, medoids per
    segment (list), Margins).
  """
  x = np.asarray(x, np.float64)
  frame_mask = np.asarray(frame_mask)
  b, f = frame_mask.shape
  d = f // frames_after
  n = x.shape[1] - 1
  outs, all_medoids, margins = [], [], Margins()
  mask_out = np.zeros((b, frames_after), frame_mask.dtype)
  for v in range(b):
    for s in range(frames_after):
      rows = [v * f + s * d + t for t in range(d)]
      mask_out[v, s] = frame_mask[v, s * d + d - 1]
      if algo == "pooling":
        outs.append(sum(x[r] for r in rows) / d)
        continue
      cls = sum(x[r, 0] for r in rows) / d
      pts = np.concatenate([x[r, 1:] for r in rows], axis=0)  # frame-major
      if algo == "sparse_sampling":
        meds = sparse_eval_indices(n * d, k)
        centres = pts[meds]
      else:
        if algo == "spectral":
          assign, meds, mg, _ = spectral(pts, k, segment_frames=d,
                                         **(spectral_kwargs or {}),
                                         **(kmedoids_kwargs or {}))
        else:
          assign, meds, mg, _ = kmedoids(pts, k, **(kmedoids_kwargs or {}))
        margins.merge(mg)
        if aggregation == "mean":
          centres = np.stack([pts[assign == c].mean(axis=0) for c in range(k)])
        else:
          centres = pts[meds]
      all_medoids.append(list(meds))
      if cluster_embedding is not None:
        centres = centres + np.asarray(cluster_embedding, np.float64)
      outs.append(np.concatenate([cls[None], centres], axis=0))
  return np.stack(outs), mask_out, all_medoids, margins
