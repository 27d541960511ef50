"""The one frame path (`data/frames.py`): its rules, and dataset + eval == encode.

The same generated video file goes through the MSR-VTT builder (PyAV decode, JPEG frames)
and the eval pipeline, and through `encode`'s path (`encoder.load_frames` /
`video_inputs` / `encode`), which stores its sampled frames as the builders do (JPEG at
`config.data.jpeg_quality`) and reads them with eval's op: model inputs and embeddings
equal eval's. Without that storing step (`jpeg_quality=0`) the inputs differ by the JPEG
rounding (quality 95, 4:2:0 chroma), whose measured size the tests state.
"""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.data import datasets
from centerclip_jax.data import frames as frame_lib
from centerclip_jax.data import pipeline
from centerclip_jax.data.datasets import common
from centerclip_jax.inference import encoder
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import loading
from centerclip_jax.weights import porting
from tests import frames_reference as ref
from tests import video_fixtures as vf


MEAN = np.asarray(ref.CLIP_MEAN)
STD = np.asarray(ref.CLIP_STD)


def _levels(a, b) -> np.ndarray:
  """|a - b| of two uint8 arrays, in uint8 levels (int)."""
  assert a.dtype == b.dtype == np.uint8, (a.dtype, b.dtype)
  return np.abs(a.astype(np.int32) - b.astype(np.int32))
TINY = clip_lib.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                           vision_patch_size=8, context_length=77, vocab_size=49408,
                           transformer_width=64, transformer_heads=1, transformer_layers=1)
MAX_FRAMES = 8


# ------------------------------------------------------------------------ frame rules


def test_eval_indices_follow_the_reference_float_formula():
  # The authors' expression in Python floats, including where it differs from exact
  # arithmetic (T=12, M=7, i=3: 5.999... -> 5).
  for t in list(range(1, 40)) + list(range(41, 400, 7)) + [3001]:
    for m in (1, 7, 12, 32):
      indices, mask = frame_lib.eval_frame_indices(t, m)
      want_i, want_m = ref.sample_frame_indices(t, m)
      np.testing.assert_array_equal(indices, want_i, err_msg=f"T={t} M={m}")
      np.testing.assert_array_equal(mask, want_m)
  np.testing.assert_array_equal(frame_lib.eval_frame_indices(30, 12)[0],
                                [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28])
  assert frame_lib.eval_frame_indices(12, 7)[0][3] == 5
  indices, mask = frame_lib.eval_frame_indices(5, 8)
  np.testing.assert_array_equal(indices, [0, 1, 2, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0, 0, 0])
  with pytest.raises(ValueError):
    frame_lib.eval_frame_indices(0, 12)


def test_crop_by_hand_and_the_model_normalises():
  frames = (np.arange(2 * 4 * 8 * 3) % 251).astype(np.uint8).reshape(2, 4, 8, 3)
  out = frame_lib.resize_and_crop(tf.constant(frames), 4).numpy()  # Short side already 4.
  assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8
  crop = frames[:, :, 2:6]  # left = round((8 - 4) / 2) = 2.
  np.testing.assert_array_equal(out, crop)
  np.testing.assert_allclose(clip_lib.normalize_pixels(out),
                             (crop.astype(np.float64) / 255 - MEAN) / STD, rtol=0, atol=1e-6)
  odd = np.zeros([1, 4, 7, 3], np.uint8)
  odd[0, :, 2] = 255  # Column 2 is the first of the crop (round(1.5) = 2).
  out = frame_lib.resize_and_crop(tf.constant(odd), 4).numpy()
  np.testing.assert_array_equal(out[0, :, 0, 0], 255)
  np.testing.assert_array_equal(out[0, :, 1:], 0)


def test_resize_shorter_side_then_crop():
  flat = np.empty([1, 48, 64, 3], np.uint8)
  flat[...] = (200, 100, 50)
  out = frame_lib.resize_and_crop(tf.constant(flat), 32).numpy()
  np.testing.assert_array_equal(out, np.broadcast_to(np.uint8([200, 100, 50]), out.shape))
  ramp = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, None, :, None],
                         [1, 48, 64, 3]).copy()
  out = frame_lib.resize_and_crop(tf.constant(ramp), 24).numpy()  # 24 x 32, crop cols 4..28.
  assert out.shape == (1, 24, 24, 3)
  assert np.all(np.diff(out[0, 12, :, 0].astype(np.int32)) > 0)
  # Output column 0 = resized column 4, centred on source x = 2 * 4.5 - 0.5 = 8.5, where
  # the ramp is 255 * 8.5 / 63 = 34.4.
  assert abs(int(out[0, 12, 0, 0]) - 34.4) < 1.5


def test_model_inputs_sample_and_pad_like_the_pipeline():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, [13, 40, 52, 3], dtype=np.uint8)
  x, mask = frame_lib.model_inputs(frames, 4, 32, jpeg_quality=0)  # No storing step.
  want_i, want_m = ref.sample_frame_indices(13, 4)
  np.testing.assert_array_equal(mask, want_m)
  assert x.dtype == np.uint8 and x.shape == (4, 32, 32, 3)
  assert _levels(x, ref.resize_and_crop_frames(frames[want_i], 32)).max() <= 1
  # By default each sampled frame is stored as the datasets store it first (JPEG q95).
  x, mask = frame_lib.model_inputs(frames, 4, 32)
  assert _levels(x, ref.resize_and_crop_frames(_jpeg_round_trip(frames[want_i]), 32)
                 ).max() <= 1
  assert _levels(x, ref.resize_and_crop_frames(frames[want_i], 32)).max() > 10
  x, mask = frame_lib.model_inputs(frames[:2], 4, 32)  # Short: the last frame repeated.
  assert mask.tolist() == [True, True, False, False]
  np.testing.assert_array_equal(x[1], x[3])
  with pytest.raises(ValueError, match="uint8"):
    frame_lib.model_inputs(frames.astype(np.float32), 4, 32)


# --------------------------------------------------- the same file: dataset + eval vs encode


@pytest.fixture(scope="module", params=[32, 48], ids=["stored_at_model_size", "resized"])
def same_file(request, tmp_path_factory):
  """MSR-VTT miniature whose two test videos are real moving clips; built at `short_side`."""
  short_side = request.param
  root = tmp_path_factory.mktemp(f"frame_path_{short_side}")
  manual = root / "raw"
  vf.write_msrvtt_layout(manual)
  videos = {"video3": vf.write_video(manual / "videos" / "all" / "video3.mp4", num_frames=100,
                                     fps=25, width=80, height=60, seed=3, pattern="moving",
                                     noise=1.0),
            "video2": vf.write_video(manual / "videos" / "all" / "video2.mp4", num_frames=40,
                                     fps=25, width=80, height=60, seed=2)}  # Flat colours.
  config = common.VideoTextConfig(fps=3, short_side=short_side)
  builder = datasets.BUILDERS["msrvtt"](data_dir=str(root / "tfds"), config=config,
                                        num_workers=1, keep_frame_cache=False)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual), try_download_gcs=False))
  params = jax.tree.map(np.asarray, clip_lib.init_params(TINY, jax.random.PRNGKey(0)))
  porting.save_converted(root / "clip", TINY, params, {}, {"source": "test"})
  c = config_lib.base_config()
  c.init_from = str(root / "clip")
  c.model = config_lib.model_config(max_frames=MAX_FRAMES, num_blocks=2, tokens_per_frame=16)
  c.model.target_frames_blocks = (MAX_FRAMES, 4)
  c.model.cluster_num_blocks = (16, 8)
  c.data.decode_short_side = short_side
  return builder, videos, c


def _eval_rows(builder):
  data = pipeline.eval_datasets(builder, "test_1k", batch_size=2, max_frames=MAX_FRAMES,
                                max_words=32, resolution=TINY.image_resolution)
  rows = {}
  for batch in data.videos:
    for i in np.flatnonzero(batch["valid"]):
      rows[data.videos.keys[batch["video_index"][i]]] = (batch["frames"][i],
                                                         batch["frame_mask"][i])
  return rows


def _jpeg_round_trip(frames: np.ndarray, quality: int = 95) -> np.ndarray:
  """What storing frames does, written independently: PIL JPEG, TF's accurate decode."""
  out = []
  for frame in frames:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    out.append(tf.io.decode_jpeg(buf.getvalue(), channels=3,
                                 dct_method="INTEGER_ACCURATE").numpy())
  return np.stack(out)


def test_model_inputs_equal_eval_inputs(same_file):
  builder, videos, config = same_file
  short_side = config.data.decode_short_side
  rows = _eval_rows(builder)
  assert set(rows) == set(videos)
  for vid, path in videos.items():
    eval_frames, eval_mask = rows[vid]
    frames, mask, clip = encoder.file_inputs(
        str(path), fps=3.0, short_side=short_side, max_frames=MAX_FRAMES,
        resolution=TINY.image_resolution)
    np.testing.assert_array_equal(mask, eval_mask)
    assert clip.num_frames == {"video3": 12, "video2": 5}[vid] and not clip.truncated
    # encode stores its frames as the datasets do: eval's inputs (same bytes, same ops),
    # uint8 to the last level; the model's normalisation of them is CLIP's within 1e-6.
    assert frames.dtype == eval_frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, eval_frames)
    np.testing.assert_allclose(clip_lib.normalize_pixels(frames),
                               ref.normalize_frames(eval_frames), rtol=0, atol=1e-6)
    # The storing step is the whole difference: skipped, the inputs differ by the JPEG
    # rounding (measured on the moving colour gradient: stored at 32 px, max 22 and mean
    # 5.0 uint8 levels; stored at 48 px and resized to 32, max 8 and mean 1.1) ...
    raw, _ = encoder.video_inputs(clip.frames, MAX_FRAMES, TINY.image_resolution,
                                  jpeg_quality=0)
    levels = _levels(raw, eval_frames)
    bound = {32: (32, 6.0), 48: (12, 1.6)}[short_side]
    assert levels.max() <= bound[0] and levels.mean() < bound[1], (vid, levels.max(),
                                                                   levels.mean())
    assert levels.max() >= 1  # The dataset path really went through JPEG.
    # ... and an independent JPEG round trip of the raw frames gives eval's inputs again.
    stored, _ = encoder.video_inputs(_jpeg_round_trip(clip.frames), MAX_FRAMES,
                                     TINY.image_resolution, jpeg_quality=0)
    np.testing.assert_array_equal(stored, eval_frames)


def test_encode_embeddings_equal_eval_embeddings(same_file):
  builder, videos, config = same_file
  rows = _eval_rows(builder)
  paths = [str(p) for p in videos.values()]
  out = encoder.encode(config, paths, [], batch_size=2)
  model, params = loading.load_model(config)
  encode_video, _ = parallel.jit_encoders(model)
  want = np.asarray(encode_video(params, np.stack([rows[v][0] for v in videos]),
                                 np.stack([rows[v][1] for v in videos])))
  np.testing.assert_allclose(np.linalg.norm(want, axis=-1), 1.0, atol=1e-5)
  apart = np.abs(want[0] - want[1]).max()  # Two different videos.
  gap = np.abs(out["video_embeddings"] - want).max()
  # Without the storing step the JPEG rounding moves this random tiny model's embeddings
  # (measured 0.0156 stored at 32 px, 0.0027 at 48 px, max abs over 32 dimensions).
  raw_config = config.copy_and_resolve_references()
  raw_config.data.jpeg_quality = 0
  raw_gap = np.abs(encoder.encode(raw_config, paths, [], batch_size=2)["video_embeddings"]
                   - want).max()
  print(f"encode vs eval embedding gap {gap:.2e} (no storing step: {raw_gap:.5f}); two "
        f"different videos {apart:.5f}")
  assert gap <= 1e-5, gap  # The issue asks for 1e-3.
  assert 1e-3 < raw_gap < apart / 5, (raw_gap, apart)


# ------------------------------------------------------------ inference: faults up front


def test_truncated_file_is_embedded_with_a_warning(tmp_path, caplog):
  whole = vf.write_video(tmp_path / "whole.avi", num_frames=250, fps=25, width=48, height=32,
                         pattern="moving", codec="mjpeg", gop=25)
  cut = vf.write_truncated(tmp_path / "cut.avi", whole, keep_bytes=whole.stat().st_size // 3)
  with caplog.at_level("WARNING"):
    clip = encoder.load_frames(str(cut), fps=3.0, short_side=32, max_frames=MAX_FRAMES)
  assert clip.truncated and 1 <= clip.num_frames < clip.expected_frames == 30
  assert len(clip.frames) == min(MAX_FRAMES, clip.num_frames)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and str(cut) in warnings[0]
  assert f"first {clip.num_frames} frames" in warnings[0]
  assert str(clip.indices.tolist()) in warnings[0]
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert not encoder.load_frames(str(whole), fps=3.0, short_side=32,
                                   max_frames=MAX_FRAMES).truncated
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("fps", [0.0, -1.0])
def test_fps_is_rejected_before_any_file_or_model(fps, tmp_path):
  config = config_lib.base_config()
  config.init_from = str(tmp_path / "no_such_checkpoint")
  with pytest.raises(encoder.InputError, match="--fps must be > 0") as info:
    encoder.encode(config, [str(tmp_path / "missing.mp4")], [], fps=fps)
  assert "no_such_checkpoint" not in str(info.value) and "missing" not in str(info.value)


def test_bad_decode_short_side_names_the_field(tmp_path):
  path = vf.write_video(tmp_path / "a.mp4")
  with pytest.raises(encoder.InputError, match="config.data.decode_short_side"):
    encoder.load_frames(str(path), fps=3.0, short_side=0, max_frames=4)
