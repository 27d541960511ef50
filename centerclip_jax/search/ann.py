"""An approximate nearest-neighbour index over the embeddings, with FAISS (`faiss-cpu`).

Brute force (`query.Searcher`, chunked) stays the default: exact, and fast enough up to
about a million videos. `search index --ann` also writes `ann.faiss`, an inverted-file
index (`IndexIVFFlat`, inner product: k-means into `nlist ~ sqrt(V)` lists, a query scans
the `nprobe` nearest lists), and `ann.json`, which ties it to the sha256 of the
embeddings it was built from; `query` and `serve` use it when it matches the index.
IVF-Flat keeps the exact vectors, so the scores it returns are the exact cosine
similarities of the candidates it finds; only candidates can be missed.

FAISS rather than ScaNN: it ships CPU wheels for every Python we support with no
dependency on a particular TensorFlow (ScaNN pins one), and its IVF index builds a
million 512-d vectors in about a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

from centerclip_jax.search import store

ANN_FILE = "ann.faiss"
ANN_META = "ann.json"
DEFAULT_NPROBE_SHARE = 1 / 8    # lists scanned per query, as a share of nlist
TRAIN_POINTS_PER_LIST = 64      # k-means training sample: this many rows per list


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("--ann needs FAISS: pip install faiss-cpu (see requirements.txt)"
                     ) from None
  return faiss


def exists(index_dir: os.PathLike) -> bool:
  return (pathlib.Path(index_dir) / ANN_META).is_file()


def read_meta(index_dir: os.PathLike) -> dict | None:
  try:
    return json.loads((pathlib.Path(index_dir) / ANN_META).read_text())
  except (OSError, ValueError):
    return None


def is_current(index_dir: os.PathLike, emb: np.ndarray) -> bool:
  meta = read_meta(index_dir)
  return bool(meta) and meta.get("embeddings_sha256") == store.array_sha256(emb)


def default_nlist(num_rows: int) -> int:
  return int(max(1, min(round(math.sqrt(num_rows)), num_rows // 39 or 1)))


def build_ivf(emb: np.ndarray, nlist: int | None = None, seed: int = 0):
  """A trained and filled `faiss.IndexIVFFlat` (inner product) of `emb [V, D]` float32."""
  faiss = _faiss()
  emb = np.ascontiguousarray(emb, np.float32)
  nlist = nlist or default_nlist(len(emb))
  index = faiss.IndexIVFFlat(faiss.IndexFlatIP(emb.shape[1]), emb.shape[1], nlist,
                             faiss.METRIC_INNER_PRODUCT)
  rng = np.random.default_rng(seed)
  n_train = min(len(emb), TRAIN_POINTS_PER_LIST * nlist)
  train = emb[np.sort(rng.choice(len(emb), n_train, replace=False))]
  index.cp.seed = seed
  index.train(train)
  index.add(emb)
  return index


def files(emb: np.ndarray, nlist: int | None = None, nprobe: int | None = None
          ) -> tuple[dict, str]:
  """ann.faiss and ann.json of `emb [V, D]` (V > 0) as `store.commit` writers, and a
  description. FAISS writes through Python file objects, so a failing write (ENOSPC, EIO)
  raises instead of being printed by its C writer and ignored."""
  faiss = _faiss()
  index = build_ivf(emb, nlist)
  nprobe = nprobe or max(1, round(index.nlist * DEFAULT_NPROBE_SHARE))
  meta = {"kind": "faiss IndexIVFFlat inner product", "nlist": int(index.nlist),
          "nprobe": int(nprobe), "num_rows": int(len(emb)),
          "embeddings_sha256": store.array_sha256(emb)}
  return {ANN_FILE: (lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)),
                     "wb"),
          ANN_META: (lambda f: f.write(json.dumps(meta, indent=1)), "w")}, describe(meta)


def remove(index_dir: os.PathLike) -> None:
  for name in (ANN_META, ANN_FILE):  # meta first: without it the ANN is not used
    (pathlib.Path(index_dir) / name).unlink(missing_ok=True)


def build(index_dir: os.PathLike, emb: np.ndarray, nlist: int | None = None,
          nprobe: int | None = None) -> str:
  """Writes ann.faiss and ann.json for the index's embeddings; returns a description."""
  if not len(emb):
    remove(index_dir)
    return ""
  writers, description = files(emb, nlist, nprobe)
  store.commit(pathlib.Path(index_dir), writers)
  return description


def describe(meta: dict) -> str:
  return f"faiss IVF{meta['nlist']},Flat nprobe {meta['nprobe']} ({meta['num_rows']} rows)"


class AnnIndex:
  """A loaded IVF index: `search(text_emb [Q, D], k)` -> (scores [Q, k], rows [Q, k])."""

  def __init__(self, index, nprobe: int, description: str):
    self._index = index
    self._index.nprobe = int(nprobe)
    self.description = description

  @classmethod
  def from_embeddings(cls, emb: np.ndarray, nlist: int | None = None,
                      nprobe: int | None = None) -> "AnnIndex":
    index = build_ivf(emb, nlist)
    nprobe = nprobe or max(1, round(index.nlist * DEFAULT_NPROBE_SHARE))
    return cls(index, nprobe, describe({"nlist": index.nlist, "nprobe": nprobe,
                                        "num_rows": len(emb)}))

  @classmethod
  def open(cls, index_dir: os.PathLike, manifest: dict) -> "AnnIndex | None":
    """The index's ANN, or None when it has none; a stale or damaged one is an error."""
    meta = read_meta(index_dir)
    if meta is None:
      if exists(index_dir):
        raise store.SearchIndexError(f"{index_dir}/{ANN_META}: unreadable; re-run "
                                     "`search index ... --ann` to rebuild the ANN index")
      return None
    if meta.get("embeddings_sha256") != manifest.get("embeddings_sha256"):
      raise store.SearchIndexError(
          f"{index_dir}/{ANN_FILE} was built from other embeddings than the index's "
          "(interrupted update?); re-run `search index ... --ann` to rebuild it")
    try:
      index = _faiss().read_index(str(pathlib.Path(index_dir) / ANN_FILE))
    except RuntimeError as e:
      raise store.SearchIndexError(f"{index_dir}/{ANN_FILE}: unreadable ({e}); re-run "
                                   "`search index ... --ann` to rebuild it") from None
    if index.ntotal != manifest.get("num_rows"):
      raise store.SearchIndexError(f"{index_dir}/{ANN_FILE}: {index.ntotal} rows, the index "
                                   f"has {manifest.get('num_rows')}; re-run `search index "
                                   "... --ann` to rebuild it")
    return cls(index, meta["nprobe"], describe(meta))

  def search(self, text_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best first; a row index of -1 (score -inf) where fewer than k were found."""
    scores, rows = self._index.search(np.ascontiguousarray(text_emb, np.float32),
                                      int(min(k, self._index.ntotal)))
    return np.where(rows < 0, -np.inf, scores), rows
