"""tools/compare_reduction.py: every method of the table is a valid configuration at both
shapes, and the flags it passes to `main` are the ones `main` parses (no compile here; the
whole table is a 76-minute run, see the README)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture()
def tool(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / "tools"))  # it imports benchmark beside it
  spec = importlib.util.spec_from_file_location("compare_reduction",
                                                REPO / "tools" / "compare_reduction.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_methods_build_at_vit_b32_and_demo_shapes(tool):
  names = [name for name, _, _ in tool.methods()]
  assert names == ["none", "pooling", "sparse_sampling", "kmedoids++", "spectral", "tome",
                   "tome_r"]
  demo = _demo_config()
  arch = clip_lib.CLIPConfig.from_dict(demo.model.clip_dims.to_dict())
  for name, b32, small in tool.methods():
    model = tool.benchmark.build("ViT-B/32", b32, "float32")  # validates the plan
    assert model.clip_config.vision_layers == 12
    cfg = demo.model.copy_and_resolve_references()
    for key, value in small.items():
      cfg[key] = value
    centerclip.build_model(cfg, arch)
    # Every reducing method keeps the same 4 segments x 49 tokens at the B6 step.
    if name not in ("none", "tome_r"):
      assert b32["target_frames_blocks"] == (12,) * 6 + (4,) * 6
      assert b32["cluster_num_blocks"] == (49,) * 12


def test_override_flags_spell_tuples_as_main_reads_them(tool):
  assert tool._override_flags({"cluster_inter": 1, "target_frames_blocks": (8, 4, 4),
                               "tome_r": (3,)}) == [
      "--config.model.cluster_inter=1", "--config.model.target_frames_blocks=(8,4,4)",
      "--config.model.tome_r=(3,)"]
