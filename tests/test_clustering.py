"""k-medoids++ and spectral clustering of one segment against the NumPy reference.

Random float inputs go through the reference first; it reports how close each
argmin/argmax decision came to a tie, and only inputs whose decisions float32 cannot
flip are compared (the assertions stay exact). Inputs with exact ties (static frames,
identical tokens) use small integers, so float32 and float64 both compute them exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax.clustering import kmedoids
from centerclip_jax.clustering import spectral
from tests import clustering_reference as ref

# Decisions closer than this (relative to the largest |shifted distance|) are skipped.
MIN_GAP = 1e-5
MIN_EIG_GAP = 1e-3


def _random_segments(seed, n, m, w, kind="gauss", scale=1.0):
  rng = np.random.default_rng(seed)
  if kind == "gauss":
    x = rng.normal(size=(n, m, w))
  else:  # a few well separated blobs
    centres = rng.normal(size=(n, 6, w)) * 3.0
    labels = rng.integers(0, 6, size=(n, m))
    x = np.take_along_axis(centres, labels[..., None], 1) + 0.5 * rng.normal(
        size=(n, m, w))
  return (x * scale).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _batched_kmedoids(k, **kw):
  return jax.jit(jax.vmap(functools.partial(kmedoids.kmedoids_pp, k=k, **kw)))


@functools.lru_cache(maxsize=None)
def _batched_spectral(k, **kw):
  return jax.jit(jax.vmap(functools.partial(spectral.spectral_cluster, k=k, **kw)))


def _compare(xs, jax_out, ref_fn, min_compared, eig_check=None):
  assignment, medoids = map(np.asarray, jax_out)
  compared = 0
  for i, x in enumerate(xs):
    r_assign, r_medoids, margins, extra = ref_fn(x)
    if margins.rel_gap < MIN_GAP:
      continue
    if eig_check is not None and not eig_check(extra):
      continue
    compared += 1
    np.testing.assert_array_equal(medoids[i], r_medoids, err_msg=f"segment {i}")
    np.testing.assert_array_equal(assignment[i], r_assign, err_msg=f"segment {i}")
  assert compared >= min_compared, (
      f"only {compared} of {len(xs)} inputs were far from ties; change the inputs")


KMEDOIDS_CASES = [
    # (m, w, k, kwargs); every batch mixes Gaussian and blob segments at two scales.
    (12, 8, 2, {}),
    (30, 16, 5, {}),
    (60, 8, 12, {}),
    (40, 8, 7, dict(p=1.0)),
    (40, 8, 7, dict(p=3.0)),
    (40, 8, 7, dict(distance="cosine")),
    (40, 8, 7, dict(pre_norm=True)),
    (40, 8, 7, dict(iter_limit=1)),
    (40, 8, 7, dict(iter_limit=0)),
]


@pytest.mark.parametrize("m,w,k,kw", KMEDOIDS_CASES)
def test_kmedoids_matches_reference(m, w, k, kw):
  seed = m * 7 + k
  xs = np.concatenate([
      _random_segments(seed, 4, m, w, "gauss"),
      _random_segments(seed + 1, 2, m, w, "blobs", 10.0),
      _random_segments(seed + 2, 2, m, w, "blobs", 1e-3),
  ])
  out = _batched_kmedoids(k, **kw)(xs)
  _compare(xs, out, lambda x: ref.kmedoids(x, k, **kw), min_compared=5)


def test_kmedoids_matches_reference_vit_b32_segment():
  """The paper's segment: 3 frames x 49 patches, K = 49."""
  xs = _random_segments(3, 4, 147, 24, "gauss")
  out = _batched_kmedoids(49)(xs)
  _compare(xs, out, lambda x: ref.kmedoids(x, 49), min_compared=3)


def test_k_equals_m_keeps_every_point():
  xs = _random_segments(1, 2, 9, 4)
  assignment, medoids = _batched_kmedoids(9)(xs)
  np.testing.assert_array_equal(medoids, np.tile(np.arange(9), (2, 1)))
  np.testing.assert_array_equal(assignment, np.tile(np.arange(9), (2, 1)))


def _static_frames_integer(seed, frames, n, w, low, high, collinear=False):
  """One segment of `frames` identical frames of small-integer tokens: [frames*n, w]."""
  rng = np.random.default_rng(seed)
  if collinear:  # all tokens on a line with |v| = 3: integer Euclidean distances
    v = np.zeros(w)
    v[:3] = (1.0, 2.0, 2.0)
    frame = rng.integers(low, high, size=(n, 1)) * v
  else:
    frame = rng.integers(low, high, size=(n, w)).astype(np.float64)
  return np.tile(frame, (frames, 1)).astype(np.float32)


@pytest.mark.parametrize("kind,k", [("manhattan", 5), ("collinear", 7)])
def test_identical_tokens_exact_ties(kind, k):
  """Static frames (each token 3 times) plus repeated tokens inside a frame.

  All arithmetic is exact in float32 and float64 here, so every tie (identical tokens,
  two-member clusters) must be broken the same way: first index.
  """
  kw = dict(p=1.0) if kind == "manhattan" else {}
  segs = np.stack([
      _static_frames_integer(s, 3, 8, 6, -2, 3, collinear=(kind == "collinear"))
      for s in range(4)
  ])
  assignment, medoids = map(np.asarray, _batched_kmedoids(k, **kw)(segs))
  for i, x in enumerate(segs):
    r_assign, r_medoids, margins, _ = ref.kmedoids(x, k, **kw)
    assert margins.ties > 0  # the case is about ties
    np.testing.assert_array_equal(medoids[i], r_medoids)
    np.testing.assert_array_equal(assignment[i], r_assign)
    # Distinct medoids, none empty, every medoid in its own cluster.
    assert len(set(medoids[i].tolist())) == k
    np.testing.assert_array_equal(assignment[i][medoids[i]], np.arange(k))


def test_all_tokens_identical_cosine_gives_distinct_medoids():
  x = np.ones((3, 12, 5), np.float32) * np.float32(0.7)
  assignment, medoids = map(np.asarray,
                            _batched_kmedoids(4, distance="cosine")(x))
  for a, med in zip(assignment, medoids):
    assert len(set(med.tolist())) == 4
    np.testing.assert_array_equal(a[med], np.arange(4))
    assert set(a.tolist()) == set(range(4))


@pytest.mark.parametrize("distance,p", [("euclidean", 2.0), ("euclidean", 1.0),
                                        ("euclidean", 3.0), ("cosine", 2.0)])
def test_pairwise_distances_exact_symmetry_and_values(distance, p):
  # A large common offset makes the matmul form's rounding visible.
  x = _random_segments(5, 1, 37, 33)[0] + np.float32(20.0)
  d = np.asarray(jax.jit(kmedoids.pairwise_distances, static_argnums=(1, 2))(
      x, distance, p))
  assert d.dtype == np.float32
  np.testing.assert_array_equal(d, d.T)
  np.testing.assert_array_equal(np.diag(d), np.zeros(37, np.float32))
  expected = ref.distances(x, distance, p)
  atol = 2e-3 if (distance, p) == ("euclidean", 2.0) else 1e-5
  np.testing.assert_allclose(d, expected, rtol=1e-5, atol=atol)


def test_minkowski_chunks_cover_the_width(monkeypatch):
  """The width is scanned in chunks; a ragged last chunk must count exactly once."""
  monkeypatch.setattr(kmedoids, "_MINKOWSKI_CHUNK_ELEMS", 10 * 10 * 3)
  x = _random_segments(6, 1, 10, 7)[0]
  d = np.asarray(kmedoids.pairwise_distances(x, "euclidean", 1.0))
  np.testing.assert_allclose(d, ref.distances(x, "euclidean", 1.0), rtol=1e-5)


def _max_intermediate_size(jaxpr):
  size = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      size = max(size, int(np.prod(v.aval.shape)) if v.aval.shape else 1)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      size = max(size, _max_intermediate_size(sub))
  return size


def test_memory_is_quadratic_not_cubic():
  m, w, k = 40, 8, 20
  jaxpr = jax.make_jaxpr(lambda x: kmedoids.kmedoids_pp(x, k))(jnp.zeros((m, w)))
  assert _max_intermediate_size(jaxpr.jaxpr) <= m * m


SPECTRAL_CASES = [
    # (m, w, k, d, kwargs, scale)
    (30, 16, 5, 3, {}, 0.5),
    (48, 8, 8, 2, dict(graph="KNN"), 0.5),  # adaptive k = 5 * d = 10
    (48, 8, 8, 2, dict(graph="KNN", knn_k=7, distance="cosine", sigma=1.0), 0.5),
    (40, 8, 6, 2, dict(p=1.0), 0.5),
]


@pytest.mark.parametrize("m,w,k,d,kw,scale", SPECTRAL_CASES)
def test_spectral_matches_reference(m, w, k, d, kw, scale):
  xs = _random_segments(m + k, 6, m, w, "gauss", scale)
  out = _batched_spectral(k, segment_frames=d, **kw)(xs)
  # With p != 2 every eigenvector matters, not only the spanned subspace.
  need_each = kw.get("p", 2.0) != 2.0

  def eig_ok(gaps):
    boundary, within = gaps
    return boundary >= MIN_EIG_GAP and (not need_each or within >= MIN_EIG_GAP)

  _compare(xs, out, lambda x: ref.spectral(x, k, segment_frames=d, **kw),
           min_compared=3, eig_check=eig_ok)


@pytest.mark.parametrize("graph,knn_k", [("HeatKernel", 1), ("KNN", 1), ("KNN", 6)])
def test_affinity_matches_reference(graph, knn_k):
  x = _random_segments(9, 1, 24, 6, scale=0.6)[0]
  a = np.asarray(spectral.affinity(x, segment_frames=2, graph=graph, knn_k=knn_k))
  expected = ref.affinity(x, segment_frames=2, graph=graph, knn_k=knn_k)
  np.testing.assert_array_equal(a > 0, expected > 0)  # the same k-NN graph
  np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(a, a.T)


def test_adaptive_knn_k():
  assert spectral.adaptive_knn_k(1, 3, 49) == 15
  assert spectral.adaptive_knn_k(4, 3, 196) == 20
  assert spectral.adaptive_knn_k(5, 3, 49) == 5
  assert spectral.adaptive_knn_k(9, 2, 196) == 9


def test_spectral_static_frames_run_and_give_distinct_medoids():
  """Identical tokens make eigenvalues degenerate; the result must stay well formed."""
  # 6 segments of 2 identical frames x 24 tokens: the batch shape of SPECTRAL_CASES[1].
  segs = np.stack([_static_frames_integer(s, 2, 24, 8, -2, 3) * np.float32(0.3)
                   for s in range(6)])
  assignment, medoids = map(np.asarray, _batched_spectral(
      8, segment_frames=2, graph="KNN")(segs))
  for a, med in zip(assignment, medoids):
    assert len(set(med.tolist())) == 8
    assert np.all(np.diff(med) > 0)
    np.testing.assert_array_equal(a[med], np.arange(8))


def test_jit_equals_no_jit():
  """Eager execution (Python loops) gives what the compiled loops give."""
  xs = _random_segments(11, 8, 12, 8)  # the shape of KMEDOIDS_CASES[0]: cached
  jitted = _batched_kmedoids(2)(xs)
  for i in range(2):
    with jax.disable_jit():
      eager = kmedoids.kmedoids_pp(xs[i], 2)
    for a, b in zip(jitted, eager):
      np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))


def test_vmap_equals_loop():
  # Batch shapes of KMEDOIDS_CASES[1] and SPECTRAL_CASES[0]: compiled already.
  xs8 = _random_segments(12, 8, 30, 16, "blobs")
  cases = [(xs8, _batched_kmedoids(5), functools.partial(kmedoids.kmedoids_pp, k=5)),
           (xs8[:6] * np.float32(0.3), _batched_spectral(5, segment_frames=3),
            functools.partial(spectral.spectral_cluster, k=5, segment_frames=3))]
  for xs, batched_fn, fn in cases:
    batched = batched_fn(xs)
    single = jax.jit(fn)
    for i in range(len(xs)):
      one = single(xs[i])
      np.testing.assert_array_equal(np.asarray(batched[0][i]), np.asarray(one[0]))
      np.testing.assert_array_equal(np.asarray(batched[1][i]), np.asarray(one[1]))


def test_bfloat16_input_gives_float32_medoids():
  x32 = jnp.asarray(_random_segments(13, 8, 30, 16)).astype(jnp.bfloat16).astype(
      jnp.float32)
  fn = _batched_kmedoids(5)
  a16, m16 = fn(x32.astype(jnp.bfloat16))
  a32, m32 = fn(x32)
  np.testing.assert_array_equal(np.asarray(m16), np.asarray(m32))
  np.testing.assert_array_equal(np.asarray(a16), np.asarray(a32))


def test_bad_arguments_raise_clear_errors():
  x = jnp.zeros((6, 3))
  with pytest.raises(ValueError, match="k=7"):
    kmedoids.kmedoids_pp(x, 7)
  with pytest.raises(ValueError, match="distance='manhattan'"):
    kmedoids.kmedoids_pp(x, 2, distance="manhattan")
  with pytest.raises(ValueError, match="minkowski_norm_p"):
    kmedoids.kmedoids_pp(x, 2, p=0.0)
  with pytest.raises(ValueError, match=r"\[M, W\]"):
    kmedoids.kmedoids_pp(jnp.zeros((2, 6, 3)), 2)
  with pytest.raises(ValueError, match="spectral_graph"):
    spectral.spectral_cluster(x, 2, segment_frames=2, graph="knn")
  with pytest.raises(ValueError, match="segment_frames"):
    spectral.spectral_cluster(x, 2, segment_frames=4)
