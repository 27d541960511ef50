"""Flax Linen CLIP (ViT image tower + text tower), numerically OpenAI's CLIP.

Module and parameter names follow the OpenAI state-dict keys, so that porting a
checkpoint is a short table of rules (see `centerclip_jax/weights/porting.py`):

  visual/{conv1, class_embedding, positional_embedding, ln_pre,
          transformer/resblocks_<i>/{ln_1, attn/{q_proj,k_proj,v_proj,out_proj}, ln_2,
                                     mlp/{c_fc, c_proj}},
          ln_post, proj}
  token_embedding, positional_embedding, transformer/resblocks_<i>/..., ln_final,
  text_projection, logit_scale

Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16). LayerNorm,
softmax and the final projections run in float32, as OpenAI's fp16 `LayerNorm` does.
The blocks, attention, MLP, LayerNorm and `conv1` are in `layers.py`.

The vision tower exposes its pieces (`embed`, `block`, `head`) so that CenterCLIP can
insert token-clustering steps between blocks without rewriting the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from centerclip_jax.models import layers

Dtype = Any
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, of pixels in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(frames):
  """uint8 pixels [..., 3] -> float32 (x / 255 - CLIP_MEAN) / CLIP_STD, one multiply-add.

  The one place that normalises: data pipelines hand the model uint8 pixels (a quarter of
  float32's bytes to the device) and CenterCLIP's video path calls this first. Raises a
  ValueError at trace time for any other dtype, so already-normalised floats are never
  normalised twice.
  """
  if frames.dtype != jnp.uint8:
    raise ValueError(f"frames must be uint8 pixels [..., 3] (the model normalises them), "
                     f"got {frames.dtype} {tuple(frames.shape)}")
  std = np.asarray(CLIP_STD, np.float64)
  scale = (1.0 / (255.0 * std)).astype(np.float32)
  bias = (-np.asarray(CLIP_MEAN, np.float64) / std).astype(np.float32)
  return frames.astype(jnp.float32) * scale + bias


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of one CLIP model (the fields of OpenAI's `CLIP.__init__`)."""

  embed_dim: int
  image_resolution: int
  vision_layers: int
  vision_width: int
  vision_patch_size: int
  context_length: int
  vocab_size: int
  transformer_width: int
  transformer_heads: int
  transformer_layers: int

  @property
  def vision_heads(self) -> int:
    return self.vision_width // 64

  @property
  def grid_size(self) -> int:
    return self.image_resolution // self.vision_patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = fields - set(d)
    unknown = set(d) - fields
    if missing or unknown:
      raise ValueError(
          f"CLIP config: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
    return cls(**{k: int(d[k]) for k in fields})

  @classmethod
  def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "CLIPConfig":
    """Infers the architecture from OpenAI state-dict key -> shape, as `build_model` does."""
    if "visual.proj" not in shapes:
      if any(k.startswith("visual.layer1") for k in shapes):
        raise ValueError("this is a ResNet CLIP checkpoint; only ViT CLIP models are supported")
      raise ValueError("not a CLIP ViT state dict: key 'visual.proj' is missing")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "text_projection",
              "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
      raise ValueError(f"not a CLIP ViT state dict: keys {absent} are missing")
    vision_width, _, vision_patch_size, _ = shapes["visual.conv1.weight"]
    vision_layers = len({k.split(".")[3] for k in shapes
                         if re.match(r"visual\.transformer\.resblocks\.\d+\.", k)})
    grid = round((shapes["visual.positional_embedding"][0] - 1) ** 0.5)
    transformer_width = shapes["ln_final.weight"][0]
    transformer_layers = len({k.split(".")[2] for k in shapes
                              if re.match(r"transformer\.resblocks\.\d+\.", k)})
    return cls(
        embed_dim=int(shapes["text_projection"][1]),
        image_resolution=int(vision_patch_size * grid),
        vision_layers=int(vision_layers),
        vision_width=int(vision_width),
        vision_patch_size=int(vision_patch_size),
        context_length=int(shapes["positional_embedding"][0]),
        vocab_size=int(shapes["token_embedding.weight"][0]),
        transformer_width=int(transformer_width),
        transformer_heads=int(transformer_width // 64),
        transformer_layers=int(transformer_layers),
    )


_TEXT = dict(context_length=77, vocab_size=49408)
PRESETS = {
    "ViT-B/32": CLIPConfig(512, 224, 12, 768, 32, transformer_width=512,
                           transformer_heads=8, transformer_layers=12, **_TEXT),
    "ViT-B/16": CLIPConfig(512, 224, 12, 768, 16, transformer_width=512,
                           transformer_heads=8, transformer_layers=12, **_TEXT),
    "ViT-L/14": CLIPConfig(768, 224, 24, 1024, 14, transformer_width=768,
                           transformer_heads=12, transformer_layers=12, **_TEXT),
    "ViT-L/14@336px": CLIPConfig(768, 336, 24, 1024, 14, transformer_width=768,
                                 transformer_heads=12, transformer_layers=12, **_TEXT),
}


def get_preset(name: str) -> CLIPConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP architecture {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]


class VisionTransformer(nn.Module):
  """CLIP's ViT image tower.

  `__call__` maps images `[..., H, W, 3]` (any leading dims, e.g. `[batch, frames]`)
  to features `[..., embed_dim]` (not normalised). The pieces are exposed for
  CenterCLIP: `embed` -> `block(i, .)` for i in range(layers) -> `head(x[:, 0])`.
  """

  config: CLIPConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    width = cfg.vision_width
    scale = width ** -0.5
    self.conv1 = layers.PatchEmbed(width, cfg.vision_patch_size, self.dtype)
    self.class_embedding = self.param(
        "class_embedding", nn.initializers.normal(scale), (width,), jnp.float32)
    self.positional_embedding = self.param(
        "positional_embedding", nn.initializers.normal(scale), (cfg.num_patches + 1, width),
        jnp.float32)
    self.ln_pre = layers.LayerNorm()
    self.transformer = layers.Transformer(cfg.vision_layers, cfg.vision_heads, self.dtype,
                                          self.remat)
    self.ln_post = layers.LayerNorm()
    self.proj = self.param("proj", nn.initializers.normal(scale), (width, cfg.embed_dim),
                           jnp.float32)

  @property
  def num_blocks(self) -> int:
    return self.config.vision_layers

  def embed(self, images):
    """images [n, H, W, 3] (CLIP-normalised) -> tokens [n, 1 + num_patches, width]."""
    res = self.config.image_resolution
    if images.shape[-3:] != (res, res, 3):
      raise ValueError(f"images must be [n, {res}, {res}, 3], got {images.shape}")
    x = self.conv1(images.astype(self.dtype))
    cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.positional_embedding.astype(self.dtype)
    return self.ln_pre(x)

  def block(self, i: int, x, bias=None):
    """Residual block `i` (0-based) on tokens [n, tokens, width].

    `bias`: optional additive attention bias broadcastable to [n, heads, tokens, tokens]
    (e.g. `[n, 1, 1, tokens]` log token sizes for proportional attention).
    """
    return self.transformer.resblocks[i](x, bias)

  def head(self, cls_tokens):
    """cls_tokens [n, width] -> features [n, embed_dim] (float32, not normalised)."""
    x = self.ln_post(cls_tokens).astype(jnp.float32)
    return x @ self.proj

  def __call__(self, images):
    lead = images.shape[:-3]
    x = self.embed(images.reshape((-1,) + images.shape[-3:]))
    for i in range(self.num_blocks):
      x = self.block(i, x)
    return self.head(x[:, 0]).reshape(lead + (-1,))


class CLIP(nn.Module):
  """OpenAI CLIP (ViT variant). `encode_image` / `encode_text` give unnormalised features."""

  config: CLIPConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    width = cfg.transformer_width
    self.visual = VisionTransformer(cfg, self.dtype, self.remat)
    self.token_embedding = nn.Embed(cfg.vocab_size, width,
                                    embedding_init=nn.initializers.normal(0.02),
                                    dtype=jnp.float32, param_dtype=jnp.float32)
    self.positional_embedding = self.param(
        "positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, width),
        jnp.float32)
    self.transformer = layers.Transformer(cfg.transformer_layers, cfg.transformer_heads,
                                          self.dtype, self.remat)
    self.ln_final = layers.LayerNorm()
    self.text_projection = self.param(
        "text_projection", nn.initializers.normal(width ** -0.5), (width, cfg.embed_dim),
        jnp.float32)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (), jnp.float32)

  def encode_image(self, images):
    """images [..., H, W, 3] -> [..., embed_dim]."""
    return self.visual(images)

  def encode_text(self, text):
    """text [batch, length] int token ids (EOT has the largest id) -> [batch, embed_dim].

    `length` may be shorter than `context_length` (CLIP4Clip uses 32); the causal mask
    makes the EOT feature independent of the padding after it. Only the EOT row is
    used, so the last block and `ln_final` run on that row alone (its attention still
    reads every earlier token): the same numbers, without the other rows' dead work and
    activations.
    """
    n = text.shape[-1]
    if n > self.config.context_length:
      raise ValueError(f"text length {n} exceeds the context length {self.config.context_length}")
    x = self.token_embedding(text).astype(self.dtype)
    x = x + self.positional_embedding[:n].astype(self.dtype)
    eot = jnp.argmax(text, axis=-1)
    mask = layers.causal_mask(n)
    x = self.transformer(x, mask, last_rows=eot, last_mask=mask[eot][:, None, None, :])
    x = self.ln_final(x[:, 0]).astype(jnp.float32)
    return x @ self.text_projection

  def __call__(self, images, text):
    """Returns (logits_per_image [n_img, n_txt], logits_per_text [n_txt, n_img])."""
    img = l2_normalize(self.encode_image(images))
    txt = l2_normalize(self.encode_text(text))
    logits = jnp.exp(self.logit_scale) * img @ txt.T
    return logits, logits.T


def l2_normalize(x, axis: int = -1, eps: Optional[float] = None):
  """x / ||x|| along `axis` (as PyTorch's `x / x.norm(dim=-1, keepdim=True)`)."""
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  if eps is not None:
    norm = norm + eps
  return x / norm


def init_params(config: CLIPConfig, rng, dtype=jnp.float32):
  """Random CLIP params (float32) of the given architecture."""
  model = CLIP(config, dtype)
  res = config.image_resolution
  images = jnp.zeros((1, res, res, 3), jnp.float32)
  text = jnp.zeros((1, min(8, config.context_length)), jnp.int32)

  def init(rng):
    return model.init(rng, images, text)["params"]
  return jax.jit(init)(rng)
