"""k-medoids++ (KKZ initialisation) on the tokens of one segment, in float32.

Semantics: `shared/docs/clustering.md`, section 3. Every function here works on ONE
segment (`[M, W]` points) with static shapes; callers `jax.vmap` it over segments.
Memory stays O(M^2) per segment: the distance matrix is the only `[M, M]` tensor that
lives across the iteration, and the medoid update uses
`cost_i = sum_j D[i, j] * [a_j == a_i]` plus a first-index argmin per cluster.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

DISTANCES = ("euclidean", "cosine")
NORM_EPS = 1e-6
# Upper bound on elements of one `[M, M, chunk]` slab of the direct Minkowski form.
_MINKOWSKI_CHUNK_ELEMS = 1 << 17
_HIGHEST = jax.lax.Precision.HIGHEST


def check_distance(distance: str, p: float) -> None:
  """Raises ValueError for an unknown metric or a bad Minkowski exponent."""
  if distance not in DISTANCES:
    raise ValueError(
        f"distance={distance!r} is not supported; use one of {DISTANCES}.")
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not (
      0.0 < float(p) < float("inf")):
    raise ValueError(
        f"minkowski_norm_p={p!r} must be a finite number > 0 (2.0 is Euclidean).")


def l2_normalize(x: jax.Array) -> jax.Array:
  """`x / (||x||_2 + 1e-6)` along the last axis (the original's pre-norm)."""
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + NORM_EPS)


def _exact_symmetric(d: jax.Array) -> jax.Array:
  """Zero diagonal, then `(D + D^T) / 2`: exactly symmetric, exactly zero diagonal."""
  eye = jnp.eye(d.shape[0], dtype=bool)
  d = jnp.where(eye, 0.0, d)
  return 0.5 * (d + d.T)


def squared_euclidean(x: jax.Array) -> jax.Array:
  """`[M, W] -> [M, M]` squared distances by the matmul form `|x|^2 + |y|^2 - 2<x, y>`.

  Clamped at 0, exactly zero diagonal, exactly symmetric.
  """
  sq = jnp.sum(x * x, axis=-1)
  gram = jnp.matmul(x, x.T, precision=_HIGHEST)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  return _exact_symmetric(d2)


def _minkowski_direct(x: jax.Array, p: float) -> jax.Array:
  """`(sum_w |x_iw - x_jw|^p)^(1/p)` for p != 2, scanning over chunks of the width.

  Peak memory is one `[M, M, chunk]` slab instead of `[M, M, W]`.
  """
  m, w = x.shape
  chunk = max(1, min(w, _MINKOWSKI_CHUNK_ELEMS // max(m * m, 1)))
  n_chunks = -(-w // chunk)
  xp = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - w)))  # zero columns add 0
  xc = xp.reshape(m, n_chunks, chunk).transpose(1, 0, 2)  # [chunks, M, chunk]

  def body(acc, xb):
    diff = jnp.abs(xb[:, None, :] - xb[None, :, :])
    term = diff if p == 1.0 else diff**p
    return acc + jnp.sum(term, axis=-1), None

  acc, _ = jax.lax.scan(body, jnp.zeros((m, m), jnp.float32), xc)
  return acc if p == 1.0 else acc**(1.0 / p)


def pairwise_distances(x: jax.Array,
                       distance: str = "euclidean",
                       p: float = 2.0) -> jax.Array:
  """`x [M, W] -> D [M, M]` float32, exactly symmetric with an exactly zero diagonal.

  'euclidean' is the Minkowski distance of order `p` (matmul form for p = 2);
  'cosine' is `1 - <x_i / (|x_i| + 1e-6), x_j / (|x_j| + 1e-6)>`.
  """
  check_distance(distance, p)
  x = jnp.asarray(x, jnp.float32)
  if distance == "cosine":
    xn = l2_normalize(x)
    d = 1.0 - jnp.matmul(xn, xn.T, precision=_HIGHEST)
  elif float(p) == 2.0:
    d = jnp.sqrt(squared_euclidean(x))
  else:
    d = _minkowski_direct(x, float(p))
  return _exact_symmetric(d)


def _shift(d: jax.Array) -> jax.Array:
  """`D - max(D) - 1`, diagonal lowered by 1: every point is strictly nearest itself."""
  d = d - jnp.max(d) - 1.0
  return d - jnp.eye(d.shape[0], dtype=d.dtype)


def first_argmin(v: jax.Array, axis: int = -1) -> jax.Array:
  """`argmin` along `axis` taking the first index on ties, as int32.

  Two plain reductions (min, then the least index attaining it): on XLA:CPU this is
  several times faster than the variadic reduce behind `jnp.argmin`.
  """
  axis = axis % v.ndim
  mn = jnp.min(v, axis=axis, keepdims=True)
  idx = jax.lax.broadcasted_iota(jnp.int32, v.shape, axis)
  return jnp.min(jnp.where(v == mn, idx, v.shape[axis]), axis=axis)


def first_argmax(v: jax.Array, axis: int = -1) -> jax.Array:
  """`argmax` along `axis` taking the first index on ties, as int32."""
  axis = axis % v.ndim
  mx = jnp.max(v, axis=axis, keepdims=True)
  idx = jax.lax.broadcasted_iota(jnp.int32, v.shape, axis)
  return jnp.min(jnp.where(v == mx, idx, v.shape[axis]), axis=axis)


def kkz_init(d: jax.Array, sq_norms: jax.Array, k: int) -> jax.Array:
  """KKZ seeds: largest-norm point, then repeatedly the point farthest from the seeds.

  Args:
    d: shifted distances `[M, M]`.
    sq_norms: `[M]` squared L2 norms of the points (same argmax as the norms).
    k: number of seeds.
  Returns:
    `[K]` int32 seed indices in the order chosen.
  """
  first = first_argmax(sq_norms)
  medoids = jnp.zeros((k,), jnp.int32).at[0].set(first)

  def body(j, carry):
    medoids, g = carry
    mj = first_argmax(g)
    return medoids.at[j].set(mj), jnp.minimum(g, d[mj])

  medoids, _ = jax.lax.fori_loop(1, k, body, (medoids, d[first]))
  return medoids


def _assign(d: jax.Array, medoids: jax.Array) -> jax.Array:
  """`a_i = argmin_k D[m_k, i]` (first cluster on ties): `[M]` int32."""
  return first_argmin(d[medoids], axis=0)


def _update(d: jax.Array, assignment: jax.Array, medoids: jax.Array) -> jax.Array:
  """Per cluster, the member with the least summed distance to its cluster: `[K]`.

  `cost_i = sum_j D[i, j] [a_j == a_i]` is one `[M, M]` pass; the per-cluster argmin
  (first index on ties) is two segment-min passes over the `M` points.
  """
  m, k = d.shape[0], medoids.shape[0]
  same = assignment[:, None] == assignment[None, :]
  cost = jnp.sum(jnp.where(same, d, 0.0), axis=1)  # [M]
  best = jax.ops.segment_min(cost, assignment, num_segments=k)  # [K]
  cand = jnp.where(cost == best[assignment], jnp.arange(m, dtype=jnp.int32), m)
  new = jax.ops.segment_min(cand, assignment, num_segments=k)
  # Clusters are never empty (each medoid is strictly nearest to itself); keep the old
  # medoid if one were, e.g. for NaN input.
  return jnp.where(new >= m, medoids, new).astype(jnp.int32)


def kmedoids_from_distances(d: jax.Array, sq_norms: jax.Array, k: int,
                            iter_limit: int = 100) -> tuple[jax.Array, jax.Array]:
  """Spec 3, steps 1 (shift) to 4 on a ready distance matrix.

  Args:
    d: `[M, M]` float32 distances, exactly symmetric, exactly zero diagonal.
    sq_norms: `[M]` squared L2 norms (KKZ's first seed is their argmax).
    k: clusters, `1 <= k <= M` (static).
    iter_limit: at most this many assign/update rounds (static).
  Returns:
    (assignment `[M]` int32 into the sorted medoids, medoids `[K]` int32 ascending).
  """
  d = _shift(d)
  seeds = kkz_init(d, sq_norms, k)

  def cond(state):
    it, _, changed = state
    return jnp.logical_and(it < iter_limit, changed)

  def body(state):
    it, medoids, _ = state
    new = _update(d, _assign(d, medoids), medoids)
    return it + 1, new, jnp.any(new != medoids)

  _, medoids, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), seeds, jnp.asarray(True)))
  medoids = jnp.sort(medoids)
  return _assign(d, medoids), medoids


def check_k(k: int, m: int) -> None:
  """Raises ValueError unless `k` is an int in `[1, m]`."""
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= m:
    raise ValueError(
        f"number of clusters k={k!r} must be an int in [1, M={m}] (M = points in "
        "one segment); lower cluster_num_blocks or use more frames per segment.")


def kmedoids_points(x: jax.Array,
                    k: int,
                    *,
                    sq_norms: jax.Array | None = None,
                    distance: str = "euclidean",
                    p: float = 2.0,
                    iter_limit: int = 100,
                    pre_norm: bool = False) -> tuple[jax.Array, jax.Array]:
  """`kmedoids_pp` with an optional KKZ key.

  KKZ's first seed is the argmax of the (pre-normed) norms. With pre-norm, or on rows
  already normalised as `u / (|u| + 1e-6)` (spectral), those norms are `t / (t + 1e-6)`
  of the raw norms `t`: all within a few float32 ulps of 1, while the map is strictly
  increasing. The argmax is therefore taken on the raw squared norms (`sq_norms`, by
  default those of `x` before pre-norm): the same index, without the rounding.
  """
  check_k(k, x.shape[0])
  check_distance(distance, p)
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  if sq_norms is None:
    sq_norms = jnp.sum(x * x, axis=-1)
  if pre_norm:
    x = l2_normalize(x)
  d = pairwise_distances(x, distance, p)
  return kmedoids_from_distances(d, sq_norms, int(k), int(iter_limit))


def kmedoids_pp(x: jax.Array,
                k: int,
                *,
                distance: str = "euclidean",
                p: float = 2.0,
                iter_limit: int = 100,
                pre_norm: bool = False) -> tuple[jax.Array, jax.Array]:
  """k-medoids++ of one segment.

  Args:
    x: `[M, W]` points (computed in float32; no gradient flows through).
    k: number of clusters, `1 <= k <= M`.
    distance: 'euclidean' (Minkowski of order `p`) or 'cosine'.
    p: Minkowski exponent.
    iter_limit: iteration cap of the assign/update loop.
    pre_norm: L2-normalise the points first.
  Returns:
    (assignment `[M]` int32, medoids `[K]` int32 sorted ascending).
  """
  if x.ndim != 2:
    raise ValueError(f"kmedoids_pp expects one segment [M, W], got shape {x.shape}.")
  return kmedoids_points(x, k, distance=distance, p=p, iter_limit=iter_limit,
                         pre_norm=pre_norm)
