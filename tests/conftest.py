"""Shared pytest setup: quiet TensorFlow; the public annotation files the tests read."""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Public dataset annotations kept in the repository (MSR-VTT's JSFusion test csv and the
# LSMDC16 public-test captions, 1,000 rows each), so a plain clone runs every test.
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
  return TEST_DATA
