"""Long videos in constant memory: inference's decode of a long vs a short video.

Used by `python tools/benchmark.py --long-video`. Writes two h264 videos (320x240, 30 fps,
a keyframe every 2 s, a moving pattern), a short one and a long one, then times the decode
of the 12 frames `encode` samples (3 fps, shorter side 224) and reads the peak RSS, each
run in a fresh process, for:

* before: decode every frame at 3 fps into memory, then sample (`video.decode_video`);
* after: `encoder.load_frames` (seek to each sampled frame, `data/sampled_decode.py`).

Prints the long/short ratio of wall time and the extra memory of the long video: its
decode's peak RSS growth (peak minus the RSS after the imports, which varies by a few
hundred MB between processes on a loaded machine) minus the short one's.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
from fractions import Fraction

import av
import numpy as np

_MEASURE = r"""
import json, resource, sys, time
from centerclip_jax.data import frames as frame_lib, video
from centerclip_jax.inference import encoder
path, method = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if method == "before":
  frames, _ = video.decode_video(path, fps=3.0, short_side=224)
  indices, mask = frame_lib.eval_frame_indices(len(frames), 12)
  chosen, count = frames[indices[mask]], len(frames)
else:
  clip = encoder.load_frames(path, fps=3.0, short_side=224, max_frames=12)
  chosen, count = clip.frames, clip.num_frames
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "import_mb": base / 1024,
                  "frames": count, "chosen": list(chosen.shape)}))
"""


def write_video(path: pathlib.Path, seconds: float, *, width: int = 320, height: int = 240,
                fps: int = 30, gop: int = 60) -> pathlib.Path:
  """An h264 mp4 of a drifting pattern with a moving block (every frame differs)."""
  rng = np.random.default_rng(0)
  canvas = rng.integers(0, 256, (height // 8 + 2, 2 * width // 8 + 2, 3), np.uint8)
  canvas = np.kron(canvas, np.ones((8, 8, 1), np.uint8))  # Blocky texture, 2x as wide.
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.gop_size = gop
    stream.options = {"preset": "veryfast", "crf": "23"}
    for i in range(int(seconds * fps)):
      x = (2 * i) % width
      frame = canvas[:height, x:x + width].copy()
      y = (3 * i) % (height - 32)
      frame[y:y + 32, 40:72] = (i * 7) % 256
      out = av.VideoFrame.from_ndarray(frame, format="rgb24")
      out.pts, out.time_base = i, Fraction(1, fps)
      for packet in stream.encode(out):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def measure(path: pathlib.Path, method: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), method], check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _growth(row: dict) -> float:
  """Peak RSS over the RSS after the imports [MB]: what the decode itself added."""
  return row["peak_mb"] - row["import_mb"]


def benchmark(short_s: float = 10.0, long_s: float = 1800.0, workdir: str | None = None
              ) -> dict:
  """{'before'|'after': {'short', 'long', 'time_ratio', 'extra_mb'}} (see module doc)."""
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    short = write_video(pathlib.Path(tmp) / "short.mp4", short_s)
    long = write_video(pathlib.Path(tmp) / "long.mp4", long_s)
    out = {"short_s": short_s, "long_s": long_s}
    for method in ("after", "before"):
      rows = {"short": measure(short, method), "long": measure(long, method)}
      if rows["short"]["chosen"] != rows["long"]["chosen"]:
        raise RuntimeError(f"{method}: different sampled shapes {rows}")
      rows["time_ratio"] = rows["long"]["seconds"] / rows["short"]["seconds"]
      rows["extra_mb"] = _growth(rows["long"]) - _growth(rows["short"])
      out[method] = rows
  return out


def print_report(result: dict) -> None:
  print(f"decode of the 12 sampled frames (3 fps, short side 224): {result['long_s']:g} s "
        f"video vs {result['short_s']:g} s, 320x240 h264, 30 fps, GOP 2 s")
  print(f"{'':8s}{'short s':>9s}{'long s':>9s}{'time x':>8s}{'short +MB':>10s}"
        f"{'long +MB':>9s}{'extra MB':>10s}")
  for method in ("before", "after"):
    r = result[method]
    print(f"{method:8s}{r['short']['seconds']:9.2f}{r['long']['seconds']:9.2f}"
          f"{r['time_ratio']:8.2f}{_growth(r['short']):10.0f}{_growth(r['long']):9.0f}"
          f"{r['extra_mb']:10.0f}")
