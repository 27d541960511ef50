"""Shared pytest setup: quiet TensorFlow, find shared/."""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_dir() -> pathlib.Path:
  """The read-only shared/ folder beside the repo (override: CENTERCLIP_SHARED)."""
  env = os.environ.get("CENTERCLIP_SHARED")
  return pathlib.Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
  path = shared_dir()
  if not (path / "data").is_dir():
    raise FileNotFoundError(
        f"shared data folder not found at {path}; set CENTERCLIP_SHARED to its location")
  return path
