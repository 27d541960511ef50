"""Tests for centerclip_jax.data.video: decoding, frame sampling, preprocessing."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from centerclip_jax.data import video
from tests import video_fixtures as vf


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  return {
      "mp4": vf.write_video(root / "a.mp4", seed=3),  # 20 frames, 10 fps, 64x48.
      "avi": vf.write_video(root / "a.avi", seed=4),
      "mkv": vf.write_video(root / "a.mkv", seed=5),
      "25fps": vf.write_video(root / "b.avi", num_frames=25, fps=25),
      "2fps": vf.write_video(root / "c.mp4", num_frames=4, fps=2),
      "one": vf.write_video(root / "one.mp4", num_frames=1),
      "two": vf.write_video(root / "two.mp4", num_frames=2),
      "portrait": vf.write_video(root / "p.mp4", width=48, height=64, num_frames=5),
      "garbage": vf.write_garbage(root / "garbage.mp4"),
      "truncated": vf.write_truncated(root / "trunc.mp4", root / "a.mp4"),
      "zero": vf.write_zero_frame_video(root / "zero.avi"),
      "missing": root / "nope.mp4",
  }


def _sources(frames, num_frames=20):
  return [vf.source_index(f, num_frames) for f in frames]


@pytest.mark.parametrize("kind", ["mp4", "avi", "mkv"])
def test_resample_to_3fps_takes_nearest_frame(videos, kind):
  frames, fps = video.decode_video(videos[kind], fps=3, short_side=None)
  # Ticks k/3 s for k/3 < 2 s; nearest of the source frames at i/10 s.
  assert _sources(frames) == [0, 3, 7, 10, 13, 17]
  assert fps == 3.0
  assert frames.dtype == np.uint8 and frames.shape == (6, 48, 64, 3)


def test_resample_other_rates(videos):
  frames, _ = video.decode_video(videos["25fps"], fps=3, short_side=None)
  assert _sources(frames, 25) == [0, 8, 17]  # 1 s: ticks 0, 8.33, 16.67 source frames.
  # Upsampling 2 -> 3 fps (frames at 0, .5, 1, 1.5 s; video ends at 2 s).
  frames, _ = video.decode_video(videos["2fps"], fps=3, short_side=None)
  assert _sources(frames, 4) == [0, 1, 1, 2, 3, 3]


def test_short_videos_give_one_frame(videos):
  assert video.decode_video(videos["one"], fps=3)[0].shape[0] == 1
  assert video.decode_video(videos["two"], fps=3)[0].shape[0] == 1  # 0.2 s < 1 tick.


def test_keep_every_frame(videos):
  frames, fps = video.decode_video(videos["mp4"], fps=None, short_side=None)
  assert _sources(frames) == list(range(20))
  assert fps == pytest.approx(10.0)


def test_short_side_resize_keeps_aspect_and_colour(videos):
  frames, _ = video.decode_video(videos["mp4"], fps=3, short_side=32)
  assert frames.shape == (6, 32, 42, 3)  # 64 * 32 / 48 = 42.7, floored.
  assert abs(float(frames[..., 1].mean()) - vf.video_level(3)) < 4
  frames, _ = video.decode_video(videos["portrait"], fps=3, short_side=32)
  assert frames.shape[1:] == (42, 32, 3)
  frames, _ = video.decode_video(videos["mp4"], fps=3, short_side=96)  # Upscale too.
  assert frames.shape[1:] == (96, 128, 3)


@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_start_end_window(videos, kind):
  frames, _ = video.decode_video(videos[kind], fps=3, short_side=None,
                                 start_time=0.5, end_time=1.5)
  # Ticks .5, .833, 1.167 s -> nearest source frames 5, 8, 12.
  assert _sources(frames) == [5, 8, 12]
  frames, _ = video.decode_video(videos[kind], fps=None, short_side=None,
                                 start_time=0.5, end_time=1.5)
  assert _sources(frames) == list(range(5, 15))
  frames, _ = video.decode_video(videos[kind], fps=3, short_side=None, start_time=1.0)
  assert _sources(frames) == [10, 13, 17]


def test_max_frames_caps_output(videos):
  frames, _ = video.decode_video(videos["mp4"], fps=None, short_side=16, max_frames=4)
  assert _sources(frames) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind,message", [
    ("missing", "not found"), ("garbage", "cannot decode"),
    ("truncated", "cannot decode"), ("zero", "no frames")])
def test_bad_videos_raise_decode_error_naming_file(videos, kind, message):
  with pytest.raises(video.VideoDecodeError, match=message) as info:
    video.decode_video(videos[kind])
  assert str(videos[kind]) in str(info.value)
  assert isinstance(info.value, ValueError)


def test_window_after_end_raises(videos):
  with pytest.raises(video.VideoDecodeError, match="no frames"):
    video.decode_video(videos["mp4"], start_time=5.0)
  with pytest.raises(ValueError, match="end_time"):
    video.decode_video(videos["mp4"], start_time=1.0, end_time=0.5)


def test_sample_indices_eval_uniform():
  indices, mask = video.sample_frame_indices(30, 12)
  # tick = 2.5: int(1.25 + 2.5 i).
  np.testing.assert_array_equal(indices, [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28])
  assert mask.all() and indices.dtype == np.int32
  indices, _ = video.sample_frame_indices(13, 4)  # tick 3.25: 1.625 + 3.25 i.
  np.testing.assert_array_equal(indices, [1, 4, 8, 11])


def test_sample_indices_match_reference_float_formula():
  # The authors' expression in Python floats, including cases where it differs
  # from exact arithmetic (T=12, M=7, i=3: 5.999... -> 5).
  for t in range(13, 400, 7):
    for m in (7, 12, 32):
      if t <= m:
        continue
      tick = t / m
      reference = [int(tick / 2 + tick * i) for i in range(m)]
      np.testing.assert_array_equal(video.sample_frame_indices(t, m)[0], reference)
  assert video.sample_frame_indices(12, 7)[0][3] == 5


def test_sample_indices_short_video_pads_with_last():
  indices, mask = video.sample_frame_indices(5, 8)
  np.testing.assert_array_equal(indices, [0, 1, 2, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0, 0, 0])
  indices, mask = video.sample_frame_indices(8, 8)
  np.testing.assert_array_equal(indices, np.arange(8))
  assert mask.all()
  train = video.sample_frame_indices(5, 8, train=True, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(train[0], indices[:5].tolist() + [4, 4, 4])


def test_sample_indices_train_one_per_segment():
  rng = np.random.default_rng(0)
  seen = [set() for _ in range(12)]
  for _ in range(200):
    indices, mask = video.sample_frame_indices(30, 12, train=True, rng=rng)
    assert mask.all()
    for i, index in enumerate(indices):
      lo, hi = int(2.5 * i), int(2.5 * (i + 1))  # Segment i of 30 / 12 frames.
      assert lo <= index < hi
      seen[i].add(int(index))
  assert seen[0] == {0, 1} and seen[1] == {2, 3, 4} and seen[11] == {27, 28, 29}


def test_sample_indices_bad_input():
  with pytest.raises(ValueError):
    video.sample_frame_indices(0, 12)
  with pytest.raises(ValueError):
    video.sample_frame_indices(10, 0)


def test_preprocess_crop_and_normalise_by_hand():
  frames = (np.arange(2 * 4 * 8 * 3) % 251).astype(np.uint8).reshape(2, 4, 8, 3)
  out = video.preprocess_frames(frames, resolution=4)  # Short side already 4.
  assert out.shape == (2, 4, 4, 3) and out.dtype == np.float32
  crop = frames[:, :, 2:6].astype(np.float64)  # left = round((8 - 4) / 2) = 2.
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_allclose(out, (crop / 255 - mean) / std, atol=1e-5)
  odd = np.zeros([1, 4, 7, 3], np.uint8)
  odd[0, :, 2] = 255  # Column 2 is the first of the crop (round(1.5) = 2).
  out = video.preprocess_frames(odd, resolution=4)
  np.testing.assert_allclose(out[0, :, 0, 0], (1 - mean[0]) / std[0], atol=1e-5)
  np.testing.assert_allclose(out[0, :, 1, 0], (0 - mean[0]) / std[0], atol=1e-5)


def test_preprocess_resizes_shorter_side():
  flat = np.empty([1, 48, 64, 3], np.uint8)
  flat[...] = (200, 100, 50)
  out = video.preprocess_frames(flat, resolution=32)
  expected = (np.array([200, 100, 50]) / 255 - video.CLIP_MEAN) / video.CLIP_STD
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)
  ramp = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, None, :, None],
                         [1, 48, 64, 3]).copy()
  out = video.preprocess_frames(ramp, resolution=24)  # -> 24 x 32, crop columns 4..28.
  assert out.shape == (1, 24, 24, 3)
  assert np.all(np.diff(out[0, 12, :, 0]) > 0)
  # Output column 0 = resized column 4, centred on source x = 2 * 4.5 - 0.5 = 8.5,
  # where the ramp is 255 * 8.5 / 63 = 34.4.
  first = (out[0, 12, 0, 0] * video.CLIP_STD[0] + video.CLIP_MEAN[0]) * 255
  assert abs(first - 34.4) < 1.5
  with pytest.raises(ValueError, match="uint8"):
    video.preprocess_frames(flat.astype(np.float32))


def test_encode_video_jpeg_and_cache(videos, tmp_path):
  request = video.JpegRequest(path=str(videos["mp4"]), fps=3, short_side=32,
                              cache_dir=str(tmp_path / "cache"))
  result = video.encode_video_jpeg(request)
  assert result.error is None and not result.from_cache and result.fps == 3.0
  decoded = [np.asarray(Image.open(io.BytesIO(j))) for j in result.jpegs]
  assert [d.shape for d in decoded] == [(32, 42, 3)] * 6
  assert _sources(decoded) == [0, 3, 7, 10, 13, 17]
  assert len(os.listdir(tmp_path / "cache")) == 1
  again = video.encode_video_jpeg(request)
  assert again.from_cache and again.jpegs == result.jpegs
  other = video.encode_video_jpeg(video.JpegRequest(
      path=str(videos["mp4"]), fps=3, short_side=16, cache_dir=str(tmp_path / "cache")))
  assert not other.from_cache and len(os.listdir(tmp_path / "cache")) == 2


def test_encode_video_jpeg_reports_errors(videos, tmp_path):
  for kind in ("garbage", "missing", "zero"):
    result = video.encode_video_jpeg(video.JpegRequest(
        path=str(videos[kind]), cache_dir=str(tmp_path)))
    assert result.error and str(videos[kind]) in result.error and not result.jpegs
  assert os.listdir(tmp_path) == []  # Failures are not cached.
