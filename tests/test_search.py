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
from PIL import Image

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
MODEL_FLAGS = ["--config.data.decode_short_side=32", "--config.model.max_frames=4",
               "--config.model.target_frames_blocks=(4,2)",
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
  c.data.decode_short_side = 32  # the short side d.npy's frames are decoded at
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
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
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
  index_lib.store.save(dst, emb, {e["path"]: e for e in manifest["entries"]},
                       {k: v for k, v in manifest.items() if k != "entries"}, complete=True)
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


# ----------------------------------------------------------------------------- faults


def _damaged_copy(index, tmp_path, name="i"):
  return copy_tree(index, tmp_path / name)


def test_truncated_or_mismatched_index_is_refused_with_the_fix(built, tmp_path):
  _, _, _, index, _ = built
  fix = "--rebuild"
  # A truncated manifest.
  bad = _damaged_copy(index, tmp_path, "manifest")
  text = (bad / index_lib.MANIFEST_FILE).read_text()
  (bad / index_lib.MANIFEST_FILE).write_text(text[:len(text) // 2])
  with pytest.raises(search.SearchIndexError, match=rf"manifest.json: truncated.*{fix}"):
    search.Searcher.open(bad)
  # A truncated embeddings file.
  bad = _damaged_copy(index, tmp_path, "emb")
  data = (bad / index_lib.EMBEDDINGS_FILE).read_bytes()
  (bad / index_lib.EMBEDDINGS_FILE).write_bytes(data[:len(data) - 40])
  with pytest.raises(search.SearchIndexError, match=rf"embeddings.npy: truncated.*{fix}"):
    index_lib.load_index(bad)
  # Rows that do not match the manifest: one row fewer; two entries on one row; the
  # content changed under the same shape.
  manifest, emb = index_lib.load_index(index)
  bad = _damaged_copy(index, tmp_path, "rows")
  np.save(bad / index_lib.EMBEDDINGS_FILE, emb[:-1])
  with pytest.raises(search.SearchIndexError, match=rf"\(2, 32\) does not match.*3 rows.*{fix}"):
    index_lib.load_index(bad)
  bad = _damaged_copy(index, tmp_path, "dup")
  m = json.loads((bad / index_lib.MANIFEST_FILE).read_text())
  oks = [e for e in m["entries"] if e["status"] == "ok"]
  oks[1]["row"] = oks[0]["row"]
  (bad / index_lib.MANIFEST_FILE).write_text(json.dumps(m))
  with pytest.raises(search.SearchIndexError, match=rf"do not number its 3 rows.*{fix}"):
    index_lib.load_index(bad)
  bad = _damaged_copy(index, tmp_path, "content")
  np.save(bad / index_lib.EMBEDDINGS_FILE, emb[::-1].copy())
  with pytest.raises(search.SearchIndexError, match=rf"content does not match.*{fix}"):
    index_lib.load_index(bad)
  # A non-finite row (written behind the manifest's back, sha256 updated to match).
  bad = _damaged_copy(index, tmp_path, "nan")
  nan = emb.copy()
  nan[m["entries"][0]["row"] if m["entries"][0]["status"] == "ok" else 0] = np.nan
  np.save(bad / index_lib.EMBEDDINGS_FILE, nan)
  m = json.loads((bad / index_lib.MANIFEST_FILE).read_text())
  m["embeddings_sha256"] = index_lib.store.array_sha256(nan)
  (bad / index_lib.MANIFEST_FILE).write_text(json.dumps(m))
  with pytest.raises(search.SearchIndexError, match=rf"1 non-finite rows.*a.mp4.*{fix}"):
    index_lib.load_index(bad)


def test_query_cli_damaged_index_is_one_line(built, tmp_path):
  _, _, _, index, _ = built
  bad = _damaged_copy(index, tmp_path)
  (bad / index_lib.MANIFEST_FILE).write_text('{"format": 1, "entries": [')
  proc = subprocess.run([sys.executable, "-m", "centerclip_jax.search", "query", "--index",
                         str(bad), "a dog"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "truncated or not JSON" in errors[0] and "--rebuild" in errors[0]
  assert "Traceback" not in proc.stderr


def test_non_finite_embedding_is_an_error_entry(built, monkeypatch, tmp_path):
  _, ckpt, videos, _, _ = built
  real = index_lib.parallel.jit_encoders

  def nan_for_first_row(model, mesh=None):
    video_fn, text_fn = real(model, mesh)
    def video(params, frames, mask):
      out = np.asarray(video_fn(params, frames, mask)).copy()
      if frames.shape[0] and float(np.asarray(frames)[0, 0, 0, 0, 0]) == first[0]:
        out[0] = np.nan
      return out
    return video, text_fn

  # The first video in path order (a.mp4) gets a NaN embedding.
  first = encode.file_inputs(str(videos / "a.mp4"), fps=3.0, short_side=32, max_frames=4,
                             resolution=32)[0][0, 0, 0]
  monkeypatch.setattr(index_lib.parallel, "jit_encoders", nan_for_first_row)
  out = tmp_path / "index"
  s = search.build_index(tiny_config(ckpt), videos, out, batch_size=1, workers=1,
                         progress=False)
  # d.npy holds a.mp4's frames, so it gets the NaN too.
  assert sorted(s.errors) == sorted([BROKEN, "a.mp4", "d.npy"])
  assert "not finite" in s.errors["a.mp4"]
  assert str(videos.resolve() / "a.mp4") in s.errors["a.mp4"]
  manifest, emb = index_lib.load_index(out)
  entry = {e["path"]: e for e in manifest["entries"]}["a.mp4"]
  assert entry["status"] == "error" and "row" not in entry
  assert emb.shape[0] == 1 and np.isfinite(emb).all()


def test_lock_refuses_a_second_writer_and_takes_over_a_stale_lock(built, tmp_path, caplog):
  _, ckpt, videos, index, _ = built
  index2 = copy_tree(index, tmp_path / "i")
  before = (index2 / index_lib.EMBEDDINGS_FILE).read_bytes()
  with index_lib.store.IndexLock(index2):
    assert index_lib.store.is_locked(index2)["pid"] == os.getpid()
    with pytest.raises(search.SearchIndexError,
                       match=rf"being written by another .*pid {os.getpid()} on "):
      search.build_index(tiny_config(ckpt), videos, index2, rebuild=True, progress=False)
  assert (index2 / index_lib.EMBEDDINGS_FILE).read_bytes() == before  # untouched
  assert index_lib.store.is_locked(index2) is None
  # A lock file left by a run that was killed (nobody holds its flock): taken over.
  (index2 / index_lib.store.LOCK_FILE).write_text(json.dumps(
      {"pid": 2 ** 22 + 7, "host": "gone", "started": 0}))
  with caplog.at_level("WARNING"):
    s = search.build_index(tiny_config(ckpt), videos, index2, progress=False)
  assert len(s.reused) == 3 and "stale lock of pid 4194311" in caplog.text


def test_symlinks_outside_the_folder_are_not_followed(tmp_path):
  root, outside = tmp_path / "videos", tmp_path / "outside"
  (root / "sub").mkdir(parents=True)
  (outside / "dir").mkdir(parents=True)
  for p in (root / "a.npy", root / "sub" / "b.npy", outside / "x.npy", outside / "dir" / "y.npy"):
    np.save(p, np.zeros((1, 2, 2, 3), np.uint8))
  os.symlink(outside / "x.npy", root / "out.npy")
  os.symlink(outside / "dir", root / "outdir")
  os.symlink(root / "sub" / "b.npy", root / "in.npy")
  os.symlink(root / "sub", root / "loop")  # inside, and a second way to the same folder
  skipped = []
  found = [f.path for f in search.scan_videos(root, skipped_links=skipped)]
  assert found == ["a.npy", "in.npy", "sub/b.npy"]
  assert sorted(skipped) == ["out.npy", "outdir"]
  found = [f.path for f in search.scan_videos(root, follow_symlinks=True)]
  assert found == ["a.npy", "in.npy", "out.npy", "outdir/y.npy", "sub/b.npy"]


def test_thumbnails_and_frame_counts_in_the_manifest(built):
  _, _, videos, index, _ = built
  manifest, _ = index_lib.load_index(index)
  for e in manifest["entries"]:
    if e["status"] != "ok":
      assert "thumb" not in e
      continue
    thumb = Image.open(index / e["thumb"])
    clip = encode.load_frames(str(videos / e["path"]), fps=3.0, short_side=32, max_frames=4)
    frames = clip.frames  # the frames the model was fed (before resize and crop)
    assert thumb.size == (frames.shape[2], frames.shape[1]), e["path"]
    # The middle one, JPEG-compressed.
    mid = frames[len(frames) // 2].astype(np.float32)
    assert np.abs(np.asarray(thumb, np.float32) - mid).mean() < 12, e["path"]
    assert e["num_frames"] == clip.num_frames and e["frames_used"] == len(clip.indices) == min(
        4, clip.num_frames)
    assert e["truncated"] is False


def test_ann_index_is_used_and_kept_current(built, tmp_path):
  _, ckpt, videos, index, _ = built
  index2 = copy_tree(index, tmp_path / "i")
  s = search.build_index(tiny_config(ckpt), videos, index2, ann=True, progress=False)
  assert s.embedded == [] and s.ann.startswith("faiss IVF1,Flat")
  brute = search.Searcher.open(index)
  ann = search.Searcher.open(index2)
  assert ann.method.startswith("ann: faiss") and brute.method == "brute force (exact)"
  for a, b in zip(ann.search(CAPTIONS, 3), brute.search(CAPTIONS, 3)):
    # a.mp4 and d.npy have the same frames: a tie the two may order differently.
    assert sorted(h.path for h in a.hits) == sorted(h.path for h in b.hits)
    np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-5)
  # An ANN that no longer matches the embeddings is refused, and updates rebuild it.
  manifest, emb = index_lib.load_index(index2)
  meta = json.loads((index2 / "ann.json").read_text())
  meta["embeddings_sha256"] = "0" * 64
  (index2 / "ann.json").write_text(json.dumps(meta))
  with pytest.raises(search.SearchIndexError, match=r"ann.faiss was built from other"):
    search.Searcher.open(index2)
  s = search.build_index(tiny_config(ckpt), videos, index2, progress=False)
  assert s.ann and search.Searcher.open(index2).method.startswith("ann")


def test_ann_recall_on_clustered_vectors():
  from centerclip_jax.search import ann as ann_lib
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((200, 64))
  emb = centers[rng.integers(0, 200, 20_000)] + 0.5 * rng.standard_normal((20_000, 64))
  emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
  queries = centers[rng.integers(0, 200, 200)] + 0.5 * rng.standard_normal((200, 64))
  queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
  exact = np.argsort(-(queries.astype(np.float64) @ emb.T.astype(np.float64)), axis=1)[:, :10]
  index = ann_lib.AnnIndex.from_embeddings(emb)
  _, rows = index.search(queries, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
  assert recall >= 0.95, recall


def test_chunked_brute_force_equals_the_full_product():
  from centerclip_jax.search import query as query_lib
  rng = np.random.default_rng(1)
  emb = rng.integers(-3, 4, size=(1000, 16)).astype(np.float32)  # many tied scores
  text = rng.integers(-3, 4, size=(5, 16)).astype(np.float32)
  full = text.astype(np.float64) @ emb.T.astype(np.float64)
  videos = query_lib.VideoEmbeddings(emb, chunk_rows=64)  # 16 chunks, the last one partial
  assert videos.chunk_rows == 64
  padded = np.concatenate([text, np.zeros((3, 16), np.float32)])  # 8 rows, 5 live
  scores, rows = videos.top_k(padded, 5, 20)
  for q in range(5):
    np.testing.assert_array_equal(rows[q], search.top_k_indices(full[q], 20))
    np.testing.assert_allclose(scores[q], full[q][rows[q]], rtol=1e-6)
  # DSL chunk by chunk == dual softmax over the live queries of the full matrix.
  emb_n = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  text_n = text / np.linalg.norm(text, axis=1, keepdims=True)
  sims = text_n.astype(np.float64) @ emb_n.T.astype(np.float64)
  dsl = sims * np.exp(100 * sims) / np.exp(100 * sims).sum(axis=0, keepdims=True)
  scores, rows = query_lib.VideoEmbeddings(emb_n, chunk_rows=64).top_k(
      np.concatenate([text_n, np.ones((3, 16), np.float32)]), 5, 10, dsl=True)
  for q in range(5):
    np.testing.assert_allclose(scores[q], np.sort(dsl[q])[::-1][:10], atol=1e-4)
