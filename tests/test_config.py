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
  if not c.init_from and not c.allow_random_init:  # the user passes --config.init_from
    c.init_from = "/converted/ViT-B-32"
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
  c.allow_random_init = True
  c.train.grad_accum_steps = 3
  with pytest.raises(ValueError, match="grad_accum_steps"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.allow_random_init = True
  c.mode = "serve"
  with pytest.raises(ValueError, match="config.mode"):
    config_lib.validate(c)


def test_empty_init_from_needs_the_opt_in():
  c = config_lib.base_config()
  with pytest.raises(ValueError, match=r"config.init_from: .*convert_clip_weights.py.*"
                     r"allow_random_init=True"):
    config_lib.validate(c)
  c.allow_random_init = True
  config_lib.validate(c)
  demo = load(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
  assert demo.allow_random_init and not demo.init_from


@pytest.mark.parametrize("batch,accum,devices,processes,ok", [
    (64, 1, 1, 1, True), (64, 1, 8, 1, True), (64, 1, 6, 1, False), (60, 1, 6, 1, True),
    (64, 2, 8, 1, True), (64, 16, 8, 1, False), (128, 16, 8, 1, True),
    (48, 1, 8, 4, True), (36, 1, 8, 4, False), (48, 1, 8, 2, True), (12, 1, 6, 2, True),
])
def test_train_batch_must_split_over_devices_and_hosts(batch, accum, devices, processes, ok):
  c = config_lib.base_config()
  c.train.global_batch_size, c.train.grad_accum_steps = batch, accum
  if ok:
    config_lib.validate_mesh(c, devices, processes)
  else:
    with pytest.raises(ValueError, match=rf"config.train.global_batch_size={batch}.* "
                       rf"{devices} device\(s\) on {processes} host\(s\)"):
      config_lib.validate_mesh(c, devices, processes)
  c.mode = "eval"  # evaluation pads its batches: no constraint
  config_lib.validate_mesh(c, devices, processes)


def test_validate_mesh_suggests_sizes_that_work():
  c = config_lib.base_config()
  c.train.global_batch_size = 50
  with pytest.raises(ValueError, match=r"multiple of 8 \(e.g. 48 or 56\)") as e:
    config_lib.validate_mesh(c, 8)
  for size in (48, 56):
    c.train.global_batch_size = size
    config_lib.validate_mesh(c, 8)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("batch,devices,expected", [
    (50, 8, 56), (64, 8, 64), (1, 8, 8), (7, 1, 7), (16, 6, 18), (4, 6, 6)])
def test_eval_batch_rounds_up_to_the_devices(batch, devices, expected):
  assert config_lib.eval_batch_size(batch, devices) == expected


def test_switches_accept_true_false_and_0_1():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "msrvtt.py")
  cases = [("model.cluster_inter", "True", 1), ("model.cluster_inter", "false", 0),
           ("model.cluster_inter", "0", 0), ("model.pre_norm", "True", True),
           ("model.pre_norm", "1", True), ("model.pre_norm", "0", False),
           ("model.svd_correct_sign", "False", False), ("model.cluster_embedding", "1", True),
           ("allow_random_init", "True", True), ("eval.dsl", "no", False)]
  for key, text, expected in cases:
    argv = config_lib.normalize_switches(["prog", "--config", path, f"--config.{key}={text}"])
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    value = holder.value
    for part in key.split("."):
      value = value[part]
    assert value == expected and type(value) is type(expected), (key, text, value)
  # Other keys and values are left alone.
  argv = ["p", "--config.model.cluster_algo=True", "--config.model.pre_norm=maybe", "True"]
  assert config_lib.normalize_switches(argv) == argv


def test_validate_checks_model_keys_before_anything_loads():
  c = config_lib.base_config()
  c.allow_random_init = True
  c.model.target_frames_blocks = (12,) * 6 + (5,) * 6
  with pytest.raises(ValueError, match=r"config.model: block 7 \(target_frames_blocks\[6\]\)"):
    config_lib.validate(c)
