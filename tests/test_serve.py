"""`search serve`: the HTTP API over a small planted index (Starlette's test client)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil

import httpx
import jax
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from centerclip_jax import search
from centerclip_jax.inference import encoder as encode
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.search import serve as serve_lib
from centerclip_jax.search import store
from centerclip_jax.search import web
from tests import test_search as ts
from tests import video_fixtures

PLANTED = "sub/b.avi"


def plant(index, videos, ckpt, caption=ts.CAPTIONS[0], path=PLANTED):
  """Replaces `path`'s row by `caption`'s text embedding (from `encode.encode`)."""
  text = encode.encode(ts.tiny_config(ckpt), [], [caption])["text_embeddings"][0]
  manifest, emb = store.load_index(index)
  row = next(e["row"] for e in manifest["entries"] if e["path"] == path)
  emb = emb.copy()
  emb[row] = text
  store.save(index, emb, {e["path"]: e for e in manifest["entries"]},
             {k: v for k, v in manifest.items() if k not in ("entries",)}, complete=True)
  return emb


@pytest.fixture(scope="module")
def planted_index(tmp_path_factory):
  """(root, ckpt, videos, index): ts.write_videos indexed in-process, PLANTED planted."""
  root = tmp_path_factory.mktemp("serve")
  params = jax.tree.map(np.asarray, clip_lib.init_params(ts.TINY, jax.random.PRNGKey(0)))
  ckpt = ts.save_checkpoint(root / "clip", params)
  videos = root / "videos"
  ts.write_videos(videos)
  index = root / "index"
  search.build_index(ts.tiny_config(ckpt), videos, index, batch_size=2, workers=1,
                     progress=False)
  plant(index, videos, ckpt)
  return root, ckpt, videos, index


@pytest.fixture(scope="module")
def service(planted_index):
  svc = serve_lib.Service(planted_index[3], max_batch=8, window_s=0.05)
  info = svc.load()
  assert info["videos"] == 3 and info["shapes"] == 4 * 4  # batches 1..8 x lengths 8..32
  return svc


@pytest.fixture()
def client(service):
  with TestClient(web.create_app(service)) as c:
    yield c


def test_search_get_finds_planted_video_with_thumb_and_media(client, planted_index):
  _, _, videos, _ = planted_index
  r = client.get("/search", params={"q": ts.CAPTIONS[0]})
  assert r.status_code == 200
  body = r.json()
  assert body["query"] == ts.CAPTIONS[0] and body["k"] == 10 and body["truncated"] is False
  hits = body["results"]
  assert [h["rank"] for h in hits] == [1, 2, 3]  # k=10 > 3 videos: every video
  assert hits[0]["path"] == PLANTED and abs(hits[0]["score"] - 1.0) < 1e-5
  assert hits[1]["score"] < 0.99 and hits[1]["score"] >= hits[2]["score"]
  assert body["method"] == "brute force (exact)"
  # The thumbnail is a frame of the video at the model's decoding size.
  t = client.get(hits[0]["thumb"])
  assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
  clip = encode.load_frames(str(videos / PLANTED), fps=3.0, short_side=32, max_frames=4)
  assert Image.open(io.BytesIO(t.content)).size == clip.frames.shape[2:0:-1]
  m = client.get(hits[0]["media"])
  assert m.status_code == 200 and m.content == (videos / PLANTED).read_bytes()
  part = client.get(hits[0]["media"], headers={"Range": "bytes=0-9"})
  assert part.status_code == 206 and part.content == (videos / PLANTED).read_bytes()[:10]
  npy = next(h for h in hits if h["path"] == "d.npy")
  assert npy["media"] is None and npy["thumb"]  # frames files: thumbnail, nothing to play
  assert client.get("/search", params={"q": ts.CAPTIONS[0], "k": 1}).json()["results"] == \
      hits[:1]


def test_search_post_batch_matches_single_queries(client):
  r = client.post("/search", json={"queries": ts.CAPTIONS, "k": 2})
  assert r.status_code == 200
  body = r.json()
  assert body["k"] == 2 and [x["query"] for x in body["results"]] == ts.CAPTIONS
  for res in body["results"]:
    single = client.get("/search", params={"q": res["query"], "k": 2}).json()["results"]
    assert [h["path"] for h in res["results"]] == [h["path"] for h in single]
    np.testing.assert_allclose([h["score"] for h in res["results"]],
                               [h["score"] for h in single], atol=1e-5)


@pytest.mark.parametrize("params,match", [
    ({}, "non-empty text query"), ({"q": "   "}, "non-empty text query"),
    ({"q": "dog", "k": "ten"}, "k must be an integer"), ({"q": "dog", "k": "0"}, "from 1 to 100"),
    ({"q": "dog", "k": "101"}, "from 1 to 100"), ({"q": "dog", "k": "2.5"}, "integer"),
])
def test_bad_get_is_a_json_400(client, params, match):
  r = client.get("/search", params=params)
  assert r.status_code == 400 and match in r.json()["error"]


@pytest.mark.parametrize("body,match", [
    (b"not json", "not JSON"), (b"[1, 2]", '"queries"'), (b'{"queries": "dog"}', '"queries"'),
    (b'{"queries": []}', "1 to 8 texts"), (b'{"queries": ["dog", 3]}', "queries[1]"),
    (b'{"queries": ["dog"], "k": true}', "k must be"), (b'\xff\xfe', "not JSON"),
    (b'{"queries": ["dog"], "k": 1000}', "from 1 to 100"),
])
def test_bad_post_is_a_json_400(client, body, match):
  r = client.post("/search", content=body, headers={"content-type": "application/json"})
  assert r.status_code == 400 and match in r.json()["error"], r.text


def test_errors_are_json_never_a_trace(client, service, monkeypatch):
  assert client.get("/nope").json() == {"error": "Not Found"}
  r = client.get("/reload")
  assert r.status_code == 405 and "error" in r.json()
  big = client.post("/search", content=b"x" * (serve_lib.MAX_BODY_BYTES + 1))
  assert big.status_code == 413
  long_q = " ".join(["cooking"] * 100)
  r = client.get("/search", params={"q": long_q})
  assert r.status_code == 200 and r.json()["truncated"] is True
  assert "32-token context" in r.json()["note"]
  assert client.get("/search", params={"q": "x" * 5000}).json()["truncated"] is True

  def broken(*a, **kw):
    raise RuntimeError("secret internals")

  monkeypatch.setattr(service.state.searcher, "search", broken)
  with TestClient(web.create_app(service), raise_server_exceptions=False) as c:
    r = c.get("/search", params={"q": "dog"})
  assert r.status_code == 500 and r.json() == {"error": "internal error (see the server log)"}
  assert "secret" not in r.text and "Traceback" not in r.text


def test_media_serves_only_index_files_inside_the_folder(client, planted_index, tmp_path):
  _, _, videos, index = planted_index
  secret = tmp_path / "outside.mp4"
  secret.write_bytes(b"TOP-SECRET-BYTES")
  for url in ["/media/..%2F..%2Fetc%2Fpasswd", "/media/%2e%2e/index/manifest.json",
              "/media/../index/manifest.json", "/media//etc/passwd", "/media/notes.txt",
              f"/media/{ts.BROKEN}", "/media/sub", f"/media/{secret}",
              "/thumbs/..%2Fmanifest.json", "/thumbs/manifest.json",
              "/static/..%2F..%2F__init__.py"]:
    r = client.get(url)
    assert r.status_code == 404, url
    assert b"TOP-SECRET" not in r.content and b"entries" not in r.content, url
  # A video of the index replaced by a symlink to outside the folder: not served.
  a = videos / "a.mp4"
  saved = tmp_path / "a.mp4"
  shutil.move(a, saved)
  try:
    os.symlink(secret, a)
    assert client.get("/media/a.mp4").status_code == 404
  finally:
    a.unlink()
    shutil.move(saved, a)
  assert client.get("/media/a.mp4").status_code == 200


def test_page_healthz_stats(client, service):
  page = client.get("/")
  assert page.status_code == 200 and 'id="q"' in page.text and "/static/app.js" in page.text
  assert client.get("/static/app.js").status_code == 200
  assert client.get("/healthz").json()["status"] == "ready"
  client.get("/search", params={"q": "dog"})
  s = client.get("/stats").json()
  assert s["videos"] == 3 and s["errors"] == 1 and len(s["fingerprint"]) == 24
  assert s["requests"] >= 1 and s["latency_ms"]["count"] >= 1
  assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]


def test_concurrent_requests_share_text_tower_calls(service):
  app = web.create_app(service)

  async def burst():
    await service.start()  # what the lifespan does
    try:
      before = service.counts["batches"]
      transport = httpx.ASGITransport(app=app)
      async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        rs = await asyncio.gather(*[c.get("/search", params={"q": f"dog {i}", "k": 1})
                                    for i in range(16)])
      return rs, service.counts["batches"] - before
    finally:
      await service.stop()

  rs, batches = asyncio.run(burst())
  assert all(r.status_code == 200 for r in rs)
  assert [r.json()["query"] for r in rs] == [f"dog {i}" for i in range(16)]
  assert 2 <= batches <= 4, batches  # 16 queries, at most 8 per call, a 50 ms window


def test_reload_swaps_atomically_and_refuses_while_written(planted_index, tmp_path):
  root, ckpt, videos, index = planted_index
  videos2 = ts.copy_tree(videos, tmp_path / "v")
  index2 = ts.copy_tree(index, tmp_path / "i")
  svc = serve_lib.Service(index2, max_batch=2)
  svc.load()
  with TestClient(web.create_app(svc)) as c:
    assert c.get("/stats").json()["videos"] == 3
    video_fixtures.write_video(videos2 / "new.mp4", num_frames=9, fps=10, seed=9,
                               pattern="moving")
    with store.IndexLock(index2):  # a `search index` run in progress
      r = c.post("/reload")
      assert r.status_code == 409 and f"pid {os.getpid()}" in r.json()["error"]
      assert c.get("/search", params={"q": "dog"}).status_code == 200
    search.build_index(ts.tiny_config(ckpt), videos2, index2, workers=1, progress=False)
    assert c.get("/stats").json()["videos"] == 3  # not until told
    r = c.post("/reload")
    assert r.status_code == 200 and r.json()["videos"] == 4 and r.json()["previous_videos"] == 3
    hits = c.get("/search", params={"q": "dog", "k": 10}).json()["results"]
    assert "new.mp4" in {h["path"] for h in hits}
    (index2 / store.MANIFEST_FILE).write_text('{"format": 1, "entr')  # damaged
    r = c.post("/reload")
    assert r.status_code == 409 and "truncated or not JSON" in r.json()["error"]
    assert "still serving" in r.json()["error"]
    assert c.get("/stats").json()["videos"] == 4


@pytest.mark.slow
def test_load_test_tool_short_run(tmp_path):
  """tools/load_test.py --demo, shortened: no errors, and the rebuilt index is switched in."""
  import json
  import subprocess
  import sys
  out = tmp_path / "load.json"
  proc = subprocess.run([sys.executable, os.path.join(ts.REPO, "tools", "load_test.py"),
                         "--demo", "--clients", "8", "--seconds", "3", "--json", str(out)],
                        cwd=ts.REPO, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  steady, rebuild = json.loads(out.read_text())
  for phase in (steady, rebuild):
    assert phase["errors"] == 0, phase["first_errors"]
    assert phase["requests"] > 8 and phase["p50_ms"] <= phase["p99_ms"]
  assert rebuild["rebuild_rc"] == 0 and rebuild["reload_status"] == 200
  assert rebuild["videos_before_reload"] == 64 and rebuild["videos_after_reload"] == 72
