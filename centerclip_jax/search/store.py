"""The files of a search index: reading them (every fault named with its fix), writing them
as one atomic change (`commit`: a full disk or an I/O error leaves the previous index
whole, `IndexWriteError` names the file), the writer's lock, and thumbnails.

  embeddings.npy  float32 `[V, D]`, L2-normalised video embeddings;
  manifest.json   one entry per video file (`path` relative to the videos folder, `size`,
                  `mtime_ns`, `status` 'ok' with the `row` of its embedding and its
                  `thumb`, or 'error' with the `error` message), the model `fingerprint`,
                  `num_rows`, the embeddings' sha256, `complete`;
  config.json     the config the videos were embedded with;
  thumbs/         one JPEG per indexed video (a frame the model saw), named by a hash of
                  its path, size and mtime;
  index.lock      held (flock) by the one `search index` run writing the index.

`load_index` checks what a damaged index looks like: a truncated or non-JSON manifest, a
truncated embeddings file, rows that do not match the manifest (count, row numbers, sha256)
and non-finite rows; each is a `SearchIndexError` naming the file and `--rebuild`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import socket
import time
from typing import Any, Callable

import ml_collections
import numpy as np

EMBEDDINGS_FILE = "embeddings.npy"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
LOCK_FILE = "index.lock"
THUMBS_DIR = "thumbs"
FORMAT_VERSION = 1
REBUILD = ("rebuild it with `python -m centerclip_jax.search index --config CFG --videos DIR "
           "--index {index} --rebuild`")


class SearchIndexError(ValueError):
  """An index directory that cannot be used as asked (wrong model, damaged, not an index)."""


def _fix(index_dir) -> str:
  return REBUILD.format(index=index_dir)


class IndexWriteError(SearchIndexError):
  """A write of the index failed (disk full, I/O error); the live index is the last saved."""


def _write_error(path: pathlib.Path, e: OSError) -> IndexWriteError:
  return IndexWriteError(
      f"writing the search index failed: {path}: {e.strerror or e} (errno {e.errno}); "
      f"{path.parent if path.parent.name != THUMBS_DIR else path.parent.parent} still "
      "holds the index as last saved (readable); free space or fix the storage, then "
      "re-run `search index` to resume")


def _tmp(path: pathlib.Path, kind: str = "tmp") -> pathlib.Path:
  return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def is_leftover(name: str) -> bool:
  """A temporary or backup file of a writer that was killed (see `commit`)."""
  return name.startswith(".") and (".tmp-" in name or ".prev-" in name)


def _write_synced(path: pathlib.Path, write: Callable[[Any], None], mode: str) -> None:
  with open(path, mode) as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(folder: pathlib.Path) -> None:
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _unlink_quietly(*files: pathlib.Path) -> None:
  for f in files:
    with contextlib.suppress(OSError):
      f.unlink(missing_ok=True)


def atomic_write(path: pathlib.Path, write: Callable[[Any], None], mode: str = "wb") -> None:
  """Writes `path` through a temporary file, fsync and rename (readers see old or new).

  Raises IndexWriteError naming `path` when a write fails (ENOSPC, EIO, ...); the old file
  stays and the temporary one is removed.
  """
  tmp = _tmp(path)
  try:
    _write_synced(tmp, write, mode)
    os.replace(tmp, path)
  except OSError as e:
    raise _write_error(path, e) from None
  finally:
    _unlink_quietly(tmp)


def commit(index_dir: pathlib.Path, files: dict[str, tuple[Callable[[Any], None], str]]
           ) -> None:
  """Replaces several files of `index_dir` as one change; the last of `files` commits it.

  `files`: name -> (write(file object), open mode). Every file is first written to a
  temporary file and synced (where ENOSPC/EIO show up), then each is renamed over the old
  one, keeping the old one as a hard link until the last rename; a failure on the way puts
  the old files back and raises IndexWriteError naming the file. Only a crash between the
  renames leaves a mix, which `load_index` detects (the manifest's sha256).
  """
  index_dir = pathlib.Path(index_dir)
  tmps = {n: _tmp(index_dir / n) for n in files}
  backups: dict[str, pathlib.Path] = {}
  replaced: list[str] = []
  current = index_dir
  try:
    for name, (write, mode) in files.items():
      current = index_dir / name
      _write_synced(tmps[name], write, mode)
    for name in files:
      current = index_dir / name
      if current.exists():
        backup = _tmp(current, "prev")
        _unlink_quietly(backup)
        try:
          os.link(current, backup)
          backups[name] = backup
        except OSError:  # no hard links here: renamed without a way back
          pass
      os.replace(tmps[name], current)
      replaced.append(name)
    _fsync_dir(index_dir)
  except OSError as e:
    for name in reversed(replaced):
      with contextlib.suppress(OSError):
        if name in backups:
          os.replace(backups[name], index_dir / name)
        else:
          (index_dir / name).unlink()
    raise _write_error(current, e) from None
  finally:
    _unlink_quietly(*tmps.values(), *backups.values())


def remove_leftovers(index_dir: pathlib.Path) -> list[str]:
  """Deletes temporary files of killed writers (call with the lock held); their names."""
  gone = []
  for folder in (index_dir, index_dir / THUMBS_DIR):
    if folder.is_dir():
      for f in folder.iterdir():
        if is_leftover(f.name):
          _unlink_quietly(f)
          gone.append(str(f.relative_to(index_dir)))
  return gone


def array_sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


def thumb_name(path: str, version: tuple = ()) -> str:
  """File name (under thumbs/) of the thumbnail of the video at relative `path`.

  `version` (size, mtime_ns): a changed file gets a new name, so that the live index keeps
  its own thumbnail until the update that replaces it is committed.
  """
  key = "\0".join([path, *map(str, version)])
  return hashlib.sha1(key.encode()).hexdigest()[:20] + ".jpg"


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
    raise SearchIndexError(f"{path}: truncated or not JSON ({e}); "
                           f"{_fix(index_dir)}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
    raise SearchIndexError(f"{path}: not a format-{FORMAT_VERSION} index manifest; "
                           f"{_fix(index_dir)}")
  if not isinstance(manifest.get("entries"), list) or not all(
      isinstance(e, dict) and "path" in e and "status" in e for e in manifest["entries"]):
    raise SearchIndexError(f"{path}: its entries are damaged; {_fix(index_dir)}")
  return manifest


def read_config(index_dir: os.PathLike) -> ml_collections.ConfigDict:
  path = pathlib.Path(index_dir) / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (ValueError, OSError) as e:
    raise SearchIndexError(f"{path}: cannot read the index's config ({e}); "
                           f"{_fix(index_dir)}") from None


def ok_rows(manifest: dict) -> list[int]:
  return [e.get("row") for e in manifest["entries"] if e["status"] == "ok"]


def load_index(index_dir: os.PathLike, verify: bool = True) -> tuple[dict, np.ndarray]:
  """(manifest, embeddings `[V, D]`) of an index, checked against each other.

  `verify` also compares the embeddings' sha256 with the manifest's and checks that every
  row is finite (about 1 s per million rows of 512).
  """
  manifest = read_manifest(index_dir)
  path = pathlib.Path(index_dir) / EMBEDDINGS_FILE
  try:
    emb = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise SearchIndexError(f"{path}: truncated or unreadable ({e}); "
                           f"{_fix(index_dir)}") from None
  n = manifest.get("num_rows")
  if emb.ndim != 2 or emb.dtype != np.float32 or len(emb) != n:
    raise SearchIndexError(f"{path}: {emb.dtype} {emb.shape} does not match {MANIFEST_FILE} "
                           f"({n} rows); {_fix(index_dir)}")
  rows = ok_rows(manifest)
  if sorted(r if isinstance(r, int) else -1 for r in rows) != list(range(n)):
    raise SearchIndexError(f"{path}: the {len(rows)} 'ok' entries of {MANIFEST_FILE} do not "
                           f"number its {n} rows 0..{n - 1} once each; {_fix(index_dir)}")
  if verify:
    if array_sha256(emb) != manifest.get("embeddings_sha256"):
      raise SearchIndexError(f"{path}: content does not match {MANIFEST_FILE} (written by "
                             f"another run, or damaged); {_fix(index_dir)}")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
      names = [e["path"] for e in manifest["entries"]
               if e["status"] == "ok" and e["row"] in set(bad[:3].tolist())]
      raise SearchIndexError(f"{path}: {len(bad)} non-finite rows (e.g. {names}); "
                             f"{_fix(index_dir)}")
  return manifest, emb


# ----------------------------------------------------------------------------- writing


def save(index_dir: pathlib.Path, emb: np.ndarray, entries: dict[str, dict], header: dict,
         complete: bool, config: dict | None = None,
         extra: dict[str, tuple[Callable[[Any], None], str]] | None = None) -> None:
  """Writes embeddings.npy, `extra` files (the ANN), config.json, then manifest.json (the
  commit) as one change (`commit`): a failed write leaves the previous index as it was."""
  emb = np.ascontiguousarray(emb, np.float32)
  manifest = dict(header, format=FORMAT_VERSION, complete=complete, num_rows=len(emb),
                  embeddings_sha256=array_sha256(emb),
                  num_ok=sum(e["status"] == "ok" for e in entries.values()),
                  num_errors=sum(e["status"] == "error" for e in entries.values()),
                  entries=[entries[p] for p in sorted(entries)])
  text = json.dumps(manifest, indent=1) + "\n"
  files = {EMBEDDINGS_FILE: (lambda f: np.save(f, emb, allow_pickle=False), "wb")}
  files.update(extra or {})
  if config is not None:
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    files[CONFIG_FILE] = (lambda f: f.write(config_text), "w")
  files[MANIFEST_FILE] = (lambda f: f.write(text), "w")
  commit(index_dir, files)


def write_thumb(index_dir: pathlib.Path, path: str, jpeg: bytes, version: tuple = ()) -> str:
  """Stores a video's thumbnail; returns its name relative to the index directory."""
  try:
    (index_dir / THUMBS_DIR).mkdir(exist_ok=True)
  except OSError as e:
    raise _write_error(index_dir / THUMBS_DIR, e) from None
  name = f"{THUMBS_DIR}/{thumb_name(path, version)}"
  atomic_write(index_dir / name, lambda f: f.write(jpeg))
  return name


def prune_thumbs(index_dir: pathlib.Path, entries: dict[str, dict],
                 only: set[str] | None = None) -> None:
  """Deletes thumbnails no entry refers to (videos removed or changed), or of `only` (names
  under thumbs/) those no entry refers to (the ones a failed update wrote)."""
  keep = {pathlib.PurePosixPath(e["thumb"]).name for e in entries.values() if e.get("thumb")}
  folder = index_dir / THUMBS_DIR
  if folder.is_dir():
    for f in folder.iterdir():
      if f.suffix == ".jpg" and f.name not in keep and (only is None or f.name in only):
        try:
          f.unlink(missing_ok=True)
        except OSError as e:  # a stale thumbnail is harmless: say so, keep the index
          logging.warning("%s: could not delete an unused thumbnail (%s)", f, e.strerror)


# ----------------------------------------------------------------------------- lock


class IndexLock:
  """The writer's lock of an index: `flock` on index.lock, which records pid and host.

  The kernel drops the lock when its process dies, so a lock file left by a killed run is
  stale by construction: the next run takes it over (and logs whose it was). A live holder
  makes `acquire` raise a `SearchIndexError` naming its pid, host and start time.
  """

  def __init__(self, index_dir: os.PathLike):
    self.path = pathlib.Path(index_dir) / LOCK_FILE
    self._fd = None

  def holder(self) -> dict:
    try:
      return json.loads(self.path.read_text() or "{}")
    except (ValueError, OSError):
      return {}

  def acquire(self) -> "IndexLock":
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        h = self.holder()
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.get("started", 0)))
        raise SearchIndexError(
            f"--index {self.path.parent} is being written by another `search index` run "
            f"(pid {h.get('pid', '?')} on {h.get('host', '?')}, since {since}); wait for it "
            f"to finish, or use another --index directory") from None
      try:  # The file may have been replaced between open and flock: lock the current one.
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    old = self.holder()
    if old.get("pid"):
      logging.warning("%s: taking over a stale lock of pid %s on %s (that run is gone)",
                      self.path, old.get("pid"), old.get("host"))
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.time()}).encode()
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, info, 0)
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      raise _write_error(self.path, e) from None
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # An empty lock file: nobody's (the file itself stays).
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def is_locked(index_dir: os.PathLike) -> dict | None:
  """The holder (pid, host, started) when a live run holds the index's lock, else None."""
  path = pathlib.Path(index_dir) / LOCK_FILE
  if not path.exists():
    return None
  fd = os.open(path, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return IndexLock(index_dir).holder() or {"pid": "?"}
  finally:
    os.close(fd)
  return None
