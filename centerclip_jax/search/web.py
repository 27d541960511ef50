"""The HTTP layer of `search serve` (routes: see `serve`): request checks, JSON, files.

`create_app(service)` is the Starlette app of a loaded `serve.Service`; `run` binds it
with uvicorn (127.0.0.1 unless asked otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import pathlib
import time
import urllib.parse

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.responses import JSONResponse
from starlette.routing import Mount
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from centerclip_jax.search import serve as serve_lib
from centerclip_jax.search.serve import BadRequest


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def parse_k(value) -> int:
  """`k` from a query string or JSON body: an int in [1, MAX_K] (default DEFAULT_K)."""
  if value is None:
    return serve_lib.DEFAULT_K
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise BadRequest(f"k must be an integer from 1 to {serve_lib.MAX_K}, got {value!r:.40}")
  try:
    k = int(value)
  except ValueError:
    raise BadRequest(f"k must be an integer from 1 to {serve_lib.MAX_K}, "
                     f"got {value!r:.40}") from None
  if not 1 <= k <= serve_lib.MAX_K:
    raise BadRequest(f"k must be from 1 to {serve_lib.MAX_K}, got {k}")
  return k


def parse_query(value, name: str = "q") -> str:
  if not isinstance(value, str) or not value.strip():
    raise BadRequest(f"{name}: give a non-empty text query, e.g. /search?q=a+man+is+cooking")
  return value.strip()


def _hit_json(hit, state: serve_lib.Loaded) -> dict:
  quoted = urllib.parse.quote(hit.path)
  playable = pathlib.PurePosixPath(hit.path).suffix.lower() in serve_lib.PLAYABLE
  thumb = state.thumbs.get(hit.path)
  return {"rank": hit.rank, "path": hit.path, "score": round(hit.score, 6),
          "thumb": f"/{thumb}" if thumb else None,
          "media": f"/media/{quoted}" if playable else None}


def _result_json(res, k: int, state: serve_lib.Loaded, max_words: int) -> dict:
  out = {"query": res.query, "k": k, "truncated": res.truncated,
         "results": [_hit_json(h, state) for h in res.hits[:k]]}
  if res.truncated:
    out["note"] = (f"the query is longer than the model's {max_words}-token context; only "
                   f"its first {max_words - 2} tokens were used")
  return out


def create_app(service: serve_lib.Service) -> Starlette:
  """The app of a loaded service (`service.load()` done)."""

  def bad(e: BadRequest) -> JSONResponse:
    service.counts["4xx"] += 1
    return _error(e.status, str(e))

  async def answer(texts: list[str], k: int) -> tuple[list[dict], str, float]:
    t0 = time.perf_counter()
    results, state = await service.search(texts, k)
    ms = (time.perf_counter() - t0) * 1e3
    service.latencies_ms.append(ms)
    service.counts["requests"] += 1
    service.counts["queries"] += len(texts)
    words = state.searcher.text_encoder.max_words
    return [_result_json(r, k, state, words) for r in results], state.searcher.method, ms

  async def search_get(request: Request):
    try:
      q = parse_query(request.query_params.get("q"))
      k = parse_k(request.query_params.get("k"))
    except BadRequest as e:
      return bad(e)
    (out,), method, ms = await answer([q[:serve_lib.MAX_QUERY_CHARS]], k)
    if len(q) > serve_lib.MAX_QUERY_CHARS:
      out["truncated"] = True
      out.setdefault("note", f"only the first {serve_lib.MAX_QUERY_CHARS} characters "
                     "of the query were read")
    return JSONResponse(dict(out, method=method, took_ms=round(ms, 3)))

  async def search_post(request: Request):
    try:
      size = int(request.headers.get("content-length") or 0)
      if size > serve_lib.MAX_BODY_BYTES:
        raise BadRequest(f"body over {serve_lib.MAX_BODY_BYTES} bytes", 413)
      body = await request.body()
      if len(body) > serve_lib.MAX_BODY_BYTES:
        raise BadRequest(f"body over {serve_lib.MAX_BODY_BYTES} bytes", 413)
      try:
        data = json.loads(body)
      except (ValueError, UnicodeDecodeError):
        raise BadRequest('the body is not JSON; send {"queries": ["a man is cooking"], '
                         '"k": 10}') from None
      if not isinstance(data, dict) or not isinstance(data.get("queries"), list):
        raise BadRequest('the body must be a JSON object with "queries": a list of texts')
      queries = data["queries"]
      if not 1 <= len(queries) <= service.max_batch:
        raise BadRequest(f"queries: give 1 to {service.max_batch} texts, got {len(queries)}")
      texts = [parse_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
      k = parse_k(data.get("k"))
    except BadRequest as e:
      return bad(e)
    cut = [t[:serve_lib.MAX_QUERY_CHARS] for t in texts]
    out, method, ms = await answer(cut, k)
    for o, t in zip(out, texts):
      if len(t) > serve_lib.MAX_QUERY_CHARS:
        o["truncated"] = True
    return JSONResponse({"k": k, "results": out, "method": method, "took_ms": round(ms, 3)})

  async def healthz(request: Request):
    del request
    s = service.state
    return JSONResponse({"status": "ready", "videos": s.searcher.num_videos,
                         "fingerprint": s.manifest["fingerprint"]})

  async def stats(request: Request):
    del request
    return JSONResponse(service.stats())

  async def reload(request: Request):
    del request
    try:
      out = await asyncio.get_running_loop().run_in_executor(None, service.reload)
    except BadRequest as e:
      return bad(e)
    return JSONResponse(out)

  async def thumb(request: Request):
    name = request.path_params["name"]
    path = service.index_dir / "thumbs" / name
    if not serve_lib.THUMB_NAME.fullmatch(name) or not path.is_file():
      return _error(404, f"no thumbnail {name!r:.60}")
    return FileResponse(path, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

  async def media(request: Request):
    rel = request.path_params["path"]
    state = service.state
    if rel not in state.paths:
      return _error(404, f"{rel!r:.100} is not a video of this index")
    full = (state.root / rel).resolve()
    if state.root not in full.parents or not full.is_file():
      return _error(404, f"{rel!r:.100} is not a file inside the indexed folder")
    if full.suffix.lower() not in serve_lib.PLAYABLE:
      return _error(404, f"{rel!r:.100} is not a playable video file")
    return FileResponse(full, media_type=mimetypes.guess_type(full.name)[0] or
                        "application/octet-stream")

  async def page(request: Request):
    del request
    return FileResponse(serve_lib.STATIC_DIR / "index.html", media_type="text/html")

  async def http_error(request: Request, exc: HTTPException):
    del request
    return _error(exc.status_code, exc.detail or "error")

  async def server_error(request: Request, exc: Exception):
    logging.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error (see the server log)")

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    await service.start()
    try:
      yield
    finally:
      await service.stop()

  routes = [
      Route("/", page),
      Route("/search", search_get, methods=["GET"]),
      Route("/search", search_post, methods=["POST"]),
      Route("/healthz", healthz),
      Route("/stats", stats),
      Route("/reload", reload, methods=["POST"]),
      Route("/thumbs/{name}", thumb),
      Route("/media/{path:path}", media),
      Mount("/static", StaticFiles(directory=serve_lib.STATIC_DIR), name="static"),
  ]
  return Starlette(routes=routes, lifespan=lifespan,
                   exception_handlers={HTTPException: http_error, Exception: server_error})


def run(service: serve_lib.Service, host: str = "127.0.0.1", port: int = 8080) -> None:
  """Serves a loaded service until interrupted (one process: the model lives in it)."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  uvicorn.run(create_app(service), host=host, port=port, log_level="warning",
              access_log=False, timeout_graceful_shutdown=5)
