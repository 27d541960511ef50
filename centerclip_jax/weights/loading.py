"""Builds the model and its params from a config: converted CLIP weights, a trained
workdir, or (for tests and the demo) random initialisation."""

from __future__ import annotations

import json
import logging
from typing import Any

from etils import epath
import jax
import ml_collections

from centerclip_jax import console
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import resolver

CLIP_CONFIG_FILE = "clip_config.json"


def resolve_path(value: str, field: str) -> epath.Path:
  """The directory a user-given checkpoint spec points at (a `DIR@STEP` suffix dropped);
  error naming the field if missing."""
  return resolver.resolve(value, field=field).root


def read_clip_config(path) -> clip_lib.CLIPConfig:
  text = (epath.Path(path) / CLIP_CONFIG_FILE).read_text()
  return clip_lib.CLIPConfig.from_dict(json.loads(text))


def _clip_config_of(source: resolver.Resolved) -> clip_lib.CLIPConfig:
  if not (source.root / CLIP_CONFIG_FILE).exists():
    raise FileNotFoundError(
        f"config.init_from: {source.root / CLIP_CONFIG_FILE} not found: {source.root} is "
        "neither a converted CLIP checkpoint (tools/convert_clip_weights.py) nor a training "
        "workdir")
  return read_clip_config(source.root)


def clip_config_for(config: ml_collections.ConfigDict) -> clip_lib.CLIPConfig:
  """The CLIP architecture a config will use (without loading any weights)."""
  if config.init_from:
    return _clip_config_of(resolver.resolve(config.init_from))
  if config.model.get("clip_dims"):
    return clip_lib.CLIPConfig.from_dict(config.model.clip_dims.to_dict())
  return clip_lib.get_preset(config.model.arch)


def load_model(config: ml_collections.ConfigDict, rng=None
               ) -> tuple[centerclip.CenterCLIP, Any]:
  """(model, params) for `config`.

  - `config.init_from` = a training workdir (it has `checkpoints/`): the params of its best
    step, or the step a `DIR@latest` / `DIR@STEP` suffix asks for (`resolver.resolve`).
  - `config.init_from` = a converted CLIP checkpoint: CLIP params + new modules
    initialised from them (see `centerclip.init_params`).
  - empty: random params of `config.model.clip_dims` (a custom architecture, e.g. the
    demo's) or else of the preset `config.model.arch` (logged as a warning).
  """
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  if not config.init_from:
    clip_config = clip_config_for(config)
    model = centerclip.build_model(config.model, clip_config)
    arch = "custom (config.model.clip_dims)" if config.model.get("clip_dims") else config.model.arch
    logging.warning("config.init_from is empty: using RANDOM %s weights", arch)
    return model, centerclip.init_params(model, rng)
  source = resolver.resolve(config.init_from)
  model = centerclip.build_model(config.model, _clip_config_of(source))
  if source.kind == "trained":
    params = resolver.load_params(source, centerclip.abstract_params(model))
    if jax.process_index() == 0:
      console.say(f"checkpoint: {source.describe()}")
    return model, params
  from centerclip_jax.weights import porting  # pylint: disable=g-import-not-at-top
  _, clip_params, extras = porting.load_converted(source.root)
  if extras:
    logging.warning("checkpoint extras not used by this model: %s", sorted(extras))
  logging.info("loaded CLIP weights from %s", source.root)
  return model, centerclip.init_params(model, rng, clip_params)
