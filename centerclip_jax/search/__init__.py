r"""Text-to-video search over your own video folder.

  python -m centerclip_jax.search index --config configs/msrvtt.py \
      --config.init_from=CKPT --videos DIR --index OUT [--batch_size N] [--rebuild]
  python -m centerclip_jax.search query --index OUT [--top_k 10] [--json] [--dsl] \
      "a man is cooking" ["another query" ...]

`index.build_index` embeds (and keeps up to date) every video of a folder;
`query.Searcher` scores text queries against the index. See the two modules.
"""

from centerclip_jax import console

console.quiet_tensorflow()  # `python -m centerclip_jax.search` imports TF here, before __main__

from centerclip_jax.search.index import SearchIndexError
from centerclip_jax.search.index import build_index
from centerclip_jax.search.index import load_index
from centerclip_jax.search.fingerprint import model_fingerprint
from centerclip_jax.search.index import scan_videos
from centerclip_jax.search.query import Searcher
from centerclip_jax.search.query import benchmark_query
from centerclip_jax.search.query import format_json
from centerclip_jax.search.query import format_table
from centerclip_jax.search.query import top_k_indices

__all__ = [
    "SearchIndexError",
    "Searcher",
    "benchmark_query",
    "build_index",
    "format_json",
    "format_table",
    "load_index",
    "model_fingerprint",
    "scan_videos",
    "top_k_indices",
]
