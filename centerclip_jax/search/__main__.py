r"""`python -m centerclip_jax.search index|query|serve ...` (see `centerclip_jax.search`).

  index  --config CFG [--config.init_from=CKPT] --videos DIR --index OUT [--batch_size N]
         [--fps 3] [--save_every 20] [--workers 2] [--rebuild] [--ann] [--follow_symlinks]
  query  --index OUT [--top_k 10] [--json] [--dsl] [--init_from CKPT] "text" ["text" ...]
  serve  --index OUT [--host 127.0.0.1] [--port 8080] [--init_from CKPT] [--max_batch 32]

Results go to stdout (a table, or JSON with --json); progress to stderr; logs to
`$TMPDIR/centerclip_jax-logs/search-<command>.log` (and stderr with --verbosity=1). Bad input
(missing folder, unreadable index, other model, a count < 1) exits with status 2 and one
line.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from centerclip_jax import config as config_lib
from centerclip_jax import console
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
_WORKERS = flags.DEFINE_integer("workers", 2, "index: processes decoding videos ahead "
                                 "of the model (1: decode in the main process).")
_REBUILD = flags.DEFINE_bool("rebuild", False,
                             "index: re-embed everything (needed to change the model).")
_ANN = flags.DEFINE_bool("ann", False, "index: also build a FAISS approximate index (for "
                         "collections of millions); query and serve use it.")
_FOLLOW = flags.DEFINE_bool("follow_symlinks", False,
                            "index: also follow symlinks that point outside --videos.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: address to bind (127.0.0.1: this "
                            "machine only; 0.0.0.0 exposes the index to the network).")
_PORT = flags.DEFINE_integer("port", 8080, "serve: TCP port.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "serve: queries per text-tower call.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "query: videos shown per query.")
_JSON = flags.DEFINE_bool("json", False, "query: print JSON instead of a table.")
_DSL = flags.DEFINE_bool("dsl", False,
                         "query: re-score by dual softmax over the queries (several queries).")
_INIT_FROM = flags.DEFINE_string("init_from", None,
                                 "query/serve: checkpoint, if it moved since indexing.")

_USAGE = ("usage: python -m centerclip_jax.search index --config CFG --videos DIR --index OUT\n"
          "       python -m centerclip_jax.search query --index OUT [--top_k N] [--json] "
          "[--dsl] TEXT [TEXT ...]\n"
          "       python -m centerclip_jax.search serve --index OUT [--host 127.0.0.1] "
          "[--port 8080]")


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
                            workers=_WORKERS.value, ann=_ANN.value,
                            follow_symlinks=_FOLLOW.value)
  print(f"index {_INDEX.value}: {s.num_videos} videos; embedded {len(s.embedded)}, "
        f"kept {len(s.reused)}, removed {len(s.removed)}, failed {len(s.errors)} "
        f"(+{len(s.old_errors)} unchanged failed files not retried)")
  if s.embedded or s.errors:
    print(f"{s.videos_per_second:.2f} videos/s over {s.seconds:.1f} s on {s.num_devices} "
          f"device(s) (compile included); the model waited for decoding "
          f"{100 * s.input_wait_share:.0f}% of the time")
  if s.ann:
    print(f"approximate index: {s.ann}")
  if s.skipped_links:
    print(f"{len(s.skipped_links)} symlinks to outside --videos not followed "
          "(--follow_symlinks to index them)")
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


def _serve(args) -> None:
  if args or _INDEX.value is None:
    raise app.UsageError(f"serve needs --index and no other arguments\n{_USAGE}")
  from centerclip_jax.search import serve as serve_lib  # pylint: disable=g-import-not-at-top
  from centerclip_jax.search import web  # pylint: disable=g-import-not-at-top
  service = serve_lib.Service(_INDEX.value, init_from=_INIT_FROM.value,
                              max_batch=_MAX_BATCH.value)
  info = service.load()
  print(f"ready: {info['videos']} videos ({info['method']}); {info['shapes']} query shapes "
        f"compiled in {info['seconds']:.1f} s; http://{_HOST.value}:{_PORT.value}/",
        flush=True)
  web.run(service, _HOST.value, _PORT.value)


_COMMANDS = {"index": _index, "query": _query, "serve": _serve}
# flag -> (commands it applies to, minimum)
_AT_LEAST = {"top_k": (("query",), 1), "batch_size": (("index",), 1),
             "save_every": (("index",), 1), "workers": (("index",), 1),
             "max_batch": (("serve",), 1), "port": (("serve",), 0)}


def _check_numbers(command: str) -> None:
  """One line for a count out of range, before anything loads."""
  for name, (commands, least) in _AT_LEAST.items():
    value = flags.FLAGS[name].value
    if command in commands and value < least:
      console.fail(f"--{name} must be >= {least}, got {value}")
  if command == "index" and not _FPS.value > 0:
    console.fail(f"--fps must be > 0 (frames per second videos are decoded at), got "
                 f"{_FPS.value}")


def main(argv):
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    raise app.UsageError(_USAGE)
  _check_numbers(argv[1])
  console.setup_logging(console.default_log_dir() / f"search-{argv[1]}.log")
  try:
    _COMMANDS[argv[1]](argv[2:])
  except (encode.InputError, ValueError, FileNotFoundError) as e:
    console.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=console.flags_parser("config", config_lib.normalize_switches))
