"""Decoding only the frames a model samples: long videos in constant memory.

`decode_sampled` returns the frames that `video.decode_video(path, fps, short_side)`
would give at the positions `choose(T)` picks (T: the number of frames at `fps`), pixel
for pixel, without holding the other T frames:

* seek (a container with a declared duration longer than `seek_after_s` and timestamps):
  the stream's exact end comes from decoding its last GOP (last frame time + the last frame
  gap, as `video.resample` ends a stream), which gives T; each sampled tick
  `start + k / fps` is then found by seeking to the keyframe before it and decoding
  forward to the first frame at or after the tick (the nearest of it and its predecessor
  wins, the earlier on a tie); ticks less than `max_gap_s` apart decode on without a seek.
  Any inconsistency (missing timestamps, a seek that lands after its tick, a tail that ends
  before the declared duration) falls back to:
* stream: one pass through `video.resample`, keeping the converted frames only while
  there are at most `keep_limit` (short videos: one pass); longer streams are counted in
  the first pass and the chosen frames converted in a second.

A stream that fails part-way (an FFmpeg error after at least one frame) or ends more than
`max(0.5 s, 2 frames)` before its declared duration is a truncated file: its decodable
frames are used and `SampledVideo.truncated` says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from fractions import Fraction
from typing import Callable, Sequence

import av
import numpy as np

from centerclip_jax.data import video

ChooseFn = Callable[[int], Sequence[int]]  # T -> distinct increasing indices in [0, T)


@dataclasses.dataclass(frozen=True)
class SampledVideo:
  """The chosen frames of a video and what its decode found.

  frames: uint8 [n, H, W, 3], the frames at `indices` of the video at `fps`.
  num_frames: T, the frames the video has at `fps` (as far as it decodes).
  expected_frames: T implied by the container's declared duration (None: not declared).
  truncated: the stream failed or ended before its declared duration.
  method: 'seek' or 'stream'.
  """
  frames: np.ndarray
  indices: np.ndarray
  num_frames: int
  fps: float
  expected_frames: int | None
  truncated: bool
  method: str


class _Unreliable(Exception):
  """Seeking cannot reproduce the streaming rule on this file."""


class _Status:
  """What a tolerant pass over a stream saw."""

  def __init__(self):
    self.frames, self.last_t, self.error = 0, None, None


def _tolerant(source, status: _Status):
  """`source` until its end or its first FFmpeg error after a decoded frame."""
  try:
    for item in source:
      status.frames += 1
      status.last_t = item[1]
      yield item
  except av.FFmpegError as e:
    if status.frames == 0:
      raise
    status.error = f"{type(e).__name__}: {e}"


def _declared_end(container, stream) -> tuple[Fraction | None, bool]:
  """(end time [s] of the stream by the container's header or None, whether that is the
  video stream's own): the later of its duration and its frame count over its frame rate
  (an AVI cut short keeps the frame count of its header, while its duration is what the
  demuxer finds). The container's duration (Matroska) may be an audio track's, so it
  counts as the video's only when the container holds nothing else."""
  ends, own = [], bool(stream.duration or stream.frames) or len(container.streams) == 1
  base = Fraction(stream.start_time or 0) * Fraction(stream.time_base or 1)
  if stream.duration and stream.time_base:
    ends.append(base + Fraction(stream.duration) * Fraction(stream.time_base))
  elif container.duration:
    ends.append(Fraction(container.start_time or 0, av.time_base) + Fraction(
        container.duration, av.time_base))
  rate = stream.average_rate or stream.guessed_rate
  if stream.frames and rate:
    ends.append(base + Fraction(stream.frames) / Fraction(rate))
  return (max(ends) if ends else None), own


def _frames_until(end: Fraction, lo: Fraction, step: Fraction) -> int:
  """Ticks lo + k / step before `end`."""
  return max(0, math.ceil((end - lo) * step))


def _timed(container, stream):
  """(frame, time [s]) of the stream from the container's position; raises _Unreliable
  on a frame without timestamp."""
  tb = Fraction(stream.time_base)
  for frame in container.decode(stream):
    if frame.pts is None:
      raise _Unreliable("frame without timestamp")
    yield frame, Fraction(frame.pts) * tb


def _seek(container, stream, time: Fraction, lo: Fraction) -> None:
  if time <= lo:
    container.seek(stream.start_time or 0, stream=stream, backward=True)
  else:
    container.seek(int(time / Fraction(stream.time_base)), stream=stream, backward=True)


class _Cursor:
  """Forward decode from a seek point; `select(tick)` applies the resampling rule."""

  def __init__(self, frames):
    self.frames, self.prev, self.pending = frames, None, None

  @property
  def position(self) -> Fraction | None:
    item = self.pending or self.prev
    return None if item is None else item[1]

  def select(self, tick: Fraction):
    while True:
      if self.pending is None:
        self.pending = next(self.frames, None)
        if self.pending is None:  # Past the last frame: it covers the ticks to the end.
          return self.prev[0] if self.prev is not None else None
      frame, t = self.pending
      if tick <= t:
        if self.prev is not None and tick - self.prev[1] <= t - tick:
          return self.prev[0]
        return frame
      self.prev, self.pending = self.pending, None


def _open_cursor(container, stream, tick: Fraction, lo: Fraction,
                 first_t: Fraction) -> _Cursor:
  """A cursor whose first frame is a keyframe before `tick` or the stream's first frame
  (at `first_t`), so that the frame before each later one is its true predecessor."""
  for back in (0, 1, 4, 16):
    target = tick - back
    _seek(container, stream, target, lo)
    frames = _timed(container, stream)
    first = next(frames, None)
    if first is not None and (first[1] == first_t or (first[1] < tick and
                                                      first[0].key_frame)):
      return _Cursor(itertools.chain([first], frames))
    if target <= lo:
      break
  raise _Unreliable(f"no seek lands before {float(tick):.3f} s")


def _stream_end(container, stream, declared: Fraction, lo: Fraction, rate, step):
  """(last frame time, stop time = last + last frame gap) from decoding the tail."""
  for back in (2, 8, 32):
    target = declared - back
    _seek(container, stream, target, lo)
    prev_t = prev_dt = None
    for _, t in _timed(container, stream):
      if prev_t is not None and t > prev_t:
        prev_dt = t - prev_t
      prev_t = t
    if prev_t is not None and (prev_dt is not None or target <= lo):
      dt = prev_dt if prev_dt else (1 / rate if rate else 1 / step)
      return prev_t, prev_t + dt
    if target <= lo:
      break
  raise _Unreliable("cannot decode the end of the stream")


def _truncated(declared: Fraction | None, own: bool, last_t: Fraction, rate) -> bool:
  if declared is None or not own:
    return False
  frame = 1 / rate if rate else Fraction(0)
  return declared - last_t > max(Fraction(1, 2), 2 * frame)


def _decode_seek(container, stream, step, short_side, choose, declared, own, max_gap):
  tb = Fraction(stream.time_base)
  lo = Fraction(stream.start_time) * tb
  rate = stream.average_rate or stream.guessed_rate
  rate = Fraction(rate) if rate else None
  first = next(_timed(container, stream), None)  # Opened at the start: the first frame.
  if first is None:
    raise _Unreliable("no frame")
  last_t, stop = _stream_end(container, stream, declared, lo, rate, step)
  if _truncated(declared, own, last_t, rate):
    raise _Unreliable("the stream ends before its declared duration")
  num_frames = _frames_until(stop, lo, step)
  if num_frames == 0:
    raise _Unreliable("no tick before the end")
  indices = np.asarray(choose(num_frames), np.int64)
  convert = video.FrameConverter(short_side)
  out, cursor = [], None
  for k in indices:
    tick = lo + int(k) / step
    if cursor is None or cursor.position is None or tick - cursor.position > max_gap:
      cursor = _open_cursor(container, stream, tick, lo, first[1])
    frame = cursor.select(tick)
    if frame is None:
      raise _Unreliable(f"nothing decoded at {float(tick):.3f} s")
    out.append(convert(frame).copy())
  return out, indices, num_frames, _frames_until(declared, lo, step)


def _decode_stream(path, step, short_side, choose, keep_limit):
  """Streaming decode in bounded memory: (frames, indices, T, expected T, truncated)."""

  def ticks(container, stream, status):
    return video.resample(
        _tolerant(video.iter_source_frames(container, stream), status), step=step,
        stream_has_start=stream.start_time is not None)

  with av.open(path) as container:
    stream = video.video_stream(container, path)
    status, convert = _Status(), video.FrameConverter(short_side)
    declared, own = _declared_end(container, stream)
    rate = stream.average_rate or stream.guessed_rate
    kept, count = [], 0
    for frame in ticks(container, stream, status):
      if kept is not None and count < keep_limit:
        kept.append(convert(frame))
      else:
        kept = None
      count += 1
    origin = Fraction(stream.start_time or 0) * Fraction(stream.time_base)
  if count == 0:
    raise video.VideoDecodeError(f"{path}: no frames decoded")
  indices = np.asarray(choose(count), np.int64)
  if kept is not None:
    out = [kept[i] for i in indices]
  else:  # Second pass: convert only the chosen ticks.
    wanted, out = set(indices.tolist()), []
    with av.open(path) as container:
      stream = video.video_stream(container, path)
      convert = video.FrameConverter(short_side)
      for position, frame in enumerate(ticks(container, stream, _Status())):
        if position in wanted:
          out.append(convert(frame).copy())
          if len(out) == len(wanted):
            break
  truncated = status.error is not None or _truncated(
      declared, own, status.last_t, Fraction(rate) if rate else None)
  expected = _frames_until(declared, origin, step) if declared is not None else None
  return out, indices, count, expected, truncated


def decode_sampled(path: str | os.PathLike, *, fps: float, short_side: int | None,
                   choose: ChooseFn, seek_after_s: float = 30.0, max_gap_s: float = 2.0,
                   keep_limit: int = 256) -> SampledVideo:
  """The frames `choose(T)` of the video at `fps` (see the module docstring).

  Raises:
    VideoDecodeError: missing, unreadable, corrupt or frameless video.
    ValueError: fps <= 0.
  """
  path = os.fspath(path)
  step = video.check_fps(fps)
  if step is None:
    raise ValueError("decode_sampled needs an fps")
  if not os.path.isfile(path):
    raise video.VideoDecodeError(f"{path}: video file not found")
  try:
    result = None
    with av.open(path) as container:
      stream = video.video_stream(container, path)
      declared, own = _declared_end(container, stream)
      lo = Fraction(stream.start_time or 0) * Fraction(stream.time_base or 1)
      if (declared is not None and stream.start_time is not None and stream.time_base
          and declared - lo > seek_after_s):
        try:
          out, indices, count, expected = _decode_seek(
              container, stream, step, short_side, choose, declared, own,
              Fraction(max_gap_s))
          result = (out, indices, count, expected, False, "seek")
        except (_Unreliable, av.FFmpegError):
          result = None
    if result is None:
      result = _decode_stream(path, step, short_side, choose, keep_limit) + ("stream",)
  except video.VideoDecodeError:
    raise
  except Exception as e:  # PyAV / FFmpeg errors: corrupt or unreadable file.
    raise video.VideoDecodeError(
        f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
  out, indices, count, expected, truncated, method = result
  if len(out) != len(indices):
    raise video.VideoDecodeError(f"{path}: decoded {len(out)} of {len(indices)} frames")
  return SampledVideo(np.stack(out), indices.astype(np.int32), count, float(fps), expected,
                      truncated, method)
