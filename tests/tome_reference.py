"""Float64 NumPy reference of ToMe's bipartite soft matching, written from the paper.

Plain loops over tokens; does not import `centerclip_jax`. Conventions (documented in
`centerclip_jax/clustering/tome.py`): set A = even positions, set B = odd positions;
cosine similarity of the tokens; each a picks its most similar b (lowest b index on
ties); the r a's with the highest best-similarity merge (lowest a index on ties); a
merged b is the size-weighted mean of its members; output = unmerged a's in input order,
then all b's in input order.
"""

from __future__ import annotations

import math

import numpy as np


def bipartite_merge(x, size, r):
  x = np.asarray(x, np.float64)
  size = np.asarray(size, np.float64)
  m = len(x)
  a_idx = list(range(0, m, 2))
  b_idx = list(range(1, m, 2))
  norm = lambda v: v / max(math.sqrt(float(np.dot(v, v))), 1e-12)
  best, best_score = [], []
  for a in a_idx:
    top_j, top_s = None, -math.inf
    for j, b in enumerate(b_idx):
      s = float(np.dot(norm(x[a]), norm(x[b])))
      if s > top_s:
        top_j, top_s = j, s
    best.append(top_j)
    best_score.append(top_s)
  ranked = sorted(range(len(a_idx)), key=lambda i: (-best_score[i], i))
  merged_a = set(ranked[:r])
  sums = [size[b] * x[b] for b in b_idx]
  sizes_b = [size[b] for b in b_idx]
  for i in ranked[:r]:
    j = best[i]
    sums[j] = sums[j] + size[a_idx[i]] * x[a_idx[i]]
    sizes_b[j] += size[a_idx[i]]
  out, out_size, dest = [], [], [0] * m
  for i, a in enumerate(a_idx):
    if i not in merged_a:
      dest[a] = len(out)
      out.append(x[a])
      out_size.append(size[a])
  kept = len(out)
  for i, a in enumerate(a_idx):
    if i in merged_a:
      dest[a] = kept + best[i]
  for j, b in enumerate(b_idx):
    dest[b] = kept + j
    out.append(sums[j] / sizes_b[j])
    out_size.append(sizes_b[j])
  return np.stack(out), np.asarray(out_size), np.asarray(dest)


def merge_to_k(x, size, k):
  m = len(x)
  dest = np.arange(m)
  while len(x) > k:
    r = min(len(x) - k, len(x) // 2)
    x, size, d = bipartite_merge(x, size, r)
    dest = d[dest]
  return x, size, dest
