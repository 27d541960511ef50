"""User paths in a bucket, part 4: search and encode with the GCS emulator's bucket
(tests/gcs_runs.py). A tiny CLIP converted into the bucket; `search index` of a local folder
into the bucket and `encode --output gs://...` side by side, then `search query` from the
index in the bucket; `search serve` from it through a local read-only copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from centerclip_jax import paths
from tests import gcs_runs

SEARCH_FLAGS = ["--config.data.decode_short_side=32", "--config.model.max_frames=4",
                "--config.model.target_frames_blocks=(4,2)",
                "--config.model.cluster_num_blocks=(16,8)"]
CAPTIONS = ["a man is cooking", "two dogs play in the snow"]
VIDEOS = ["a.mp4", "sub/b.avi"]


def _start(module, *args, tmpdir, **pipes):
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=gcs_runs.REPO,
                          env=gcs_runs.env(TMPDIR=str(tmpdir)), text=True, **pipes)


def _finish(proc, timeout=900):
  """A started process run to the end, as subprocess.run returns it."""
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def search_runs(gcs, tmp_path_factory):
  """A tiny CLIP converted into the bucket; `search index` of a local folder into the
  bucket, `search query` from it, `encode --output gs://` of the same files."""
  import jax
  from centerclip_jax.models import clip as clip_lib
  from centerclip_jax.weights import porting
  from tests import video_fixtures as vf
  root = tmp_path_factory.mktemp("gcs_search")
  scratch = root / "tmp"
  scratch.mkdir()
  clip = gcs.url("search/clip")
  tiny = clip_lib.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2,
                            vision_width=64, vision_patch_size=8, context_length=77,
                            vocab_size=49408, transformer_width=64, transformer_heads=1,
                            transformer_layers=1)  # as tests/test_search.py
  params = jax.tree.map(np.asarray, clip_lib.init_params(tiny, jax.random.PRNGKey(0)))
  porting.save_converted(clip, tiny, params, {}, {"source": "test"})
  videos = root / "videos"
  vf.write_video(videos / "a.mp4", num_frames=30, fps=10, seed=1, pattern="moving")
  vf.write_video(videos / "sub" / "b.avi", num_frames=12, fps=10, seed=2, pattern="moving")
  model = ["--config", os.path.join(gcs_runs.REPO, "configs", "msrvtt.py"),
           f"--config.init_from={clip}", *SEARCH_FLAGS]
  index, out = gcs.url("search/index"), gcs.url("search/emb")
  (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
  # `search index` and `encode` side by side (neither reads what the other writes).
  pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  building = _start("centerclip_jax.search", "index", *model, "--videos", str(videos),
                    "--index", index, "--batch_size", "2", "--workers", "1",
                    tmpdir=scratch, **pipes)
  encoding = _start("centerclip_jax.encode", *model, "--videos",
                    *[str(videos / v) for v in VIDEOS], "--captions", str(root / "captions.txt"),
                    "--batch_size", "2", "--output", out, tmpdir=scratch, **pipes)
  built, encoded = (_finish(p) for p in (building, encoding))
  assert built.returncode == 0, built.stderr[-3000:]
  assert encoded.returncode == 0, encoded.stderr[-3000:]
  query = gcs_runs.cli("centerclip_jax.search", "query", "--index", index, "--json",
                       "--top_k", "2", *CAPTIONS, tmpdir=scratch)
  assert query.returncode == 0, query.stderr[-3000:]
  return dict(index=index, built=built, query=json.loads(query.stdout), emb=out + ".npz",
              encoded=encoded, scratch=scratch, videos=videos)


def _emb(search_runs):
  with paths.local_copy(search_runs["emb"]) as local:
    return dict(np.load(os.fspath(local)))


def test_encode_output_in_the_bucket(search_runs):
  emb = _emb(search_runs)
  assert emb["video_embeddings"].shape == (2, 32) and emb["text_embeddings"].shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(emb["video_embeddings"], axis=1), 1, atol=1e-5)
  assert list(emb["captions"]) == CAPTIONS
  assert search_runs["emb"] in search_runs["encoded"].stdout
  assert not os.path.exists(os.path.join(gcs_runs.REPO, "gs:"))


def test_search_index_in_the_bucket_and_query_from_it(search_runs):
  from centerclip_jax.search import index as index_lib
  assert "2 videos; embedded 2" in search_runs["built"].stdout
  emb = _emb(search_runs)
  with paths.staged_tree(search_runs["index"], upload=False) as local:
    manifest, rows = index_lib.load_index(local, verify=True)
  assert manifest["complete"]
  by_path = {e["path"]: rows[e["row"]] for e in manifest["entries"] if e["status"] == "ok"}
  assert sorted(by_path) == sorted(VIDEOS)
  for i, path in enumerate(VIDEOS):  # the index holds what encode computes
    np.testing.assert_allclose(by_path[path], emb["video_embeddings"][i], atol=2e-5)
  scores = emb["text_embeddings"] @ emb["video_embeddings"].T  # cosine similarity
  for q, result in enumerate(search_runs["query"]["results"]):
    assert result["query"] == CAPTIONS[q]
    hits = result["hits"]
    assert [h["path"] for h in hits] == [VIDEOS[j] for j in np.argsort(-scores[q])]
    for h in hits:
      assert h["score"] == pytest.approx(scores[q][VIDEOS.index(h["path"])], abs=1e-4)
  # The local stages are gone (only the log folder stays in $TMPDIR).
  assert [p.name for p in search_runs["scratch"].iterdir()] in ([], ["centerclip_jax-logs"])


def test_search_serve_stages_a_local_copy(search_runs):
  from centerclip_jax.search import serve
  service = serve.Service(search_runs["index"], max_batch=1)
  local = service.index_dir
  assert not paths.is_uri(local) and (local / "manifest.json").exists()
  info = service.load()
  assert info["videos"] == 2 and service.stats()["index"] == search_runs["index"]
  assert service.reload()["reloaded"] and service.index_dir != local
  assert not local.exists()  # the previous copy is removed
