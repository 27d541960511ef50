"""`centerclip_jax.search`: index a folder (incremental, resumable), query it, both CLIs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from centerclip_jax import config as config_lib
from centerclip_jax.inference import encoder as encode
from centerclip_jax import search
from centerclip_jax.data import video as video_lib
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import porting
from centerclip_jax.search import index as index_lib
from tests import video_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = clip_lib.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                           vision_patch_size=8, context_length=77, vocab_size=49408,
                           transformer_width=64, transformer_heads=1, transformer_layers=1)
MODEL_FLAGS = ["--config.model.max_frames=4", "--config.model.target_frames_blocks=(4,2)",
               "--config.model.cluster_num_blocks=(16,8)"]
CAPTIONS = ["a man is cooking", "two dogs play in the snow"]
# Files of the test folder, in index (path) order; notes.txt is not a video.
OK_FILES = ["a.mp4", "d.npy", "sub/b.avi"]
BROKEN = "broken.mp4"


def tiny_config(ckpt):
  c = config_lib.base_config()
  c.init_from = str(ckpt)
  c.model = config_lib.model_config(max_frames=4, num_blocks=2, tokens_per_frame=16)
  c.model.target_frames_blocks = (4, 2)
  c.model.cluster_num_blocks = (16, 8)
  return c


def save_checkpoint(path, params):
  porting.save_converted(path, TINY, params, {}, {"source": "test"})
  return path


def write_videos(folder):
  video_fixtures.write_video(folder / "a.mp4", num_frames=30, fps=10, seed=1, pattern="moving")
  video_fixtures.write_video(folder / "sub" / "b.avi", num_frames=12, fps=10, seed=2,
                             pattern="moving")
  frames, _ = video_lib.decode_video(str(folder / "a.mp4"), fps=3.0, short_side=32)
  np.save(folder / "d.npy", frames)
  video_fixtures.write_garbage(folder / BROKEN)
  (folder / "notes.txt").write_text("not a video\n")


def copy_tree(src, dst):
  return shutil.copytree(src, dst, copy_function=shutil.copy2)  # keeps mtimes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A folder indexed once through the CLI (subprocess): (root, ckpt, videos, index, stdout)."""
  root = tmp_path_factory.mktemp("search")
  params = jax.tree.map(np.asarray, clip_lib.init_params(TINY, jax.random.PRNGKey(0)))
  ckpt = save_checkpoint(root / "clip", params)
  # Another model: the same weights, one tensor changed a little.
  other = jax.tree.map(np.copy, params)
  other["visual"]["proj"] += np.float32(0.01)
  save_checkpoint(root / "other_clip", other)
  videos = root / "videos"
  write_videos(videos)
  index = root / "index"
  cmd = [sys.executable, "-m", "centerclip_jax.search", "index", "--config",
         os.path.join(REPO, "configs", "msrvtt.py"), f"--config.init_from={ckpt}",
         *MODEL_FLAGS, "--videos", str(videos), "--index", str(index), "--batch_size", "2",
         "--save_every", "1"]
  # Two simulated CPU devices: batches of 2 are sharded 1 + 1 (checked against `encode`).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root, ckpt, videos, index, proc.stdout


@pytest.fixture(scope="module")
def reference(built):
  """Embeddings of the same files and captions from `encode.encode` (the encode CLI's path)."""
  _, ckpt, videos, _, _ = built
  out = encode.encode(tiny_config(ckpt), [str(videos / p) for p in OK_FILES], CAPTIONS,
                      batch_size=2)
  return (dict(zip(OK_FILES, out["video_embeddings"])),
          dict(zip(CAPTIONS, out["text_embeddings"])))


def rows_by_path(index):
  manifest, emb = index_lib.load_index(index, verify=True)
  return {e["path"]: emb[e["row"]] for e in manifest["entries"] if e["status"] == "ok"}


def test_index_cli_embeds_folder_and_reports_broken_file(built, reference):
  _, ckpt, videos, index, stdout = built
  assert "3 videos; embedded 3" in stdout and "failed 1" in stdout and BROKEN in stdout
  assert "on 2 device(s)" in stdout
  manifest, emb = index_lib.load_index(index, verify=True)
  assert manifest["complete"] and manifest["videos_root"] == str(videos.resolve())
  entries = {e["path"]: e for e in manifest["entries"]}
  assert sorted(entries) == sorted(OK_FILES + [BROKEN])  # recursive; notes.txt skipped
  assert entries[BROKEN]["status"] == "error" and BROKEN in entries[BROKEN]["error"]
  stat = (videos / "sub" / "b.avi").stat()
  assert entries["sub/b.avi"]["size"] == stat.st_size
  assert entries["sub/b.avi"]["mtime_ns"] == stat.st_mtime_ns
  assert emb.shape == (3, 32) and emb.dtype == np.float32
  assert sorted(e["row"] for e in entries.values() if e["status"] == "ok") == [0, 1, 2]
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  # The index holds what `encode` computes for each file (batched on a mesh here).
  videos_ref, _ = reference
  for path, row in rows_by_path(index).items():
    np.testing.assert_allclose(row, videos_ref[path], atol=2e-5, err_msg=path)
  config = json.loads((index / index_lib.CONFIG_FILE).read_text())
  assert config["init_from"] == str(ckpt.resolve())
  assert list(config["model"]["cluster_num_blocks"]) == [16, 8]


def test_update_embeds_only_new_and_changed_files(built, tmp_path):
  _, ckpt, videos, index, _ = built
  videos2, index2 = copy_tree(videos, tmp_path / "v"), copy_tree(index, tmp_path / "i")
  before = rows_by_path(index2)
  video_fixtures.write_video(videos2 / "new" / "e.mov", num_frames=9, fps=10, seed=5,
                             pattern="moving")
  b_stat = (videos2 / "sub" / "b.avi").stat()
  video_fixtures.write_video(videos2 / "sub" / "b.avi", num_frames=12, fps=10, seed=7,
                             pattern="moving")
  os.utime(videos2 / "sub" / "b.avi", ns=(b_stat.st_atime_ns, b_stat.st_mtime_ns + 10**9))
  (videos2 / "d.npy").unlink()
  config = tiny_config(ckpt)
  s = search.build_index(config, videos2, index2, batch_size=2, progress=False)
  assert s.embedded == ["new/e.mov", "sub/b.avi"]
  assert s.reused == ["a.mp4"] and s.removed == ["d.npy"] and s.old_errors == [BROKEN]
  assert s.errors == {} and s.num_videos == 3
  after = rows_by_path(index2)
  assert sorted(after) == ["a.mp4", "new/e.mov", "sub/b.avi"]
  np.testing.assert_array_equal(after["a.mp4"], before["a.mp4"])  # row kept, not recomputed
  assert np.abs(after["sub/b.avi"] - before["sub/b.avi"]).max() > 1e-3
  # Nothing changed: nothing embedded, index untouched.
  mtime = (index2 / index_lib.EMBEDDINGS_FILE).stat().st_mtime_ns
  s = search.build_index(config, videos2, index2, progress=False)
  assert s.embedded == [] and s.removed == [] and len(s.reused) == 3
  assert (index2 / index_lib.EMBEDDINGS_FILE).stat().st_mtime_ns == mtime


class _Stop(BaseException):
  """A hard interruption (like Ctrl-C), not a per-file error."""


def test_interrupted_run_resumes(built, monkeypatch, tmp_path):
  _, ckpt, videos, index, _ = built
  real_load = encode.load_frames

  def load_or_stop(path, **kw):
    if path.endswith("b.avi"):
      raise _Stop()
    return real_load(path, **kw)

  monkeypatch.setattr(encode, "load_frames", load_or_stop)
  out = tmp_path / "index"
  config = tiny_config(ckpt)
  with pytest.raises(_Stop):
    search.build_index(config, videos, out, batch_size=1, save_every=1, workers=1,
                       progress=False)
  manifest = index_lib.read_manifest(out)
  assert not manifest["complete"]
  assert sorted(e["path"] for e in manifest["entries"]) == ["a.mp4", BROKEN, "d.npy"]
  with pytest.raises(search.SearchIndexError, match="interrupted"):
    search.Searcher.open(out)
  monkeypatch.setattr(encode, "load_frames", real_load)
  s = search.build_index(config, videos, out, batch_size=1, workers=1, progress=False)
  assert s.embedded == ["sub/b.avi"] and s.reused == ["a.mp4", "d.npy"]
  assert s.old_errors == [BROKEN]
  resumed, full = rows_by_path(out), rows_by_path(index)
  assert sorted(resumed) == sorted(full)
  for path in full:
    np.testing.assert_allclose(resumed[path], full[path], atol=2e-5, err_msg=path)


def test_other_model_is_refused_or_rebuilt(built, tmp_path):
  root, ckpt, videos, index, _ = built
  other_cfg = tiny_config(ckpt)
  other_cfg.model.cluster_num_blocks = (16, 4)
  with pytest.raises(search.SearchIndexError,
                     match=r"another model: config.model differs.*--rebuild"):
    search.build_index(other_cfg, videos, index, progress=False)
  other_ckpt = root / "other_clip"
  with pytest.raises(search.SearchIndexError, match="checkpoint differs"):
    search.build_index(tiny_config(other_ckpt), videos, index, progress=False)
  # A copy of the same checkpoint elsewhere is the same model.
  moved = copy_tree(ckpt, tmp_path / "moved_clip")
  assert search.model_fingerprint(tiny_config(moved), 3.0)[0] == \
      index_lib.read_manifest(index)["fingerprint"]
  index2 = copy_tree(index, tmp_path / "i")
  s = search.build_index(tiny_config(other_ckpt), videos, index2, batch_size=4, rebuild=True,
                         progress=False)
  assert s.embedded == OK_FILES and list(s.errors) == [BROKEN] and s.reused == []
  assert (index_lib.read_manifest(index2)["fingerprint"]
          == search.model_fingerprint(tiny_config(other_ckpt), 3.0)[0])
  # Querying with another checkpoint than the index's is refused too.
  with pytest.raises(search.SearchIndexError, match="model has changed"):
    search.Searcher.open(index, init_from=str(other_ckpt))


def test_bad_index_arguments(built, tmp_path):
  _, ckpt, videos, _, _ = built
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "x.txt").write_text("x")
  with pytest.raises(search.SearchIndexError, match="not a search index"):
    search.build_index(tiny_config(ckpt), videos, tmp_path / "busy", progress=False)
  with pytest.raises(ValueError, match="not a directory"):
    search.build_index(tiny_config(ckpt), tmp_path / "nope", tmp_path / "i", progress=False)
  with pytest.raises(search.SearchIndexError, match="no manifest.json"):
    search.Searcher.open(tmp_path / "busy")


@pytest.fixture(scope="module")
def planted(built, reference, tmp_path_factory):
  """A copy of the index where sub/b.avi's row is replaced by CAPTIONS[0]'s text embedding."""
  _, _, _, index, _ = built
  dst = copy_tree(index, tmp_path_factory.mktemp("planted") / "index")
  manifest, emb = index_lib.load_index(dst)
  row = next(e["row"] for e in manifest["entries"] if e["path"] == "sub/b.avi")
  emb = emb.copy()
  emb[row] = reference[1][CAPTIONS[0]]
  np.save(dst / index_lib.EMBEDDINGS_FILE, emb)
  return dst, emb


def test_query_finds_planted_video(built, reference, planted):
  index, emb = planted
  searcher = search.Searcher.open(index)
  results = searcher.search(CAPTIONS, top_k=2)
  assert [r.query for r in results] == CAPTIONS
  hits = results[0].hits
  assert hits[0].path == "sub/b.avi" and hits[0].rank == 1
  assert abs(hits[0].score - 1.0) < 1e-5 and hits[1].score < 0.99
  # Scores are the cosine similarities with the caption's embedding, best first.
  paths = searcher.paths
  for query, res in zip(CAPTIONS, results):
    expect = emb @ reference[1][query]
    order = np.argsort(-expect)[:2]
    assert [h.path for h in res.hits] == [paths[i] for i in order]
    np.testing.assert_allclose([h.score for h in res.hits], expect[order], atol=2e-5)
  assert len(searcher.search(CAPTIONS[:1], top_k=10)[0].hits) == 3  # k > V: every video
  # DSL: score * softmax over the queries of 100 * score, per video.
  dsl = searcher.search(CAPTIONS, top_k=3, dsl=True)
  sims = np.stack([emb @ reference[1][q] for q in CAPTIONS]).astype(np.float64)
  soft = np.exp(100 * sims) / np.exp(100 * sims).sum(axis=0, keepdims=True)
  for q, res in enumerate(dsl):
    for h in res.hits:
      assert h.score == pytest.approx(sims[q, paths.index(h.path)] * soft[q, paths.index(h.path)],
                                      abs=1e-4)
  table = search.format_table(results)
  lines = table.splitlines()
  assert lines[0] == f"query: {CAPTIONS[0]}" and lines[1].split() == ["rank", "score", "video"]
  assert lines[2].split() == ["1", "1.0000", "sub/b.avi"]
  assert "DSL-rescored" in search.format_table(dsl, dsl=True).splitlines()[0]


def test_query_cli_json(planted):
  index, _ = planted
  cmd = [sys.executable, "-m", "centerclip_jax.search", "query", "--index", str(index),
         "--top_k", "2", "--json", *CAPTIONS]
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert out["dsl"] is False and [r["query"] for r in out["results"]] == CAPTIONS
  top = out["results"][0]["hits"][0]
  assert top["path"] == "sub/b.avi" and top["rank"] == 1 and abs(top["score"] - 1) < 1e-5
  assert len(out["results"][1]["hits"]) == 2


def test_top_k_indices():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 20, size=500).astype(np.float32)  # many ties
  for k in (1, 7, 500, 600):
    got = search.top_k_indices(scores, k)
    want = np.lexsort((np.arange(500), -scores))[:k]  # best first, ties by index
    np.testing.assert_array_equal(got, want)
  assert search.top_k_indices(scores, 0).shape == (0,)


def test_benchmark_query_runs():
  dims = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
              vision_patch_size=16, context_length=77, vocab_size=49408,
              transformer_width=64, transformer_heads=1, transformer_layers=1)
  out = search.benchmark_query(num_videos=1000, clip_dims=dims, repeats=3)
  assert out["num_videos"] == 1000 and out["embed_dim"] == 32 and out["repeats"] == 3
  assert 0 < out["min_ms"] <= out["median_ms"] <= out["p90_ms"]
