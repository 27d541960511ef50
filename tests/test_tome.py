"""ToMe bipartite soft matching (`clustering/tome.py`) against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax.clustering import tome
from tests import tome_reference as ref

_merge = jax.jit(tome.bipartite_merge, static_argnums=2)
_merge_to_k = jax.jit(tome.merge_to_k, static_argnums=2)


def _tokens(m, w, seed, groups=None):
  rng = np.random.default_rng(seed)
  if groups is None:
    return rng.normal(size=(m, w)).astype(np.float32)
  centres = rng.normal(size=(groups, w)) * 4
  return (centres[rng.integers(0, groups, m)] + 0.3 * rng.normal(size=(m, w))).astype(
      np.float32)


def test_merge_rounds():
  assert tome.merge_rounds(196, 49) == (98, 49)
  assert tome.merge_rounds(50, 49) == (1,)
  assert tome.merge_rounds(7, 1) == (3, 2, 1)
  assert tome.merge_rounds(5, 5) == ()
  with pytest.raises(ValueError, match="k=6"):
    tome.merge_rounds(5, 6)


@pytest.mark.parametrize("m,r,seed", [(8, 4, 0), (9, 3, 1), (49, 20, 2), (196, 98, 3)])
def test_one_round_matches_reference(m, r, seed):
  x = _tokens(m, 16, seed, groups=5)
  size = np.random.default_rng(seed).integers(1, 4, m).astype(np.float32)
  got = jax.device_get(_merge(jnp.asarray(x), jnp.asarray(size), r))
  want = ref.bipartite_merge(x, size, r)
  np.testing.assert_array_equal(got[2], want[2])
  np.testing.assert_allclose(got[1], want[1], rtol=0, atol=0)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,seed", [(196, 49, 0), (98, 49, 1), (32, 8, 2), (7, 1, 3)])
def test_merge_to_k_matches_reference(m, k, seed):
  x = _tokens(m, 24, seed, groups=k)
  got = jax.device_get(_merge_to_k(jnp.asarray(x), jnp.ones((m,), jnp.float32), k))
  want = ref.merge_to_k(x, np.ones(m), k)
  assert got[0].shape == (k, 24)
  np.testing.assert_array_equal(got[2], want[2])
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  # Destinations are consistent with the sizes: each output token's size is the number
  # of input patches merged into it.
  np.testing.assert_array_equal(np.bincount(got[2], minlength=k), got[1])


def test_weighted_mean_and_total_size_conserved():
  x = _tokens(64, 8, 4)
  size = np.random.default_rng(5).uniform(0.5, 3.0, 64).astype(np.float32)
  out, out_size, _ = jax.device_get(_merge_to_k(jnp.asarray(x), jnp.asarray(size), 10))
  np.testing.assert_allclose(out_size.sum(), size.sum(), rtol=1e-6)
  np.testing.assert_allclose((out_size[:, None] * out).sum(0) / out_size.sum(),
                             (size[:, None] * x).sum(0) / size.sum(), rtol=1e-5, atol=1e-6)


def test_duplicates_merge_first():
  # Token 0 (set A) duplicates token 5 (set B): the one merge of r=1 takes that pair.
  x = _tokens(8, 6, 6)
  x[0] = x[5]
  out, size, dest = jax.device_get(_merge(jnp.asarray(x), jnp.ones(8), 1))
  assert dest[0] == dest[5]
  assert size[dest[5]] == 2.0
  np.testing.assert_allclose(out[dest[5]], x[5], rtol=1e-6)


def test_jit_vmap_equal_and_gradients_finite():
  xs = jnp.asarray(np.stack([_tokens(50, 12, s, groups=6) for s in range(4)]))
  ones = jnp.ones(xs.shape[:2])
  fn = jax.vmap(lambda x, s: tome.merge_to_k(x, s, 9))
  eager = fn(xs, ones)
  jitted = jax.jit(fn)(xs, ones)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(fn(x, ones)[0])))(xs)
  assert np.all(np.isfinite(np.asarray(grad)))
  # Every input token receives gradient size/total-size of its merged token.
  g_lin = jax.grad(lambda x: jnp.sum(fn(x, ones)[0]))(xs)
  _, sizes, dest = jax.device_get(jitted)
  expected = 1.0 / np.take_along_axis(sizes, dest, axis=1)
  np.testing.assert_allclose(np.asarray(g_lin)[..., 0], expected, rtol=1e-6)


def test_size_bias_is_log():
  np.testing.assert_allclose(np.asarray(tome.size_bias(jnp.asarray([1.0, 2.0, 4.0]))),
                             np.log([1.0, 2.0, 4.0]), rtol=1e-7)
