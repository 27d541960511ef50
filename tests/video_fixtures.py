"""Tiny synthetic videos and miniature dataset layouts for tests.

Videos are written with PyAV. In a "flat" video every frame is one colour:
red = `frame_level(i, num_frames)` (so a decoded frame tells which source frame
it came from, see `source_index`), green = `video_level(seed)` (distinct per
video), blue = 128. "moving" videos are drifting gradients with mild noise
(a more realistic decoding cost).

Layout writers (`write_*_layout`) create the official annotation files of each
dataset in a folder, plus videos, one corrupt video and one missing video, and
return what a builder should produce from them.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

_CODECS = {".mp4": "libx264", ".avi": "mpeg4", ".mkv": "ffv1", ".mov": "libx264",
           ".webm": "libvpx-vp9", ".ts": "libx264"}


def frame_level(i: int, num_frames: int) -> int:
  """Red value of source frame i (levels spread over [10, 245])."""
  step = max(1, 235 // max(1, num_frames - 1))
  return 10 + step * i


def source_index(frame: np.ndarray, num_frames: int) -> int:
  """Which source frame a decoded flat frame [H, W, 3] came from."""
  step = max(1, 235 // max(1, num_frames - 1))
  return int(round((float(frame[..., 0].mean()) - 10) / step))


def video_level(seed: int) -> int:
  """Green value of a flat video with this seed."""
  return 30 + (37 * seed) % 200


def write_video(path, *, num_frames: int = 20, fps: int = 10, width: int = 64,
                height: int = 48, seed: int = 0, pattern: str = "flat",
                codec: str | None = None, gop: int | None = None,
                noise: float = 4.0) -> Path:
  """Writes a video (codec from the suffix unless given: mp4/mov/ts h264, avi mpeg4,
  mkv ffv1, webm vp9); `gop`: frames between keyframes (the codec's default if None);
  `noise`: the standard deviation (uint8 levels) of the "moving" pattern's pixel noise."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  codec = codec or _CODECS[path.suffix]
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    if gop is not None:
      stream.gop_size = gop
    if codec == "libx264":
      stream.options = {"crf": "12"}
    elif codec in ("mpeg4", "mjpeg", "libvpx", "libvpx-vp9"):
      stream.bit_rate = 4_000_000
    for i in range(num_frames):
      if pattern == "flat":
        arr = np.empty([height, width, 3], np.uint8)
        arr[..., 0] = frame_level(i, num_frames)
        arr[..., 1] = video_level(seed)
        arr[..., 2] = 128
      else:  # "moving": a drifting colour gradient with a little noise.
        y, x = np.mgrid[0:height, 0:width]
        phase = 2 * np.pi * (x / width + y / (2 * height) + i / max(1, num_frames))
        base = 127 + 100 * np.stack([np.sin(phase), np.sin(phase + 2), np.sin(phase + 4)], -1)
        arr = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
      frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
      frame.pts, frame.time_base = i, Fraction(1, fps)
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def write_video_with_longer_audio(path, *, video_s: int = 4, audio_s: int = 10) -> Path:
  """A Matroska file (give .mkv) whose silent PCM audio outlasts its 25 fps h264 video, so
  the container's duration is the audio's."""
  path = Path(path)
  with av.open(str(path), "w") as container:
    video = container.add_stream("libx264", rate=25)
    video.width, video.height, video.pix_fmt, video.gop_size = 48, 32, "yuv420p", 25
    audio = container.add_stream("pcm_s16le", rate=8000)
    audio.layout = "mono"
    for i in range(25 * video_s):
      frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 2 * i, np.uint8), format="rgb24")
      frame.pts, frame.time_base = i, Fraction(1, 25)
      for packet in video.encode(frame):
        container.mux(packet)
    for packet in video.encode():
      container.mux(packet)
    for j in range(audio_s):
      frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16",
                                         layout="mono")
      frame.sample_rate, frame.pts, frame.time_base = 8000, 8000 * j, Fraction(1, 8000)
      for packet in audio.encode(frame):
        container.mux(packet)
    for packet in audio.encode():
      container.mux(packet)
  return path


def write_garbage(path, num_bytes: int = 4096, seed: int = 0) -> Path:
  """A file of random bytes with a video suffix (a corrupt video)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(np.random.default_rng(seed).bytes(num_bytes))
  return path


def write_truncated(path, source, keep_bytes: int = 600) -> Path:
  """The first `keep_bytes` bytes of a real video (a truncated download)."""
  path = Path(path)
  path.write_bytes(Path(source).read_bytes()[:keep_bytes])
  return path


def write_zero_frame_video(path) -> Path:
  """An AVI file (give a .avi path) with an MPEG-4 video stream and no frames."""
  path = Path(path)
  with av.open(str(path), "w", format="avi") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()
  return path


# Miniature dataset layouts (2 s, 10 fps, 64x48 flat videos).


@dataclasses.dataclass
class Layout:
  """What a builder must produce from a miniature layout.

  expected: {split: {video_id: [captions]}} examples to write.
  skipped: {split: {video_id: reason prefix ('missing' or 'undecodable')}}.
  seeds: {video_id: seed} of each written video (see `video_level`).
  """
  expected: dict
  skipped: dict
  seeds: dict


def _videos(root: Path, names, ext, corrupt, missing) -> dict[str, int]:
  seeds = {}
  for seed, name in enumerate(names):
    if name == missing:
      continue
    path = root / f"{name}{ext}"
    if name == corrupt:
      write_garbage(path, seed=seed)
    else:
      write_video(path, seed=seed)
      seeds[name] = seed
  return seeds


def write_msrvtt_layout(root) -> Layout:
  """MSRVTT_data.json, train 7k/9k csv, JSFusion test csv, videos/all/*.mp4."""
  root = Path(root)
  ids = [f"video{i}" for i in range(6)]
  sentences = []
  for i, vid in enumerate(ids):
    for j in range(2 if i % 2 else 3):
      sentences.append({"caption": f"clip {i} caption {j}", "video_id": vid,
                        "sen_id": len(sentences)})
  data = {"info": {}, "videos": [{"video_id": v, "id": i, "split": "train"}
                                 for i, v in enumerate(ids)],
          "sentences": sentences}
  (root / "MSRVTT_data.json").parent.mkdir(parents=True, exist_ok=True)
  (root / "MSRVTT_data.json").write_text(json.dumps(data))
  (root / "MSRVTT_train.7k.csv").write_text("video_id\nvideo0\nvideo1\n")
  (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\nvideo5\n")
  (root / "MSRVTT_JSFUSION_test.csv").write_text(
      "key,vid_key,video_id,sentence\n"
      "ret0,msr3,video3,a man, with a hat, sings\n"
      "ret1,msr4,video4,a cat jumps\n"
      "ret2,msr2,video2,the test sentence\n")
  seeds = _videos(root / "videos" / "all", ids, ".mp4", corrupt="video5", missing="video4")
  caps = lambda v: [s["caption"] for s in sentences if s["video_id"] == v]
  expected = {"train_7k": {v: caps(v) for v in ["video0", "video1"]},
              "train_9k": {v: caps(v) for v in ["video0", "video1", "video2"]},
              "test_1k": {"video3": ["a man, with a hat, sings"],
                          "video2": ["the test sentence"]}}
  skipped = {"train_7k": {}, "train_9k": {"video5": "undecodable"},
             "test_1k": {"video4": "missing"}}
  return Layout(expected, skipped, seeds)


def write_msvd_layout(root) -> Layout:
  """raw-captions.pkl, {train,val,test}_list.txt, YouTubeClips/*.avi."""
  root = Path(root)
  ids = ["-4wsuPCjDBc_5_15", "abc_1_7", "xyz_0_4", "q9_10_20", "bad_1_2"]
  captions = {v: [["a", "clip", str(i)], ["another", "caption", str(i)]]
              for i, v in enumerate(ids)}
  root.mkdir(parents=True, exist_ok=True)
  (root / "raw-captions.pkl").write_bytes(pickle.dumps(captions))
  (root / "train_list.txt").write_text(f"{ids[0]}\n{ids[1]}\n{ids[4]}\n")
  (root / "val_list.txt").write_text(f"{ids[2]}\n")
  (root / "test_list.txt").write_text(f"{ids[3]}\n")
  seeds = _videos(root / "YouTubeClips", ids, ".avi", corrupt="bad_1_2", missing="q9_10_20")
  joined = {v: [" ".join(c) for c in caps] for v, caps in captions.items()}
  expected = {"train": {v: joined[v] for v in ids[:2]}, "val": {ids[2]: joined[ids[2]]},
              "test": {}}
  skipped = {"train": {"bad_1_2": "undecodable"}, "val": {}, "test": {"q9_10_20": "missing"}}
  return Layout(expected, skipped, seeds)


def write_lsmdc_layout(root) -> Layout:
  """LSMDC16 task-1 csv files (6 tab-separated fields), avi/<movie>/<clip>.avi."""
  root = Path(root)
  movie = "0001_American_Beauty"
  clips = [f"{movie}_00.00.{s:02d}.000-00.00.{s + 2:02d}.000" for s in range(0, 12, 2)]
  rows = {"LSMDC16_annos_training.csv": [(clips[0], "SOMEONE walks in."),
                                         (clips[1], "He sits."),
                                         (clips[0], "SOMEONE turns."),
                                         (clips[4], "Broken clip.")],
          "LSMDC16_annos_val.csv": [(clips[2], "She smiles.")],
          "LSMDC16_challenge_1000_publictect.csv": [(clips[3], "A door opens."),
                                                    (clips[5], "He waves, smiling.")]}
  root.mkdir(parents=True, exist_ok=True)
  for name, lines in rows.items():
    text = "".join(f"{c}\t00.00.01.000\t00.00.02.000\t00.00.01.000\t00.00.02.000\t{s}\n"
                   for c, s in lines)
    (root / name).write_text(text)
  seeds = _videos(root / "avi" / movie, clips, ".avi", corrupt=clips[4], missing=clips[3])
  expected = {"train": {clips[0]: ["SOMEONE walks in.", "SOMEONE turns."],
                        clips[1]: ["He sits."]},
              "val": {clips[2]: ["She smiles."]}, "test": {clips[5]: ["He waves, smiling."]}}
  skipped = {"train": {clips[4]: "undecodable"}, "val": {}, "test": {clips[3]: "missing"}}
  return Layout(expected, skipped, seeds)


def write_activitynet_layout(root) -> Layout:
  """train.json / val_1.json ({v_id: duration, timestamps, sentences}), v_<id>.mp4."""
  root = Path(root)
  ann = lambda *s: {"duration": 2.0, "timestamps": [[0.0, 1.0]] * len(s),
                    "sentences": list(s)}
  train = {"v_aaa": ann("A man runs. ", " He stops."), "v_bbb": ann("Kids play."),
           "v_bad": ann("Corrupt.")}
  val = {"v_ccc": ann("A dog barks.", "It sits. "), "v_ddd": ann("Missing video.")}
  root.mkdir(parents=True, exist_ok=True)
  (root / "train.json").write_text(json.dumps(train))
  (root / "val_1.json").write_text(json.dumps(val))
  seeds = _videos(root / "videos", ["v_aaa", "v_bad", "v_ddd"], ".mp4",
                  corrupt="v_bad", missing="v_ddd")
  write_video(root / "videos" / "bbb.mkv", seed=7)  # CLIP4Clip naming: no v_.
  write_video(root / "videos" / "v_ccc.mp4", seed=8)
  seeds.update({"v_bbb": 7, "v_ccc": 8})
  expected = {"train": {"v_aaa": ["A man runs. He stops."], "v_bbb": ["Kids play."]},
              "val_1": {"v_ccc": ["A dog barks. It sits."]}}
  skipped = {"train": {"v_bad": "undecodable"}, "val_1": {"v_ddd": "missing"}}
  return Layout(expected, skipped, seeds)


def write_didemo_layout(root) -> Layout:
  """{train,val,test}_data.json (list of annotations), videos/<name>."""
  root = Path(root)
  item = lambda v, d: {"video": v, "description": d, "times": [[0, 0], [0, 1]],
                       "annotation_id": 0, "num_segments": 6}
  data = {"train_data.json": [item("1@N0_1_a.mov", "a girl dances"),
                              item("2@N0_2_b.mp4", "a bird flies"),
                              item("1@N0_1_a.mov", " she spins "),
                              item("3@N0_3_c.avi", "garbage")],
          "val_data.json": [item("4@N0_4_d.mp4", "the car stops")],
          "test_data.json": [item("5@N0_5_e.m4v", "nobody has this video"),
                             item("6@N0_6_f.mp4", "a boat sails")]}
  root.mkdir(parents=True, exist_ok=True)
  for name, items in data.items():
    (root / name).write_text(json.dumps(items))
  videos = root / "videos"
  write_video(videos / "1@N0_1_a.mp4", seed=1)  # Converted: extension replaced.
  write_video(videos / "2@N0_2_b.mp4", seed=2)
  write_garbage(videos / "3@N0_3_c.avi")
  write_video(videos / "4@N0_4_d.mp4.mp4", seed=4)  # Converted: extension appended.
  write_video(videos / "6@N0_6_f.mp4", seed=6)
  seeds = {"1@N0_1_a.mov": 1, "2@N0_2_b.mp4": 2, "4@N0_4_d.mp4": 4, "6@N0_6_f.mp4": 6}
  expected = {"train": {"1@N0_1_a.mov": ["a girl dances she spins"],
                        "2@N0_2_b.mp4": ["a bird flies"]},
              "val": {"4@N0_4_d.mp4": ["the car stops"]},
              "test": {"6@N0_6_f.mp4": ["a boat sails"]}}
  skipped = {"train": {"3@N0_3_c.avi": "undecodable"}, "val": {},
             "test": {"5@N0_5_e.m4v": "missing"}}
  return Layout(expected, skipped, seeds)


LAYOUTS = {"msrvtt": write_msrvtt_layout, "msvd": write_msvd_layout,
           "lsmdc": write_lsmdc_layout, "activitynet_captions": write_activitynet_layout,
           "didemo": write_didemo_layout}


