"""The transformer layers of CLIP's two towers, numerically OpenAI's (`clip/model.py`).

Names are the OpenAI state-dict keys: `ln_1`, `attn/{q,k,v,out}_proj`, `ln_2`,
`mlp/{c_fc,c_proj}` in `resblocks_<i>`; `conv1` is `PatchEmbed`. Parameters are float32;
`dtype` is the compute dtype. Shapes: tokens `[batch, tokens, width]`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
LN_EPS = 1e-5


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (eps 1e-5) in float32; output in the input dtype."""

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (width,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias
    return y.astype(x.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def _patchify(images, p: int):
  """[n, H, W, C] -> [n, (H/p) * (W/p), p * p * C], patches row-major, (kh, kw, C) inside."""
  n, h, w, c = images.shape
  x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def _unpatchify(x, shape, p: int):
  n, h, w, c = shape
  x = x.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def patch_project(images, kernel, p: int):
  """images [n, H, W, C], kernel [p, p, C, width] -> [n, (H/p) * (W/p), width].

  The stride-p convolution as patchify + one matmul. Its VJP recomputes the patches from
  `images` instead of keeping a patchified copy of every frame alive for the backward pass.
  """
  return _patchify(images, p) @ kernel.reshape(-1, kernel.shape[-1])


def _patch_project_fwd(images, kernel, p):
  return patch_project(images, kernel, p), (images, kernel)


def _patch_project_bwd(p, res, g):
  images, kernel = res
  k2 = kernel.reshape(-1, kernel.shape[-1])
  dk = jnp.einsum("ntk,ntw->kw", _patchify(images, p), g).reshape(kernel.shape)
  dx = _unpatchify(g @ k2.T, images.shape, p)
  return dx.astype(images.dtype), dk.astype(kernel.dtype)


patch_project.defvjp(_patch_project_fwd, _patch_project_bwd)


class PatchEmbed(nn.Module):
  """`conv1`: the stride-`patch` convolution without bias, as one matmul over patches.

  images [n, H, W, C] -> [n, (H/p) * (W/p), width], patches row-major. The kernel is
  `nn.Conv`'s `[p, p, C, width]`; on XLA:CPU the patchify + matmul is about 3x faster
  than the convolution (same sums, in another order).
  """

  width: int
  patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    c, p = images.shape[-1], self.patch
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width),
                        jnp.float32)
    return patch_project(images.astype(self.dtype), kernel.astype(self.dtype), p)


class MultiheadAttention(nn.Module):
  """PyTorch `nn.MultiheadAttention` (batch first) with `in_proj` split into q/k/v.

  x: [batch, queries, width] (the queries); kv: [batch, tokens, width] the keys' and
  values' input (default x: self-attention); mask: optional additive float mask
  broadcastable to [batch, heads, queries, tokens] (e.g. [tokens, tokens]).
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, kv=None):
    width = x.shape[-1]
    kv = x if kv is None else kv
    head_dim = width // self.num_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    q = split(dense("q_proj")(x)) * (head_dim ** -0.5)
    k = split(dense("k_proj")(kv))
    v = split(dense("v_proj")(kv))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if mask is not None:
      logits = logits + mask
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:-1] + (width,))
    return dense("out_proj")(out)


class MLP(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(4 * width, dtype=self.dtype, param_dtype=jnp.float32, name="c_fc")(x)
    x = quick_gelu(x)
    return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)); x: [batch, tokens, width].

  With `rows` (int [batch]) only row `rows[b]` of each sequence is computed: its query
  attends to the keys and values of all tokens (`mask` then broadcastable to
  [batch, heads, 1, tokens]), and the output is [batch, 1, width], the same row-wise
  computation as the full block's row. The other rows' attention outputs and MLPs are
  never computed nor kept for the backward pass.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, rows=None):
    h = LayerNorm(name="ln_1")(x)
    kv = h
    if rows is not None:
      take = lambda t: jnp.take_along_axis(t, rows[:, None, None], axis=1)
      x, h = take(x), take(h)
    x = x + MultiheadAttention(self.num_heads, self.dtype, name="attn")(h, mask, kv)
    x = x + MLP(self.dtype, name="mlp")(LayerNorm(name="ln_2")(x))
    return x


class Transformer(nn.Module):
  """A stack of residual attention blocks named `resblocks_<i>`."""

  layers: int
  heads: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    block_cls = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    self.resblocks = [block_cls(self.heads, self.dtype) for _ in range(self.layers)]

  def __call__(self, x, mask=None, last_rows=None, last_mask=None):
    """x [batch, tokens, width] -> the same; with `last_rows` (int [batch]) the last block
    computes only those rows (`ResidualAttentionBlock`'s `rows`, its mask `last_mask`):
    -> [batch, 1, width]."""
    for i, block in enumerate(self.resblocks):
      last = last_rows is not None and i == len(self.resblocks) - 1
      x = block(x, last_mask, last_rows) if last else block(x, mask)
    return x


def causal_mask(n: int):
  """Additive [n, n] mask: -inf above the diagonal (OpenAI's `build_attention_mask`)."""
  return jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf).astype(jnp.float32)
