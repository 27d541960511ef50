"""A search index of a video folder: one L2-normalised embedding per video, kept up to date.

An index directory holds
  embeddings.npy  float32 `[V, D]`, L2-normalised video embeddings;
  manifest.json   one entry per video file found (`path` relative to the videos folder,
                  `size`, `mtime_ns`, `status` 'ok' with the `row` of its embedding, or
                  'error' with the `error` message), the model `fingerprint` and its parts,
                  `complete` (False while a run is in progress or was interrupted);
  config.json     the config the videos were embedded with (`init_from` made absolute).

`build_index` embeds only new or changed files (size or mtime changed), reuses the rows
of unchanged ones, drops deleted ones, and saves every `save_every` batches, so that an
interrupted run resumes where it stopped. Files that failed to decode are retried only
once they change (or with `rebuild`). Each file is replaced atomically; the manifest,
written last, records the sha256 of the embeddings file it describes.

The model fingerprint (`fingerprint.model_fingerprint`: `config.model`, the identity of
the `init_from` checkpoint, the decoding frame rate) is recorded; an index is only ever
extended with embeddings of the same fingerprint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm

from centerclip_jax import config as config_lib
from centerclip_jax.inference import encoder as encode
from centerclip_jax import parallel
from centerclip_jax.models import centerclip
from centerclip_jax.weights import loading
from centerclip_jax.weights import resolver
from centerclip_jax.search import fingerprint as fingerprint_lib

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".npy")
EMBEDDINGS_FILE = "embeddings.npy"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class SearchIndexError(ValueError):
  """An index directory that cannot be used as asked (wrong model, damaged, not an index)."""


@dataclasses.dataclass(frozen=True)
class VideoFile:
  """A video file under the videos folder: `path` relative (POSIX), size, mtime in ns."""
  path: str
  size: int
  mtime_ns: int


@dataclasses.dataclass
class IndexSummary:
  """What one `build_index` run did (paths relative to the videos folder)."""
  embedded: list[str]          # embedded in this run (new or changed files)
  reused: list[str]            # unchanged, embedding kept
  removed: list[str]           # gone from the folder, dropped from the index
  errors: dict[str, str]       # failed in this run: path -> message
  old_errors: list[str]        # unchanged files that failed before (not retried)
  num_videos: int              # rows of the index now
  seconds: float               # wall time of the embedding loop
  fingerprint: str
  num_devices: int = 0         # devices the batches were sharded over (0: no model run)

  @property
  def videos_per_second(self) -> float:
    done = len(self.embedded) + len(self.errors)
    return done / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- files


def scan_videos(root: os.PathLike, exclude: Iterable[os.PathLike] = ()) -> list[VideoFile]:
  """Every video / `.npy` file under `root` (recursive), sorted by relative path.

  Files under any `exclude` directory (e.g. the index itself) and hidden files are skipped.
  """
  root = pathlib.Path(root).resolve()
  if not root.is_dir():
    raise ValueError(f"--videos {root}: not a directory; give the folder of videos to index")
  excluded = [pathlib.Path(e).resolve() for e in exclude]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    here = pathlib.Path(dirpath)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                         and (here / d).resolve() not in excluded)
    for name in filenames:
      if name.startswith(".") or pathlib.Path(name).suffix.lower() not in VIDEO_SUFFIXES:
        continue
      p = here / name
      try:
        st = p.stat()
      except OSError:
        continue  # vanished or a broken link
      if p.is_file():
        found.append(VideoFile(p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
  return sorted(found, key=lambda f: f.path)


def _atomic_write(path: pathlib.Path, write: Callable[[Any], None], mode: str = "wb") -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _array_sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


# ----------------------------------------------------------------------------- reading


def read_manifest(index_dir: os.PathLike) -> dict:
  """manifest.json of an index directory (checked)."""
  path = pathlib.Path(index_dir) / MANIFEST_FILE
  if not path.is_file():
    raise SearchIndexError(f"{index_dir}: no {MANIFEST_FILE}; not a search index (build "
                           "one with `python -m centerclip_jax.search index ...`)")
  try:
    manifest = json.loads(path.read_text())
  except (ValueError, OSError) as e:
    raise SearchIndexError(f"{path}: unreadable ({e}); rebuild the index with "
                           "--rebuild") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
    raise SearchIndexError(f"{path}: not a format-{FORMAT_VERSION} index manifest; rebuild "
                           "the index with --rebuild")
  return manifest


def read_config(index_dir: os.PathLike) -> ml_collections.ConfigDict:
  path = pathlib.Path(index_dir) / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (ValueError, OSError) as e:
    raise SearchIndexError(f"{path}: cannot read the index's config ({e})") from None


def load_index(index_dir: os.PathLike, verify: bool = False) -> tuple[dict, np.ndarray]:
  """(manifest, embeddings `[V, D]`) of an index; `verify` checks the embeddings' sha256."""
  manifest = read_manifest(index_dir)
  path = pathlib.Path(index_dir) / EMBEDDINGS_FILE
  try:
    emb = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise SearchIndexError(f"{path}: unreadable ({e}); rebuild the index with "
                           "--rebuild") from None
  if emb.ndim != 2 or emb.dtype != np.float32 or len(emb) != manifest.get("num_rows"):
    raise SearchIndexError(f"{path}: {emb.dtype} {emb.shape} does not match {MANIFEST_FILE} "
                           f"({manifest.get('num_rows')} rows); rebuild the index with "
                           "--rebuild")
  if verify and _array_sha256(emb) != manifest.get("embeddings_sha256"):
    raise SearchIndexError(f"{path}: content does not match {MANIFEST_FILE} (interrupted "
                           "write?)")
  return manifest, emb


# ----------------------------------------------------------------------------- writing


def _save(index_dir: pathlib.Path, emb: np.ndarray, entries: dict[str, dict], header: dict,
          complete: bool) -> None:
  """Writes embeddings.npy, then manifest.json (the commit), each atomically."""
  emb = np.ascontiguousarray(emb, np.float32)
  _atomic_write(index_dir / EMBEDDINGS_FILE, lambda f: np.save(f, emb, allow_pickle=False))
  manifest = dict(header, format=FORMAT_VERSION, complete=complete, num_rows=len(emb),
                  embeddings_sha256=_array_sha256(emb),
                  num_ok=sum(e["status"] == "ok" for e in entries.values()),
                  num_errors=sum(e["status"] == "error" for e in entries.values()),
                  entries=[entries[p] for p in sorted(entries)])
  text = json.dumps(manifest, indent=1) + "\n"
  _atomic_write(index_dir / MANIFEST_FILE, lambda f: f.write(text), mode="w")


def _compact(rows: np.ndarray, entries: dict[str, dict]) -> np.ndarray:
  """Keeps only referenced rows, in entry (path) order; renumbers `row` in place."""
  ok = [entries[p] for p in sorted(entries) if entries[p]["status"] == "ok"]
  out = rows[[e["row"] for e in ok]] if ok else np.zeros((0, rows.shape[1]), np.float32)
  for i, e in enumerate(ok):
    e["row"] = i
  return out


def _prefetch(fn: Callable, items: list, workers: int) -> Iterator[tuple[Any, Any]]:
  """Yields (item, fn(item) or the exception it raised) in order, `workers` threads ahead."""
  if workers <= 1:
    for item in items:
      try:
        yield item, fn(item)
      except Exception as e:  # pylint: disable=broad-except
        yield item, e
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    it = iter(items)
    for item in it:
      pending.append((item, pool.submit(fn, item)))
      if len(pending) >= 2 * workers:
        break
    while pending:
      item, fut = pending.popleft()
      nxt = next(it, None)
      if nxt is not None:
        pending.append((nxt, pool.submit(fn, nxt)))
      try:
        yield item, fut.result()
      except Exception as e:  # pylint: disable=broad-except
        yield item, e


def _error_message(e: BaseException) -> str:
  if isinstance(e, (encode.InputError, ValueError)):
    return str(e)
  return f"{type(e).__name__}: {e}"


def build_index(config: ml_collections.ConfigDict, videos_dir: os.PathLike,
                index_dir: os.PathLike, *, batch_size: int = 8, fps: float = 3.0,
                save_every: int = 20, rebuild: bool = False, workers: int = 4,
                progress: bool = True) -> IndexSummary:
  """Creates or updates the index of every video under `videos_dir` (see module doc).

  Args:
    config: the model config (`config.init_from`: converted or trained checkpoint).
    videos_dir: folder searched recursively for VIDEO_SUFFIXES files.
    index_dir: the index directory (created if missing).
    batch_size: videos per forward pass (rounded up to a multiple of the device count).
    fps: frame rate videos are decoded at before frame sampling (as `encode`).
    save_every: save progress every this many batches.
    rebuild: re-embed everything, also when the index was built with another model.
    workers: threads that decode videos ahead of the model.
    progress: show a tqdm progress bar.
  Raises:
    SearchIndexError: the index was built with another model fingerprint (and not
      `rebuild`), or `index_dir` is not an index.
    ValueError / FileNotFoundError: a bad config or folder.
  """
  config_lib.validate(config)
  if jax.process_count() > 1:
    raise ValueError("search index runs on one host; start it without multi-host setup")
  if batch_size < 1 or save_every < 1:
    raise ValueError(f"batch_size ({batch_size}) and save_every ({save_every}) must be >= 1")
  videos_dir = pathlib.Path(videos_dir).resolve()
  index_dir = pathlib.Path(index_dir).resolve()
  if index_dir.exists() and not index_dir.is_dir():
    raise SearchIndexError(f"--index {index_dir}: exists and is not a directory")
  if (index_dir.is_dir() and any(index_dir.iterdir())
      and not (index_dir / MANIFEST_FILE).exists()):
    raise SearchIndexError(f"--index {index_dir}: a non-empty directory that is not a "
                           "search index; give a new or empty directory")
  config = ml_collections.ConfigDict(config.to_dict())
  if config.init_from:
    config.init_from = resolver.resolve(config.init_from).spec  # pin the step (DIR@STEP)
  fingerprint, parts = fingerprint_lib.model_fingerprint(config, fps)
  files = scan_videos(videos_dir, exclude=[index_dir])

  old_entries: dict[str, dict] = {}
  old_complete = False
  rows = None
  if (index_dir / MANIFEST_FILE).exists() and not rebuild:
    manifest = read_manifest(index_dir)
    if manifest.get("fingerprint") != fingerprint:
      raise SearchIndexError(
          f"--index {index_dir} was built with another model: "
          f"{fingerprint_lib.mismatch_reason(manifest.get('fingerprint_parts', {}), parts)}. "
          "Pass --rebuild to re-embed every video with this model, or use another --index "
          "directory.")
    try:
      _, rows = load_index(index_dir, verify=True)
      old_entries = {e["path"]: e for e in manifest["entries"]}
      old_complete = bool(manifest.get("complete"))
    except SearchIndexError as e:
      logging.warning("%s: re-embedding every video", e)

  entries: dict[str, dict] = {}
  todo: list[VideoFile] = []
  reused, old_errors = [], []
  for f in files:
    old = old_entries.get(f.path)
    if old and old["size"] == f.size and old["mtime_ns"] == f.mtime_ns:
      entries[f.path] = old
      (reused if old["status"] == "ok" else old_errors).append(f.path)
    else:
      todo.append(f)
  removed = sorted(set(old_entries) - {f.path for f in files})

  index_dir.mkdir(parents=True, exist_ok=True)
  (index_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2,
                                                  sort_keys=True) + "\n")
  header = {"fingerprint": fingerprint, "fingerprint_parts": parts,
            "videos_root": str(videos_dir), "init_from": config.init_from}
  summary = IndexSummary([], reused, removed, {}, old_errors, 0, 0.0, fingerprint)
  if rows is None:
    rows = np.zeros((0, loading.clip_config_for(config).embed_dim), np.float32)
  if not todo:  # nothing to embed: no model needed
    if removed or not old_complete:
      rows = _compact(rows, entries)
      _save(index_dir, rows, entries, header, complete=True)
    summary.num_videos = len(rows)
    return summary

  model, params = loading.load_model(config)
  res, max_frames = model.clip_config.image_resolution, model.max_frames
  mesh = parallel.make_mesh(jax.local_devices())
  n_dev = summary.num_devices = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  encode_video, _ = parallel.jit_encoders(model, mesh)
  params = parallel.replicate(params, mesh)
  new_rows: list[np.ndarray] = []

  def prepare(f: VideoFile):
    frames = encode.load_frames(str(videos_dir / f.path), fps=fps, resolution=res)
    return encode.video_inputs(frames, max_frames, res)

  def run_batch(batch: list[tuple[VideoFile, tuple]]):
    frames = encode.pad_batch(np.stack([c[0] for _, c in batch]), batch_size)
    masks = encode.pad_batch(np.stack([c[1] for _, c in batch]), batch_size)
    glob = parallel.host_batch_to_global({"frames": frames, "mask": masks}, mesh)
    out = np.asarray(encode_video(params, glob["frames"], glob["mask"]), np.float32)
    start = len(rows) + sum(len(r) for r in new_rows)
    new_rows.append(out[:len(batch)])
    for i, (f, _) in enumerate(batch):
      entries[f.path] = {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
                         "status": "ok", "row": start + i}
      summary.embedded.append(f.path)

  def save(complete: bool):
    nonlocal rows
    rows = np.concatenate([rows] + new_rows) if new_rows else rows
    new_rows.clear()
    if complete:
      rows = _compact(rows, entries)
    _save(index_dir, rows, entries, header, complete)

  start_time = time.time()
  batch: list = []
  batches_since_save = 0
  bar = tqdm.tqdm(total=len(todo), desc="indexing videos", unit="video", disable=not progress)
  try:
    for f, result in _prefetch(prepare, todo, workers):
      if isinstance(result, BaseException):
        msg = _error_message(result)
        entries[f.path] = {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
                           "status": "error", "error": msg}
        summary.errors[f.path] = msg
        logging.warning("skipping %s", msg)
      else:
        batch.append((f, result))
      bar.update(1)
      bar.set_postfix(errors=len(summary.errors) + len(old_errors))
      if len(batch) == batch_size:
        run_batch(batch)
        batch = []
        batches_since_save += 1
        if batches_since_save >= save_every:
          save(complete=False)
          batches_since_save = 0
    if batch:
      run_batch(batch)
  except BaseException:
    save(complete=False)  # keep what is done; the next run resumes from here
    raise
  finally:
    bar.close()
  summary.seconds = time.time() - start_time
  save(complete=True)
  summary.num_videos = len(rows)
  return summary
