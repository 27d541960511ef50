"""Text queries against a video index: embed the text, score every video, keep the top k.

Scores are cosine similarities `<t, v>` of the L2-normalised text and video embeddings
(one matrix product for all queries, on the device that holds the index; top-k by
`np.argpartition`). With `dsl=True` they are re-scored by dual softmax over the query
axis (`metrics.dual_softmax`, temperature 100), which only changes anything when several
queries are asked at once.

Text encoding pads each query batch to a power-of-two number of rows and cuts its tokens
to the shortest multiple of 8 (<= max_words) that holds every query's end token: the
causal mask makes the end token's feature independent of the padding after it, so the
result is the full-length encoding up to float rounding, at a fraction of the cost for
short queries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.inference import encoder as encode
from centerclip_jax.evaluation import metrics
from centerclip_jax.data import tokenizer as tokenizer_lib
from centerclip_jax.models import centerclip
from centerclip_jax.weights import loading
from centerclip_jax.search import fingerprint as fingerprint_lib
from centerclip_jax.search import index as index_lib

DSL_TEMPERATURE = 100.0


@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int      # 1-based
  path: str      # relative to the indexed folder
  score: float


@dataclasses.dataclass(frozen=True)
class QueryResult:
  query: str
  hits: list[Hit]


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the `k` highest of `scores [V]`, best first (ties: lower index first)."""
  k = min(int(k), len(scores))
  if k <= 0:
    return np.zeros((0,), np.int64)
  if k < len(scores):
    # The k-th best score; ties with it are taken in index order, so that the result does
    # not depend on how argpartition happens to split them.
    kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
    above = np.flatnonzero(scores > kth)
    cand = np.concatenate([above, np.flatnonzero(scores == kth)[:k - len(above)]])
  else:
    cand = np.arange(len(scores))
  return cand[np.lexsort((cand, -scores[cand]))]


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


class TextEncoder:
  """Captions -> L2-normalised text embeddings `[Q, D]` float32 (CenterCLIP's text tower)."""

  def __init__(self, model, params, max_words: int):
    self._encode = parallel.jit_encoders(model)[1]
    # The vision tower's weights are not needed (fewer arguments to pass on every call).
    params = dict(params, clip={k: v for k, v in params["clip"].items() if k != "visual"})
    self._params = jax.device_put(params)
    self._max_words = int(max_words)
    self._tokenizer = tokenizer_lib.get_tokenizer()

  def on_device(self, texts: Sequence[str]) -> jax.Array:
    """`[Q', D]` embeddings on the device; rows past `len(texts)` are padding."""
    tokens = self._tokenizer.tokenize(list(texts), self._max_words)
    length = int(np.max(np.argmax(tokens, axis=1))) + 1  # through the last end token
    tokens = tokens[:, :min(self._max_words, -(-length // 8) * 8)]
    return self._encode(self._params, encode.pad_batch(tokens, _pow2_at_least(len(tokens))))

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    return np.asarray(self.on_device(texts), np.float32)[:len(texts)]


@jax.jit
def _similarity(video_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
  """`[V, D], [Q, D] -> [Q, V]` in full float32 (no reduced-precision matmul on GPU)."""
  return jnp.matmul(text_emb, video_emb.T, precision=jax.lax.Precision.HIGHEST)


class Searcher:
  """A loaded index plus the text tower that embeds queries for it."""

  def __init__(self, text_encoder: TextEncoder, embeddings: np.ndarray, paths: Sequence[str],
               videos_root: str = ""):
    if len(paths) != len(embeddings):
      raise ValueError(f"{len(paths)} paths for {len(embeddings)} embeddings")
    self.text_encoder = text_encoder
    self.embeddings = np.ascontiguousarray(embeddings, np.float32)
    self._video = jax.device_put(self.embeddings)  # scored on the device, one product
    self.paths = list(paths)
    self.videos_root = videos_root

  @classmethod
  def open(cls, index_dir: os.PathLike, init_from: Optional[str] = None) -> "Searcher":
    """Loads an index, its config and checkpoint (`init_from` overrides config.json's).

    Raises SearchIndexError when the checkpoint is not the one the index was built with.
    """
    manifest, emb = index_lib.load_index(index_dir)
    config = index_lib.read_config(index_dir)
    if init_from is not None:
      config.init_from = init_from
    config_lib.validate(config)
    fingerprint, parts = fingerprint_lib.model_fingerprint(
        config, manifest["fingerprint_parts"]["fps"])
    if fingerprint != manifest["fingerprint"]:
      raise index_lib.SearchIndexError(
          f"{index_dir}: the model has changed since this index was built "
          f"({fingerprint_lib.mismatch_reason(manifest['fingerprint_parts'], parts)}); "
          "re-run `search index ... --rebuild` with this checkpoint, or pass --init_from "
          "with the checkpoint the index was built with.")
    if not manifest.get("complete"):
      raise index_lib.SearchIndexError(
          f"{index_dir}: indexing was interrupted; re-run `search index` to finish it")
    paths = [""] * len(emb)
    for e in manifest["entries"]:
      if e["status"] == "ok":
        paths[e["row"]] = e["path"]
    model, params = loading.load_model(config)
    return cls(TextEncoder(model, params, config.model.max_words), emb, paths,
               manifest.get("videos_root", ""))

  def search(self, queries: Sequence[str], top_k: int = 10, dsl: bool = False
             ) -> list[QueryResult]:
    """The `top_k` videos of each query, best first."""
    if not queries:
      raise ValueError("give at least one query text")
    if not len(self.embeddings):
      return [QueryResult(q, []) for q in queries]
    scores = np.asarray(_similarity(self._video, self.text_encoder.on_device(queries)))
    scores = scores[:len(queries)]
    if dsl:
      scores = metrics.dual_softmax(scores, DSL_TEMPERATURE, axis=0)
    out = []
    for q, row in zip(queries, scores):
      idx = top_k_indices(row, top_k)
      out.append(QueryResult(q, [Hit(r + 1, self.paths[i], float(row[i]))
                                 for r, i in enumerate(idx)]))
    return out


def format_table(results: Sequence[QueryResult], dsl: bool = False) -> str:
  """Human-readable results: one block per query (rank, score, video)."""
  lines = []
  if dsl:
    lines.append(f"scores are DSL-rescored (dual softmax over the {len(results)} queries, "
                 f"temperature {DSL_TEMPERATURE:g})")
  for res in results:
    lines.append(f"query: {res.query}")
    lines.append(f"{'rank':>6}  {'score':>8}  video")
    for h in res.hits:
      lines.append(f"{h.rank:>6}  {h.score:>8.4f}  {h.path}")
    if not res.hits:
      lines.append("        (the index is empty)")
    lines.append("")
  return "\n".join(lines).rstrip("\n")


def format_json(results: Sequence[QueryResult], dsl: bool = False, videos_root: str = "") -> str:
  return json.dumps({
      "score": ("dsl: dual softmax over the queries of the cosine similarity"
                if dsl else "cosine similarity"),
      "dsl": bool(dsl),
      "videos_root": videos_root,
      "results": [{"query": r.query,
                   "hits": [dataclasses.asdict(h) for h in r.hits]} for r in results],
  }, indent=2)


def benchmark_query(num_videos: int = 10_000, arch: str = "ViT-B/32",
                    query: str = "a man is cooking in a kitchen", top_k: int = 10,
                    repeats: int = 50, seed: int = 0,
                    clip_dims: Optional[dict] = None) -> dict:
  """Latency of one query on a random index of `num_videos` normalised embeddings.

  Times (after loading and a compiling warm-up) text encoding of one query + scoring
  every video + top-k, with random weights of `arch` (or `clip_dims`, a CLIPConfig dict).
  Returns milliseconds: median, min, p90, plus the sizes used.
  """
  config = config_lib.base_config()
  config.seed = seed
  config.model.arch = arch
  config.model.cluster_inter = 0  # only the text tower runs here
  if clip_dims:
    config.model.clip_dims = dict(clip_dims)
  model, params = loading.load_model(config)
  dim = model.clip_config.embed_dim
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((num_videos, dim)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  searcher = Searcher(TextEncoder(model, params, config.model.max_words), emb,
                      [f"video{i:06d}.mp4" for i in range(num_videos)])
  searcher.search([query], top_k)  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    searcher.search([query], top_k)
    times.append((time.perf_counter() - t0) * 1e3)
  times.sort()
  return {"num_videos": num_videos, "embed_dim": dim,
          "arch": "custom" if clip_dims else arch, "repeats": repeats,
          "median_ms": statistics.median(times), "min_ms": times[0],
          "p90_ms": times[int(0.9 * (len(times) - 1))],
          "device": str(jax.devices()[0].platform)}
