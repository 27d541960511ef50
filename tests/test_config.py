"""Configs: every shipped config validates; bad ones fail before compiling, naming the field."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from centerclip_jax import config as config_lib
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
  c = load(path)
  config_lib.validate(c)
  arch = (clip_lib.CLIPConfig.from_dict(c.model.clip_dims.to_dict()) if c.model.clip_dims
          else clip_lib.get_preset(c.model.arch))
  centerclip.build_model(c.model, arch)


def test_msrvtt_is_paper_recipe():
  c = load(pathlib.Path(__file__).resolve().parents[1] / "configs" / "msrvtt.py")
  assert c.model.target_frames_blocks == (12,) * 6 + (4,) * 6
  assert c.model.cluster_num_blocks == (49,) * 12
  assert c.model.max_frames == 12 and c.model.max_words == 32
  assert c.train.global_batch_size == 128 and c.train.num_epochs == 5


@pytest.mark.parametrize("field,value,match", [
    ("target_frames_blocks", (12,) * 6 + (5,) * 6, "target_frames_blocks"),
    ("target_frames_blocks", (12,) * 11, "target_frames_blocks"),
    ("cluster_num_blocks", (49,) * 6 + (200,) * 6, "cluster_num_blocks"),
    ("cluster_algo", "kmeans", "algo"),
    ("cluster_distance", "manhattan", "distance"),
    ("sim_header", "tightTransf", "sim_header"),
    ("dtype", "float16", "dtype"),
])
def test_bad_model_config_rejected(field, value, match):
  m = config_lib.model_config()
  m[field] = value
  with pytest.raises(ValueError, match=match):
    centerclip.build_model(m, clip_lib.get_preset("ViT-B/32"))


def test_original_spelling_accepted():
  m = config_lib.model_config()
  m.cluster_algo = "kmediods++"
  model = centerclip.build_model(m, clip_lib.get_preset("ViT-B/32"))
  assert model.settings.algo == "kmedoids++"


def test_bad_train_config_rejected():
  c = config_lib.base_config()
  c.train.grad_accum_steps = 3
  with pytest.raises(ValueError, match="grad_accum_steps"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.mode = "serve"
  with pytest.raises(ValueError, match="config.mode"):
    config_lib.validate(c)
