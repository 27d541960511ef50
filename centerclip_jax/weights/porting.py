"""Port PyTorch CLIP checkpoints (OpenAI, CLIP4Clip, CenterCLIP) to the Flax CLIP.

Sources:
  * OpenAI's TorchScript archives as distributed (`ViT-B-32.pt`, fp16 inside);
  * plain state dicts (`.pt`, `.pth`, `.bin`), read with `torch.load(weights_only=True)`;
  * fine-tuned CLIP4Clip / CenterCLIP checkpoints (`ckpt.best.pth.tar`, `pytorch_model.bin.N`):
    CLIP keys under a `clip.` or `module.clip.` prefix, every other trained tensor
    (`frame_position_embeddings.weight`, `transformerClip.*`, `...tokencluster_inter.cluster_embed`)
    carried over as a flat dict of "extras".

The Flax module names follow the OpenAI keys (see `clip.py`), so the port is a short table of
rules from a Flax parameter path to its PyTorch key (`_torch_source`): Linear weights
[out, in] -> Dense kernels [in, out]; `conv1` [out, in, kh, kw] -> [kh, kw, in, out];
`attn.in_proj_{weight,bias}` split into `q_proj`/`k_proj`/`v_proj`; LayerNorm `weight` ->
`scale`; `token_embedding.weight` -> `token_embedding/embedding`; the rest as is. The expected
tree comes from `jax.eval_shape` of the Flax init, and any missing, unused or mis-shaped key
is reported, all at once.

Reading the files themselves (format sniffing, `weights_only` unpickling, TorchScript) is
`torch_files.py`; torch is imported lazily, only to read `.pt` files or run the reference.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import traverse_util

from centerclip_jax import paths
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import torch_files

CLIPConfig = clip_lib.CLIPConfig
CheckpointError = torch_files.CheckpointError
_brief = torch_files.brief
PARAMS_SUBDIR = "params"
CONFIG_FILE = "clip_config.json"
METADATA_FILE = "conversion.json"
# Integer entries of OpenAI's archives that `clip.model.build_model` drops.
_OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")
# CenterCLIP / CLIP4Clip additions that live under the `clip.` prefix: not CLIP weights.
_EXTRAS_UNDER_CLIP = re.compile(
    r"visual\.position_ids|visual\.conv2\.weight|.*\.(tokencluster_inter|deepcluster)\..*")
_CONVERT_HINT = "run tools/convert_clip_weights.py --input <CLIP .pt> --output <dir> first"


@dataclasses.dataclass(frozen=True)
class ConversionReport:
  """What `torch_to_flax` found: key prefix, preset match, sizes, extras."""
  prefix: str
  preset: Optional[str]
  num_params: int
  extras: dict[str, tuple[int, ...]]
  ignored: tuple[str, ...]


def clip_prefix(keys) -> str:
  """The prefix of the CLIP keys ('', 'module.', 'clip.', 'module.clip.', ...)."""
  keys = list(keys)
  if any(re.match(r"(module\.)?(vision_model|text_model)\.", k) for k in keys):
    raise ValueError("this is a Hugging Face transformers CLIP (vision_model.*/text_model.*); "
                     "convert OpenAI's checkpoint (e.g. ViT-B-32.pt) instead")
  anchor = "token_embedding.weight"
  prefixes = {k[:-len(anchor)] for k in keys if k.endswith(anchor)}
  prefixes = sorted(p for p in prefixes if p == "" or p.endswith("."))
  if not prefixes:
    raise ValueError(f"not a CLIP checkpoint: no '{anchor}' key among {len(keys)} keys "
                     f"(first: {keys[:3]})")
  if len(prefixes) > 1:
    raise ValueError(f"several CLIP models in one checkpoint (key prefixes {prefixes})")
  return prefixes[0]


def split_clip_state_dict(state_dict: Mapping[str, np.ndarray]):
  """Splits keys into (CLIP state dict with OpenAI names, extras, prefix).

  Extras are every key outside the CLIP prefix and CenterCLIP's additions inside it, named
  by their key without a leading 'module.'.
  """
  prefix = clip_prefix(state_dict)
  clip_sd, extras = {}, {}
  for key, value in state_dict.items():
    inner = key[len(prefix):] if key.startswith(prefix) else None
    if inner is None or _EXTRAS_UNDER_CLIP.fullmatch(inner):
      extras[key[len("module."):] if key.startswith("module.") else key] = value
    else:
      clip_sd[inner] = value
  return clip_sd, extras, prefix


def infer_config(clip_state_dict: Mapping[str, Any]) -> CLIPConfig:
  """`CLIPConfig.from_shapes` on an OpenAI-layout state dict; ValueError if impossible."""
  try:
    config = CLIPConfig.from_shapes({k: np.shape(v) for k, v in clip_state_dict.items()})
  except (IndexError, TypeError, KeyError) as e:
    raise ValueError(f"cannot infer the CLIP architecture from the key shapes ({_brief(e)})"
                     ) from None
  for tower, width, heads in (("vision", config.vision_width, config.vision_heads),
                              ("text", config.transformer_width, config.transformer_heads)):
    if heads < 1 or width % heads:
      raise ValueError(f"{tower} width {width} (from the key shapes) is not a multiple of 64, "
                       "as CLIP's attention heads need")
  return config


def read_torch_checkpoint(path) -> tuple[dict[str, np.ndarray], str]:
  """Reads a PyTorch CLIP checkpoint -> (state dict of numpy arrays, source kind).

  Source kind is 'torchscript', 'state_dict' or 'finetuned' (CLIP keys under a prefix).
  Floating tensors come back as float32; OpenAI's integer entries are dropped. Anything
  that is not a ViT CLIP checkpoint raises a one-line `CheckpointError` naming the file.
  """
  path = Path(path)
  state, fmt = torch_files.read_tensors(path)
  try:
    prefix = clip_prefix(state)
    for name in _OPENAI_INT_KEYS:
      if prefix + name in state and state[prefix + name].dtype.kind in "iu":
        del state[prefix + name]
    clip_sd, _, _ = split_clip_state_dict(state)
    infer_config(clip_sd)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  kind = "torchscript" if fmt == "torchscript" else ("finetuned" if prefix else "state_dict")
  return state, kind


# ----------------------------------------------------------------------------- conversion


@functools.lru_cache(maxsize=8)
def expected_param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """'/'-joined Flax parameter path -> shape, from `jax.eval_shape` of the init."""
  res = config.image_resolution
  model = clip_lib.CLIP(config)
  tree = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, res, res, 3), jnp.float32),
      jnp.zeros((1, config.context_length), jnp.int32))["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _torch_source(flax_path: str) -> tuple[str, str, Optional[int]]:
  """Flax path -> (PyTorch key, transform, q/k/v index into in_proj or None).

  Transforms: 'linear' ([out, in] -> [in, out]), 'conv' ([out, in, kh, kw] ->
  [kh, kw, in, out]) or 'copy'.
  """
  *mods, leaf = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", m) for m in flax_path.split("/")]
  if len(mods) >= 2 and mods[-2] == "attn" and mods[-1] in ("q_proj", "k_proj", "v_proj"):
    name = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
    return ".".join(mods[:-1] + [name]), ("linear" if leaf == "kernel" else "copy"), "qkv".index(
        mods[-1][0])
  torch_leaf = {"scale": "weight", "embedding": "weight", "kernel": "weight"}.get(leaf, leaf)
  transform = "copy" if leaf != "kernel" else ("conv" if mods[-1] == "conv1" else "linear")
  return ".".join(mods + [torch_leaf]), transform, None


def _torch_shape(flax_shape, transform, part) -> tuple[int, ...]:
  shape = {"linear": lambda s: tuple(s[::-1]), "conv": lambda s: (s[3], s[2], s[0], s[1]),
           "copy": tuple}[transform](flax_shape)
  return (3 * shape[0],) + shape[1:] if part is not None else shape


def expected_torch_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """OpenAI state-dict key -> shape for this architecture (via the rules above)."""
  out = {}
  for path, shape in expected_param_shapes(config).items():
    key, transform, part = _torch_source(path)
    out[key] = _torch_shape(shape, transform, part)
  return out


def _check_keys(given: Mapping[str, tuple], expected: Mapping[str, tuple], what: str):
  """Raises CheckpointError listing every missing, unused and mis-shaped key at once."""
  missing = sorted(set(expected) - set(given))
  unused = sorted(set(given) - set(expected))
  bad = sorted(f"{k} {list(given[k])} (expected {list(expected[k])})"
               for k in set(given) & set(expected) if tuple(given[k]) != tuple(expected[k]))
  problems = [f"{name} {len(keys)}: {', '.join(keys)}" for name, keys in
              (("missing", missing), ("unused", unused), ("mis-shaped", bad)) if keys]
  if problems:
    raise CheckpointError(f"{what} does not match the CLIP architecture: " + "; ".join(problems))


def preset_name(config: CLIPConfig) -> Optional[str]:
  return next((name for name, preset in clip_lib.PRESETS.items() if preset == config), None)


def torch_to_flax(state_dict: Mapping[str, np.ndarray]):
  """OpenAI-layout state dict -> (CLIPConfig, params, extras, ConversionReport).

  `params` is the nested Flax tree of float32 numpy arrays; `extras` maps each non-CLIP
  floating tensor's name to a float32 array (integer buffers are listed as ignored).
  """
  try:
    clip_sd, extras_sd, prefix = split_clip_state_dict(state_dict)
    config = infer_config(clip_sd)
    expected = expected_torch_shapes(config)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot build the Flax CLIP for the inferred architecture "
                          f"{dataclasses.asdict(config)} ({_brief(e)})") from None
  _check_keys({k: np.shape(v) for k, v in clip_sd.items()}, expected, "the checkpoint")
  flat = {}
  for path, shape in expected_param_shapes(config).items():
    key, transform, part = _torch_source(path)
    value = np.asarray(clip_sd[key], np.float32)
    if part is not None:
      value = np.split(value, 3, axis=0)[part]
    value = {"linear": lambda v: v.T, "conv": lambda v: v.transpose(2, 3, 1, 0),
             "copy": lambda v: v}[transform](value)
    flat[path] = np.ascontiguousarray(value, np.float32).reshape(shape)
  params = traverse_util.unflatten_dict(flat, sep="/")
  extras = {k: np.asarray(v, np.float32) for k, v in extras_sd.items()
            if np.asarray(v).dtype.kind == "f"}
  report = ConversionReport(
      prefix=prefix, preset=preset_name(config),
      num_params=int(sum(np.prod(s) for s in expected_param_shapes(config).values())),
      extras={k: tuple(v.shape) for k, v in extras.items()},
      ignored=tuple(sorted(set(extras_sd) - set(extras))))
  return config, params, extras, report


def check_params(params, config: CLIPConfig, what: str = "params"):
  """Raises CheckpointError unless `params` is exactly the Flax CLIP tree of `config`."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  _check_keys({k: np.shape(v) for k, v in flat.items()}, expected_param_shapes(config), what)


# ----------------------------------------------------------------------------- storage


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with paths.user_path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def conversion_metadata(source, source_kind: str, report: ConversionReport) -> dict[str, Any]:
  """Provenance for conversion.json: source, kind, sha256, extras, versions, date."""
  import flax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  versions = {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
              "orbax-checkpoint": getattr(ocp, "__version__", "unknown")}
  if "torch" in sys.modules:
    versions["torch"] = sys.modules["torch"].__version__
  return {
      "source": str(paths.user_path(source)), "source_kind": source_kind,
      "source_sha256": file_sha256(source), "key_prefix": report.prefix,
      "preset": report.preset, "num_params": report.num_params,
      "extras": {k: list(v) for k, v in report.extras.items()},
      "ignored": list(report.ignored), "versions": versions,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _is_converted_dir(path: Path) -> bool:
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_SUBDIR).is_dir()


def save_converted(out_dir, config: CLIPConfig, params, extras, metadata: Mapping[str, Any],
                   overwrite: bool = False) -> Path:
  """Writes out_dir/{params (orbax: {'params', 'extras'}), clip_config.json, conversion.json}.

  The directory appears only once complete (written beside it, then renamed). With
  `overwrite`, an existing converted checkpoint or empty directory is replaced; any other
  existing path is left alone.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = paths.user_path(out_dir)
  if out_dir.exists():
    if not overwrite:
      raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    if not (_is_converted_dir(out_dir) or (out_dir.is_dir() and not any(out_dir.iterdir()))):
      raise FileExistsError(f"{out_dir} exists and is not a converted CLIP checkpoint; "
                            "refusing to replace it")
  check_params(params, config)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
  paths.rmtree(tmp)
  tmp.mkdir(parents=True)
  try:
    tree = {"params": params, "extras": {k: np.asarray(v, np.float32) for k, v in extras.items()}}
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_SUBDIR, tree)
    (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
    (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n")
    paths.replace(tmp, out_dir)
  finally:
    paths.rmtree(tmp)
  return out_dir


def load_converted(directory) -> tuple[CLIPConfig, dict, dict[str, np.ndarray]]:
  """Reads a `save_converted` directory -> (CLIPConfig, params, extras), numpy float32.

  The tree is checked against the config; callers place it on devices themselves.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = paths.user_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no converted CLIP checkpoint here; {_CONVERT_HINT}")
  if not _is_converted_dir(directory):
    raise CheckpointError(f"{directory}: not a converted CLIP checkpoint ({CONFIG_FILE} or "
                          f"{PARAMS_SUBDIR}/ missing); {_CONVERT_HINT}")
  try:
    config = CLIPConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(directory / PARAMS_SUBDIR)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{directory / PARAMS_SUBDIR}: cannot restore ({_brief(e)}); "
                          f"{_CONVERT_HINT}") from None
  if not isinstance(tree, Mapping) or "params" not in tree:
    raise CheckpointError(f"{directory / PARAMS_SUBDIR}: no 'params' tree; {_CONVERT_HINT}")
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(tree["params"]))
  check_params(params, config, f"{directory}")
  extras = {k: np.asarray(v, np.float32) for k, v in dict(tree.get("extras") or {}).items()}
  return config, params, extras
