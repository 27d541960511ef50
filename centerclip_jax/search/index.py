"""Building a search index of a video folder: one L2-normalised embedding per video.

`build_index` embeds only new or changed files (size or mtime changed), reuses the rows
of unchanged ones, drops deleted ones, and saves every `save_every` batches, so that an
interrupted run resumes where it stopped. Files that failed to decode, or whose
embedding is not finite, are 'error' entries naming the reason, retried only once they
change (or with `rebuild`). One run at a time writes an index (`store.IndexLock`).

Decoding runs in `workers` processes (spawned, so JAX's threads are never forked) a
bounded number of videos ahead of the model; the summary reports how long the model
waited for them. Each video's middle decoded frame is kept as its thumbnail.

Symlinks under the folder are followed only when they point inside it, unless
`follow_symlinks`. The model fingerprint (`fingerprint.model_fingerprint`) is recorded;
an index is only ever extended with embeddings of the same fingerprint. File formats:
`store`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time

import jax
import ml_collections
import numpy as np
import tqdm

from centerclip_jax import paths
from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.inference import encoder as encode
from centerclip_jax.search import ann as ann_lib
from centerclip_jax.search import fingerprint as fingerprint_lib
from centerclip_jax.search import store
from centerclip_jax.search import videos as videos_lib
from centerclip_jax.search.videos import VIDEO_SUFFIXES  # pylint: disable=unused-import
from centerclip_jax.search.videos import VideoFile
from centerclip_jax.search.videos import scan_videos
from centerclip_jax.search.store import CONFIG_FILE  # pylint: disable=unused-import
from centerclip_jax.search.store import EMBEDDINGS_FILE  # pylint: disable=unused-import
from centerclip_jax.search.store import MANIFEST_FILE
from centerclip_jax.search.store import SearchIndexError
from centerclip_jax.search.store import load_index
from centerclip_jax.search.store import read_config  # pylint: disable=unused-import
from centerclip_jax.search.store import read_manifest
from centerclip_jax.weights import loading
from centerclip_jax.weights import resolver



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
  input_wait_seconds: float = 0.0  # of `seconds`, the model waiting for decoded videos
  skipped_links: list[str] = dataclasses.field(default_factory=list)  # symlinks not followed
  ann: str = ""                # the approximate index written, if any
  truncated: list[str] = dataclasses.field(default_factory=list)  # partially decoded files

  @property
  def videos_per_second(self) -> float:
    done = len(self.embedded) + len(self.errors)
    return done / self.seconds if self.seconds > 0 else 0.0

  @property
  def input_wait_share(self) -> float:
    return self.input_wait_seconds / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- building


def _check_dirs(videos_dir, index_dir) -> tuple[pathlib.Path, pathlib.Path]:
  videos_dir = pathlib.Path(videos_dir).resolve()
  index_dir = pathlib.Path(index_dir).resolve()
  if index_dir.exists() and not index_dir.is_dir():
    raise SearchIndexError(f"--index {index_dir}: exists and is not a directory")
  if (index_dir.is_dir() and not (index_dir / MANIFEST_FILE).exists() and any(
      p.name not in (store.LOCK_FILE, store.THUMBS_DIR) and not store.is_leftover(p.name)
      for p in index_dir.iterdir())):
    raise SearchIndexError(f"--index {index_dir}: a non-empty directory that is not a "
                           "search index; give a new or empty directory")
  return videos_dir, index_dir


def build_index(config: ml_collections.ConfigDict, videos_dir: os.PathLike,
                index_dir: os.PathLike, *, batch_size: int = 8, fps: float = 3.0,
                save_every: int = 20, rebuild: bool = False, workers: int = 2,
                follow_symlinks: bool = False, ann: bool = False,
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
    workers: processes decoding videos ahead of the model (<= 1: in this process).
    follow_symlinks: also follow symlinks that point outside `videos_dir`.
    ann: also write an approximate (FAISS) index; an index that has one keeps it current.
    progress: show a tqdm progress bar.
  Raises:
    SearchIndexError: another model's index (and not `rebuild`), not an index, or
      another run is writing it.
    ValueError / FileNotFoundError: a bad config or folder.
  """
  config_lib.validate(config)
  if jax.process_count() > 1:
    raise ValueError("search index runs on one host; start it without multi-host setup")
  if batch_size < 1 or save_every < 1:
    raise ValueError(f"batch_size ({batch_size}) and save_every ({save_every}) must be >= 1")
  if paths.is_uri(index_dir):  # built in a local copy, uploaded when it is complete
    with paths.staged_tree(index_dir) as local:
      return build_index(config, videos_dir, local, batch_size=batch_size, fps=fps,
                         save_every=save_every, rebuild=rebuild, workers=workers,
                         follow_symlinks=follow_symlinks, ann=ann, progress=progress)
  videos_dir, index_dir = _check_dirs(videos_dir, index_dir)
  if not videos_dir.is_dir():
    raise ValueError(f"--videos {videos_dir}: not a directory; give the folder of videos "
                     "to index")
  index_dir.mkdir(parents=True, exist_ok=True)
  with store.IndexLock(index_dir):
    return _build_locked(config, videos_dir, index_dir, batch_size, fps, save_every,
                         rebuild, workers, follow_symlinks, ann, progress)


def _build_locked(config, videos_dir, index_dir, batch_size, fps, save_every, rebuild,
                  workers, follow_symlinks, ann, progress) -> IndexSummary:
  config = ml_collections.ConfigDict(config.to_dict())
  if config.init_from:
    config.init_from = resolver.resolve(config.init_from).spec  # pin the step (DIR@STEP)
  fingerprint, parts = fingerprint_lib.model_fingerprint(config, fps)
  for name in store.remove_leftovers(index_dir):
    logging.warning("%s: removed %s, left by a `search index` run that was killed",
                    index_dir, name)
  skipped: list[str] = []
  files = scan_videos(videos_dir, exclude=[index_dir], follow_symlinks=follow_symlinks,
                      skipped_links=skipped)
  for link in skipped:
    logging.warning("%s: a symlink to outside %s, not followed (--follow_symlinks to "
                    "index it)", link, videos_dir)

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
  ann = ann or ann_lib.exists(index_dir)

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

  config_dict = config.to_dict()  # written with the manifest: the old index keeps its own
  header = {"fingerprint": fingerprint, "fingerprint_parts": parts,
            "videos_root": str(videos_dir), "init_from": config.init_from,
            "follow_symlinks": bool(follow_symlinks)}
  summary = IndexSummary([], reused, removed, {}, old_errors, 0, 0.0, fingerprint,
                         skipped_links=skipped)
  if rows is None:
    rows = np.zeros((0, loading.clip_config_for(config).embed_dim), np.float32)

  def finish(rows):
    rows = _compact(rows, entries)
    extra = {}
    if ann and len(rows):  # written before the commit: a failure leaves the old index whole
      extra, summary.ann = ann_lib.files(rows)
    elif ann:
      ann_lib.remove(index_dir)
    store.save(index_dir, rows, entries, header, complete=True, config=config_dict,
               extra=extra)
    store.prune_thumbs(index_dir, entries)
    summary.num_videos = len(rows)
    return summary

  if not todo:  # nothing to embed: no model needed
    if removed or not old_complete or (ann and not ann_lib.is_current(index_dir, rows)):
      return finish(rows)
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

  def entry(f: VideoFile, **kw) -> dict:
    return {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, **kw}

  def fail(f: VideoFile, msg: str):
    entries[f.path] = entry(f, status="error", error=msg)
    summary.errors[f.path] = msg
    logging.warning("skipping %s", msg)

  written_thumbs: set[str] = set()  # by this run; removed again if the run fails to save
  saved = [old_entries]  # the entries the index on disk has

  def write_thumb(f: VideoFile, jpeg: bytes) -> str:
    name = store.write_thumb(index_dir, f.path, jpeg, version=(f.size, f.mtime_ns))
    written_thumbs.add(pathlib.PurePosixPath(name).name)
    return name

  def run_batch(batch: list[tuple[VideoFile, dict]]):
    frames = encode.pad_batch(np.stack([c["frames"] for _, c in batch]), batch_size)
    masks = encode.pad_batch(np.stack([c["mask"] for _, c in batch]), batch_size)
    glob = parallel.host_batch_to_global({"frames": frames, "mask": masks}, mesh)
    out = np.asarray(encode_video(params, glob["frames"], glob["mask"]), np.float32)
    start = len(rows) + sum(len(r) for r in new_rows)
    good = []
    for i, (f, c) in enumerate(batch):
      if not np.isfinite(out[i]).all():
        fail(f, f"{videos_dir / f.path}: the model's embedding is not finite (NaN/inf); "
             "the file is not indexed")
        continue
      entries[f.path] = entry(f, status="ok", row=start + len(good),
                              thumb=write_thumb(f, c["thumb"]),
                              **c["info"])
      if c["info"]["truncated"]:
        summary.truncated.append(f.path)
      good.append(i)
      summary.embedded.append(f.path)
    new_rows.append(out[good])

  def save_partial():
    nonlocal rows
    rows = np.concatenate([rows] + new_rows) if new_rows else rows
    new_rows.clear()
    store.save(index_dir, rows, entries, header, complete=False, config=config_dict)
    saved[0] = {k: dict(v) for k, v in entries.items()}

  prepare = videos_lib.Prepare(str(videos_dir), fps=fps,
                               short_side=config.data.decode_short_side, resolution=res,
                               max_frames=max_frames,
                               jpeg_quality=config.data.jpeg_quality)
  start_time = time.time()
  batch: list = []
  batches_since_save = 0
  bar = tqdm.tqdm(total=len(todo), desc="indexing videos", unit="video", disable=not progress)
  try:
    for f, result, waited in videos_lib.prefetch(prepare, todo, workers):
      summary.input_wait_seconds += waited
      if isinstance(result, BaseException):
        fail(f, videos_lib.error_message(result))
      else:
        batch.append((f, result))
      bar.update(1)
      bar.set_postfix(errors=len(summary.errors) + len(old_errors))
      if len(batch) == batch_size:
        run_batch(batch)
        batch = []
        batches_since_save += 1
        if batches_since_save >= save_every:
          save_partial()
          batches_since_save = 0
    if batch:
      run_batch(batch)
  except store.IndexWriteError:  # the storage fails: the index stays as last saved
    store.prune_thumbs(index_dir, saved[0], only=written_thumbs)
    raise
  except BaseException:
    save_partial()  # keep what is done; the next run resumes from here
    raise
  finally:
    bar.close()
  summary.seconds = time.time() - start_time
  rows = np.concatenate([rows] + new_rows) if new_rows else rows
  try:
    return finish(rows)
  except store.IndexWriteError:
    store.prune_thumbs(index_dir, saved[0], only=written_thumbs)
    raise


def _compact(rows: np.ndarray, entries: dict[str, dict]) -> np.ndarray:
  """Keeps only referenced rows, in entry (path) order; renumbers `row` in place."""
  ok = [entries[p] for p in sorted(entries) if entries[p]["status"] == "ok"]
  out = rows[[e["row"] for e in ok]] if ok else np.zeros((0, rows.shape[1]), np.float32)
  for i, e in enumerate(ok):
    e["row"] = i
  return out
