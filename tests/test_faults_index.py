"""Fault injection for the search index writer: ENOSPC and EIO on each file an update writes
(embeddings.npy, manifest.json, config.json, a thumbnail, ann.faiss, ann.json), a rename
that fails half-way through the commit, and a real ENOSPC from the kernel (/dev/full).

Each test checks the run stops with one line naming the file, that the previous index is
byte-for-byte the one before (no temporary file left, no half-written file live), that it
loads and answers queries as before, and that re-running the update afterwards finishes it.
"""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from centerclip_jax import search
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.search import ann as ann_lib
from centerclip_jax.search import index as index_lib
from centerclip_jax.search import store
from tests import video_fixtures
from tests.test_search import CAPTIONS, MODEL_FLAGS, REPO, TINY, copy_tree, save_checkpoint
from tests.test_search import tiny_config

NEW = "new/e.mov"


def _snapshot(index: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*"))
          if p.is_file() and p.name != store.LOCK_FILE}


def _answers(index: pathlib.Path, text_encoder=None):
  searcher = search.Searcher.open(index, text_encoder=text_encoder)
  return searcher, (searcher.method, [[(h.path, round(h.score, 5)) for h in r.hits]
                                      for r in searcher.search(CAPTIONS, top_k=2)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A complete index (with ANN) of two videos; copies of the folder with a third video
  ('updated': the update embeds it) and without b.avi ('shrunk': the update only rewrites
  the index, no model runs)."""
  root = tmp_path_factory.mktemp("faults_index")
  params = jax.tree.map(np.asarray, clip_lib.init_params(TINY, jax.random.PRNGKey(0)))
  config = tiny_config(save_checkpoint(root / "clip", params))
  videos = root / "videos"
  video_fixtures.write_video(videos / "a.mp4", num_frames=12, fps=10, seed=1, pattern="moving")
  video_fixtures.write_video(videos / "sub" / "b.avi", num_frames=9, fps=10, seed=2,
                             pattern="moving")
  index = root / "index"
  s = search.build_index(config, videos, index, batch_size=2, workers=1, ann=True,
                         progress=False)
  assert s.embedded == ["a.mp4", "sub/b.avi"] and s.ann
  updated = copy_tree(videos, root / "updated")
  video_fixtures.write_video(updated / NEW, num_frames=9, fps=10, seed=5, pattern="moving")
  shrunk = copy_tree(videos, root / "shrunk")
  (shrunk / "sub" / "b.avi").unlink()
  searcher, answers = _answers(index)
  return {"config": config, "updated": updated, "shrunk": shrunk, "index": index,
          "text_encoder": searcher.text_encoder, "answers": answers,
          "files": _snapshot(index)}


class _FailingFile:
  """A file whose writes fail like a full or broken disk: half the first write lands, then
  OSError(code) without a file name, as `write(2)` reports it."""

  def __init__(self, f, code):
    self._f, self._code = f, code

  def write(self, data):
    self._f.write(data[:len(data) // 2])
    self._f.flush()
    raise OSError(self._code, os.strerror(self._code))

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def _fail_writes_of(monkeypatch, name: str, code: int) -> list:
  """Writes to the temporary file of `name` (a file name, or 'thumbs') raise `code`."""
  opened = []

  def faulty_open(path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)  # pylint: disable=unspecified-encoding
    p = pathlib.Path(path)
    hit = (p.parent.name == store.THUMBS_DIR if name == store.THUMBS_DIR
           else p.name.startswith(f".{name}.tmp-"))
    if hit and "w" in mode:
      opened.append(p)
      return _FailingFile(f, code)
    return f

  monkeypatch.setattr(store, "open", faulty_open, raising=False)
  return opened


def _check_intact(base, index, error_text, failed_path):
  assert "\n" not in error_text
  assert error_text.startswith(f"writing the search index failed: {failed_path}: ")
  assert f"{index} still holds the index as last saved" in error_text
  assert _snapshot(index) == base["files"]  # byte-for-byte, and no temporary file left
  manifest, emb = index_lib.load_index(index, verify=True)
  assert manifest["complete"] and len(emb) == 2
  assert _answers(index, base["text_encoder"])[1] == base["answers"]


@pytest.mark.parametrize("name,code,folder", [
    (index_lib.EMBEDDINGS_FILE, errno.ENOSPC, "shrunk"),
    (index_lib.MANIFEST_FILE, errno.ENOSPC, "shrunk"),
    (index_lib.MANIFEST_FILE, errno.EIO, "updated"),
    (index_lib.CONFIG_FILE, errno.ENOSPC, "shrunk"),
    (store.THUMBS_DIR, errno.ENOSPC, "updated"),
    (ann_lib.ANN_FILE, errno.ENOSPC, "shrunk"),
    (ann_lib.ANN_META, errno.EIO, "shrunk")])
def test_failing_write_keeps_the_previous_index(base, tmp_path, monkeypatch, name, code,
                                                folder):
  index = copy_tree(base["index"], tmp_path / "index")
  opened = _fail_writes_of(monkeypatch, name, code)
  with pytest.raises(store.IndexWriteError) as info:
    search.build_index(base["config"], base[folder], index, batch_size=2, workers=1,
                       progress=False)
  assert len(opened) == 1  # the fault was injected, once: the run stopped there
  failed = opened[0].parent / opened[0].name.split(".tmp-")[0][1:]
  text = str(info.value)
  print(text)
  assert os.strerror(code) in text and f"errno {code}" in text
  _check_intact(base, index, text, failed)
  if name == index_lib.MANIFEST_FILE and code == errno.EIO:  # the storage works again
    monkeypatch.undo()
    s = search.build_index(base["config"], base["updated"], index, batch_size=2, workers=1,
                           progress=False)
    assert s.embedded == [NEW] and s.reused == ["a.mp4", "sub/b.avi"] and s.ann
    assert _answers(index, base["text_encoder"])[1][0].startswith("ann: ")
    assert len(index_lib.load_index(index)[1]) == 3


def test_failing_rename_of_the_manifest_puts_the_old_files_back(base, tmp_path, monkeypatch):
  """embeddings.npy, ann.* and config.json are already renamed when the manifest's rename
  fails (EIO): they are put back, so the old manifest still matches what is live."""
  index = copy_tree(base["index"], tmp_path / "index")
  real_replace = os.replace
  renamed = []

  def replace(src, dst):
    if pathlib.Path(dst) == index / index_lib.MANIFEST_FILE and ".tmp-" in str(src):
      raise OSError(errno.EIO, os.strerror(errno.EIO))
    if pathlib.Path(dst).parent == index and ".tmp-" in str(src):
      renamed.append(pathlib.Path(dst).name)
    real_replace(src, dst)

  monkeypatch.setattr(store.os, "replace", replace)
  with pytest.raises(store.IndexWriteError) as info:
    search.build_index(base["config"], base["shrunk"], index, progress=False)
  monkeypatch.undo()
  assert set(renamed) == {index_lib.EMBEDDINGS_FILE, ann_lib.ANN_FILE, ann_lib.ANN_META,
                          index_lib.CONFIG_FILE}
  _check_intact(base, index, str(info.value), index / index_lib.MANIFEST_FILE)


def test_kernel_enospc_from_dev_full(base, tmp_path):
  """A real ENOSPC (the temporary file is a link to /dev/full) on the manifest of a save."""
  index = copy_tree(base["index"], tmp_path / "index")
  manifest, emb = index_lib.load_index(index)
  tmp = index / f".{index_lib.MANIFEST_FILE}.tmp-{os.getpid()}"
  tmp.symlink_to("/dev/full")
  with pytest.raises(store.IndexWriteError) as info:
    store.save(index, emb[::-1].copy(), {e["path"]: e for e in manifest["entries"]},
               {k: v for k, v in manifest.items() if k != "entries"}, complete=True)
  assert not tmp.exists()
  _check_intact(base, index, str(info.value), index / index_lib.MANIFEST_FILE)
  assert f"errno {errno.ENOSPC}" in str(info.value)


def test_leftovers_of_a_killed_writer_are_removed(base, tmp_path, caplog):
  """Temporary files a kill -9 left do not make a new index folder 'not an index', and the
  next run on an index removes them."""
  fresh = tmp_path / "fresh"
  (fresh / store.THUMBS_DIR).mkdir(parents=True)
  (fresh / f".{index_lib.MANIFEST_FILE}.tmp-99999").write_bytes(b"half")
  index_lib._check_dirs(base["shrunk"], fresh)  # pylint: disable=protected-access
  (fresh / "notes.txt").write_text("x")
  with pytest.raises(search.SearchIndexError, match="not a search index"):
    index_lib._check_dirs(base["shrunk"], fresh)  # pylint: disable=protected-access
  index = copy_tree(base["index"], tmp_path / "index")
  left = [index / f".{index_lib.EMBEDDINGS_FILE}.tmp-99999",
          index / f".{index_lib.MANIFEST_FILE}.prev-99999",
          index / store.THUMBS_DIR / ".0123.jpg.tmp-99999"]
  for f in left:
    f.write_bytes(b"half")
  with caplog.at_level("WARNING"):
    s = search.build_index(base["config"], base["shrunk"], index, progress=False)
  assert s.removed == ["sub/b.avi"] and s.num_videos == 1
  assert not any(f.exists() for f in left)
  assert caplog.text.count("left by a `search index` run that was killed") == 3
  assert len(index_lib.load_index(index)[1]) == 1


_HOLDER = """
import sys, time
from centerclip_jax import search
from centerclip_jax.inference import encoder as encode
from tests.test_search import tiny_config
ckpt, videos, index, go = sys.argv[1:]
real = encode.load_frames
def wait_then_load(path, **kw):  # blocks, holding the index's lock, until the test says go
  while not __import__("os").path.exists(go):
    time.sleep(0.05)
  return real(path, **kw)
encode.load_frames = wait_then_load
s = search.build_index(tiny_config(ckpt), videos, index, batch_size=4, workers=1,
                       progress=False)
print("HOLDER DONE", s.embedded, s.num_videos, flush=True)
"""


def test_two_processes_on_one_index(base, tmp_path):
  """A second `search index` process on an index another process is writing refuses with
  one line naming the first's pid; the first then finishes and the index loads. The first
  holds the lock while it waits for a file the test creates, so the order is fixed."""
  index, go = tmp_path / "index", tmp_path / "go"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  first = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, base["config"].init_from, str(base["updated"]),
       str(index), str(go)], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 600
    while (store.is_locked(index) or {}).get("pid") != first.pid:
      assert first.poll() is None, first.stdout.read()[-3000:]
      assert time.time() < deadline, "the first process never took the lock"
      time.sleep(0.2)
    second = subprocess.run(
        [sys.executable, "-m", "centerclip_jax.search", "index", "--config",
         os.path.join(REPO, "configs", "msrvtt.py"),
         f"--config.init_from={base['config'].init_from}",
         *MODEL_FLAGS, "--videos", str(base["updated"]), "--index", str(index)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, second.stderr[-3000:]
    assert f"is being written by another `search index` run (pid {first.pid} on " in errors[0]
    assert first.poll() is None  # still holding the lock, untouched by the second
    go.touch()
    out, _ = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert first.returncode == 0, out[-3000:]
  assert "HOLDER DONE ['a.mp4', 'new/e.mov', 'sub/b.avi'] 3" in out, out[-3000:]
  manifest, emb = index_lib.load_index(index, verify=True)
  assert manifest["complete"] and len(emb) == 3 and store.is_locked(index) is None
