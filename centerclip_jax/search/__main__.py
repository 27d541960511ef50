r"""`python -m centerclip_jax.search index|query ...` (see `centerclip_jax.search`).

  index  --config CFG [--config.init_from=CKPT] --videos DIR --index OUT [--batch_size N]
         [--fps 3] [--save_every 20] [--workers 4] [--rebuild]
  query  --index OUT [--top_k 10] [--json] [--dsl] [--init_from CKPT] "text" ["text" ...]

Results go to stdout (a table, or JSON with --json); progress and logs to stderr. Bad
input (missing folder, unreadable index, other model) exits with status 2 and one line.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from centerclip_jax.inference import encoder as encode
from centerclip_jax.search import index as index_lib
from centerclip_jax.search import query as query_lib

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "index: config file (configs/<name>.py).")
_VIDEOS = flags.DEFINE_string("videos", None, "index: folder of videos (searched recursively).")
_INDEX = flags.DEFINE_string("index", None, "Index directory.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "index: videos per forward pass (all devices).")
_FPS = flags.DEFINE_float("fps", 3.0, "index: frame rate videos are decoded at.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 20, "index: save progress every N batches.")
_WORKERS = flags.DEFINE_integer("workers", 4, "index: threads decoding videos ahead.")
_REBUILD = flags.DEFINE_bool("rebuild", False,
                             "index: re-embed everything (needed to change the model).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "query: videos shown per query.")
_JSON = flags.DEFINE_bool("json", False, "query: print JSON instead of a table.")
_DSL = flags.DEFINE_bool("dsl", False,
                         "query: re-score by dual softmax over the queries (several queries).")
_INIT_FROM = flags.DEFINE_string("init_from", None,
                                 "query: checkpoint, if it moved since indexing.")

_USAGE = ("usage: python -m centerclip_jax.search index --config CFG --videos DIR --index OUT\n"
          "       python -m centerclip_jax.search query --index OUT [--top_k N] [--json] "
          "[--dsl] TEXT [TEXT ...]")


def _index(args) -> None:
  if args:
    raise app.UsageError(f"index: unexpected arguments {args}\n{_USAGE}")
  missing = [n for n, f in (("--config", _CONFIG), ("--videos", _VIDEOS), ("--index", _INDEX))
             if f.value is None]
  if missing:
    raise app.UsageError(f"index needs {', '.join(missing)}\n{_USAGE}")
  s = index_lib.build_index(_CONFIG.value, _VIDEOS.value, _INDEX.value,
                            batch_size=_BATCH.value, fps=_FPS.value,
                            save_every=_SAVE_EVERY.value, rebuild=_REBUILD.value,
                            workers=_WORKERS.value)
  print(f"index {_INDEX.value}: {s.num_videos} videos; embedded {len(s.embedded)}, "
        f"kept {len(s.reused)}, removed {len(s.removed)}, failed {len(s.errors)} "
        f"(+{len(s.old_errors)} unchanged failed files not retried)")
  if s.embedded or s.errors:
    print(f"{s.videos_per_second:.2f} videos/s over {s.seconds:.1f} s on {s.num_devices} "
          "device(s) (compile included)")
  for path, msg in sorted(s.errors.items()):
    print(f"  failed: {path}: {msg}")


def _query(args) -> None:
  if not args:
    raise app.UsageError(f"query needs at least one query text\n{_USAGE}")
  if _INDEX.value is None:
    raise app.UsageError(f"query needs --index\n{_USAGE}")
  searcher = query_lib.Searcher.open(_INDEX.value, init_from=_INIT_FROM.value)
  start = time.perf_counter()
  results = searcher.search(args, _TOP_K.value, dsl=_DSL.value)
  logging.info("%d queries in %.1f ms (compile included)", len(args),
               (time.perf_counter() - start) * 1e3)
  if _JSON.value:
    print(query_lib.format_json(results, _DSL.value, searcher.videos_root))
  else:
    print(query_lib.format_table(results, _DSL.value))


def main(argv):
  if len(argv) < 2 or argv[1] not in ("index", "query"):
    raise app.UsageError(_USAGE)
  try:
    (_index if argv[1] == "index" else _query)(argv[2:])
  except (encode.InputError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
