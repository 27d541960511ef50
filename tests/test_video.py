"""Tests of the decode: `data/video.py` (the datasets' decode) and `data/sampled_decode.py`
(only the sampled frames, for encode / search / visualize)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from centerclip_jax.data import sampled_decode
from centerclip_jax.data import video
from tests import frames_reference as ref
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


# --------------------------------------------------------------- sampled decode (inference)

# (suffix, codec): containers with an index (mp4, mov, avi, mkv, webm) and one without
# (MPEG-TS: seeks land anywhere, so the decode falls back to streaming).
CONTAINERS = [(".mp4", "libx264"), (".mov", "libx264"), (".avi", "mpeg4"), (".avi", "mjpeg"),
              (".mkv", "libx264"), (".webm", "libvpx"), (".webm", "libvpx-vp9"),
              (".ts", "libx264")]
# decode_sampled options -> the method it must use on an indexed container.
MODES = {"seek": (dict(seek_after_s=0.0), "seek"),
         "seek_each_frame": (dict(seek_after_s=0.0, max_gap_s=0.0), "seek"),
         "stream_one_pass": (dict(seek_after_s=1e9), "stream"),
         "stream_two_passes": (dict(seek_after_s=1e9, keep_limit=5), "stream")}


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
  """8 s, 25 fps, keyframe every second, a moving pattern (every frame differs)."""
  root = tmp_path_factory.mktemp("containers")
  return {(suffix, codec): vf.write_video(
      root / f"{codec}{suffix}", num_frames=200, fps=25, width=48, height=32, seed=i,
      pattern="moving", codec=codec, gop=25) for i, (suffix, codec) in enumerate(CONTAINERS)}


def _eval_choice(max_frames):
  """The eval sampling rule (independent reference): distinct indices of T frames."""
  return lambda t: ref.sample_frame_indices(t, max_frames)[0][:min(t, max_frames)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: f"{c[1]}{c[0]}")
def test_sampled_decode_equals_decoding_everything(containers, container, mode):
  """The frames equal those of the current rule: decode all at fps, then int(tick/2 + tick*i)."""
  path = containers[container]
  options, method = MODES[mode]
  for fps, max_frames in ((3.0, 12), (3.0, 30), (7.0, 5)):
    everything, _ = video.decode_video(path, fps=fps, short_side=24)
    want = _eval_choice(max_frames)(len(everything))
    got = sampled_decode.decode_sampled(path, fps=fps, short_side=24,
                                        choose=_eval_choice(max_frames), **options)
    assert got.method == ("stream" if container[0] == ".ts" else method)
    assert got.num_frames == len(everything) == got.expected_frames
    assert not got.truncated
    np.testing.assert_array_equal(got.indices, want)
    np.testing.assert_array_equal(got.frames, everything[want])  # Pixel for pixel.
    assert got.frames.shape == (len(want), 24, 36, 3) and got.frames.dtype == np.uint8


def test_sampled_decode_short_videos_and_upsampling(videos):
  for kind in ("one", "two", "2fps", "mp4"):
    everything, _ = video.decode_video(videos[kind], fps=3, short_side=None)
    for options, _ in MODES.values():
      got = sampled_decode.decode_sampled(videos[kind], fps=3, short_side=None,
                                          choose=_eval_choice(4), **options)
      want = _eval_choice(4)(len(everything))
      np.testing.assert_array_equal(got.frames, everything[want], err_msg=kind)
      assert got.num_frames == len(everything)


@pytest.mark.parametrize("codec,suffix", [("mpeg4", ".avi"), ("mjpeg", ".avi"),
                                          ("libx264", ".mkv"), ("libvpx-vp9", ".webm")])
def test_truncated_stream_uses_what_decodes_and_says_so(tmp_path, codec, suffix):
  whole = vf.write_video(tmp_path / f"whole{suffix}", num_frames=250, fps=25, width=48,
                         height=32, pattern="moving", codec=codec, gop=25)
  cut = vf.write_truncated(tmp_path / f"cut{suffix}", whole,
                           keep_bytes=int(0.3 * whole.stat().st_size))
  for options, _ in MODES.values():
    got = sampled_decode.decode_sampled(cut, fps=3, short_side=None, choose=_eval_choice(12),
                                        **options)
    assert got.truncated and got.method == "stream"
    assert 1 <= got.num_frames < 30 and len(got.frames) == min(12, got.num_frames)
    # The frames are the decodable start of the whole video's at 3 fps (the last one may be
    # only partly decoded), and those of the full decode where that does not fail.
    everything, _ = video.decode_video(whole, fps=3, short_side=None)
    np.testing.assert_array_equal(got.frames[:-1], everything[got.indices[:-1]])
    try:
      cut_frames, _ = video.decode_video(cut, fps=3, short_side=None)
    except video.VideoDecodeError:  # The datasets' decode rejects what fails part-way.
      continue
    assert len(cut_frames) == got.num_frames
    np.testing.assert_array_equal(got.frames, cut_frames[got.indices])


def test_audio_longer_than_video_is_not_truncation(tmp_path):
  path = vf.write_video_with_longer_audio(tmp_path / "av.mkv")  # Container: 10 s, video 4 s.
  everything, _ = video.decode_video(path, fps=3, short_side=None)
  want = _eval_choice(12)(len(everything))
  for options, method in MODES.values():
    got = sampled_decode.decode_sampled(path, fps=3, short_side=None, choose=_eval_choice(12),
                                        **options)
    assert got.method == method and not got.truncated
    assert got.num_frames == len(everything) == 12
    np.testing.assert_array_equal(got.frames, everything[want])


@pytest.mark.parametrize("kind,message", [
    ("missing", "not found"), ("garbage", "cannot decode"),
    ("truncated", "cannot decode"), ("zero", "no frames")])
def test_sampled_decode_bad_videos_name_the_file(videos, kind, message):
  with pytest.raises(video.VideoDecodeError, match=message) as info:
    sampled_decode.decode_sampled(videos[kind], fps=3, short_side=32, choose=_eval_choice(4))
  assert str(videos[kind]) in str(info.value)


@pytest.mark.parametrize("fps", [0, -1.0])
def test_fps_must_be_positive(videos, fps):
  with pytest.raises(ValueError, match="fps must be > 0"):
    sampled_decode.decode_sampled(videos["mp4"], fps=fps, short_side=32,
                                  choose=_eval_choice(4))
  with pytest.raises(ValueError, match="fps must be > 0"):
    video.decode_video(videos["mp4"], fps=fps)
