"""`python -m centerclip_jax.encode` end to end on tiny generated videos and .npy frames."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from centerclip_jax import config as config_lib
from centerclip_jax.inference import encoder as encode
from centerclip_jax.data import tokenizer as tokenizer_lib
from centerclip_jax.data import video as video_lib
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import porting
from tests import video_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = clip_lib.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                           vision_patch_size=8, context_length=77, vocab_size=49408,
                           transformer_width=64, transformer_heads=1, transformer_layers=1)
CAPTIONS = ["a man is cooking", "two dogs play in the snow &amp; run", "<|endoftext|> text"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("encode")
  params = clip_lib.init_params(TINY, jax.random.PRNGKey(0))
  params = jax.tree.map(np.asarray, params)
  porting.save_converted(root / "clip", TINY, params, {}, {"source": "test"})
  videos = [video_fixtures.write_video(root / "a.mp4", num_frames=30, fps=10, seed=1,
                                       pattern="moving"),
            video_fixtures.write_video(root / "b.avi", num_frames=7, fps=10, seed=2,
                                       pattern="moving")]
  frames, _ = video_lib.decode_video(str(videos[0]), fps=3.0, short_side=32)
  np.save(root / "a_frames.npy", frames)
  (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n\n")
  return root, params


def tiny_config(root):
  c = config_lib.base_config()
  c.init_from = str(root / "clip")
  c.model = config_lib.model_config(max_frames=4, num_blocks=2, tokens_per_frame=16)
  c.model.target_frames_blocks = (4, 2)
  c.model.cluster_num_blocks = (16, 8)
  c.data.decode_short_side = 32  # the short side a_frames.npy is decoded at
  return c


def test_encode_videos_npy_and_captions(setup):
  root, params = setup
  paths = [str(root / "a.mp4"), str(root / "b.avi"), str(root / "a_frames.npy")]
  out = encode.encode(tiny_config(root), paths, CAPTIONS, batch_size=2)
  v, t = out["video_embeddings"], out["text_embeddings"]
  assert v.shape == (3, 32) and t.shape == (3, 32)
  assert v.dtype == np.float32 and t.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1.0, atol=1e-5)
  # The .npy of a.mp4's decoded frames embeds exactly like the video file itself, and
  # the two different videos embed differently (input order is kept).
  np.testing.assert_allclose(v[2], v[0], atol=1e-6)
  assert np.abs(v[0] - v[1]).max() > 1e-4
  # Text embeddings: the plain CLIP text tower on the CLIP4Clip tokenisation.
  model = clip_lib.CLIP(TINY)
  tokens = tokenizer_lib.get_tokenizer().tokenize(CAPTIONS, 32)
  ref = np.asarray(model.apply({"params": params}, tokens, method=model.encode_text))
  np.testing.assert_allclose(t, ref / np.linalg.norm(ref, axis=-1, keepdims=True), atol=1e-5)
  assert list(out["video_paths"]) == paths and list(out["captions"]) == CAPTIONS
  np.testing.assert_allclose(out["logit_scale"], np.exp(params["logit_scale"]), rtol=1e-6)


def test_short_video_repeats_last_frame_and_masks():
  frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  x, mask = encode.video_inputs(frames, 4, 4)
  assert x.shape == (4, 4, 4, 3) and x.dtype == np.uint8
  assert mask.tolist() == [True, True, False, False]
  np.testing.assert_array_equal(x[1], x[3])


def test_bad_inputs_name_the_file(setup, tmp_path):
  root, _ = setup
  bad = video_fixtures.write_garbage(tmp_path / "broken.mp4")
  with pytest.raises(encode.InputError, match="broken.mp4"):
    encode.encode(tiny_config(root), [str(bad)], [])
  wrong = tmp_path / "wrong.npy"
  np.save(wrong, np.zeros((4, 4, 3), np.float32))
  with pytest.raises(encode.InputError, match="wrong.npy"):
    encode.load_frames(str(wrong), fps=3.0, short_side=32, max_frames=4)
  with pytest.raises(encode.InputError, match="no such file"):
    encode.load_frames(str(tmp_path / "missing.mp4"), fps=3.0, short_side=32, max_frames=4)


def test_cli(setup, tmp_path):
  """The CLI writes the .npz; a corrupt video is a one-line error naming it, not a traceback."""
  root, _ = setup
  bad = video_fixtures.write_garbage(tmp_path / "corrupt.mp4")
  base = [sys.executable, "-m", "centerclip_jax.encode", "--config",
          os.path.join(REPO, "configs", "msrvtt.py"), f"--config.init_from={root / 'clip'}",
          "--config.model.max_frames=4", "--config.model.target_frames_blocks=(4,2)",
          "--config.model.cluster_num_blocks=(16,8)"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  out = tmp_path / "out.npz"
  ok = subprocess.run(base + ["--videos", str(root / "a_frames.npy"), "--captions",
                              str(root / "captions.txt"), "--output", str(out)],
                      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  data = np.load(out)
  assert data["video_embeddings"].shape == (1, 32) and data["text_embeddings"].shape == (3, 32)
  fail = subprocess.run(base + ["--videos", str(bad), "--output", str(tmp_path / "x.npz")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert fail.returncode == 2
  assert "corrupt.mp4" in fail.stderr and "Traceback" not in fail.stderr
  assert not (tmp_path / "x.npz").exists()


# ------------------------------------------------------------------ the CLI's arguments


def test_videos_take_several_files_after_one_flag():
  from centerclip_jax import encode as app  # pylint: disable=g-import-not-at-top
  argv = ["encode", "--config", "c.py", "--videos", "a.mp4", "b.avi", "c.npy",
          "--captions", "t.txt", "--videos=d.mp4", "e.mp4", "--videos", "f.mp4", "--output", "o"]
  assert app.expand_multi(argv) == [
      "encode", "--config", "c.py", "--videos=a.mp4", "--videos=b.avi", "--videos=c.npy",
      "--captions", "t.txt", "--videos=d.mp4", "--videos=e.mp4", "--videos=f.mp4",
      "--output", "o"]


def test_output_gets_the_npz_suffix_it_is_written_with(tmp_path):
  from centerclip_jax import console  # pylint: disable=g-import-not-at-top
  from centerclip_jax import encode as app  # pylint: disable=g-import-not-at-top
  assert app.output_path(str(tmp_path / "emb")) == tmp_path / "emb.npz"
  assert app.output_path(str(tmp_path / "emb.npz")) == tmp_path / "emb.npz"
  with pytest.raises(console.UsageError, match="is a folder"):
    app.output_path(str(tmp_path))
  with pytest.raises(console.UsageError, match="does not exist"):
    app.output_path(str(tmp_path / "missing" / "emb.npz"))


class _Flag:
  def __init__(self, value):
    self.value = value


def test_non_finite_embedding_is_an_error_naming_the_file(setup, tmp_path, monkeypatch, capsys):
  """encode never writes a NaN row: the check names the video (the model's own short-video
  rule keeps real embeddings finite; here the model output is forced to NaN)."""
  from centerclip_jax import encode as app  # pylint: disable=g-import-not-at-top
  root, _ = setup
  real = encode.encode

  def nan_for_b(*args, **kwargs):
    out = real(*args, **kwargs)
    out["video_embeddings"][1] = np.nan
    return out

  monkeypatch.setattr(encode, "encode", nan_for_b)
  out = tmp_path / "o.npz"
  cli = {"config": _Flag(tiny_config(root)),
         "videos": _Flag([str(root / "a_frames.npy"), str(root / "b.avi")]),
         "captions": _Flag(None), "output": _Flag(str(out)), "fps": _Flag(3.0),
         "batch_size": _Flag(2)}
  with pytest.raises(SystemExit) as e:
    app.main(["encode"], cli)
  assert e.value.code == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "non-finite" in err[0] and "b.avi" in err[0]
  assert "a_frames.npy" not in err[0] and not out.exists()


# ------------------------------------------------------------------------ captions files


def test_captions_control_characters_and_special_tokens_are_text(tmp_path):
  tok = tokenizer_lib.get_tokenizer()
  path = tmp_path / "caps.txt"
  path.write_bytes("a dog\x0cruns\r\n\x00 a cat \x1b[31m\n<|endoftext|> hi\n\u2028x\n".encode())
  caps = encode.read_captions(str(path))
  # Only newlines split captions: form feed, NUL and ESC stay inside (as text); U+2028
  # is whitespace at the edge, stripped like spaces.
  assert caps == ["a dog\x0cruns", "\x00 a cat \x1b[31m", "<|endoftext|> hi", "x"]
  tokens = tok.tokenize(caps, 16)
  sot, eot = tokens[0, 0], tokens[0].max()
  for row in tokens:
    assert row[0] == sot and int((row == eot).sum()) == 1  # the literal is never an EOT
  plain = tok.tokenize(["hi"], 16)[0]
  assert list(tokens[2][:3]) != list(plain[:3])  # "<|endoftext|>" was tokenised as text


def test_captions_invalid_utf8_and_huge_lines_are_clear_errors(tmp_path):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes(b"ok\nnaive caf\xe9\n")
  with pytest.raises(encode.InputError, match=r"latin1.txt: line 2 is not UTF-8"):
    encode.read_captions(str(bad))
  huge = tmp_path / "huge.txt"
  huge.write_text("short\n" + "word " * 2_000_000 + "\n")  # a 10 MB line
  with pytest.raises(encode.InputError, match=r"huge.txt: line 2 has 10000000 characters"):
    encode.read_captions(str(huge))


@pytest.mark.parametrize("algo", ["kmedoids++", "tome"])
def test_one_two_three_frame_videos_encode_finite(setup, tmp_path, algo):
  """Videos of 1, 2 and 3 decoded frames under a 12-frame `B2 - 4` plan: finite, unit-norm
  embeddings (the original rule would give 0/0 for the 1- and 2-frame ones)."""
  root, _ = setup
  rng = np.random.default_rng(7)
  paths = []
  for n in (1, 2, 3):
    path = tmp_path / f"short{n}.npy"
    np.save(path, rng.integers(0, 255, (n, 32, 40, 3), dtype=np.uint8))
    paths.append(str(path))
  c = tiny_config(root)
  c.model = config_lib.model_config(max_frames=12, num_blocks=2, tokens_per_frame=16)
  c.model.target_frames_blocks = (12, 4)
  c.model.cluster_num_blocks = (16, 8)
  c.model.cluster_algo = algo
  out = encode.encode(c, paths, [], batch_size=3)
  v = out["video_embeddings"]
  assert v.shape == (3, 32) and np.all(np.isfinite(v))
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-5)
