r"""Brute force vs the FAISS ANN on a synthetic index: recall@10 and query latency.

  python tools/ann_benchmark.py [--num 1000000] [--dim 512] [--queries 200] [--json OUT]

The vectors are L2-normalised draws around `--clusters` random centres (real embeddings
are clustered too; uniform random vectors in 512-d have no neighbours worth finding).
Queries are drawn the same way. Ground truth: float64 NumPy. Latency: one query at a
time after a warm-up, brute force through `query.VideoEmbeddings` (the chunked device
scan `query`/`serve` run), the ANN through `ann.AnnIndex` with the nprobe `--ann` writes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from centerclip_jax.search import ann as ann_lib
from centerclip_jax.search import query as query_lib


def clustered(rng, n: int, centres: np.ndarray, spread: float) -> np.ndarray:
  x = centres[rng.integers(0, len(centres), n)]
  x = x + spread * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[1])
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ms(times) -> dict:
  t = np.asarray(times) * 1e3
  return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99))}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--clusters", type=int, default=2000)
  p.add_argument("--spread", type=float, default=1.0, help="noise norm around a centre")
  p.add_argument("--queries", type=int, default=200)
  p.add_argument("--nprobe", type=int, default=None)
  p.add_argument("--json", default=None)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((a.clusters, a.dim), dtype=np.float32) / np.sqrt(a.dim)
  emb = np.empty((a.num, a.dim), np.float32)
  for s in range(0, a.num, 100_000):
    emb[s:s + 100_000] = clustered(rng, min(100_000, a.num - s), centres, a.spread)
  queries = clustered(rng, a.queries, centres, a.spread)

  # Exact top-10 in float64, 100k rows at a time (memory stays bounded).
  best_s = np.full((a.queries, 0), -np.inf)
  best_i = np.zeros((a.queries, 0), np.int64)
  q64 = queries.astype(np.float64)
  for s in range(0, a.num, 100_000):
    sims = q64 @ emb[s:s + 100_000].T.astype(np.float64)
    cand_s = np.concatenate([best_s, sims], axis=1)
    cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + sims.shape[1]),
                                                     sims.shape)], axis=1)
    top = np.argsort(-cand_s, axis=1, kind="stable")[:, :10]
    best_s = np.take_along_axis(cand_s, top, 1)
    best_i = np.take_along_axis(cand_i, top, 1)
  exact = best_i

  t0 = time.perf_counter()
  index = ann_lib.AnnIndex.from_embeddings(emb, nprobe=a.nprobe)
  build_s = time.perf_counter() - t0
  videos = query_lib.VideoEmbeddings(emb)

  def timed(fn):
    fn(queries[:1])
    times, rows = [], []
    for q in queries:
      t = time.perf_counter()
      rows.append(fn(q[None]))
      times.append(time.perf_counter() - t)
    return np.concatenate(rows), times

  brute_rows, brute_t = timed(lambda q: videos.top_k(q, 1, 10)[1])
  ann_rows, ann_t = timed(lambda q: index.search(q, 10)[1])
  recall = lambda rows: float(np.mean([len(set(r) & set(e)) / 10
                                       for r, e in zip(rows, exact)]))
  out = {"num": a.num, "dim": a.dim, "queries": a.queries, "ann": index.description,
         "ann_build_s": build_s, "brute_force": dict(_ms(brute_t), recall_at_10=recall(brute_rows)),
         "ann_index": dict(_ms(ann_t), recall_at_10=recall(ann_rows))}
  print(f"{a.num} x {a.dim} vectors, {a.queries} single queries; ANN: {index.description}, "
        f"built in {build_s:.1f} s")
  for name in ("brute_force", "ann_index"):
    r = out[name]
    print(f"{name:12s} recall@10 {r['recall_at_10']:.3f}  p50 {r['p50_ms']:.2f} ms  "
          f"p99 {r['p99_ms']:.2f} ms")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
