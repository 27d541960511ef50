"""Shared logic of the video-text TFDS builders.

A dataset module only parses its annotation files into `VideoJob`s per split
(`VideoTextBuilder._read_splits`); this base class finds the videos under the
manual dir, decodes them in a process pool (`video.encode_video_jpeg`: PyAV
at `config.fps`, shorter side `config.short_side`, JPEG), caches each decoded
video on disk (keyed by path + mtime + options) so that an interrupted build
restarts fast, skips missing and undecodable videos and records them, and the
short ones, in the dataset's metadata (`info.metadata['skipped']`, `['short']`,
`['listed']`, `['empty_splits']`), and writes the readable build report
(`report.py`) to `build_report.txt` in the dataset's folder. A download config
with a Beam runner or options builds in a Beam pipeline instead (`beam_build.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import tensorflow_datasets as tfds
import tqdm
from etils import epath

from centerclip_jax import paths
from centerclip_jax.data import video
from centerclip_jax.data.datasets import report
from centerclip_jax.data.datasets.features import video_text_features

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg",
                    ".wmv", ".flv", ".3gp", ".ogv")


class AnnotationError(ValueError):
  """A malformed annotation file (the message names the file and line or key)."""


@dataclasses.dataclass(frozen=True)
class VideoJob:
  """One example to build: a video and all its captions."""
  video_id: str
  candidates: tuple[str, ...]  # File names or stems that may hold the video.
  captions: tuple[str, ...]
  start_time: float | None = None
  end_time: float | None = None


class VideoTextConfig(tfds.core.BuilderConfig):
  """Decoding options: target fps, shorter side and JPEG quality."""

  def __init__(self, *, fps: float = 3.0, short_side: int = 224,
               jpeg_quality: int = video.JPEG_QUALITY, name: str | None = None, **kwargs):
    if fps <= 0 or short_side <= 0 or not 1 <= jpeg_quality <= 100:
      raise ValueError(f"bad config: fps={fps}, short_side={short_side}, "
                       f"jpeg_quality={jpeg_quality}")
    name = name or config_name(fps, short_side)
    kwargs.setdefault("description", f"Frames at {fps:g} fps, shorter side {short_side}.")
    super().__init__(name=name, **kwargs)
    self.fps, self.short_side, self.jpeg_quality = float(fps), int(short_side), jpeg_quality


def config_name(fps: float, short_side: int) -> str:
  return f"fps{fps:g}_{short_side}".replace(".", "p")


def _walk(root: str | os.PathLike) -> Iterable[tuple[str, str]]:
  """(folder, file name) of every file under root, folders in sorted order; a bucket
  folder (`gs://...`) through epath."""
  if paths.is_uri(root):
    found = [(os.fspath(folder), name) for folder, _, files in epath.Path(root).walk()
             for name in files]
    yield from sorted(found, key=lambda f: (f[0].rstrip("/").split("/"), f[1]))
    return
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs.sort()
    for name in sorted(files):
      yield folder, name


class VideoIndex:
  """Every video file under a folder (local or in a bucket), by file name or by stem."""

  def __init__(self, root: str | os.PathLike):
    self.by_name: dict[str, str] = {}
    self.by_stem: dict[str, str] = {}
    self.duplicates = 0
    for folder, name in _walk(root):
      if name.lower().endswith(VIDEO_EXTENSIONS):
        path = (folder.rstrip("/") + "/" + name if paths.is_uri(folder)
                else os.path.join(folder, name))
        if name in self.by_name:
          self.duplicates += 1
          continue
        self.by_name[name] = path
        self.by_stem.setdefault(os.path.splitext(name)[0], path)
    if self.duplicates:
      log.warning("%s: %d video file names occur twice; the first (sorted) is used.",
                  root, self.duplicates)

  def find(self, candidates: Iterable[str]) -> str | None:
    """The first candidate found as a file name, else as a stem; None if absent."""
    candidates = list(candidates)
    for key in candidates:
      if key in self.by_name:
        return self.by_name[key]
    for key in candidates:
      if key in self.by_stem:
        return self.by_stem[key]
    return None

  def __len__(self) -> int:
    return len(self.by_name)


def read_text(file) -> str:
  """A text annotation file, local or in a bucket, as UTF-8 with its line ends kept."""
  return epath.Path(file).read_bytes().decode("utf-8")


def find_annotation(manual_dir: Path, name: str, max_depth: int = 2) -> Path:
  """`name` in manual_dir or a subfolder up to `max_depth` deep; raises if absent."""
  for depth in range(max_depth + 1):
    matches = sorted(manual_dir.glob("/".join(["*"] * depth + [name])))
    if matches:
      return matches[0]
  raise FileNotFoundError(f"{name} not found in {manual_dir} (or its subfolders); "
                          "see the dataset's MANUAL_DOWNLOAD_INSTRUCTIONS.")


class VideoTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: subclasses set the class docs and implement `_read_splits`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [VideoTextConfig(fps=3.0, short_side=224)]
  HOMEPAGE = ""
  CITATION = ""

  def __init__(self, *, num_workers: int | None = None,
               frame_cache_dir: str | os.PathLike | None = None,
               keep_frame_cache: bool = True, **kwargs):
    """Args beyond TFDS's: num_workers (decode processes; None/0: all cores),
    frame_cache_dir (default `<download_dir>/centerclip_frames/<name>`),
    keep_frame_cache (False: delete the cache after a successful build)."""
    super().__init__(**kwargs)
    self.num_workers = num_workers or len(os.sched_getaffinity(0))
    self._frame_cache_dir = frame_cache_dir
    self._keep_frame_cache = keep_frame_cache
    self.frame_cache_dir: str | None = None  # Set when the build starts.
    self._annotations: tuple[Path, dict[str, list[VideoJob]]] | None = None
    self.beam_runner: str | None = None  # Set when a Beam build starts.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=video_text_features(),
        homepage=self.HOMEPAGE, citation=self.CITATION,
        metadata=tfds.core.MetadataDict())

  def _read_splits(self, manual_dir: Path) -> dict[str, list[VideoJob]]:
    """Parses the annotations into jobs per split; raises AnnotationError."""
    raise NotImplementedError

  def read_annotations(self, manual_dir) -> dict[str, list[VideoJob]]:
    """The jobs per split from the annotation files (parsed once per manual dir).

    Raises AnnotationError or FileNotFoundError naming the file; call it before
    `download_and_prepare` to report a bad layout before TFDS starts.
    """
    manual_dir = epath.Path(manual_dir)
    if self._annotations is None or self._annotations[0] != manual_dir:
      splits = self._read_splits(manual_dir)
      for name, jobs in splits.items():
        counts = collections.Counter(job.video_id for job in jobs)
        if dup := next((v for v, n in counts.items() if n > 1), None):
          raise AnnotationError(f"{self.name}, split {name}: video id {dup!r} listed twice")
      self._annotations = (manual_dir, splits)
    return self._annotations[1]

  def request(self, path: str, job: VideoJob, return_frames: bool,
              cache: bool = True) -> video.JpegRequest:
    """The decode request of one video (cache: in the frame cache dir)."""
    config = self.builder_config
    return video.JpegRequest(
        path=path, fps=config.fps, short_side=config.short_side, start_time=job.start_time,
        end_time=job.end_time, quality=config.jpeg_quality,
        cache_dir=self.frame_cache_dir if cache else None,
        return_frames=return_frames)

  def _download_and_prepare(self, dl_manager, download_config):
    """Runs the build with the process pool, or in a Beam pipeline when the
    download config names a runner or pipeline options (`beam_build`)."""
    self.beam_runner = None
    if download_config.beam_runner is not None or download_config.beam_options is not None:
      from centerclip_jax.data.datasets import beam_build  # pylint: disable=g-import-not-at-top
      self.beam_runner = beam_build.runner_name(download_config)
      # TFDS passes its Beam pipeline to a `_split_generators(dl_manager, pipeline)`.
      self._split_generators = functools.partial(beam_build.split_generators, self)
    try:
      super()._download_and_prepare(dl_manager, download_config)
    except ValueError as e:
      if self.beam_runner is None:
        raise
      raise beam_build.explain(self, e) from e
    finally:
      self.__dict__.pop("_split_generators", None)

  def plan(self, dl_manager):
    """Annotations and video files: (splits, {(split, id): path or None},
    [((path, start, end), job)] one per distinct video to decode, sorted)."""
    manual_dir = epath.Path(dl_manager.manual_dir)
    splits = self.read_annotations(manual_dir)  # Fails fast on bad annotations.
    index = VideoIndex(manual_dir)
    log.info("%s: %d video files under %s", self.name, len(index), manual_dir)
    paths = {(name, job.video_id): index.find(job.candidates)
             for name, jobs in splits.items() for job in jobs}
    unique = sorted({(p, job.start_time, job.end_time): job
                     for name, jobs in splits.items() for job in jobs
                     if (p := paths[name, job.video_id]) is not None}.items(),
                    key=lambda kv: str(kv[0]))
    return splits, paths, unique

  def _split_generators(self, dl_manager):
    """Parses annotations, then decodes every video once into the frame cache.

    Decoding everything before TFDS writes any split lets a split whose videos
    are all missing or undecodable be left out with a warning (TFDS cannot
    write an empty split) instead of failing the build after other splits.
    """
    splits, paths, unique = self.plan(dl_manager)
    downloads = os.fspath(dl_manager.download_dir)
    if "://" in downloads:  # data_dir in a bucket: the decoded-frame cache stays local
      downloads = os.path.join(tempfile.gettempdir(), "centerclip_downloads")
    self.frame_cache_dir = os.fspath(self._frame_cache_dir or Path(
        downloads) / "centerclip_frames" / self.name)
    os.makedirs(self.frame_cache_dir, exist_ok=True)

    requests = [self.request(key[0], job, return_frames=False) for key, job in unique]
    errors, frames, start = {}, {}, time.perf_counter()
    for (key, _), result in zip(unique, _run_pool(
        video.encode_video_jpeg, requests, self.num_workers, f"{self.name} decode")):
      if (error := decode_error(result)) is not None:
        errors[key] = error
      frames[key] = result.num_frames
    good = self.sort_out(dl_manager, splits, paths, errors, frames, {
        "videos": len(requests), "seconds": time.perf_counter() - start,
        "workers": min(self.num_workers, len(requests))})
    generators = {name: self._generate_examples(split=name, jobs=jobs)
                  for name, jobs in good.items() if jobs}
    if not generators:
      raise self.no_video_error(dl_manager)
    return generators

  def no_video_error(self, dl_manager) -> ValueError:
    """The error of a build with no video to write, with the report (after `sort_out`)."""
    return ValueError(f"{self.name}: no video of any split could be read from "
                      f"{dl_manager.manual_dir}:\n"
                      + report.render(self.info.metadata, self.name))

  def sort_out(self, dl_manager, splits, paths, errors, frames, decode):
    """Records in the metadata which videos were written, skipped or short.

    errors / frames: {(path, start, end): decode error / frames decoded};
    decode: the decoding pass's numbers. Returns {split: [(job, path)]} to write.
    """
    shortest = report.min_frames(self.builder_config.fps)
    skipped, short, good = {}, {}, {}
    for name, jobs in splits.items():
      skipped[name], short[name], good[name] = [], [], []
      for job in jobs:
        path = paths[name, job.video_id]
        key = (path, job.start_time, job.end_time)
        if path is None:
          reason = f"missing: no video file named {' or '.join(job.candidates)}"
        elif key in errors:
          reason = f"undecodable: {errors[key]}"
        else:
          good[name].append((job, path))
          if frames[key] < shortest:
            short[name].append({"video_id": job.video_id, "path": path,
                                "num_frames": frames[key]})
          continue
        skipped[name].append({"video_id": job.video_id, "path": path, "reason": reason})
      log.info("%s/%s: %d listed, %d written, %d skipped, %d short", self.name, name,
               len(jobs), len(good[name]), len(skipped[name]), len(short[name]))
    raw = os.fspath(dl_manager.manual_dir)  # For the rebuild command.
    self.info.metadata["manual_dir"] = raw if "://" in raw else os.path.abspath(raw)
    self.info.metadata["listed"] = {name: len(jobs) for name, jobs in splits.items()}
    self.info.metadata["skipped"] = skipped
    self.info.metadata["short"] = short
    self.info.metadata["empty_splits"] = sorted(n for n in splits if not good[n])
    self.info.metadata["decode"] = {"fps": self.builder_config.fps,
                                    "short_side": self.builder_config.short_side,
                                    "jpeg_quality": self.builder_config.jpeg_quality,
                                    **decode}
    return good

  def _generate_examples(self, split: str, jobs: Sequence[tuple[VideoJob, str]]):
    """Yields (video_id, example), reading the frames from the frame cache."""
    for job, path in jobs:
      result = video.encode_video_jpeg(self.request(path, job, return_frames=True))
      if result.error is not None:  # Changed since the decoding pass.
        log.warning("%s/%s: skipping video %s (%s)", self.name, split, job.video_id,
                    result.error)
        self.info.metadata["skipped"][split].append(
            {"video_id": job.video_id, "path": path, "reason": f"undecodable: {result.error}"})
        continue
      yield job.video_id, make_example(job, result)

  def _process_pipeline_result(self, pipeline_result) -> None:
    from centerclip_jax.data.datasets import beam_build  # pylint: disable=g-import-not-at-top
    beam_build.process_result(self, pipeline_result)

  def _post_download_and_prepare_hook(self) -> None:
    self.report_path().write_text(report.render(
        self.info.metadata, f"{self.name}/{self.builder_config.name}", show=None) + "\n")
    if not self._keep_frame_cache and self.frame_cache_dir:
      shutil.rmtree(self.frame_cache_dir, ignore_errors=True)


  def report_path(self):
    """The build report with every id (`report.REPORT_FILE` in the dataset's folder)."""
    return self.data_path / report.REPORT_FILE

  def report(self, show: int | None = report.SHOW) -> str:
    """The build report from this dataset's metadata (first `show` ids of each list)."""
    return report.render(self.info.metadata, f"{self.name}/{self.builder_config.name}", show)


def _run_pool(fn, requests, num_workers: int, desc: str):
  """fn over requests in order, in `num_workers` spawned processes, with tqdm."""
  bar = tqdm.tqdm(total=len(requests), desc=desc, unit="video", mininterval=2.0)
  workers = min(num_workers, len(requests))
  if workers <= 1:
    for request in requests:
      yield fn(request)
      bar.update()
    bar.close()
    return
  # Spawn, not fork: the parent has TensorFlow's threads running.
  chunksize = 1 if len(requests) < 64 * workers else 4
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    for result in pool.imap(fn, requests, chunksize=chunksize):
      yield result
      bar.update()
  bar.close()


def decode_error(result: video.JpegResult) -> str | None:
  """Why a decoded video cannot be written (None: it can)."""
  if result.error is None and result.num_frames == 0:
    return "no frame decoded"
  return result.error


def make_example(job: VideoJob, result: video.JpegResult) -> dict:
  """The TFDS example of a decoded video (`features.video_text_features`)."""
  return {"video_id": job.video_id, "frames": list(result.jpegs),
          "num_frames": len(result.jpegs), "fps": result.fps, "captions": list(job.captions)}


def check(condition: bool, file: Path | str, where: str, message: str) -> None:
  """Raises AnnotationError('<file>, <where>: <message>') unless condition."""
  if not condition:
    raise AnnotationError(f"{file}, {where}: {message}")


def strip_join(sentences: Iterable[str]) -> str:
  """Sentences stripped and joined with one space (a paragraph caption)."""
  return " ".join(s.strip() for s in sentences if s.strip())
