"""ToMe inside the model: the merge step, proportional attention, the tome_r schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax import config as config_lib
from centerclip_jax.clustering import segments as segments_lib
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.models import layers
from tests import tome_reference as ref

TINY = clip_lib.CLIPConfig(embed_dim=32, image_resolution=16, vision_layers=3, vision_width=64,
                           vision_patch_size=4, context_length=16, vocab_size=100,
                           transformer_width=32, transformer_heads=2, transformer_layers=1)


def test_proportional_attention_equals_attention_over_duplicates():
  """A token of size s stands for s identical tokens: with log(s) on its logits, the
  block over the merged sequence equals the block over the unmerged one (float precision)."""
  block = layers.ResidualAttentionBlock(num_heads=4)
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1, 6, 32)).astype(np.float32)
  sizes = np.asarray([1, 3, 1, 2, 1, 4], np.float32)
  full = np.repeat(base, sizes.astype(int), axis=1)  # [1, 12, 32] with duplicates
  params = jax.jit(block.init)(jax.random.PRNGKey(1), jnp.asarray(full))
  apply = jax.jit(block.apply)
  out_full = np.asarray(apply(params, jnp.asarray(full)))
  bias = jnp.log(jnp.asarray(sizes))[None, None, None, :]
  out_merged = np.asarray(apply(params, jnp.asarray(base), bias))
  first = np.concatenate([[0], np.cumsum(sizes.astype(int))[:-1]])
  np.testing.assert_allclose(out_merged[0], out_full[0, first], rtol=1e-5, atol=1e-5)
  # Without the bias the merged block differs: the identity is not trivially true.
  plain = np.asarray(apply(params, jnp.asarray(base)))
  assert np.abs(plain[0] - out_full[0, first]).max() > 1e-3


def test_tome_step_matches_reference_per_segment():
  settings = segments_lib.ClusterSettings(algo="tome")
  step = segments_lib.ClusterStep(block=1, frames_before=4, frames_after=2, k=5)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2 * 4, 1 + 9, 16)).astype(np.float32)  # 2 videos, 4 frames, N=9
  mask = np.ones((2, 4), bool)
  out, _, info = jax.jit(lambda a, m: segments_lib.cluster_step_with_info(a, m, step, settings)
                         )(jnp.asarray(x), jnp.asarray(mask))
  out = np.asarray(out)
  xs = x.reshape(4, 2, 10, 16)  # segments of 2 frames
  for s in range(4):
    points = xs[s, :, 1:].reshape(18, 16)
    want, want_size, want_dest = ref.merge_to_k(points, np.ones(18), 5)
    np.testing.assert_allclose(out[s, 1:], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[s, 0], xs[s, :, 0].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(info["sizes"])[s], want_size)
    np.testing.assert_array_equal(np.asarray(info["assignment"])[s], want_dest)


def _model(tome_r=(), proportional=True):
  m = config_lib.model_config(max_frames=4, num_blocks=3, tokens_per_frame=16)
  m.max_words = 8
  m.cluster_algo = "tome"
  m.target_frames_blocks = (4, 2, 2)
  m.cluster_num_blocks = (16, 32, 32) if tome_r else (16, 12, 12)
  m.tome_r = tome_r
  m.tome_proportional_attention = proportional
  return centerclip.build_model(m, TINY)


def _inputs():
  rng = np.random.default_rng(3)
  frames = jnp.asarray(rng.integers(0, 256, (2, 4, 16, 16, 3), np.uint8))
  text = jnp.asarray(rng.integers(1, 90, (2, 8)).astype(np.int32))
  return frames, jnp.ones((2, 4), bool), text


@pytest.mark.parametrize("tome_r", [(), (0, 8, 6)])
def test_tome_model_finite_sizes_conserved_grads_finite(tome_r):
  # (jit == no-jit of the merge itself: tests/test_tome.py; the whole tower, or its
  # gradient, eagerly is minutes on 2 cores.)
  model = _model(tome_r)
  frames, mask, text = _inputs()
  params = centerclip.init_params(model, jax.random.PRNGKey(0))
  video = lambda p: model.apply({"params": p}, frames, mask, method=model.encode_video)
  jitted = np.asarray(jax.jit(video)(params))
  assert jitted.shape == (2, 32) and np.all(np.isfinite(jitted))
  _, inter = jax.jit(lambda p: model.apply({"params": p}, frames, mask,
                                           method=model.segment_features,
                                           mutable=["intermediates"]))(params)
  sizes = np.asarray(inter["intermediates"]["cluster_step_0"][0]["sizes"])
  np.testing.assert_array_equal(sizes.sum(-1), 2 * 16)  # every patch of the segment
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, frames, mask,
                                                          text)[0] ** 3)))(params)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_proportional_attention_switch_changes_the_output():
  frames, mask, _ = _inputs()
  on, off = _model(), _model(proportional=False)
  params = centerclip.init_params(on, jax.random.PRNGKey(0))
  a = np.asarray(jax.jit(lambda p: on.apply({"params": p}, frames, mask,
                                            method=on.encode_video))(params))
  b = np.asarray(jax.jit(lambda p: off.apply({"params": p}, frames, mask,
                                             method=off.encode_video))(params))
  assert np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("tome_r,message", [
    ((0, 20, 0), "at most 16"),
    ((3, 0, 0), "merging starts at the first clustering step"),
    ((0, 1), "one per ViT block"),
])
def test_tome_r_validated_naming_the_block(tome_r, message):
  with pytest.raises(ValueError, match=message) as e:
    _model(tome_r)
  assert str(e.value).startswith("config.model.tome_r")


def test_tome_r_needs_tome():
  m = config_lib.model_config(max_frames=4, num_blocks=3, tokens_per_frame=16)
  m.max_words = 8
  m.target_frames_blocks, m.cluster_num_blocks = (4, 2, 2), (16, 12, 12)
  m.tome_r = (0, 2, 2)
  with pytest.raises(ValueError, match="config.model.tome_r: needs cluster_algo='tome'"):
    centerclip.build_model(m, TINY)
