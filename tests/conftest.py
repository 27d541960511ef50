"""Shared pytest setup: quiet TensorFlow; the public annotation files the tests read."""

from __future__ import annotations

import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache for the whole test session and every subprocess it
# starts (the end-to-end runs compile the same demo programs again and again). Programs
# that compile in under half a second are not cached. Delete the folder to start cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "centerclip_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Public dataset annotations kept in the repository (MSR-VTT's JSFusion test csv and the
# LSMDC16 public-test captions, 1,000 rows each), so a plain clone runs every test.
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
  return TEST_DATA


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A local in-memory GCS emulator with bucket 'centerclip-test' (tests/gcs_emulator.py).

  Its variables (STORAGE_EMULATOR_HOST and the TF proxy ones) are set in this process's
  environment, so subprocesses inherit them, and removed again when the session ends.
  """
  from tests import gcs_emulator
  emulator = gcs_emulator.start("centerclip-test", tmp_path_factory.mktemp("gcs"))
  saved = {k: os.environ.get(k) for k in emulator.env}
  emulator.apply()
  try:
    yield emulator
  finally:
    emulator.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
