"""plan_steps, ClusterSettings and cluster_step against the NumPy reference."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax.clustering import ClusterSettings
from centerclip_jax.clustering import ClusterStep
from centerclip_jax.clustering import cluster_step
from centerclip_jax.clustering import plan_steps
from centerclip_jax.clustering import baselines
from tests import clustering_reference as ref

MIN_GAP = 1e-5  # as in test_clustering: skip inputs with float32-sized near-ties

_jit_step = jax.jit(cluster_step, static_argnames=("step", "settings", "train"))

# --- plan_steps ---------------------------------------------------------------


def test_plan_b6_4_49():
  steps = plan_steps(12, [12] * 6 + [4] * 6, [49] * 12, 12, 49)
  assert steps == (ClusterStep(block=6, frames_before=12, frames_after=4, k=49),)
  assert steps[0].segment_frames == 3


def test_plan_multi_step_and_token_only_steps():
  steps = plan_steps(12, [12] * 4 + [6] * 4 + [3] * 4, [49] * 12, 12, 49)
  assert steps == (ClusterStep(4, 12, 6, 49), ClusterStep(8, 6, 3, 49))
  # Fewer tokens at the same frame count: a step with d = 1.
  steps = plan_steps(12, [12] * 12, [49] * 6 + [25] * 6, 12, 49)
  assert steps == (ClusterStep(6, 12, 12, 25),)
  # k = 1 disables clustering; equal k and frames never cluster.
  assert plan_steps(12, [12] * 12, [49] * 6 + [1] * 6, 12, 49) == ()
  assert plan_steps(12, [12] * 12, [30] * 12, 12, 49) == ()
  # Tokens per segment after a step are k: the second step's M is 20 * 2.
  steps = plan_steps(8, [8, 4, 2], [20, 20, 40], 3, 49)
  assert steps == (ClusterStep(1, 8, 4, 20), ClusterStep(2, 4, 2, 40))
  # NumPy ints (e.g. from a config array) are accepted and stored as Python ints.
  steps = plan_steps(np.int64(12), np.array([12] * 6 + [4] * 6), np.full(12, 49), 12,
                     np.int32(49))
  assert steps == (ClusterStep(6, 12, 4, 49),) and type(steps[0].k) is int


@pytest.mark.parametrize("args,match", [
    ((12, [12] * 11, [49] * 12, 12, 49), r"target_frames_blocks has 11 entries.*12"),
    ((12, [12] * 12, [49] * 13, 12, 49), r"cluster_num_blocks has 13 entries"),
    ((12, [12] * 6 + [5] * 6, [49] * 12, 12, 49),
     r"block 7 \(target_frames_blocks\[6\]\).*do not divide 12"),
    ((12, [12] * 6 + [4] * 6, [49] * 6 + [200] * 6, 12, 49),
     r"block 7 \(cluster_num_blocks\[6\]\) = 200.*M = 49 x 3 = 147"),
    ((12, [12] * 6 + [4] * 3 + [6] * 3, [49] * 12, 12, 49),
     r"block 10 .*increase from 4 to 6"),
    ((12, [12] * 6 + [0] * 6, [49] * 12, 12, 49),
     r"target_frames_blocks\[6\] \(block 7\) = 0"),
    ((12, [12] * 12, [49] * 3 + [-1] * 9, 12, 49),
     r"cluster_num_blocks\[3\] \(block 4\) = -1"),
    ((12, [12] * 6 + [4] * 6, [49] * 6 + [1] * 6, 12, 49),
     r"block 7 .*frames drop from 12 to 4.*cluster_num_blocks\[6\] = 1"),
    ((12, [12] * 12, [49.0] * 12, 12, 49), r"cluster_num_blocks\[0\]"),
    ((0, [12] * 12, [49] * 12, 12, 49), r"max_frames=0"),
])
def test_plan_invalid_configurations(args, match):
  with pytest.raises(ValueError, match=match):
    plan_steps(*args)


# --- ClusterSettings ----------------------------------------------------------


def test_settings_defaults_alias_and_hash():
  s = ClusterSettings(algo="kmediods++")
  assert s.algo == "kmedoids++"
  assert s == ClusterSettings() and hash(s) == hash(ClusterSettings())
  assert ClusterSettings(minkowski_norm_p=3) == ClusterSettings(minkowski_norm_p=3.0)
  assert ClusterSettings(algo="spectral", spectral_graph="KNN").spectral_graph == "KNN"


@pytest.mark.parametrize("field,value", [
    ("algo", "kmeans"), ("distance", "manhattan"), ("minkowski_norm_p", 0.0),
    ("minkowski_norm_p", float("inf")), ("iter_limit", -1), ("iter_limit", 2.5),
    ("threshold", -1.0), ("pre_norm", 1), ("aggregation", "max"),
    ("spectral_sigma", 0.0), ("spectral_graph", "knn"), ("spectral_knn_k", -2),
    ("svd_correct_sign", "yes"),
])
def test_settings_reject_bad_values(field, value):
  with pytest.raises(ValueError, match=rf"ClusterSettings\.{field}="):
    ClusterSettings(**{field: value})


def test_settings_reject_mean_for_baselines():
  with pytest.raises(ValueError, match="aggregation='mean' needs algo"):
    ClusterSettings(algo="pooling", aggregation="mean")


# --- cluster_step against the reference -----------------------------------------

B, F, FA, N, W, K = 2, 6, 2, 8, 8, 6  # d = 3, M = 24
STEP = ClusterStep(block=3, frames_before=F, frames_after=FA, k=K)
MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)


def _tokens(seed, b=B, f=F, n=N, w=W, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b * f, 1 + n, w)) * scale).astype(np.float32)


def _reference_inputs(ref_kwargs, frames_after=FA, k=K, **token_kwargs):
  """The first seed whose reference decisions are all far from ties."""
  for seed in range(40):
    x = _tokens(seed, **token_kwargs)
    mask = np.ones((x.shape[0] // token_kwargs.get("f", F), token_kwargs.get("f", F)),
                   np.int32)
    out = ref.cluster_step(x, mask, frames_after, k, **ref_kwargs)
    margins = out[3]
    if margins.rel_gap >= MIN_GAP and margins.eig_boundary >= 1e-3:
      return x, out
  raise AssertionError("no input far enough from ties; change the generator")


STEP_CASES = {
    "kmedoids": (ClusterSettings(), {}, {}),
    "kmedoids_mean_embedding": (ClusterSettings(aggregation="mean"),
                                dict(aggregation="mean"), dict(embedding=True)),
    "kmedoids_cosine_prenorm": (ClusterSettings(distance="cosine", pre_norm=True),
                                dict(kmedoids_kwargs=dict(distance="cosine",
                                                          pre_norm=True)), {}),
    "spectral_knn": (ClusterSettings(algo="spectral", spectral_graph="KNN"),
                     dict(algo="spectral", spectral_kwargs=dict(graph="KNN")),
                     dict(scale=0.4)),
    "pooling": (ClusterSettings(algo="pooling"), dict(algo="pooling"), {}),
    "sparse_sampling": (ClusterSettings(algo="sparse_sampling"),
                        dict(algo="sparse_sampling"), {}),
}


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_cluster_step_matches_reference(name):
  settings, ref_kwargs, extra = STEP_CASES[name]
  emb = None
  if extra.get("embedding"):
    emb = np.random.default_rng(99).normal(size=(K, W)).astype(np.float32)
    ref_kwargs = dict(ref_kwargs, cluster_embedding=emb)
  x, (r_out, _, _, _) = _reference_inputs(ref_kwargs, scale=extra.get("scale", 1.0))
  _, r_mask, _, _ = ref.cluster_step(x, MASK, FA, K, algo="pooling")
  out, mask = _jit_step(x, jnp.asarray(MASK), STEP, settings, cluster_embedding=emb)
  out = np.asarray(out)
  kept = N if settings.algo == "pooling" else K
  assert out.shape == (B * FA, 1 + kept, W) and out.dtype == np.float32
  assert mask.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(mask), r_mask)
  np.testing.assert_array_equal(np.asarray(mask), [[1, 0], [1, 1]])
  if settings.algo in ("kmedoids++", "spectral", "sparse_sampling") and emb is None \
      and settings.aggregation is None:
    # Centre tokens are input tokens, gathered exactly.
    np.testing.assert_array_equal(out[:, 1:], r_out[:, 1:].astype(np.float32))
  np.testing.assert_allclose(out, r_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ["kmedoids++", "sparse_sampling"])
def test_cluster_step_gradient_reaches_exactly_the_kept_tokens(algo):
  """The centres' VJP (a one-hot matmul, not a scatter): d sum(out * w) / dx is w at
  each kept token's input position, the mean's 1/d share at every CLS, zero elsewhere."""
  from centerclip_jax.clustering import segments  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(_tokens(3))
  mask = jnp.ones((B, F), bool)
  settings = ClusterSettings(algo=algo)
  w = np.random.default_rng(4).normal(size=(B * FA, 1 + K, W)).astype(np.float32)

  def loss(x):
    out, _, info = segments.cluster_step_with_info(x, mask, STEP, settings,
                                                   rng=jax.random.PRNGKey(0))
    return jnp.sum(out * w), info["kept"]

  grad, kept = jax.jit(jax.grad(loss, has_aux=True))(x)
  d = F // FA
  want = np.zeros((B * F, 1 + N, W), np.float32)
  for s in range(B * FA):
    for f in range(d):
      want[s * d + f, 0] = w[s, 0] / d
    for j, point in enumerate(np.asarray(kept)[s]):  # points are frame-major
      want[s * d + point // N, 1 + point % N] = w[s, 1 + j]
  np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=1e-7)


def test_cluster_step_vit_b32_b6_4_49():
  """The paper's setting at a small width: 12 frames x 49 patches -> 4 x 49."""
  (step,) = plan_steps(12, [12] * 6 + [4] * 6, [49] * 12, 12, 49)
  x, (r_out, _, r_medoids, _) = _reference_inputs({}, frames_after=4, k=49, b=1,
                                                  f=12, n=49, w=16)
  mask = jnp.ones((1, 12), bool)
  out, mask_out = _jit_step(x, mask, step, ClusterSettings())
  assert out.shape == (4, 50, 16) and mask_out.shape == (1, 4)
  assert mask_out.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(out)[:, 1:], r_out[:, 1:].astype(np.float32))
  np.testing.assert_allclose(np.asarray(out), r_out, rtol=1e-6, atol=1e-6)


def test_two_steps_12_6_3():
  steps = plan_steps(12, [12] * 2 + [6] * 2 + [3] * 2, [8] * 6, 6, 8)
  assert [(s.frames_before, s.frames_after, s.k) for s in steps] == [(12, 6, 8),
                                                                     (6, 3, 8)]
  mask = np.array([[1] * 10 + [0] * 2], np.int32)
  for seed in range(20):  # inputs whose decisions are far from ties at both steps
    x = _tokens(seed, b=1, f=12, n=8, w=8)
    r_out, r_m, gaps = x, mask, []
    for step in steps:
      r_out, r_m, _, margins = ref.cluster_step(r_out, r_m, step.frames_after, step.k)
      gaps.append(margins.rel_gap)
    if min(gaps) >= MIN_GAP:
      break
  else:
    raise AssertionError("no input far enough from ties")
  out, m = x, mask
  for step in steps:
    out, m = _jit_step(out, jnp.asarray(m), step, ClusterSettings())
  assert out.shape == (3, 9, 8)
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(m), r_m)
  np.testing.assert_allclose(np.asarray(out), r_out, rtol=1e-6, atol=1e-6)


# --- sparse sampling ------------------------------------------------------------


def test_sparse_sampling_eval_indices():
  idx = baselines.sparse_sampling_indices
  np.testing.assert_array_equal(idx(1, 24, 6)[0], [2, 6, 10, 14, 18, 22])
  np.testing.assert_array_equal(idx(1, 10, 4)[0], [1, 3, 6, 8])  # stride 2.5
  np.testing.assert_array_equal(idx(2, 147, 49), np.tile(1 + 3 * np.arange(49), (2, 1)))


def _token_ids(x_out_ids, b, frames_after, d, n):
  """Decode segment-local point indices from tokens that carry `row*1000 + token`."""
  ids = np.asarray(x_out_ids).astype(np.int64)
  rows, tok = ids // 1000, ids % 1000
  seg_first_row = (np.arange(b * frames_after) * d)[:, None]
  return (rows - seg_first_row) * n + (tok - 1)


def test_sparse_sampling_train_one_token_per_stride():
  x = np.zeros((B * F, 1 + N, W), np.float32)
  x[:, :, 0] = np.arange(B * F)[:, None] * 1000 + np.arange(1 + N)[None, :]
  settings = ClusterSettings(algo="sparse_sampling")
  picked = []
  for seed in range(3):
    out, _ = _jit_step(x, jnp.asarray(MASK), STEP, settings, train=True,
                       rng=jax.random.PRNGKey(seed))
    local = _token_ids(np.asarray(out)[:, 1:, 0], B, FA, F // FA, N)
    stride = (N * F // FA) // K
    lo = np.arange(K) * stride
    assert np.all(local >= lo) and np.all(local < lo + stride)
    picked.append(local)
  assert not np.array_equal(picked[0], picked[1])
  again, _ = _jit_step(x, jnp.asarray(MASK), STEP, settings, train=True,
                       rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(
      _token_ids(np.asarray(again)[:, 1:, 0], B, FA, F // FA, N), picked[0])


# --- gradients, dtypes, errors ----------------------------------------------------


@pytest.mark.parametrize("algo", ["kmedoids++", "spectral"])
def test_gradients_flow_into_kept_tokens_and_cls_only(algo):
  settings = ClusterSettings(algo=algo)
  wts = np.random.default_rng(4).normal(size=(B * FA, 1 + K, W)).astype(np.float32)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(_jit_step(x, jnp.asarray(MASK), STEP, settings)[0] * wts)))
  out_fn = lambda x: np.asarray(_jit_step(x, jnp.asarray(MASK), STEP, settings)[0])
  d = F // FA
  # Distinct random tokens, then static frames (every token d times: identical tokens,
  # degenerate eigenvalues) where no NaN may leak through the clustering.
  for static in (False, True):
    x = _tokens(3, f=1).repeat(F, axis=0) if static else _tokens(3)
    x = x * np.float32(0.4)
    _, g = grad_fn(jnp.asarray(x))
    g, out = np.asarray(g), out_fn(jnp.asarray(x))
    assert np.all(np.isfinite(g))
    for s in range(B * FA):
      np.testing.assert_allclose(g[s * d:(s + 1) * d, 0],
                                 np.tile(wts[s, 0] / d, (d, 1)), rtol=1e-6)
      points = x[s * d:(s + 1) * d, 1:].reshape(d * N, W)
      gp = g[s * d:(s + 1) * d, 1:].reshape(d * N, W)
      nonzero = np.any(gp != 0, axis=-1)
      assert nonzero.sum() == K  # K distinct kept tokens, the rest exactly zero
      np.testing.assert_allclose(gp.sum(0), wts[s, 1:].sum(0), rtol=1e-5, atol=1e-6)
      if not static:  # locate each centre token among the points by value
        idx = [int(np.flatnonzero(np.all(points == c, -1))[0]) for c in out[s, 1:]]
        assert sorted(idx) == idx and set(idx) == set(np.flatnonzero(nonzero))
        np.testing.assert_allclose(gp[idx], wts[s, 1:], rtol=1e-6)


def test_bfloat16_tokens_give_the_float32_medoids():
  x32 = _tokens(8).astype(jnp.bfloat16).astype(np.float32)
  x16 = jnp.asarray(x32).astype(jnp.bfloat16)
  mask = jnp.asarray(MASK).astype(bool)
  out16, m16 = _jit_step(x16, mask, STEP, ClusterSettings())
  out32, _ = _jit_step(jnp.asarray(x32), mask, STEP, ClusterSettings())
  assert out16.dtype == jnp.bfloat16 and m16.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(out16[:, 1:]),
                                np.asarray(out32[:, 1:].astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(out16[:, 0]),
                                np.asarray(out32[:, 0].astype(jnp.bfloat16)))


def test_cluster_step_bad_inputs_raise_clear_errors():
  x = jnp.zeros((B * F, 1 + N, W))
  mask = jnp.ones((B, F))
  s = ClusterSettings()
  with pytest.raises(ValueError, match="frame_mask must be"):
    cluster_step(x, jnp.ones((B, F - 1)), STEP, s)
  with pytest.raises(ValueError, match="expected B x frames_before"):
    cluster_step(x[:-1], mask, STEP, s)
  with pytest.raises(ValueError, match=r"k=30 clusters .* M = 8 x 3 = 24"):
    cluster_step(x, mask, ClusterStep(3, F, FA, 30), s)
  with pytest.raises(ValueError, match=r"cluster_embedding must be \[K=6, W=8\]"):
    cluster_step(x, mask, STEP, s, cluster_embedding=jnp.zeros((K, W + 1)))
  with pytest.raises(ValueError, match="pooling"):
    cluster_step(x, mask, STEP, ClusterSettings(algo="pooling"),
                 cluster_embedding=jnp.zeros((K, W)))
  with pytest.raises(ValueError, match="rng"):
    cluster_step(x, mask, STEP, ClusterSettings(algo="sparse_sampling"), train=True)
  with pytest.raises(ValueError, match="frames_after=4 must divide"):
    ClusterStep(0, 6, 4, 3)
