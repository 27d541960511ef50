"""Text queries against a video index: embed the text, score every video, keep the top k.

Scores are cosine similarities `<t, v>` of the L2-normalised text and video embeddings.
Brute force (the default) scans the embeddings on the device in chunks of `CHUNK_ROWS`
rows, keeping each chunk's top k (`lax.top_k`) and then the best of those, so memory is
bounded by one chunk whatever the index size. An index built with `--ann` is searched
with its FAISS index instead (`ann.py`). With `dsl=True` scores are re-scored by dual
softmax over the query axis (as `metrics.dual_softmax`, temperature 100; per video, so
chunk by chunk), which only changes anything when several queries are asked at once.

Text encoding pads each query batch to a power-of-two number of rows and cuts its tokens
to the shortest multiple of 8 (<= max_words) that holds every query's end token: the
causal mask makes the end token's feature independent of the padding after it, so the
result is the full-length encoding up to float rounding, at a fraction of the cost for
short queries. A query longer than the context keeps its first tokens (`truncated`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from centerclip_jax import paths as path_lib
from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.inference import encoder as encode
from centerclip_jax.data import tokenizer as tokenizer_lib
from centerclip_jax.weights import loading
from centerclip_jax.search import ann as ann_lib
from centerclip_jax.search import fingerprint as fingerprint_lib
from centerclip_jax.search import index as index_lib

DSL_TEMPERATURE = 100.0
CHUNK_ROWS = 32768  # videos scored per step of the brute-force scan


@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int      # 1-based
  path: str      # relative to the indexed folder
  score: float


@dataclasses.dataclass(frozen=True)
class QueryResult:
  query: str
  hits: list[Hit]
  truncated: bool = False  # longer than the text tower's context: only its start was used


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
    self.max_words = int(max_words)
    self._tokenizer = tokenizer_lib.get_tokenizer()

  def truncated(self, texts: Sequence[str]) -> list[bool]:
    """Whether each text is longer than the context (only its first tokens are used)."""
    return [len(self._tokenizer.encode(t)) > self.max_words - 2 for t in texts]

  def on_device(self, texts: Sequence[str]) -> jax.Array:
    """`[Q', D]` embeddings on the device; rows past `len(texts)` are padding."""
    tokens = self._tokenizer.tokenize(list(texts), self.max_words)
    length = int(np.max(np.argmax(tokens, axis=1))) + 1  # through the last end token
    tokens = tokens[:, :min(self.max_words, -(-length // 8) * 8)]
    return self._encode(self._params, encode.pad_batch(tokens, _pow2_at_least(len(tokens))))

  def warmup(self, max_batch: int) -> int:
    """Compiles every (batch, length) shape of up to `max_batch` queries; returns how many."""
    n = 0
    for batch in (1 << i for i in range(max(0, int(max_batch) - 1).bit_length() + 1)):
      for length in range(8, self.max_words + 8, 8):
        tokens = np.zeros((batch, min(length, self.max_words)), np.int32)
        tokens[:, 0], tokens[:, -1] = self._tokenizer.sot_token, self._tokenizer.eot_token
        self._encode(self._params, tokens).block_until_ready()
        n += 1
    return n

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    return np.asarray(self.on_device(texts), np.float32)[:len(texts)]


@functools.partial(jax.jit, static_argnames=("k", "dsl"))
def _chunked_top_k(video: jax.Array, num_rows: jax.Array, text: jax.Array,
                   num_queries: jax.Array, *, k: int, dsl: bool):
  """Top-k of `text [Q, D] @ video.T` over `video [C, R, D]` chunks, one chunk at a time.

  Rows `>= num_rows` (padding) and, for DSL, queries `>= num_queries` are left out.
  Memory is `O(Q * R)` whatever C. Returns (scores [Q, k], rows [Q, k]) best first; ties
  go to the lower row (lax.top_k is stable and the candidates stay in row order).
  """
  c, r, _ = video.shape
  offsets = jnp.arange(c, dtype=jnp.int32) * r

  def one(args):
    chunk, offset = args
    s = jnp.matmul(text, chunk.T, precision=jax.lax.Precision.HIGHEST)  # [Q, R] float32
    if dsl:
      live = (jnp.arange(text.shape[0]) < num_queries)[:, None]
      s = s * jax.nn.softmax(jnp.where(live, DSL_TEMPERATURE * s, -jnp.inf), axis=0)
    s = jnp.where((offset + jnp.arange(r) < num_rows)[None], s, -jnp.inf)
    vals, idx = jax.lax.top_k(s, k)
    return vals, idx + offset

  vals, idx = jax.lax.map(one, (video, offsets))  # [C, Q, k]
  vals = vals.transpose(1, 0, 2).reshape(text.shape[0], c * k)
  idx = idx.transpose(1, 0, 2).reshape(text.shape[0], c * k)
  best, j = jax.lax.top_k(vals, k)
  return best, jnp.take_along_axis(idx, j, axis=1)


class VideoEmbeddings:
  """`[V, D]` embeddings on the device in chunks of `chunk_rows` (bounded scoring memory)."""

  def __init__(self, embeddings: np.ndarray, chunk_rows: int = CHUNK_ROWS):
    emb = np.ascontiguousarray(embeddings, np.float32)
    self.num_rows, self.dim = emb.shape
    dim = self.dim
    rows = min(int(chunk_rows), _pow2_at_least(max(self.num_rows, 8)))
    chunks = max(1, -(-self.num_rows // rows))
    padded = np.zeros((chunks * rows, dim), np.float32)
    padded[:self.num_rows] = emb
    self.chunk_rows = rows
    self._video = jax.device_put(padded.reshape(chunks, rows, dim))

  def top_k(self, text: jax.Array | np.ndarray, num_queries: int, k: int,
            dsl: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores [num_queries, k'], rows [num_queries, k']), k' = min(k, V), best first."""
    k = min(int(k), self.num_rows)
    bucket = min(max(_pow2_at_least(k), 16), self.chunk_rows)
    if k > bucket:  # more than a chunk: one chunk of all rows
      return VideoEmbeddings(self.embeddings(), _pow2_at_least(k)).top_k(
          text, num_queries, k, dsl)
    vals, idx = _chunked_top_k(self._video, jnp.int32(self.num_rows), text,
                               jnp.int32(num_queries), k=bucket, dsl=bool(dsl))
    return (np.asarray(vals)[:num_queries, :k], np.asarray(idx)[:num_queries, :k])

  def embeddings(self) -> np.ndarray:
    return np.asarray(self._video).reshape(-1, self._video.shape[-1])[:self.num_rows]


class Searcher:
  """A loaded index plus the text tower that embeds queries for it.

  Scoring is brute force over every row (`VideoEmbeddings`), or the index's FAISS ANN
  (`ann.AnnIndex`) when it has one and `dsl` is off (DSL needs every query's score).
  """

  def __init__(self, text_encoder: TextEncoder, embeddings: np.ndarray, paths: Sequence[str],
               videos_root: str = "", ann: Optional[ann_lib.AnnIndex] = None,
               chunk_rows: int = CHUNK_ROWS):
    if len(paths) != len(embeddings):
      raise ValueError(f"{len(paths)} paths for {len(embeddings)} embeddings")
    self.text_encoder = text_encoder
    self.videos = VideoEmbeddings(embeddings, chunk_rows)
    self.paths = list(paths)
    self.videos_root = videos_root
    self.ann = ann
    self.manifest: dict = {}  # set by `open`

  @property
  def num_videos(self) -> int:
    return self.videos.num_rows

  @property
  def method(self) -> str:
    return f"ann: {self.ann.description}" if self.ann else "brute force (exact)"

  @classmethod
  def open(cls, index_dir: os.PathLike, init_from: Optional[str] = None,
           text_encoder: Optional[TextEncoder] = None) -> "Searcher":
    """Loads an index, its config and checkpoint (`init_from` overrides config.json's).

    `text_encoder`: reuse a loaded one (a server re-loading its index); its model must be
    the index's. Raises SearchIndexError when the index is damaged or incomplete, or the
    checkpoint is not the one the index was built with.
    """
    if path_lib.is_uri(index_dir):  # read from a temporary local copy
      with path_lib.staged_tree(index_dir, upload=False) as local:
        return cls.open(local, init_from=init_from, text_encoder=text_encoder)
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
    ann = ann_lib.AnnIndex.open(index_dir, manifest)
    if text_encoder is None:
      model, params = loading.load_model(config)
      text_encoder = TextEncoder(model, params, config.model.max_words)
    searcher = cls(text_encoder, emb, paths, manifest.get("videos_root", ""), ann)
    searcher.manifest = manifest
    return searcher

  def search_embeddings(self, text: jax.Array | np.ndarray, num_queries: int, top_k: int,
                        dsl: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) `[num_queries, min(top_k, V)]` of text embeddings (rows >= Q: pad)."""
    if self.ann is not None and not dsl:
      return self.ann.search(np.asarray(text, np.float32)[:num_queries], top_k)
    return self.videos.top_k(text, num_queries, top_k, dsl)

  def search(self, queries: Sequence[str], top_k: int = 10, dsl: bool = False
             ) -> list[QueryResult]:
    """The `top_k` videos of each query, best first."""
    if not queries:
      raise ValueError("give at least one query text")
    truncated = self.text_encoder.truncated(queries)
    if not self.num_videos:
      return [QueryResult(q, [], t) for q, t in zip(queries, truncated)]
    scores, rows = self.search_embeddings(self.text_encoder.on_device(queries), len(queries),
                                          top_k, dsl)
    return [QueryResult(q, [Hit(r + 1, self.paths[i], float(s))
                            for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0], t)
            for q, srow, irow, t in zip(queries, scores, rows, truncated)]


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
      "results": [{"query": r.query, "truncated": r.truncated,
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
