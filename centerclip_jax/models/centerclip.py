"""CenterCLIP: CLIP with token clustering between ViT blocks, for text-video retrieval.

Video path (`encode_video`): uint8 frames `[batch, frames, H, W, 3]` -> CLIP's pixel
normalisation (`clip.normalize_pixels`, here and nowhere else) -> the CLIP ViT's patch
embedding -> blocks, with a clustering step (`centerclip_jax.clustering.cluster_step`)
before each block that the plan selects, which shrinks `[batch*frames, 1+N, width]` to
`[batch*segments, 1+K, width]` -> `ln_post`/`proj` of every segment's CLS token ->
similarity head (`meanP`: normalise, masked mean over segments, normalise; `seqTransf`:
CLIP4Clip's temporal transformer with a residual first) -> `[batch, embed_dim]`.
Text path (`encode_text`): the CLIP text tower, L2-normalised.

The parameter tree is `{'clip': <CLIP tree>, 'cluster_embedding_<i>': [K, width] (optional),
'seq_transformer': {...} (seqTransf only)}`, so that pretrained CLIP weights sit under one
key (the optimiser's `coef_lr` group).
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from centerclip_jax.models import settings as settings_lib
from centerclip_jax.clustering import segments as segments_lib
from centerclip_jax.clustering import tome as tome_lib
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.models import layers

Dtype = Any


def masked_mean_pool(features, mask):
  """meanP: features [B, S, D], mask [B, S] -> [B, D] (each normalised, masked mean, normalised)."""
  features = clip_lib.l2_normalize(features.astype(jnp.float32))
  m = mask.astype(jnp.float32)[..., None]
  pooled = jnp.sum(features * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return clip_lib.l2_normalize(pooled)


class SeqTransformer(nn.Module):
  """CLIP4Clip's `seqTransf` head: frame position embeddings + transformer + residual.

  features [B, S, D], mask [B, S] -> [B, S, D]. Initialised from the CLIP text tower's
  positional embedding and first layers (`init_from_clip`).
  """

  layers: int
  heads: int
  max_frames: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, mask):
    width = features.shape[-1]
    pos = self.param("frame_position_embeddings", nn.initializers.normal(0.01),
                     (self.max_frames, width), jnp.float32)
    x = (features + pos[:features.shape[1]]).astype(self.dtype)
    attn_mask = jnp.where(mask[:, None, None, :].astype(bool), 0.0, -1e6).astype(jnp.float32)
    x = layers.Transformer(self.layers, self.heads, self.dtype, name="transformer")(x, attn_mask)
    return x.astype(jnp.float32) + features


class CenterCLIP(nn.Module):
  """Text-video retrieval model. See the module docstring."""

  clip_config: clip_lib.CLIPConfig
  max_frames: int
  steps: tuple[segments_lib.ClusterStep, ...] = ()
  settings: segments_lib.ClusterSettings = segments_lib.ClusterSettings()
  tome_r: tuple[int, ...] = ()  # per block, tokens merged per row (cluster_algo 'tome')
  cluster_embedding: bool = False
  sim_header: str = "meanP"
  seq_transformer_layers: int = 4
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    self.clip = clip_lib.CLIP(self.clip_config, self.dtype, self.remat)
    width = self.clip_config.vision_width
    if self.cluster_embedding:
      self.cluster_embeddings = [
          self.param(f"cluster_embedding_{i}", nn.initializers.normal(width ** -0.5),
                     (step.k, width), jnp.float32)
          for i, step in enumerate(self.steps)]
    if self.sim_header == "seqTransf":
      self.seq_transformer = SeqTransformer(
          self.seq_transformer_layers, self.clip_config.transformer_heads, self.max_frames,
          self.dtype)

  def segment_features(self, frames, frame_mask, train: bool = False):
    """frames uint8 [B, F, H, W, 3], frame_mask [B, F] -> ([B, S, D] float32, mask [B, S]).

    S is the number of segments after the last clustering step (F without clustering).
    This is the one walk over the ViT blocks. Before block `b` a token-reduction step may
    run (`_reduce`), which maps `(x, mask)` to fewer tokens and may return an additive
    attention bias for the blocks after it. With `mutable=['intermediates']` every step
    sows `cluster_step_<i>`: a dict with the step's input 'tokens' `[B*F_i, 1+N_i, W]`
    and 'frame_mask' `[B, F_i]`, and the step's info (`segments.cluster_step_with_info`:
    'kept', 'sizes', 'assignment'); without it, sowing costs nothing.
    """
    batch, num_frames = frames.shape[:2]
    if num_frames != self.max_frames:
      raise ValueError(f"expected {self.max_frames} frames per video, got {num_frames}")
    visual = self.clip.visual
    frames = clip_lib.normalize_pixels(frames)
    x = visual.embed(frames.reshape((batch * num_frames,) + frames.shape[2:]))
    mask, sizes = frame_mask, None
    for b in range(self.clip_config.vision_layers):
      x, mask, sizes = self._reduce(b, x, mask, sizes, train)
      x = visual.block(b, x, self._attention_bias(sizes))
    features = visual.head(x[:, 0])
    return features.reshape(batch, -1, features.shape[-1]), mask

  def _reduce(self, b: int, x, mask, sizes, train: bool):
    """The token reduction before block `b` (if any): (x, mask, sizes) -> the same.

    `sizes` `[rows, tokens]` float32 (CLS first) is carried only by token merging
    (`cluster_algo='tome'`): how many input patches each token stands for; the other
    algorithms keep None (no attention bias, exactly the original's blocks). With
    `tome_r`, `tome_r[b]` more tokens of every row merge before block `b`.
    """
    i = next((i for i, step in enumerate(self.steps) if step.block == b), None)
    tome = self.settings.algo == "tome"
    if i is not None:
      rng = None
      if train and self.settings.algo == "sparse_sampling":
        rng = self.make_rng("cluster")
      x_out, mask_out, info = segments_lib.cluster_step_with_info(
          x, mask, self.steps[i], self.settings,
          cluster_embedding=self.cluster_embeddings[i] if self.cluster_embedding else None,
          train=train, rng=rng, sizes=None if sizes is None else sizes[:, 1:])
      self.sow("intermediates", f"cluster_step_{i}", dict(info, tokens=x, frame_mask=mask))
      x, mask = x_out, mask_out
      if tome:
        sizes = jnp.concatenate([jnp.ones_like(info["sizes"][:, :1]), info["sizes"]], axis=1)
    r = self.tome_r[b] if self.tome_r else 0
    if tome and r:
      if sizes is None:
        sizes = jnp.ones(x.shape[:2], jnp.float32)
      x, sizes = tome_lib.merge_rows(x, sizes, r)
    return x, mask, sizes

  def _attention_bias(self, sizes):
    """Proportional attention: `log(size)` added to every key's logits `[rows, 1, 1, T]`."""
    if sizes is None or not self.settings.proportional_attention:
      return None
    return tome_lib.size_bias(sizes)[:, None, None, :]

  def encode_video(self, frames, frame_mask, train: bool = False):
    """frames uint8 [B, F, H, W, 3] (pixels), frame_mask [B, F] -> [B, D] L2-normalised."""
    features, mask = self.segment_features(frames, frame_mask, train)
    if self.sim_header == "seqTransf":
      features = self.seq_transformer(features, mask)
    return masked_mean_pool(features, mask)

  def encode_text(self, text):
    """text [B, L] token ids -> [B, D] L2-normalised."""
    return clip_lib.l2_normalize(self.clip.encode_text(text))

  def logit_scale(self):
    return self.clip.logit_scale

  def __call__(self, frames, frame_mask, text, train: bool = False):
    """Returns (video [B, D], text [B, D], logit_scale) for the contrastive loss."""
    return (self.encode_video(frames, frame_mask, train), self.encode_text(text),
            self.clip.logit_scale)


def build_model(model_cfg: ml_collections.ConfigDict,
                clip_config: clip_lib.CLIPConfig) -> CenterCLIP:
  """CenterCLIP from `config.model` (validated here, before anything compiles)."""
  settings_lib.validate_model(model_cfg, clip_config)
  return CenterCLIP(
      clip_config=clip_config,
      max_frames=int(model_cfg.max_frames),
      steps=settings_lib.cluster_plan(model_cfg, clip_config),
      settings=settings_lib.cluster_settings(model_cfg),
      tome_r=settings_lib.tome_schedule(model_cfg, clip_config) if model_cfg.cluster_inter else (),
      cluster_embedding=bool(model_cfg.cluster_embedding) and bool(model_cfg.cluster_inter),
      sim_header=model_cfg.sim_header,
      seq_transformer_layers=int(model_cfg.seq_transformer_layers),
      dtype=jnp.bfloat16 if model_cfg.dtype == "bfloat16" else jnp.float32,
      remat=bool(model_cfg.remat))


def dummy_inputs(model: CenterCLIP, batch: int = 1, words: int = 8):
  """(uint8 frames [batch, F, R, R, 3], bool mask [batch, F], int32 text [batch, words])."""
  res = model.clip_config.image_resolution
  return (jnp.zeros((batch, model.max_frames, res, res, 3), jnp.uint8),
          jnp.ones((batch, model.max_frames), bool),
          jnp.zeros((batch, words), jnp.int32))


def abstract_params(model: CenterCLIP):
  """Shapes/dtypes of the model's params, without allocating them."""
  return jax.eval_shape(
      lambda r: model.init({"params": r, "cluster": r}, *dummy_inputs(model))["params"],
      jax.random.PRNGKey(0))


def init_params(model: CenterCLIP, rng, clip_params: Optional[dict] = None):
  """Params of the whole model: random, or `clip_params` (e.g. converted OpenAI weights)
  with the new modules initialised from them as the original does:
  `cluster_embedding_<i>` from the visual positional embedding `[1:K+1]`, and
  seqTransf's frame position embeddings and layers from the text tower.
  """
  if clip_params is None:
    clip_params = clip_lib.init_params(model.clip_config, rng)
  abstract = abstract_params(model)
  _check_tree(abstract["clip"], clip_params)
  params = {"clip": clip_params}
  visual_pos = clip_params["visual"]["positional_embedding"]
  for i, step in enumerate(model.steps if model.cluster_embedding else ()):
    params[f"cluster_embedding_{i}"] = jnp.asarray(visual_pos[1:step.k + 1])
  if model.sim_header == "seqTransf":
    text_pos = clip_params["positional_embedding"]
    params["seq_transformer"] = {
        "frame_position_embeddings": jnp.asarray(text_pos[:model.max_frames]),
        "transformer": {f"resblocks_{i}": clip_params["transformer"][f"resblocks_{i}"]
                        for i in range(model.seq_transformer_layers)}}
  _check_tree(abstract, params)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _check_tree(expected, actual):
  exp = {"/".join(map(str, k)): v.shape for k, v in
         flax.traverse_util.flatten_dict(expected).items()}
  act = {"/".join(map(str, k)): tuple(v.shape) for k, v in
         flax.traverse_util.flatten_dict(actual).items()}
  missing = sorted(set(exp) - set(act))
  extra = sorted(set(act) - set(exp))
  shapes = sorted(k for k in set(exp) & set(act) if tuple(exp[k]) != act[k])
  if missing or extra or shapes:
    raise ValueError(
        "params do not match the model: "
        f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
        f"unexpected {extra[:10]}{'...' if len(extra) > 10 else ''}, "
        f"wrong shape {[(k, act[k], tuple(exp[k])) for k in shapes[:10]]}")
