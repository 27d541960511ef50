"""Runs child processes to the end, sending SIGTERM to one of them once it printed a given
line: the preemption tests (tests/test_checkpoints.py, tests/test_gcs_*.py)."""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import Callable, Sequence


def run(procs: Sequence[subprocess.Popen], sigterm_when: Callable[[str], bool] | None = None,
        watched: int = -1, timeout: float = 600) -> tuple[list[int], list[str]]:
  """Waits for every process (each started with `stdout=PIPE, text=True`, stderr merged in
  if it matters). Reads procs[watched]'s output line by line and SIGTERMs that process once,
  at the first line for which `sigterm_when(line)` holds. Returns (return codes, outputs).
  A process still running after `timeout` seconds, or when this fails, is killed."""
  logs = [""] * len(procs)
  watched %= len(procs)

  def drain(i):  # the others' output read all along: a full pipe would block them
    logs[i] = procs[i].stdout.read()

  readers = [threading.Thread(target=drain, args=(i,), daemon=True)
             for i in range(len(procs)) if i != watched]
  try:
    for reader in readers:
      reader.start()
    for line in procs[watched].stdout:
      logs[watched] += line
      if sigterm_when is not None and sigterm_when(line):
        procs[watched].send_signal(signal.SIGTERM)
        sigterm_when = None
    for p in procs:
      p.wait(timeout=timeout)
    for reader in readers:
      reader.join(timeout=60)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], logs
