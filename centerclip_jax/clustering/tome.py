"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

Bipartite soft matching on one segment's tokens, written like the clustering functions:
pure, static shapes, `vmap`ped over segments by the caller, no gradient through the
matching (the merged tokens are differentiable size-weighted means of their members).

One round on `M` tokens with sizes `s` merges `r <= M // 2` of them:
  1. split the tokens alternately into A = tokens 0, 2, 4, ... and B = tokens 1, 3, 5, ...;
  2. score every (a, b) pair by the cosine similarity of their matching features
     (here the tokens themselves: the points that k-medoids clusters, so both reduction
     families see the same input; ToMe's paper matches on the attention keys);
  3. every a finds its most similar b (first b on ties); the `r` tokens of A whose best
     score is highest (earlier a first on ties) are merged into their b: the new b is the
     size-weighted mean `sum(s_i x_i) / sum(s_i)` of itself and the a's merged into it,
     with size `sum(s_i)`;
  4. the output is the unmerged a's (in their input order) followed by every b (in input
     order); ToMe's own code puts the unmerged a's in score order, which changes only
     the order of the output tokens.
`merge_to_k` repeats rounds with `r = min(M - K, M // 2)` until `K` tokens remain.

Proportional attention (ToMe, section 3): a merged token of size `s` stands for `s`
tokens, so attention adds `log(s)` to the logits of its key (`size_bias`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_rounds(m: int, k: int) -> tuple[int, ...]:
  """The tokens `r` merged in each round that takes `m` tokens to `k` (static)."""
  if not 1 <= k <= m:
    raise ValueError(f"tome: cannot merge {m} tokens to k={k}; need 1 <= k <= {m}.")
  rounds = []
  while m > k:
    r = min(m - k, m // 2)
    rounds.append(r)
    m -= r
  return tuple(rounds)


def bipartite_merge(x: jax.Array, size: jax.Array, r: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One round of bipartite soft matching on one segment.

  Args:
    x: `[M, W]` tokens (float32 recommended; the matching runs in float32).
    size: `[M]` float32 token sizes (1 for an original patch).
    r: tokens to merge, `0 <= r <= M // 2` (static).
  Returns:
    (merged `[M - r, W]` in `x.dtype`, sizes `[M - r]` float32, destination `[M]` int32:
    the output token every input token went to).
  """
  m, _ = x.shape
  if not 0 <= r <= m // 2:
    raise ValueError(f"bipartite_merge: r={r} must be in [0, M // 2 = {m // 2}].")
  na = (m + 1) // 2
  if r == 0:
    return x, size.astype(jnp.float32), jnp.arange(m, dtype=jnp.int32)
  feats = jax.lax.stop_gradient(x).astype(jnp.float32)
  feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  scores = feats[0::2] @ feats[1::2].T  # [na, nb]
  best = jnp.argmax(scores, axis=1).astype(jnp.int32)  # first b on ties
  best_score = jnp.max(scores, axis=1)
  order = jnp.argsort(-best_score, stable=True).astype(jnp.int32)
  src = order[:r]  # a's merged, best first
  keep = jnp.sort(order[r:])  # a's kept, in input order
  dst = best[src]

  size = size.astype(jnp.float32)
  xa, xb = x[0::2].astype(jnp.float32), x[1::2].astype(jnp.float32)
  sa, sb = size[0::2], size[1::2]
  nb = m // 2
  sum_b = sb[:, None] * xb + jax.ops.segment_sum(sa[src, None] * xa[src], dst,
                                                 num_segments=nb)
  size_b = sb + jax.ops.segment_sum(sa[src], dst, num_segments=nb)
  merged = jnp.concatenate([xa[keep], sum_b / size_b[:, None]], axis=0).astype(x.dtype)
  sizes = jnp.concatenate([sa[keep], size_b], axis=0)

  kept = na - r
  dest_a = jnp.zeros((na,), jnp.int32)
  dest_a = dest_a.at[keep].set(jnp.arange(kept, dtype=jnp.int32))
  dest_a = dest_a.at[src].set(kept + dst)
  dest_b = kept + jnp.arange(nb, dtype=jnp.int32)
  dest = jnp.zeros((m,), jnp.int32).at[0::2].set(dest_a).at[1::2].set(dest_b)
  return merged, sizes, dest


def merge_to_k(x: jax.Array, size: jax.Array, k: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Repeated bipartite merging of one segment's `[M, W]` tokens down to `K`.

  Returns (merged `[K, W]`, sizes `[K]` float32, destination `[M]` int32 in `[0, K)`).
  """
  dest = jnp.arange(x.shape[0], dtype=jnp.int32)
  for r in merge_rounds(x.shape[0], k):
    x, size, d = bipartite_merge(x, size, r)
    dest = d[dest]
  return x, size.astype(jnp.float32), dest


def size_bias(size: jax.Array) -> jax.Array:
  """Proportional attention's additive key bias: `log(size)` (`[..., T]` float32)."""
  return jnp.log(size.astype(jnp.float32))


def merge_rows(x: jax.Array, sizes: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """ToMe's per-block schedule: merge `r` patch tokens of every row, CLS protected.

  x: `[n, 1+T, W]`, sizes: `[n, 1+T]` -> (`[n, 1+T-r, W]`, `[n, 1+T-r]`).
  """
  merged, merged_sizes, _ = jax.vmap(lambda t, z: bipartite_merge(t, z, r))(
      x[:, 1:], sizes[:, 1:])
  return (jnp.concatenate([x[:, :1], merged], axis=1),
          jnp.concatenate([sizes[:, :1].astype(jnp.float32), merged_sizes], axis=1))


def check_schedule(tome_r, steps, num_blocks: int, tokens_per_frame: int) -> tuple[int, ...]:
  """Validates the per-block `tome_r` list against the clustering steps.

  `tome_r[b]` (block `b + 1`) tokens are merged in every row before that block; it must be
  0 before the first step and at most half the row's patch tokens. Returns the list as
  ints (all zeros when empty). Raises ValueError naming the block.
  """
  tome_r = tuple(tome_r) or (0,) * num_blocks
  if len(tome_r) != num_blocks:
    raise ValueError(f"tome_r has {len(tome_r)} entries; it needs one per ViT block "
                     f"({num_blocks}), or none.")
  first = min((s.block for s in steps), default=num_blocks)
  tokens = tokens_per_frame
  at = {s.block: s for s in steps}
  out = []
  for b, r in enumerate(tome_r):
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
      raise ValueError(f"tome_r[{b}] (block {b + 1}) = {r!r}: use an int >= 0.")
    if b in at:
      tokens = at[b].k
    if r and b < first:
      raise ValueError(f"tome_r[{b}] (block {b + 1}) = {r}: merging starts at the first "
                       f"clustering step (block {first + 1}); use 0 before it.")
    if r > tokens // 2:
      raise ValueError(f"tome_r[{b}] (block {b + 1}) = {r}: a row has only {tokens} patch "
                       f"tokens there, so at most {tokens // 2} can merge.")
    tokens -= r
    out.append(int(r))
  return tuple(out)
