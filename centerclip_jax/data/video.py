"""Video decoding with PyAV: frames resampled to a target fps, shorter side resized.

The one decode of the package: the TFDS builders store what `encode_video_jpeg` decodes,
and `sampled_decode.py` (encode, search, visualize) picks the same frames with the same
resampling rule (`resample`) and resize (`FrameConverter`). Only NumPy, PyAV and Pillow are
imported here, so that worker processes stay light.

* `decode_video` / `iter_frames`: frames at `fps` (the frame nearest each 1/fps tick),
  shorter side resized (bicubic), optionally a [start, end) window.
* `encode_video_jpeg`: decode + JPEG-encode, with an on-disk cache; the unit of work that
  the dataset builders hand to a process pool or a Beam worker. A video in a bucket
  (`gs://...`) is read through a temporary local copy of that one file, removed after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from fractions import Fraction
from typing import Iterator

import av
import numpy as np
from PIL import Image

from centerclip_jax import paths

_CACHE_FORMAT = 1


class VideoDecodeError(ValueError):
  """A video file is missing, unreadable, corrupt or has no frames."""


def resized_shape(height: int, width: int, short_side: int | None) -> tuple[int, int]:
  """(height, width) with the shorter side set to `short_side`, aspect kept.

  The longer side is floored, as torchvision's `Resize(int)` does.
  """
  if short_side is None:
    return height, width
  if short_side <= 0:
    raise ValueError(f"short_side must be positive, got {short_side}")
  if height <= width:
    return short_side, max(1, int(short_side * width / height))
  return max(1, int(short_side * height / width)), short_side


def _frame_time(frame, index: int, base: Fraction, rate: Fraction | None) -> Fraction:
  if frame.pts is not None and frame.time_base is not None:
    return Fraction(frame.pts) * Fraction(frame.time_base)
  if rate:
    return base + Fraction(index) / rate
  raise VideoDecodeError("frame without timestamp and stream without frame rate")


def iter_source_frames(container, stream, start: Fraction = Fraction(0)):
  """Yields (frame, time [s], stream start [s], frame rate) in presentation order."""
  rate = stream.average_rate or stream.guessed_rate
  rate = Fraction(rate) if rate else None
  base = (Fraction(stream.start_time) * Fraction(stream.time_base)
          if stream.start_time is not None and stream.time_base is not None
          else Fraction(0))
  if start > 0 and stream.time_base is not None:
    try:  # Seek to the keyframe at or before the window start.
      container.seek(int((base + start) / Fraction(stream.time_base)),
                     stream=stream, backward=True)
    except av.FFmpegError:
      container.seek(0)
  for index, frame in enumerate(container.decode(stream)):
    yield frame, _frame_time(frame, index, base, rate), base, rate


class FrameConverter:
  """PyAV frame -> uint8 RGB [H, W, 3], shorter side `short_side` (bicubic, aspect kept);
  a frame handed in twice in a row (one source frame for two ticks) is converted once."""

  def __init__(self, short_side: int | None):
    self.short_side = short_side
    self._last = None  # (frame, array)

  def __call__(self, frame) -> np.ndarray:
    if self._last is None or self._last[0] is not frame:
      h, w = resized_shape(frame.height, frame.width, self.short_side)
      self._last = (frame, frame.to_ndarray(width=w, height=h, format="rgb24",
                                            interpolation="BICUBIC"))
    return self._last[1]


def resample(source, *, step: Fraction | None, start: Fraction = Fraction(0),
             end: Fraction | None = None, stream_has_start: bool = True,
             max_frames: int | None = None):
  """The source frame of every output tick, in order (the rule of `decode_video`).

  source: (frame, time [s], stream start [s], frame rate) in presentation order, as
  `iter_source_frames` yields them. step: output fps (None: every frame in the window).
  """
  emitted = 0
  k = 0
  prev = None  # (frame, time) of the previous source frame.
  prev_dt = None
  lo = hi = None
  rate = None
  for frame, t, base, rate in source:
    if lo is None:
      origin = base if stream_has_start else t
      lo = origin + start
      hi = origin + end if end is not None else None
    if step is None:  # Keep every frame inside the window.
      if t < lo:
        continue
      if hi is not None and t >= hi:
        break
      yield frame
      emitted += 1
    else:
      tick = lo + k / step
      while tick <= t and (hi is None or tick < hi):
        if prev is not None and tick - prev[1] <= t - tick:
          yield prev[0]
        else:
          yield frame
        emitted += 1
        k += 1
        tick = lo + k / step
        if max_frames is not None and emitted >= max_frames:
          return
      if hi is not None and tick >= hi:
        break
      if prev is not None and t > prev[1]:
        prev_dt = t - prev[1]
      prev = (frame, t)
    if max_frames is not None and emitted >= max_frames:
      return
  else:
    # End of stream: the last frame covers ticks up to its end time.
    if step is not None and prev is not None:
      dt = prev_dt if prev_dt else (1 / rate if rate else 1 / step)
      stop = prev[1] + dt if hi is None else min(prev[1] + dt, hi)
      tick = lo + k / step
      while tick < stop and (max_frames is None or emitted < max_frames):
        yield prev[0]
        emitted += 1
        k += 1
        tick = lo + k / step


def iter_frames(
    path: str | os.PathLike,
    *,
    fps: float | None = 3.0,
    short_side: int | None = 224,
    start_time: float | None = None,
    end_time: float | None = None,
    max_frames: int | None = None,
) -> Iterator[np.ndarray]:
  """Yields resampled, resized uint8 frames [H, W, 3] one at a time.

  See `decode_video`; this streaming form keeps memory flat for long videos.
  Errors from PyAV are raised as `VideoDecodeError` naming the file.
  """
  path = os.fspath(path)
  step = check_fps(fps)
  if not os.path.isfile(path):
    raise VideoDecodeError(f"{path}: video file not found")
  start = Fraction(start_time) if start_time else Fraction(0)
  end = Fraction(end_time) if end_time is not None else None
  if end is not None and end <= start:
    raise ValueError(f"{path}: end_time {end_time} must be after start_time {start_time}")
  try:
    with av.open(path) as container:
      stream = video_stream(container, path)
      convert = FrameConverter(short_side)
      emitted = 0
      for frame in resample(iter_source_frames(container, stream, start), step=step,
                            start=start, end=end,
                            stream_has_start=stream.start_time is not None,
                            max_frames=max_frames):
        yield convert(frame)
        emitted += 1
      if emitted == 0:
        window = "" if start_time is None and end_time is None else (
            f" in [{start_time}, {end_time}) s")
        raise VideoDecodeError(f"{path}: no frames decoded{window}")
  except VideoDecodeError:
    raise
  except Exception as e:  # PyAV / FFmpeg errors: corrupt or unreadable file.
    raise VideoDecodeError(
        f"{path}: cannot decode video ({type(e).__name__}: {e})") from e


def check_fps(fps: float | None) -> Fraction | None:
  """fps as an exact Fraction (None stays None); a ValueError unless fps > 0."""
  if fps is None:
    return None
  if not fps > 0:
    raise ValueError(f"fps must be > 0, got {fps}")
  return Fraction(fps).limit_denominator(1_000_000)


def video_stream(container, path: str):
  """The first video stream, frame-threaded; VideoDecodeError if there is none."""
  if not container.streams.video:
    raise VideoDecodeError(f"{path}: no video stream")
  stream = container.streams.video[0]
  stream.thread_type = "AUTO"
  return stream


def decode_video(
    path: str | os.PathLike,
    *,
    fps: float | None = 3.0,
    short_side: int | None = 224,
    start_time: float | None = None,
    end_time: float | None = None,
    max_frames: int | None = None,
) -> tuple[np.ndarray, float]:
  """Decodes a video into uint8 frames [T, H, W, 3] at `fps`.

  Resampling: ticks at start + k / fps for every k with tick < end of the window
  (the video's end is its last frame's time plus one frame duration); each tick
  takes the source frame nearest to it (the earlier one on a tie), like
  `ffmpeg -r fps` up to which of two neighbouring frames wins. A video shorter
  than one tick gives 1 frame. `fps=None` keeps every source frame.

  Args:
    path: the video file.
    fps: target frame rate, or None to keep every frame.
    short_side: the shorter side after a bicubic resize (aspect kept, longer
      side floored), or None to keep the size.
    start_time, end_time: optional window in seconds from the stream start
      (seek to start, decode up to end).
    max_frames: optional cap: stop after this many output frames.

  Returns:
    (frames uint8 [T, H, W, 3], fps of the frames).

  Raises:
    VideoDecodeError: missing, unreadable, corrupt or frameless video.
  """
  frames = list(iter_frames(path, fps=fps, short_side=short_side,
                            start_time=start_time, end_time=end_time,
                            max_frames=max_frames))
  return np.stack(frames), _output_fps(path, fps)


def _output_fps(path, fps: float | None) -> float:
  if fps is not None:
    return float(fps)
  try:
    with av.open(os.fspath(path)) as container:
      stream = container.streams.video[0]
      rate = stream.average_rate or stream.guessed_rate
      return float(rate) if rate else 0.0
  except Exception as e:
    raise VideoDecodeError(f"{path}: cannot read frame rate ({e})") from e


@dataclasses.dataclass(frozen=True)
class JpegRequest:
  """One video to decode and JPEG-encode (picklable, for process pools)."""
  path: str
  fps: float | None = 3.0
  short_side: int | None = 224
  start_time: float | None = None
  end_time: float | None = None
  quality: int = 95
  cache_dir: str | None = None  # Reuse/store results here when set.
  return_frames: bool = True  # False: only store in cache_dir, return counts.

  def cache_key(self) -> str:
    if paths.is_uri(self.path):
      st = paths.user_path(self.path).stat()
      where, mtime, size = self.path, st.mtime, st.length
    else:
      st = os.stat(self.path)
      where, mtime, size = os.path.abspath(self.path), st.st_mtime_ns, st.st_size
    text = "|".join(str(x) for x in (
        _CACHE_FORMAT, where, mtime, size,
        self.fps, self.short_side, self.start_time, self.end_time, self.quality))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class JpegResult:
  jpegs: tuple[bytes, ...] = ()  # Empty when the request had return_frames=False.
  fps: float = 0.0
  error: str | None = None  # Set when the video could not be decoded.
  from_cache: bool = False
  num_frames: int = 0


JPEG_QUALITY = 95  # The builders' default: how the datasets store frames.


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
  """uint8 [H, W, 3] -> JPEG bytes, as the datasets store frames (PIL, 4:2:0 chroma)."""
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _load_cache(file: str, frames: bool) -> JpegResult | None:
  try:
    with np.load(file, allow_pickle=False) as z:
      offsets, jpegs = z["offsets"], ()
      if frames:
        data = z["data"].tobytes()
        jpegs = tuple(data[a:b] for a, b in zip(offsets[:-1], offsets[1:]))
      return JpegResult(jpegs, float(z["fps"]), from_cache=True,
                        num_frames=len(offsets) - 1)
  except Exception:  # Unreadable cache entry (e.g. killed mid-write): redo.
    return None


def _save_cache(file: str, result: JpegResult) -> None:
  offsets = np.cumsum([0] + [len(j) for j in result.jpegs]).astype(np.int64)
  data = np.frombuffer(b"".join(result.jpegs), dtype=np.uint8)
  tmp = f"{file}.{os.getpid()}.tmp.npz"
  np.savez(tmp, data=data, offsets=offsets, fps=np.float64(result.fps))
  os.replace(tmp, file)


def encode_video_jpeg(request: JpegRequest) -> JpegResult:
  """Decodes `request.path` and JPEG-encodes its frames; never raises.

  With `cache_dir`, a result keyed by (path, mtime, size, decode options) is
  read back instead of decoding, and new results are stored there, so an
  interrupted dataset build restarts fast. Decode errors come back as
  `JpegResult.error` (decode failures are not cached).
  """
  local = request.path
  try:
    file = None
    found = paths.user_path(request.path).is_file()
    if paths.is_uri(request.path) and not found:
      return JpegResult(error=f"{request.path}: video file not found")
    if request.cache_dir and found:
      file = os.path.join(request.cache_dir, request.cache_key() + ".npz")
      if os.path.exists(file):
        if (cached := _load_cache(file, request.return_frames)) is not None:
          return cached
    with paths.local_copy(request.path) as copy:  # a bucket's video: a temporary copy
      local = os.fspath(copy)
      jpegs = tuple(encode_jpeg(f, request.quality) for f in iter_frames(
          local, fps=request.fps, short_side=request.short_side,
          start_time=request.start_time, end_time=request.end_time))
      fps = _output_fps(local, request.fps)
    result = JpegResult(jpegs, fps, num_frames=len(jpegs))
    if file is not None:
      os.makedirs(request.cache_dir, exist_ok=True)
      _save_cache(file, result)
      if not request.return_frames:
        result = dataclasses.replace(result, jpegs=())
    return result
  except Exception as e:  # Report, never crash a pool worker.
    msg = str(e) if isinstance(e, VideoDecodeError) else (
        f"{request.path}: {type(e).__name__}: {e}")
    return JpegResult(error=msg.replace(local, request.path))  # a bucket's, not the copy's
