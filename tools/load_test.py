r"""Load test of `search serve` on localhost: N clients for S seconds, then again while the
index is rebuilt beside it (switched in with POST /reload).

  python tools/load_test.py --index DIR [--clients 32] [--seconds 30] [--videos DIR \
      --config CFG ...]        # an existing index (and, for the rebuild phase, its sources)
  python tools/load_test.py --demo [--clients 32] [--seconds 30] [--json OUT]

`--demo` builds a small index with a random tiny CLIP in a temporary folder (one video
per clip, written as `.npy` frames). The server is started as a subprocess on a free
127.0.0.1 port; clients are threads with one keep-alive connection each, sending GET
/search with varied queries until the deadline (every loop is bounded in time), and the
server's RSS is sampled each second from /proc. Phase 2 starts `search index` (new videos
added) on the served index, keeps the clients running, then POSTs /reload once the run
has finished and checks that the new videos are searchable. Prints one JSON line per
phase: requests/s, p50/p99 latency, errors, RSS at start/end/max.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("a man is cooking pasta", "two dogs play in the snow", "a car drives at night",
         "people dancing at a party", "a cat sleeps on a sofa", "someone plays the guitar")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
  for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  return 0.0


def make_demo(root: pathlib.Path, num_videos: int = 64) -> list[str]:
  """A tiny random CLIP and `num_videos` frame files; returns the `search index` flags."""
  import jax  # pylint: disable=g-import-not-at-top
  from centerclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from centerclip_jax.weights import porting  # pylint: disable=g-import-not-at-top
  dims = clip_lib.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2,
                             vision_width=64, vision_patch_size=8, context_length=77,
                             vocab_size=49408, transformer_width=64, transformer_heads=1,
                             transformer_layers=1)
  params = jax.tree.map(np.asarray, clip_lib.init_params(dims, jax.random.PRNGKey(0)))
  porting.save_converted(root / "clip", dims, params, {}, {"source": "load_test"})
  write_videos(root / "videos", 0, num_videos)
  return ["--config", str(REPO / "configs" / "msrvtt.py"), f"--config.init_from={root / 'clip'}",
          "--config.data.decode_short_side=32", "--config.model.max_frames=4",
          "--config.model.target_frames_blocks=(4,2)",
          "--config.model.cluster_num_blocks=(16,8)", "--videos", str(root / "videos")]


def write_videos(folder: pathlib.Path, start: int, count: int) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(start)
  for i in range(start, start + count):
    np.save(folder / f"clip{i:05d}.npy", rng.integers(0, 255, (6, 32, 40, 3), np.uint8))


def _client(port: int, stop: threading.Event, seed: int, out: list, lock: threading.Lock):
  rng = np.random.default_rng(seed)
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  lat, errors = [], []
  while not stop.is_set():
    q = f"{WORDS[rng.integers(len(WORDS))]} {rng.integers(1000)}"
    t0 = time.perf_counter()
    try:
      conn.request("GET", "/search?" + urllib.parse.urlencode({"q": q, "k": 10}))
      resp = conn.getresponse()
      body = resp.read()
      if resp.status != 200 or not json.loads(body)["results"]:
        errors.append(f"{resp.status} {body[:200]!r}")
    except (OSError, http.client.HTTPException, ValueError) as e:
      errors.append(repr(e))
      conn.close()
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat.append(time.perf_counter() - t0)
  conn.close()
  with lock:
    out.append((lat, errors))


def _post(port: int, path: str) -> tuple[int, dict]:
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  conn.request("POST", path)
  resp = conn.getresponse()
  return resp.status, json.loads(resp.read())


def run_phase(port: int, pid: int, clients: int, seconds: float, during=None) -> dict:
  """`clients` threads for `seconds` (and 2 s past `during()`, run meanwhile, if longer)."""
  t0 = time.time()
  deadline = t0 + seconds
  results, lock, stop = [], threading.Lock(), threading.Event()
  threads = [threading.Thread(target=_client, args=(port, stop, i, results, lock))
             for i in range(clients)]
  rss = [_rss_mb(pid)]
  sampler_stop = threading.Event()

  def sample():
    while not sampler_stop.wait(1.0):
      rss.append(_rss_mb(pid))

  sampler = threading.Thread(target=sample)
  sampler.start()
  for t in threads:
    t.start()
  extra = {}
  if during is not None:
    extra = during(deadline)
    deadline = max(deadline, time.time() + 2)
  time.sleep(max(0.0, deadline - time.time()))
  stop.set()
  for t in threads:
    t.join(timeout=60)
  sampler_stop.set()
  sampler.join()
  seconds = time.time() - t0
  lat = np.concatenate([np.asarray(r[0]) for r in results]) * 1e3
  errors = [e for r in results for e in r[1]]
  return dict({"clients": clients, "seconds": seconds, "requests": int(len(lat)),
               "requests_per_s": len(lat) / seconds,
               "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
               "errors": len(errors), "first_errors": errors[:3],
               "rss_mb_start": rss[0], "rss_mb_end": rss[-1], "rss_mb_max": max(rss)}, **extra)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--index", help="a built index (else --demo)")
  p.add_argument("--demo", action="store_true")
  p.add_argument("--clients", type=int, default=32)
  p.add_argument("--seconds", type=float, default=30.0)
  p.add_argument("--no_rebuild", action="store_true", help="skip the rebuild phase")
  p.add_argument("--json", default=None)
  a, index_flags = p.parse_known_args(argv)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  with tempfile.TemporaryDirectory(prefix="load_test") as tmp:
    tmp = pathlib.Path(tmp)
    if a.demo:
      index_flags = make_demo(tmp)
      index = tmp / "index"
      subprocess.run([sys.executable, "-m", "centerclip_jax.search", "index", *index_flags,
                      "--index", str(index), "--workers", "1"], cwd=REPO, env=env,
                     check=True, capture_output=True, timeout=900)
    elif a.index:
      index = pathlib.Path(a.index)
    else:
      p.error("give --index DIR or --demo")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "centerclip_jax.search", "serve",
                               "--index", str(index), "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
      start = time.time()
      while True:
        if server.poll() is not None:
          raise SystemExit(f"serve exited: {server.stdout.read()[-2000:]}")
        try:
          conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
          conn.request("GET", "/healthz")
          if conn.getresponse().status == 200:
            break
        except OSError:
          pass
        if time.time() - start > 900:
          raise SystemExit("serve did not become ready in 900 s")
        time.sleep(0.2)
      phases = [dict(run_phase(port, server.pid, a.clients, a.seconds), phase="steady")]

      def rebuild(deadline):
        if a.demo:
          write_videos(pathlib.Path(index_flags[-1]), 1000, 8)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "centerclip_jax.search", "index",
                               *index_flags, "--index", str(index), "--workers", "1"],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(60, deadline - time.time() + 600))
        status, body = _post(port, "/reload")
        return {"rebuild_s": time.time() - t0, "rebuild_rc": proc.returncode,
                "reload_status": status, "videos_after_reload": body.get("videos"),
                "videos_before_reload": body.get("previous_videos")}

      if (a.demo or index_flags) and not a.no_rebuild:
        phases.append(dict(run_phase(port, server.pid, a.clients, a.seconds, rebuild),
                           phase="rebuild+reload"))
    finally:
      server.terminate()
      server.wait(timeout=30)
  for ph in phases:
    print(json.dumps(ph))
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(phases, indent=1))
  return phases


if __name__ == "__main__":
  main()
