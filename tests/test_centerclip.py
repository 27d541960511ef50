"""The CenterCLIP model: clustering inside the ViT, heads, params from CLIP weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax import config as config_lib
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.models import layers

TINY = clip_lib.CLIPConfig(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64,
                           vision_patch_size=8, context_length=16, vocab_size=100,
                           transformer_width=64, transformer_heads=2, transformer_layers=2)


@pytest.fixture(scope="module")
def clip_params():
  return clip_lib.init_params(TINY, jax.random.PRNGKey(3))


def tiny_model(**overrides):
  m = config_lib.model_config(max_frames=6, num_blocks=4, tokens_per_frame=16)
  m.max_words = 8
  m.seq_transformer_layers = 2
  m.target_frames_blocks = (6, 6, 2, 2)
  m.cluster_num_blocks = (16, 16, 5, 5)
  for k, v in overrides.items():
    m[k] = v
  return centerclip.build_model(m, TINY)


def inputs(batch=2, frames=6, res=32, seed=0):
  rng = np.random.default_rng(seed)
  f = jnp.asarray(rng.integers(0, 256, (batch, frames, res, res, 3), np.uint8))
  mask = jnp.ones((batch, frames), bool)
  text = jnp.asarray(rng.integers(1, 90, (batch, 8)), jnp.int32).at[:, 5].set(99)
  return f, mask, text


def test_plan_and_segment_shapes():
  model = tiny_model()
  assert [(s.block, s.frames_before, s.frames_after, s.k) for s in model.steps] == [(2, 6, 2, 5)]
  params = centerclip.init_params(model, jax.random.PRNGKey(0))
  f, mask, _ = inputs()
  feats, seg_mask = model.apply({"params": params}, f, mask, method=model.segment_features)
  assert feats.shape == (2, 2, 64) and seg_mask.shape == (2, 2)


def test_no_clustering_equals_clip_frame_features_mean(clip_params):
  """cluster_inter=0 is CLIP4Clip meanP: mean of normalised per-frame CLIP features."""
  model = tiny_model(cluster_inter=0)
  params = centerclip.init_params(model, jax.random.PRNGKey(1), clip_params)
  f, mask, text = inputs()
  mask = mask.at[1, 4:].set(False)
  video = model.apply({"params": params}, f, mask, method=model.encode_video)
  clip_model = clip_lib.CLIP(TINY)
  frame_feats = np.asarray(clip_model.apply({"params": params["clip"]},
                                            clip_lib.normalize_pixels(f),
                                            method=clip_model.encode_image), np.float64)
  frame_feats /= np.linalg.norm(frame_feats, axis=-1, keepdims=True)
  m = np.asarray(mask, np.float64)[..., None]
  expected = (frame_feats * m).sum(1) / m.sum(1)
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(video), expected, atol=1e-5)
  txt = model.apply({"params": params}, text, method=model.encode_text)
  ref = np.asarray(clip_model.apply({"params": params["clip"]}, text, method=clip_model.encode_text))
  np.testing.assert_allclose(np.asarray(txt), ref / np.linalg.norm(ref, axis=-1, keepdims=True),
                             atol=1e-5)


def test_normalize_pixels_is_clip_mean_std_of_uint8():
  """Every uint8 level of every channel -> (x / 255 - mean) / std within 1e-6."""
  levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
  got = np.asarray(clip_lib.normalize_pixels(jnp.asarray(levels)))
  expected = (levels / 255.0 - np.asarray(clip_lib.CLIP_MEAN)) / np.asarray(clip_lib.CLIP_STD)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  assert got[0, 0] < -1.79 and got[255, 2] > 2.14  # not the identity, not [0, 1]


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_video_path_refuses_frames_that_are_not_uint8(dtype):
  """One clear error at trace time instead of normalising normalised frames again."""
  model = tiny_model()
  f, mask, _ = inputs()
  params = jax.eval_shape(lambda: centerclip.init_params(model, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match=r"frames must be uint8 pixels.*got "
                     + np.dtype(dtype).name):
    jax.eval_shape(lambda p: model.apply({"params": p}, f.astype(dtype), mask,
                                         method=model.encode_video), params)


def test_text_tower_runs_its_last_block_on_the_eot_row_only(clip_params):
  """encode_text (last block and ln_final on the EOT row) == every row through every
  block, then the EOT row; values and gradients."""
  model = clip_lib.CLIP(TINY)
  rng = np.random.default_rng(5)
  text = rng.integers(1, 90, (4, 10)).astype(np.int32)
  for row, eot in enumerate((0, 3, 7, 9)):  # EOT (largest id) first, inside, last
    text[row, eot] = 99
  text = jnp.asarray(text)

  def full_rows(m, t):
    n = t.shape[-1]
    x = m.token_embedding(t) + m.positional_embedding[:n]
    x = m.ln_final(m.transformer(x, layers.causal_mask(n)))
    return x[jnp.arange(t.shape[0]), jnp.argmax(t, axis=-1)] @ m.text_projection

  def loss(p, method):
    out = model.apply({"params": p}, text, method=method)
    return jnp.sum(jnp.sin(3.0 * out)), out

  (l_eot, eot_out), g_eot = jax.value_and_grad(loss, has_aux=True)(clip_params,
                                                                   model.encode_text)
  (l_all, all_out), g_all = jax.value_and_grad(loss, has_aux=True)(clip_params, full_rows)
  np.testing.assert_allclose(eot_out, all_out, rtol=0, atol=1e-6)
  assert np.abs(np.asarray(all_out)).max() > 0.1  # not trivially zero
  flat_eot, flat_all = (jax.tree_util.tree_leaves(g) for g in (g_eot, g_all))
  scale = max(float(np.abs(np.asarray(b)).max()) for b in flat_all)  # about 200 here
  for a, b in zip(flat_eot, flat_all):  # float32 rounding (measured up to 2.6e-6 * scale)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)
  last = g_all["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"]
  assert np.abs(np.asarray(last)).max() > 1e-3  # the last block gets a real gradient


def test_clustering_changes_the_embedding(clip_params):
  """Clustering drops tokens, so the embedding differs from the unclustered one."""
  with_c = tiny_model()
  without = tiny_model(cluster_inter=0)
  params = centerclip.init_params(with_c, jax.random.PRNGKey(2), clip_params)
  f, mask, _ = inputs()
  a = with_c.apply({"params": params}, f, mask, method=with_c.encode_video)
  b = without.apply({"params": params}, f, mask, method=without.encode_video)
  assert np.all(np.isfinite(a))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=-1), 1.0, atol=1e-5)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3


@pytest.mark.parametrize("overrides", [
    {"cluster_embedding": True, "sim_header": "seqTransf", "aggregation": "mean"},
    {"cluster_algo": "spectral"},
    {"cluster_algo": "pooling"},
    {"cluster_algo": "sparse_sampling"},
])
def test_variants_run_and_train(overrides, clip_params):
  model = tiny_model(**overrides)
  params = centerclip.init_params(model, jax.random.PRNGKey(3), clip_params)
  f, mask, text = inputs()

  def loss(p):
    v, t, s = model.apply({"params": p}, f, mask, text, train=True,
                          rngs={"cluster": jax.random.PRNGKey(0)})
    return -jnp.sum(v * t) * jnp.exp(s)

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert np.abs(grads["clip"]["visual"]["conv1"]["kernel"]).max() > 0
  if overrides.get("cluster_embedding"):
    assert np.abs(grads["cluster_embedding_0"]).max() > 0


def test_new_modules_initialised_from_clip(clip_params):
  model = tiny_model(cluster_embedding=True, sim_header="seqTransf")
  params = centerclip.init_params(model, jax.random.PRNGKey(5), clip_params)
  np.testing.assert_array_equal(params["cluster_embedding_0"],
                                clip_params["visual"]["positional_embedding"][1:6])
  np.testing.assert_array_equal(params["seq_transformer"]["frame_position_embeddings"],
                                clip_params["positional_embedding"][:6])
  np.testing.assert_array_equal(
      params["seq_transformer"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"],
      clip_params["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"])


def test_wrong_params_rejected_with_names(clip_params):
  model = tiny_model()
  broken = {k: v for k, v in clip_params.items() if k != "ln_final"}
  with pytest.raises(ValueError, match="ln_final"):
    centerclip.init_params(model, jax.random.PRNGKey(0), broken)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vit_b32_video_tower_with_clustering(dtype):
  """The whole video tower at ViT-B/32 shapes with `B6 - 4, 49` k-medoids++."""
  m = config_lib.model_config()
  m.dtype = dtype
  model = centerclip.build_model(m, clip_lib.get_preset("ViT-B/32"))
  assert [(s.block, s.frames_before, s.frames_after, s.k) for s in model.steps] == [(6, 12, 4, 49)]
  params = jax.eval_shape(lambda: centerclip.init_params(model, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.02, s.dtype), params)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.01 * jax.random.normal(
          jax.random.PRNGKey(hash(jax.tree_util.keystr(path)) % 2**31), p.shape), params)
  frames = jax.random.randint(jax.random.PRNGKey(1), (1, 12, 224, 224, 3), 0, 256
                              ).astype(jnp.uint8)
  mask = jnp.ones((1, 12), bool)
  feats, seg_mask = jax.jit(lambda p, f, m_: model.apply({"params": p}, f, m_,
                                                      method=model.segment_features))(
                                                          params, frames, mask)
  assert feats.shape == (1, 4, 512) and seg_mask.shape == (1, 4)
  assert np.all(np.isfinite(np.asarray(feats)))


@pytest.mark.parametrize("overrides", [{"cluster_inter": 0}, {"cluster_algo": "kmedoids++"}])
def test_remat_gives_the_same_loss_and_gradients(overrides, clip_params):
  """`model.remat` (every residual block of both towers) recomputes the blocks in the
  backward pass: the same value and gradients, and the lowered program keeps each block's
  recomputation apart behind an optimization barrier (one per block: 4 vision + 2 text).
  XLA:CPU drops those barriers and CSE merges the recomputation back, so the memory saving
  shows on TPU/GPU only (README, "Speed and memory")."""
  f, mask, text = inputs()
  out = {}
  for remat in (False, True):
    model = tiny_model(remat=remat, **overrides)
    params = centerclip.init_params(model, jax.random.PRNGKey(3), clip_params)

    def loss(p, model=model):
      v, t, s = model.apply({"params": p}, f, mask, text, train=True,
                            rngs={"cluster": jax.random.PRNGKey(0)})
      return -jnp.sum(v * t) * jnp.exp(s)

    step = jax.jit(jax.value_and_grad(loss))
    out[remat] = (step(params), step.lower(params).as_text().count("optimization_barrier"))
  (value, grads), barriers = out[False]
  (value_r, grads_r), barriers_r = out[True]
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-6)
  assert (barriers, barriers_r) == (0, TINY.vision_layers + TINY.transformer_layers)
