"""Tests for centerclip_jax.training.losses (symmetric InfoNCE) against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax.training import losses


def _normalised(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_ce_diag(logits):
  """Mean over rows of -log softmax(logits)[i, i], float64."""
  m = logits.max(axis=1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
  return float(np.mean(lse - np.diag(logits)))


def _np_loss(video, text, logit_scale):
  logits = np.exp(logit_scale) * text.astype(np.float64) @ video.astype(np.float64).T
  return 0.5 * (_np_ce_diag(logits) + _np_ce_diag(logits.T))


def test_matches_numpy():
  rng = np.random.default_rng(0)
  v, t = _normalised(rng, 7, 16), _normalised(rng, 7, 16)
  scale = np.log(1 / 0.07)
  got = losses.symmetric_infonce(jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32),
                                 jnp.float32(scale))
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), _np_loss(v, t, scale), rtol=1e-5, atol=1e-5)


def test_asymmetric_directions_both_count():
  # A non-square-symmetric score matrix: the two directions differ, the loss is their mean.
  rng = np.random.default_rng(1)
  v, t = _normalised(rng, 5, 4), _normalised(rng, 5, 4)
  logits = np.exp(2.0) * t @ v.T
  t2v, v2t = _np_ce_diag(logits), _np_ce_diag(logits.T)
  assert abs(t2v - v2t) > 1e-3
  got = float(losses.symmetric_infonce(jnp.asarray(v), jnp.asarray(t), 2.0))
  np.testing.assert_allclose(got, 0.5 * (t2v + v2t), rtol=1e-5)


def test_analytic_limits():
  # All embeddings equal: uniform softmax, loss = log(batch).
  e = np.ones((6, 3)) / np.sqrt(3)
  np.testing.assert_allclose(float(losses.symmetric_infonce(e, e, 3.0)), np.log(6), rtol=1e-6)
  # Orthonormal pairs, large scale: loss ~ 0.
  e = np.eye(4)
  assert float(losses.symmetric_infonce(e, e, np.log(100.0))) < 1e-6


def test_bfloat16_inputs_use_float32_math():
  rng = np.random.default_rng(2)
  v, t = _normalised(rng, 8, 32), _normalised(rng, 8, 32)
  vb, tb = jnp.asarray(v, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = losses.symmetric_infonce(vb, tb, jnp.float32(np.log(1 / 0.07)))
  assert got.dtype == jnp.float32
  want = _np_loss(np.asarray(vb, np.float32), np.asarray(tb, np.float32), np.log(1 / 0.07))
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_valid_mask_equals_unpadded_batch():
  rng = np.random.default_rng(3)
  v, t = _normalised(rng, 8, 16), _normalised(rng, 8, 16)
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  scale = 2.5
  got = losses.symmetric_infonce(v, t, scale, valid=valid)
  want = _np_loss(v[valid], t[valid], scale)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  # Without the mask the padded rows change the loss (the test above can fail).
  assert abs(float(losses.symmetric_infonce(v, t, scale)) - want) > 1e-3


def test_valid_mask_gradients_zero_on_padding_and_finite():
  rng = np.random.default_rng(4)
  v, t = _normalised(rng, 6, 8), _normalised(rng, 6, 8)
  valid = jnp.array([1, 0, 1, 1, 0, 1], bool)
  grad_fn = jax.jit(jax.grad(lambda v, t, s: losses.symmetric_infonce(v, t, s, valid),
                             argnums=(0, 1, 2)))
  gv, gt, gs = grad_fn(jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32), 3.0)
  for g in (gv, gt):
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~np.asarray(valid)], 0.0)
    assert np.abs(np.asarray(g)[np.asarray(valid)]).max() > 1e-4
  assert np.isfinite(gs)


def test_all_rows_padded_is_finite_zero():
  e = np.eye(3)
  got = losses.symmetric_infonce(e, e, 1.0, valid=np.zeros(3, bool))
  assert float(got) == 0.0


def test_bad_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match="same"):
    losses.symmetric_infonce(np.ones((4, 3)), np.ones((5, 3)), 1.0)
  with pytest.raises(ValueError, match=r"\[batch, dim\]"):
    losses.symmetric_infonce(np.ones((4,)), np.ones((4,)), 1.0)
  with pytest.raises(ValueError, match="valid"):
    losses.symmetric_infonce(np.ones((4, 3)), np.ones((4, 3)), 1.0, valid=np.ones(3, bool))
  with pytest.raises(ValueError, match="scalar"):
    losses.symmetric_infonce(np.ones((4, 3)), np.ones((4, 3)), np.ones(2))
