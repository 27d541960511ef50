"""Spectral clustering of one segment (the paper's ablation), in float32.

Semantics: `shared/docs/clustering.md`, section 4: heat-kernel affinity (optionally a
symmetric k-NN graph), normalised Laplacian, the K eigenvectors of the smallest
eigenvalues with Bro's sign correction, rows normalised, then k-medoids++ on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from centerclip_jax.clustering import kmedoids

GRAPHS = ("HeatKernel", "KNN")


def adaptive_knn_k(knn_k: int, segment_frames: int, tokens_per_frame: int) -> int:
  """`knn_k` if >= 5, else `5*d` (fewer than 100 tokens per frame) or `5*d + 5`."""
  if knn_k >= 5:
    return knn_k
  return 5 * segment_frames if tokens_per_frame < 100 else 5 * segment_frames + 5


def affinity(x: jax.Array,
             *,
             segment_frames: int,
             sigma: float = 2.0,
             graph: str = "HeatKernel",
             knn_k: int = 1) -> jax.Array:
  """`x [M, W] -> A [M, M]`: `exp(-|x_i - x_j|^2 / (2 sigma^2))`, k-NN masked for 'KNN'."""
  if graph not in GRAPHS:
    raise ValueError(f"spectral_graph={graph!r} is not supported; use one of {GRAPHS}.")
  m = x.shape[0]
  a = jnp.exp(-kmedoids.squared_euclidean(x) / (2.0 * float(sigma)**2))
  if graph == "KNN":
    kk = min(adaptive_knn_k(knn_k, segment_frames, m // segment_frames), m)
    _, top = jax.lax.top_k(a, kk)  # [M, kk], lower index first on ties
    rows = jnp.arange(m)[:, None]
    keep = jnp.zeros((m, m), bool).at[rows, top].set(True)
    a = jnp.where(keep | keep.T, a, 0.0)
  return a


def _eigenvectors(x: jax.Array, k: int, *, segment_frames: int, sigma: float,
                  graph: str, knn_k: int, correct_sign: bool) -> jax.Array:
  """`x [M, W] -> U [M, K]`, sign-corrected eigenvectors of the K smallest eigenvalues.

  Columns follow the SVD order of the spec (descending singular values): the last
  column belongs to the smallest eigenvalue. `L_sym` is symmetric PSD, so `eigh`
  (ascending eigenvalues) gives the same decomposition with `S = |eigenvalues|`, `V = U`.
  """
  a = affinity(x, segment_frames=segment_frames, sigma=sigma, graph=graph, knn_k=knn_k)
  deg = jnp.sum(a, axis=1)  # >= A_ii = 1 > 0
  lap = jnp.diag(deg) - a
  dinv = 1.0 / jnp.sqrt(deg)
  lsym = dinv[:, None] * lap * dinv[None, :]
  evals, evecs = jnp.linalg.eigh(lsym)
  u = evecs[:, :k][:, ::-1]
  s = jnp.abs(evals[:k])[::-1]
  if correct_sign:
    c = s[None, :] * u  # column k is S_k * V^T[k, :]
    sign = jnp.sign(jnp.sum(jnp.sign(c) * c * c, axis=0))
    # An exactly zero score (S_k == 0) leaves the column as it is.
    u = u * jnp.where(sign == 0, 1.0, sign)[None, :]
  return u


def spectral_embedding(x: jax.Array,
                       k: int,
                       *,
                       segment_frames: int,
                       sigma: float = 2.0,
                       graph: str = "HeatKernel",
                       knn_k: int = 1,
                       correct_sign: bool = True) -> jax.Array:
  """`x [M, W] -> Q [M, K]`: row-normalised eigenvectors of the K smallest eigenvalues."""
  u = _eigenvectors(jnp.asarray(x, jnp.float32), k, segment_frames=segment_frames,
                    sigma=sigma, graph=graph, knn_k=knn_k, correct_sign=correct_sign)
  return kmedoids.l2_normalize(u)


def spectral_cluster(x: jax.Array,
                     k: int,
                     *,
                     segment_frames: int,
                     sigma: float = 2.0,
                     graph: str = "HeatKernel",
                     knn_k: int = 1,
                     correct_sign: bool = True,
                     distance: str = "euclidean",
                     p: float = 2.0,
                     iter_limit: int = 100,
                     pre_norm: bool = False) -> tuple[jax.Array, jax.Array]:
  """Spectral clustering of one segment.

  Args:
    x: `[M, W]` points of one segment (computed in float32, no gradient).
    k: number of clusters, `1 <= k <= M`.
    segment_frames: frames per segment `d` (the adaptive k-NN uses `N = M // d`).
    sigma, graph, knn_k, correct_sign: spec 4.1-4.3.
    distance, p, iter_limit, pre_norm: settings of the k-medoids++ run on `Q`.
  Returns:
    (assignment `[M]` int32, medoids `[K]` int32 ascending): indices of rows of `x`.
  """
  if x.ndim != 2:
    raise ValueError(
        f"spectral_cluster expects one segment [M, W], got shape {x.shape}.")
  kmedoids.check_k(k, x.shape[0])
  if segment_frames < 1 or x.shape[0] % segment_frames:
    raise ValueError(f"segment_frames={segment_frames} must be >= 1 and divide "
                     f"M={x.shape[0]}.")
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  u = _eigenvectors(x, k, segment_frames=segment_frames, sigma=sigma, graph=graph,
                    knn_k=knn_k, correct_sign=correct_sign)
  # KKZ's first seed on Q = u / (|u| + 1e-6) is the argmax of |u| (see kmedoids_points).
  return kmedoids.kmedoids_points(kmedoids.l2_normalize(u), k,
                                  sq_norms=jnp.sum(u * u, axis=-1), distance=distance,
                                  p=p, iter_limit=iter_limit, pre_norm=pre_norm)
