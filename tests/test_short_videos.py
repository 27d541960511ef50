"""Short videos (1, 2, 3 decoded frames under a 12-frame `B - 4` plan) get finite embeddings.

The rule (`segments.segment_mask`, spec section 2.6): a segment's mask is its last frame's;
a video with a valid frame but no valid segment keeps its first segment valid. Where the
original rule (last frame only) gives a finite embedding, ours is identical to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from centerclip_jax import config as config_lib
from centerclip_jax.clustering import segments as segments_lib
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.training import trainer

# 2 blocks, 16 px, 4 px patches: N = 16. Block 2 clusters 12 frames -> 4 segments of d = 3.
TINY = clip_lib.CLIPConfig(embed_dim=64, image_resolution=16, vision_layers=2, vision_width=64,
                           vision_patch_size=4, context_length=16, vocab_size=100,
                           transformer_width=64, transformer_heads=1, transformer_layers=1)
ALGOS = ("kmedoids++", "spectral", "pooling", "sparse_sampling", "tome")
HEADS = ("meanP", "seqTransf")
VALID = (1, 2, 3)  # decoded frames of the batch's three videos


def original_segment_mask(frame_mask, frames_after):
  """The original's rule: a segment's mask is its last frame's."""
  b, f = frame_mask.shape
  return frame_mask.reshape(b, frames_after, f // frames_after)[:, :, -1]


def build(algo, head):
  m = config_lib.model_config(max_frames=12, num_blocks=2, tokens_per_frame=16)
  m.max_words = 8
  m.sim_header = head
  m.seq_transformer_layers = 1
  m.cluster_algo = algo
  m.target_frames_blocks = (12, 4)
  m.cluster_num_blocks = (16, 16 if algo == "pooling" else 5)
  return centerclip.build_model(m, TINY)


def short_batch(seed=0):
  """Three videos with 1, 2, 3 decoded frames: each pads by repeating its last frame."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (len(VALID), 12, 16, 16, 3), np.uint8)
  mask = np.zeros((len(VALID), 12), bool)
  for v, n in enumerate(VALID):
    frames[v, n:] = frames[v, n - 1]
    mask[v, :n] = True
  text = rng.integers(1, 90, (len(VALID), 8)).astype(np.int32)
  text[:, 5] = 99
  return jnp.asarray(frames), jnp.asarray(mask), jnp.asarray(text)


@pytest.fixture(scope="module")
def clip_params():
  return clip_lib.init_params(TINY, jax.random.PRNGKey(0))


def test_segment_mask_rule():
  mask = np.zeros((6, 12), bool)
  for v, n in enumerate((0, 1, 2, 3, 5, 12)):
    mask[v, :n] = True
  got = np.asarray(segments_lib.segment_mask(jnp.asarray(mask), 4))
  np.testing.assert_array_equal(got, [
      [0, 0, 0, 0],  # no frame at all (padding) stays invalid
      [1, 0, 0, 0], [1, 0, 0, 0],  # 1 or 2 frames: first segment kept
      [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])  # 3, 5, 12 frames: the original's rule
  # 0/1 float masks keep their dtype.
  got = segments_lib.segment_mask(jnp.asarray(mask, jnp.float32), 4)
  assert got.dtype == jnp.float32


def test_segment_mask_equals_original_wherever_a_segment_is_valid():
  rng = np.random.default_rng(1)
  for frames_after in (1, 2, 3, 4, 6, 12):
    mask = rng.random((200, 12)) < rng.random((200, 1))
    ours = np.asarray(segments_lib.segment_mask(jnp.asarray(mask), frames_after))
    orig = original_segment_mask(mask, frames_after)
    has = orig.any(axis=1)
    np.testing.assert_array_equal(ours[has], orig[has])
    rescued = ~has & mask.any(axis=1)
    assert np.all(ours[rescued].sum(axis=1) == 1) and np.all(ours[rescued, 0])
    assert not ours[~mask.any(axis=1)].any()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("algo", ALGOS)
def test_short_videos_finite_and_original_where_finite(algo, head, clip_params, monkeypatch):
  model = build(algo, head)
  params = centerclip.init_params(model, jax.random.PRNGKey(1), clip_params)
  frames, mask, _ = short_batch()

  def encode(p, f, m):
    video = model.apply({"params": p}, f, m, method=model.encode_video)
    feats, seg_mask = model.apply({"params": p}, f, m, method=model.segment_features)
    return video, feats, seg_mask

  video, feats, seg_mask = map(np.asarray, jax.jit(encode)(params, frames, mask))
  assert np.all(np.isfinite(video)), video
  np.testing.assert_array_equal(seg_mask, [[1, 0, 0, 0]] * 3)
  np.testing.assert_allclose(np.linalg.norm(video, axis=1), 1.0, atol=1e-5)
  if head == "meanP":  # one valid segment: the embedding is that segment's feature
    first = feats[:, 0] / np.linalg.norm(feats[:, 0], axis=1, keepdims=True)
    np.testing.assert_allclose(video, first, atol=1e-5)
  # The original rule: NaN for 1 and 2 frames, and exactly our embedding for 3.
  monkeypatch.setattr(segments_lib, "segment_mask", original_segment_mask)
  orig = np.asarray(jax.jit(lambda p, f, m: model.apply(
      {"params": p}, f, m, method=model.encode_video))(params, frames, mask))
  assert np.all(np.isnan(orig[:2])) and np.all(np.isfinite(orig[2]))
  np.testing.assert_array_equal(video[2], orig[2])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("algo", ALGOS)
def test_short_videos_train_step_is_finite(algo, head, clip_params):
  model = build(algo, head)
  params = centerclip.init_params(model, jax.random.PRNGKey(1), clip_params)
  frames, mask, text = short_batch(seed=2)
  tx = optax.adamw(1e-4)
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(3), "nonfinite": jnp.int32(0),
           "first_nonfinite": jnp.int32(0)}
  batch = {"frames": frames, "frame_mask": mask, "text": text}
  state, metrics = jax.jit(trainer.make_train_step(model, tx))(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  assert int(state["nonfinite"]) == 0  # the update was applied, not dropped
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state["params"]))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state["params"], params)
  assert changed["clip"]["visual"]["conv1"]["kernel"]
