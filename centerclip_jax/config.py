"""The configuration every `configs/<name>.py` starts from, and its validation.

Configs are code: each file in `configs/` defines `get_config()` that calls
`base_config()` and changes what its dataset needs. Model keys keep the names of the
authors' CenterCLIP scripts so that those port 1:1 (per-block lists are tuples, so that
`--config.model.target_frames_blocks='(12,12,12,12,12,12,4,4,4,4,4,4)'` works).
`validate(config)` rejects a bad config with a message naming the field, before anything
is compiled.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from centerclip_jax.clustering import segments as segments_lib
from centerclip_jax.models import clip as clip_lib

MODES = ("train_and_eval", "train", "eval")
SIM_HEADERS = ("meanP", "seqTransf")
DTYPES = ("float32", "bfloat16")


def model_config(max_frames: int = 12, num_blocks: int = 12,
                 tokens_per_frame: int = 49) -> ml_collections.ConfigDict:
  """CenterCLIP model keys (`config.model`), default `B6 - 4, 49` k-medoids++ on ViT-B/32."""
  m = ml_collections.ConfigDict()
  m.arch = "ViT-B/32"             # used for random init when config.init_from is empty
  m.clip_dims = ml_collections.ConfigDict()  # optional custom CLIPConfig fields (demo)
  m.dtype = "float32"             # compute dtype; params are always float32
  m.remat = False                 # rematerialise residual blocks to save memory
  m.max_frames = max_frames
  m.max_words = 32
  m.sim_header = "meanP"          # 'meanP' or 'seqTransf'
  m.seq_transformer_layers = 4    # seqTransf: layers copied from the CLIP text tower
  # Token clustering (names as in the authors' scripts).
  m.cluster_inter = 1             # 0 turns clustering off (the CLIP4Clip baseline)
  m.cluster_algo = "kmedoids++"   # 'kmedoids++' ('kmediods++'), 'spectral', 'pooling', 'sparse_sampling'
  half = num_blocks // 2
  m.target_frames_blocks = (max_frames,) * half + (max_frames // 3,) * (num_blocks - half)
  m.cluster_num_blocks = (tokens_per_frame,) * num_blocks
  m.cluster_distance = "euclidean"
  m.minkowski_norm_p = 2.0
  m.cluster_iter_limit = 100
  m.cluster_threshold = 1e-6
  m.pre_norm = False
  m.aggregation = ""              # '' (medoid tokens) or 'mean'
  m.cluster_embedding = False
  m.spectral_sigma = 2.0
  m.spectral_graph = "HeatKernel"
  m.spectral_knn_k = 1
  m.svd_correct_sign = True
  return m


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every dataset config (MSR-VTT recipe of the paper)."""
  c = ml_collections.ConfigDict()
  c.mode = "train_and_eval"
  c.seed = 42
  c.init_from = ""                # converted CLIP checkpoint dir (tools/convert_clip_weights.py)
  c.data_dir = ""                 # TFDS data dir (tools/prepare_data.py)
  c.dataset = "msrvtt"            # TFDS builder name
  c.train_split = "train_9k"
  c.val_split = ""                # model selection split; '' -> eval_split (as the original)
  c.eval_split = "test_1k"
  c.model = model_config()
  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 128
  c.train.num_epochs = 5
  c.train.num_train_steps = -1    # > 0 overrides num_epochs
  c.train.lr = 5e-3               # new modules; CLIP params get lr * coef_lr
  c.train.coef_lr = 1e-3
  c.train.weight_decay = 0.2
  c.train.warmup_proportion = 0.1
  c.train.clip_norm = 1.0
  c.train.grad_accum_steps = 1
  c.train.freeze_layer_num = -1
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.eval_every_epochs = 1
  c.train.keep_checkpoints = 3
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64          # videos (and captions) per eval batch, global
  c.eval.dsl = True               # also report dual-softmax re-scored metrics
  c.data = ml_collections.ConfigDict()
  c.data.resolution = -1          # -1: the model's image resolution
  c.data.shuffle_buffer = 2048
  return c


def dataset_config(dataset: str, train_split: str, val_split: str, eval_split: str, *,
                   max_frames: int = 12, max_words: int = 32) -> ml_collections.ConfigDict:
  """`base_config()` for one dataset; long videos (> 12 frames) cluster into 4-frame
  segments after block 6 and use a smaller eval batch."""
  c = base_config()
  c.dataset = dataset
  c.train_split, c.val_split, c.eval_split = train_split, val_split, eval_split
  if max_frames != 12:
    c.model = model_config(max_frames=max_frames)
    c.model.target_frames_blocks = (max_frames,) * 6 + (max_frames // 4,) * 6
    c.eval.batch_size = 16
  c.model.max_words = max_words
  return c


def _fail(field: str, msg: str):
  raise ValueError(f"config.{field}: {msg}")


def cluster_settings(m: ml_collections.ConfigDict) -> segments_lib.ClusterSettings:
  """ClusterSettings from the `config.model` keys (validated by ClusterSettings)."""
  aggregation = m.aggregation if m.aggregation not in ("", "none", "None") else None
  try:
    return segments_lib.ClusterSettings(
        algo=m.cluster_algo, distance=m.cluster_distance,
        minkowski_norm_p=float(m.minkowski_norm_p), iter_limit=int(m.cluster_iter_limit),
        threshold=float(m.cluster_threshold), pre_norm=bool(m.pre_norm),
        aggregation=aggregation, spectral_sigma=float(m.spectral_sigma),
        spectral_graph=m.spectral_graph, spectral_knn_k=int(m.spectral_knn_k),
        svd_correct_sign=bool(m.svd_correct_sign))
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None


def cluster_plan(m: ml_collections.ConfigDict, clip_config: clip_lib.CLIPConfig):
  """The clustering steps the config asks for (empty when cluster_inter is 0)."""
  if not m.cluster_inter:
    return ()
  try:
    return segments_lib.plan_steps(
        int(m.max_frames), tuple(m.target_frames_blocks), tuple(m.cluster_num_blocks),
        clip_config.vision_layers, clip_config.num_patches)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None


def validate_model(m: ml_collections.ConfigDict, clip_config: clip_lib.CLIPConfig) -> None:
  """Checks `config.model` against the CLIP architecture; raises ValueError."""
  if m.dtype not in DTYPES:
    _fail("model.dtype", f"{m.dtype!r} is not one of {DTYPES}")
  if m.sim_header not in SIM_HEADERS:
    _fail("model.sim_header", f"{m.sim_header!r} is not one of {SIM_HEADERS}")
  if int(m.max_frames) < 1:
    _fail("model.max_frames", "must be >= 1")
  if not 3 <= int(m.max_words) <= clip_config.context_length:
    _fail("model.max_words", f"must be in [3, {clip_config.context_length}], got {m.max_words}")
  if m.sim_header == "seqTransf" and clip_config.embed_dim != clip_config.transformer_width:
    _fail("model.sim_header", "seqTransf needs embed_dim == transformer_width (it reuses "
          f"text layers), got {clip_config.embed_dim} and {clip_config.transformer_width}")
  if m.sim_header == "seqTransf" and not 1 <= m.seq_transformer_layers <= clip_config.transformer_layers:
    _fail("model.seq_transformer_layers",
          f"must be in [1, {clip_config.transformer_layers}] (copied from the text tower)")
  cluster_settings(m)
  cluster_plan(m, clip_config)


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects a bad config with a message naming the field, before anything compiles."""
  if config.mode not in MODES:
    _fail("mode", f"{config.mode!r} is not one of {MODES}")
  for field in ("init_from", "data_dir"):
    value = config.get(field, "")
    if value and ("\x00" in value or not os.path.isabs(os.path.abspath(value))):
      _fail(field, f"{value!r} is not a valid path")
  if not config.init_from:
    if config.model.get("clip_dims"):
      try:
        clip_lib.CLIPConfig.from_dict(config.model.clip_dims.to_dict())
      except (TypeError, ValueError) as e:
        _fail("model.clip_dims", str(e))
    else:
      clip_lib.get_preset(config.model.arch)
  t = config.train
  if t.global_batch_size < 1:
    _fail("train.global_batch_size", "must be >= 1")
  if t.grad_accum_steps < 1 or t.global_batch_size % t.grad_accum_steps:
    _fail("train.grad_accum_steps",
          f"must be >= 1 and divide train.global_batch_size ({t.global_batch_size})")
  if not 0 <= t.warmup_proportion < 1:
    _fail("train.warmup_proportion", "must be in [0, 1)")
  if t.lr <= 0 or t.coef_lr <= 0:
    _fail("train.lr", "train.lr and train.coef_lr must be > 0")
  if config.eval.batch_size < 1:
    _fail("eval.batch_size", "must be >= 1")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain JSON-able dict of a config (tuples become lists)."""
  return config.to_dict()
