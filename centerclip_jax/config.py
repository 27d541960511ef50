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

from centerclip_jax.models import clip as clip_lib
from centerclip_jax.models import settings as settings_lib
from centerclip_jax.models.settings import model_config  # re-exported for configs/

MODES = ("train_and_eval", "train", "eval")


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
  c.train.optimizer = "adamw"     # the authors' torch AdamW runs; 'bertadam': CLIP4Clip's
  c.train.freeze_layer_num = 0    # 0: CLIP's embeddings, conv1, ln_pre frozen; -1: none
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.eval_every_epochs = 1
  c.train.keep_checkpoints = 3
  c.train.skip_nonfinite = False  # non-finite loss/grads: False stops the run, True skips the update
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64          # videos (and captions) per eval batch, global
  c.eval.dsl = True               # also report dual-softmax re-scored metrics
  c.data = ml_collections.ConfigDict()
  c.data.decode_short_side = 224  # videos -> frames (encode, search): the datasets' short side
  c.data.shuffle_buffer = 2048
  c.data.train_examples = "captions"  # each (video, caption) pair per epoch ('videos': 1 per video)
  c.data.device_prefetch = 2      # global batches in flight to the devices (1: none ahead)
  return c


def dataset_config(dataset: str, train_split: str, val_split: str, eval_split: str, *,
                   train_examples: str, max_frames: int = 12, max_words: int = 32,
                   segments: int = 0) -> ml_collections.ConfigDict:
  """`base_config()` for one dataset; `train_examples` is 'captions' (every pair once
  per epoch) or 'videos' (one random caption per video). Long videos (> 12 frames)
  cluster after block 6 into `segments` segments (0: 4-frame segments) and use a
  smaller eval batch."""
  c = base_config()
  c.dataset = dataset
  c.train_split, c.val_split, c.eval_split = train_split, val_split, eval_split
  c.data.train_examples = train_examples
  if max_frames != 12:
    c.model = model_config(max_frames=max_frames)
    c.model.target_frames_blocks = (max_frames,) * 6 + (segments or max_frames // 4,) * 6
    c.eval.batch_size = 16
  c.model.max_words = max_words
  return c


def _fail(field: str, msg: str):
  raise ValueError(f"config.{field}: {msg}")


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
  if t.get("optimizer", "adamw") not in ("adamw", "bertadam"):
    _fail("train.optimizer", f"{t.optimizer!r} is not 'adamw' (the authors' AdamW runs) or "
          "'bertadam' (CLIP4Clip's BertAdam)")
  if t.get("freeze_layer_num", 0) < -1:
    _fail("train.freeze_layer_num", "must be >= -1 (-1 freezes nothing, 0 the embeddings)")
  if config.data.get("device_prefetch", 2) < 1:
    _fail("data.device_prefetch", "must be >= 1 (1 transfers each batch when it is needed)")
  if config.data.get("train_examples", "videos") not in ("captions", "videos"):
    _fail("data.train_examples", f"{config.data.train_examples!r} is not 'captions' (every "
          "(video, caption) pair once per epoch) or 'videos' (one random caption per video)")
  if t.lr <= 0 or t.coef_lr <= 0:
    _fail("train.lr", "train.lr and train.coef_lr must be > 0")
  if config.eval.batch_size < 1:
    _fail("eval.batch_size", "must be >= 1")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain JSON-able dict of a config (tuples become lists)."""
  return config.to_dict()
