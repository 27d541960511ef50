"""Builds the model and its params from a config: converted CLIP weights, a trained
workdir, or (for tests and the demo) random initialisation."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections

from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import resolver

CLIP_CONFIG_FILE = "clip_config.json"


def resolve_path(value: str, field: str) -> pathlib.Path:
  """A user-given path from the config, expanded; error naming the field if missing."""
  if "\x00" in value:
    raise ValueError(f"config.{field}: invalid path {value!r}")
  path = pathlib.Path(os.path.expanduser(value)).resolve()
  if not path.exists():
    raise FileNotFoundError(
        f"config.{field}: {path} does not exist. Convert OpenAI CLIP weights with "
        "`python tools/convert_clip_weights.py --input ViT-B-32.pt --output DIR` and set "
        f"--config.{field}=DIR (or point it at a training workdir).")
  return path


def read_clip_config(path: pathlib.Path) -> clip_lib.CLIPConfig:
  with open(path / CLIP_CONFIG_FILE) as f:
    return clip_lib.CLIPConfig.from_dict(json.load(f))


def clip_config_for(config: ml_collections.ConfigDict) -> clip_lib.CLIPConfig:
  """The CLIP architecture a config will use (without loading any weights)."""
  if config.init_from:
    path = resolve_path(config.init_from, "init_from")
    if not (path / CLIP_CONFIG_FILE).exists():
      raise FileNotFoundError(
          f"config.init_from: {path / CLIP_CONFIG_FILE} not found: {path} is neither a "
          "converted CLIP checkpoint (tools/convert_clip_weights.py) nor a training workdir")
    return read_clip_config(path)
  if config.model.get("clip_dims"):
    return clip_lib.CLIPConfig.from_dict(config.model.clip_dims.to_dict())
  return clip_lib.get_preset(config.model.arch)


def load_model(config: ml_collections.ConfigDict, rng=None
               ) -> tuple[centerclip.CenterCLIP, Any]:
  """(model, params) for `config`.

  - `config.init_from` = a training workdir (it has `checkpoints/`): its latest params.
  - `config.init_from` = a converted CLIP checkpoint: CLIP params + new modules
    initialised from them (see `centerclip.init_params`).
  - empty: random params of `config.model.clip_dims` (a custom architecture, e.g. the
    demo's) or else of the preset `config.model.arch` (logged as a warning).
  """
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  clip_config = clip_config_for(config)
  model = centerclip.build_model(config.model, clip_config)
  if not config.init_from:
    arch = "custom (config.model.clip_dims)" if config.model.get("clip_dims") else config.model.arch
    logging.warning("config.init_from is empty: using RANDOM %s weights", arch)
    return model, centerclip.init_params(model, rng)
  path = resolve_path(config.init_from, "init_from")
  if (path / "checkpoints").is_dir():
    params = resolver.load_params_only(path, centerclip.abstract_params(model))
    logging.info("loaded trained params from %s", path)
    return model, params
  from centerclip_jax.weights import porting  # pylint: disable=g-import-not-at-top
  _, clip_params, extras = porting.load_converted(path)
  if extras:
    logging.warning("checkpoint extras not used by this model: %s", sorted(extras))
  logging.info("loaded CLIP weights from %s", path)
  return model, centerclip.init_params(model, rng, clip_params)
