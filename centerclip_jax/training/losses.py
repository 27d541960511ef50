"""Contrastive losses for text-video retrieval.

The loss is written on the *global* batch: under `jax.jit` over a device mesh with the
batch sharded on the `batch` axis, XLA inserts the all-gathers, so the score matrix has
every video of every device as a negative (the all-device loss of CLIP4Clip's
`AllGather` + `CrossEn`), with no per-device code.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked scores: exp(_MASKED - max) is exactly 0 in float32,
# and, unlike -inf, it can never produce inf - inf = NaN in the softmax or its gradient.
_MASKED = -1e9


def similarity_logits(video_emb, text_emb, logit_scale):
  """Scaled cosine scores, text to video.

  Args:
    video_emb: [batch, dim] L2-normalised video embeddings (any float dtype).
    text_emb: [batch, dim] L2-normalised text embeddings.
    logit_scale: scalar, the *log* of the temperature multiplier (CLIP's `logit_scale`
      parameter); the score is `exp(logit_scale) * <t, v>`.

  Returns:
    [batch_text, batch_video] float32 scores; row i is caption i against every video.
  """
  video = jnp.asarray(video_emb).astype(jnp.float32)
  text = jnp.asarray(text_emb).astype(jnp.float32)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  return scale * jnp.einsum("td,vd->tv", text, video, precision=jax.lax.Precision.HIGHEST)


def _diag_cross_entropy(logits, valid):
  """Mean over valid rows of -log softmax(logits)[i, i]; logits [n, n] float32."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.diagonal(logp)
  if valid is None:
    return jnp.mean(nll)
  nll = jnp.where(valid, nll, 0.0)
  return jnp.sum(nll) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def symmetric_infonce(video_emb, text_emb, logit_scale, valid: Optional[jax.Array] = None):
  """Symmetric InfoNCE (CLIP4Clip's `CrossEn` on the score matrix and on its transpose).

  loss = (CE_text->video + CE_video->text) / 2, each the mean over the batch of
  -log softmax(scores)[i, i], with scores = exp(logit_scale) * text @ video.T.

  Args:
    video_emb: [batch, dim] L2-normalised video embeddings (float32 or bfloat16; the
      math is float32).
    text_emb: [batch, dim] L2-normalised text embeddings; row i pairs with video i.
    logit_scale: scalar log temperature (the raw CLIP parameter).
    valid: optional bool [batch]; False marks padded rows. A padded pair is neither an
      anchor (left out of the mean) nor a negative (its column/row is masked out).

  Returns:
    Scalar float32 loss.
  """
  video_emb = jnp.asarray(video_emb)
  text_emb = jnp.asarray(text_emb)
  if video_emb.ndim != 2 or text_emb.ndim != 2:
    raise ValueError(
        f"symmetric_infonce: video_emb and text_emb must be [batch, dim]; got "
        f"{video_emb.shape} and {text_emb.shape}")
  if video_emb.shape != text_emb.shape:
    raise ValueError(
        f"symmetric_infonce: video_emb {video_emb.shape} and text_emb {text_emb.shape} must "
        "have the same [batch, dim] (row i of each is one positive pair)")
  if jnp.ndim(logit_scale) != 0:
    raise ValueError(f"symmetric_infonce: logit_scale must be a scalar, got shape "
                     f"{jnp.shape(logit_scale)}")
  logits = similarity_logits(video_emb, text_emb, logit_scale)
  if valid is not None:
    valid = jnp.asarray(valid)
    if valid.shape != (video_emb.shape[0],):
      raise ValueError(f"symmetric_infonce: valid must be bool [{video_emb.shape[0]}], got "
                       f"shape {valid.shape}")
    valid = valid.astype(bool)
    pair_ok = valid[:, None] & valid[None, :]
    logits = jnp.where(pair_ok, logits, _MASKED)
  t2v = _diag_cross_entropy(logits, valid)
  v2t = _diag_cross_entropy(logits.T, valid)
  return 0.5 * (t2v + v2t)
