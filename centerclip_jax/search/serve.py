"""`search serve`: the index behind an HTTP API and a web page (Starlette on uvicorn).

  GET  /search?q=TEXT&k=N      {"query", "k", "truncated", "results": [{"path", "score",
                               "rank", "thumb", "media"}], "method", "took_ms"}
  POST /search                 {"queries": [...], "k": N} -> {"k", "results": [one per query]}
  GET  /healthz                200 {"status": "ready", ...} (the app runs only once ready)
  GET  /stats                  index size, model fingerprint, request latency percentiles
  POST /reload                 re-reads the index and swaps it in atomically (409 while a
                               `search index` run holds its lock; the old one keeps serving)
  GET  /  /static/...          the search page; /thumbs/NAME.jpg; /media/PATH (the video
                               files of the index, only inside the indexed folder)

The model and index are loaded and every query shape compiled before the server binds
(`Service.load`). Concurrent requests are micro-batched: the first query waits up to
`window_s` for others, then one text-tower call embeds them all (at most `max_batch`), so
throughput grows with load. Bad input gets a 4xx with {"error": ...}; any other failure a
500 with {"error": "internal error"} (the trace goes to the log, never to the client).

Why Starlette + uvicorn: an ASGI stack (one event loop; the model stays in one process
and requests queue without a thread each), small and well kept, with range requests for
video, static files with path checks, and a test client; FastAPI would add pydantic for
two endpoints' worth of validation.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import pathlib
import re
import tempfile
import threading
import time
from typing import Optional

import numpy as np

from centerclip_jax import paths as path_lib
from centerclip_jax.search import query as query_lib
from centerclip_jax.search import store

DEFAULT_K = 10
MAX_K = 100
MAX_QUERY_CHARS = 1000   # longer texts are cut (the context holds ~30 words anyway)
MAX_BODY_BYTES = 1 << 20
STATIC_DIR = pathlib.Path(__file__).with_name("static")
THUMB_NAME = re.compile(r"[0-9a-f]{20}\.jpg")  # store.thumb_name
PLAYABLE = (".mp4", ".webm", ".m4v", ".mov", ".mkv", ".avi")


class BadRequest(Exception):
  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Loaded:
  """One loaded index: what a batch reads, swapped as a whole by `reload`."""
  searcher: query_lib.Searcher
  manifest: dict
  root: pathlib.Path                # the indexed folder
  thumbs: dict[str, str]            # path -> thumbs/NAME.jpg
  paths: frozenset[str]             # the videos of the index (relative paths)
  loaded_at: float


@dataclasses.dataclass
class _Job:
  texts: list[str]
  k: int
  future: asyncio.Future


def _load(index_dir: pathlib.Path, init_from, text_encoder=None) -> Loaded:
  searcher = query_lib.Searcher.open(index_dir, init_from=init_from, text_encoder=text_encoder)
  manifest = searcher.manifest
  thumbs = {e["path"]: e["thumb"] for e in manifest["entries"]
            if e["status"] == "ok" and e.get("thumb")}
  return Loaded(searcher, manifest, pathlib.Path(manifest.get("videos_root", "")).resolve(),
                thumbs, frozenset(searcher.paths), time.time())


class Service:
  """The loaded index + model, the micro-batcher and the request statistics."""

  def __init__(self, index_dir, init_from: Optional[str] = None, max_batch: int = 32,
               window_s: float = 0.003):
    # A gs:// index is served from a local copy (re-copied by `reload`), never written.
    self.source = str(index_dir) if path_lib.is_uri(index_dir) else None
    self._stage: Optional[tempfile.TemporaryDirectory] = None
    self.index_dir = self._stage_copy() if self.source else pathlib.Path(index_dir).resolve()
    self.init_from = init_from
    self.max_batch = int(max_batch)
    self.window_s = float(window_s)
    self.state: Optional[Loaded] = None
    self.latencies_ms = collections.deque(maxlen=10_000)
    self.counts = collections.Counter()
    self._reload_lock = threading.Lock()
    self._model_thread: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._queue: Optional[asyncio.Queue] = None
    self._carry: Optional[_Job] = None

  # ------------------------------------------------------------------ loading
  def _stage_copy(self) -> pathlib.Path:
    """Copies the gs:// index into a fresh temporary folder (the previous one is removed
    when its object goes); returns the local index folder."""
    stage = tempfile.TemporaryDirectory(prefix="centerclip-serve-")
    local = pathlib.Path(stage.name) / "index"
    source = path_lib.user_path(self.source)
    if not source.is_dir():
      stage.cleanup()
      raise store.SearchIndexError(f"--index {self.source}: not found in the bucket")
    path_lib.copytree(source, path_lib.user_path(local))
    self._stage = stage
    return local

  def load(self) -> dict:
    """Loads model and index and compiles every query shape (blocking; before serving)."""
    t0 = time.perf_counter()
    state = _load(self.index_dir, self.init_from)
    shapes = state.searcher.text_encoder.warmup(self.max_batch)
    self._warm_scoring(state.searcher)
    self.state = state
    return {"videos": state.searcher.num_videos, "shapes": shapes,
            "seconds": time.perf_counter() - t0, "method": state.searcher.method}

  def _warm_scoring(self, searcher: query_lib.Searcher) -> None:
    """Compiles scoring for every padded query count a batch can have."""
    if not searcher.num_videos:
      return
    for q in (1 << i for i in range(max(0, self.max_batch - 1).bit_length() + 1)):
      searcher.search_embeddings(np.zeros((q, searcher.videos.dim), np.float32), q, MAX_K)

  def reload(self) -> dict:
    """Re-reads the index from disk and swaps it in; raises BadRequest(409) if it can't."""
    if not self._reload_lock.acquire(blocking=False):
      raise BadRequest("a reload is already in progress", 409)
    try:
      # A bucket index is uploaded only once complete (`search index` stages it): no lock.
      holder = None if self.source else store.is_locked(self.index_dir)
      if holder:
        raise BadRequest(f"the index is being written (`search index` pid {holder.get('pid')} "
                         f"on {holder.get('host')}); still serving the previous one, retry "
                         "when that run has finished", 409)
      old = self.state
      try:
        if self.source:
          self.index_dir = self._stage_copy()
        new = _load(self.index_dir, self.init_from, old.searcher.text_encoder)
      except store.SearchIndexError as e:
        raise BadRequest(f"{e}; still serving the previous index", 409) from None
      if new.manifest["fingerprint"] != old.manifest["fingerprint"]:
        raise BadRequest("the index was rebuilt with another model; restart `search serve` "
                         "to load it (still serving the previous index)", 409)
      self._warm_scoring(new.searcher)
      self.state = new  # atomic: a batch reads self.state once
      self.counts["reloads"] += 1
      return {"reloaded": True, "videos": new.searcher.num_videos,
              "previous_videos": old.searcher.num_videos, "method": new.searcher.method}
    finally:
      self._reload_lock.release()

  # ------------------------------------------------------------------ batching
  async def start(self) -> None:
    """Starts the batcher on the running event loop (the app's lifespan calls this)."""
    self._model_thread = concurrent.futures.ThreadPoolExecutor(1, "text-tower")
    self._queue = asyncio.Queue()
    self._carry = None
    self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

  async def stop(self) -> None:
    self._batcher.cancel()
    self._model_thread.shutdown(wait=False)

  async def search(self, texts: list[str], k: int) -> tuple[list, Loaded]:
    fut = asyncio.get_running_loop().create_future()
    await self._queue.put(_Job(texts, k, fut))
    return await fut

  async def _next_batch(self) -> list[_Job]:
    loop = asyncio.get_running_loop()
    job, self._carry = self._carry or await self._queue.get(), None
    jobs, n = [job], len(job.texts)
    deadline = loop.time() + self.window_s
    while n < self.max_batch:
      try:
        job = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time()))
      except asyncio.TimeoutError:
        break
      if n + len(job.texts) > self.max_batch:
        self._carry = job
        break
      jobs.append(job)
      n += len(job.texts)
    return jobs

  async def _batch_loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      jobs = await self._next_batch()
      state = self.state
      texts = [t for j in jobs for t in j.texts]
      try:
        results = await loop.run_in_executor(
            self._model_thread, state.searcher.search, texts, MAX_K)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("search batch failed")
        for j in jobs:
          if not j.future.done():
            j.future.set_exception(e)
        continue
      self.counts["batches"] += 1
      self.counts["batched_queries"] += len(texts)
      start = 0
      for j in jobs:
        if not j.future.done():
          j.future.set_result((results[start:start + len(j.texts)], state))
        start += len(j.texts)

  # ------------------------------------------------------------------ stats
  def stats(self) -> dict:
    s = self.state
    lat = np.asarray(self.latencies_ms, np.float64)
    pct = ({f"p{p}": round(float(np.percentile(lat, p)), 3) for p in (50, 90, 99)}
           if len(lat) else {})
    parts = s.manifest.get("fingerprint_parts", {})
    return {
        "index": self.source or str(self.index_dir), "videos": s.searcher.num_videos,
        "errors": s.manifest.get("num_errors", 0), "videos_root": str(s.root),
        "fingerprint": s.manifest["fingerprint"], "checkpoint": parts.get("checkpoint"),
        "method": s.searcher.method, "loaded_at": s.loaded_at,
        "requests": self.counts["requests"], "queries": self.counts["queries"],
        "batches": self.counts["batches"],
        "mean_batch": (self.counts["batched_queries"] / self.counts["batches"]
                       if self.counts["batches"] else 0.0),
        "reloads": self.counts["reloads"], "errors_4xx": self.counts["4xx"],
        "latency_ms": dict(pct, count=len(lat), window=self.latencies_ms.maxlen),
    }
