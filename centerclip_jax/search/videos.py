"""The videos of a folder to index: finding them (symlink rules) and decoding them ahead of
the model in worker processes (`prefetch`, a bounded queue).
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import dataclasses
import io
import multiprocessing
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from centerclip_jax.inference import encoder as encode

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".npy")
THUMB_QUALITY = 85


@dataclasses.dataclass(frozen=True)
class VideoFile:
  """A video file under the videos folder: `path` relative (POSIX), size, mtime in ns."""
  path: str
  size: int
  mtime_ns: int


# ----------------------------------------------------------------------------- files


def _inside(path: pathlib.Path, root: pathlib.Path) -> bool:
  return path == root or root in path.parents


def scan_videos(root: os.PathLike, exclude: Iterable[os.PathLike] = (), *,
                follow_symlinks: bool = False,
                skipped_links: list | None = None) -> list[VideoFile]:
  """Every video / `.npy` file under `root` (recursive), sorted by relative path.

  Files under any `exclude` directory (e.g. the index itself) and hidden files are
  skipped. A symlink (file or folder) whose target is outside `root` is skipped (its
  relative path appended to `skipped_links`) unless `follow_symlinks`; a symlinked folder
  inside `root` is not descended (its files are found under their real path).
  """
  root = pathlib.Path(root).resolve()
  if not root.is_dir():
    raise ValueError(f"--videos {root}: not a directory; give the folder of videos to index")
  excluded = [pathlib.Path(e).resolve() for e in exclude]
  skipped = skipped_links if skipped_links is not None else []
  seen_dirs = {root}
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
    here = pathlib.Path(dirpath)
    keep = []
    for d in sorted(dirnames):
      real = (here / d).resolve()
      if d.startswith(".") or real in excluded or real in seen_dirs:
        continue
      if (here / d).is_symlink():
        if _inside(real, root):
          continue  # its files are found under their real folder
        if not follow_symlinks:
          skipped.append((here / d).relative_to(root).as_posix())
          continue
      seen_dirs.add(real)
      keep.append(d)
    dirnames[:] = keep
    for name in filenames:
      if name.startswith(".") or pathlib.Path(name).suffix.lower() not in VIDEO_SUFFIXES:
        continue
      p = here / name
      if p.is_symlink() and not (follow_symlinks or _inside(p.resolve(), root)):
        skipped.append(p.relative_to(root).as_posix())
        continue
      try:
        st = p.stat()
      except OSError:
        continue  # vanished or a broken link
      if p.is_file():
        found.append(VideoFile(p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
  return sorted(found, key=lambda f: f.path)


# ----------------------------------------------------------------------------- decoding


def decode_for_index(path: str, fps: float, short_side: int, resolution: int,
                     max_frames: int, jpeg_quality: int) -> dict:
  """A worker's job: the model inputs of one video, its thumbnail and what decoding found.

  `encode.file_inputs` decodes only the sampled frames; the middle one is the thumbnail.
  Returns {'frames' uint8 [max_frames, res, res, 3], 'mask' bool [max_frames], 'thumb'
  JPEG bytes, 'info': {num_frames, frames_used, truncated[, expected_frames]}}.
  """
  inputs, mask, clip = encode.file_inputs(path, fps=fps, short_side=short_side,
                                          max_frames=max_frames, resolution=resolution,
                                          jpeg_quality=jpeg_quality)
  buf = io.BytesIO()
  Image.fromarray(clip.frames[len(clip.frames) // 2]).save(buf, format="JPEG",
                                                           quality=THUMB_QUALITY)
  info = {"num_frames": int(clip.num_frames), "frames_used": int(len(clip.indices)),
          "truncated": bool(clip.truncated)}
  if clip.truncated and clip.expected_frames:
    info["expected_frames"] = int(clip.expected_frames)
  return {"frames": inputs, "mask": mask, "thumb": buf.getvalue(), "info": info}


def prefetch(fn: Callable, items: list, workers: int) -> Iterator[tuple[Any, Any, float]]:
  """Yields (item, fn(item) or its exception, seconds waited) in order.

  `workers` > 1: that many spawned processes, at most 2 * workers items ahead (a bounded
  queue); otherwise in this process (what the tests' monkeypatching relies on).
  """
  if workers <= 1:
    for item in items:
      t0 = time.perf_counter()
      try:
        out = fn(item)
      except Exception as e:  # pylint: disable=broad-except
        out = e
      yield item, out, time.perf_counter() - t0
    return
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending = collections.deque()
    it = iter(items)
    try:
      for item in it:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= 2 * workers:
          break
      while pending:
        item, fut = pending.popleft()
        t0 = time.perf_counter()
        try:
          out = fut.result()
        except Exception as e:  # pylint: disable=broad-except
          out = e
        waited = time.perf_counter() - t0
        nxt = next(it, None)
        if nxt is not None:
          pending.append((nxt, pool.submit(fn, nxt)))
        yield item, out, waited
    finally:
      for _, fut in pending:
        fut.cancel()


@dataclasses.dataclass(frozen=True)
class Prepare:
  """`decode_for_index` bound to one run's settings (picklable for worker processes)."""
  root: str
  fps: float
  short_side: int
  resolution: int
  max_frames: int
  jpeg_quality: int

  def __call__(self, f: VideoFile) -> dict:
    return decode_for_index(os.path.join(self.root, f.path), self.fps, self.short_side,
                            self.resolution, self.max_frames, self.jpeg_quality)


def error_message(e: BaseException) -> str:
  if isinstance(e, concurrent.futures.process.BrokenProcessPool):
    return "the decoding worker died on this file (out of memory or a crash in FFmpeg)"
  if isinstance(e, (encode.InputError, ValueError)):
    return str(e)
  return f"{type(e).__name__}: {e}"
