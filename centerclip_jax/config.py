"""The configuration every `configs/<name>.py` starts from, and its validation.

Configs are code: each file in `configs/` defines `get_config()` that calls
`base_config()` and changes what its dataset needs. Model keys keep the names of the
authors' CenterCLIP scripts so that those port 1:1 (per-block lists are tuples, so that
`--config.model.target_frames_blocks='(12,12,12,12,12,12,4,4,4,4,4,4)'` works).
`validate(config)` rejects a bad config with a message naming the field, before anything
is compiled; `validate_mesh` does the same for the device and host counts.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import ml_collections

from centerclip_jax.models import clip as clip_lib
from centerclip_jax.models import settings as settings_lib
from centerclip_jax.models.settings import model_config  # re-exported for configs/

MODES = ("train_and_eval", "train", "eval")
# On/off keys: the authors' scripts pass 0/1, Python configs True/False; both work on the
# command line (`normalize_switches`).
SWITCHES = ("allow_random_init", "model.cluster_inter", "model.pre_norm",
            "model.cluster_embedding", "model.svd_correct_sign", "model.remat", "eval.dsl")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every dataset config (MSR-VTT recipe of the paper)."""
  c = ml_collections.ConfigDict()
  c.mode = "train_and_eval"
  c.seed = 42
  c.init_from = ""                # converted CLIP checkpoint dir (tools/convert_clip_weights.py)
  c.allow_random_init = False     # init_from empty: random weights only when this is True
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
  # Non-finite loss or gradients: False stops the run, True skips the update.
  c.train.skip_nonfinite = False
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64          # videos (and captions) per eval batch, global
  c.eval.dsl = True               # also report dual-softmax re-scored metrics
  c.data = ml_collections.ConfigDict()
  c.data.decode_short_side = 224  # videos -> frames (encode, search): the datasets' short side
  c.data.jpeg_quality = 95        # encode/search/visualize store sampled frames as the datasets do
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
  if not config.init_from and not config.get("allow_random_init", False):
    _fail("init_from", "is empty, so the model would have RANDOM weights. Convert OpenAI CLIP "
          "weights (`python tools/convert_clip_weights.py --input ViT-B-32.pt --output DIR`) "
          "and pass --config.init_from=DIR (or a training workdir), or set "
          "--config.allow_random_init=True")
  if not config.init_from:  # the architecture is known now: check the model keys against it
    if config.model.get("clip_dims"):
      try:
        arch = clip_lib.CLIPConfig.from_dict(config.model.clip_dims.to_dict())
      except (TypeError, ValueError) as e:
        _fail("model.clip_dims", str(e))
    else:
      arch = clip_lib.get_preset(config.model.arch)
    settings_lib.validate_model(config.model, arch)
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
  if not 0 <= config.data.get("jpeg_quality", 95) <= 100:
    _fail("data.jpeg_quality", "must be in 0..100: the JPEG quality the datasets store frames "
          "at (prepare_data's, 95), which encode/search/visualize apply too; 0 skips it")
  if t.lr <= 0 or t.coef_lr <= 0:
    _fail("train.lr", "train.lr and train.coef_lr must be > 0")
  if config.eval.batch_size < 1:
    _fail("eval.batch_size", "must be >= 1")


def validate_mesh(config: ml_collections.ConfigDict, num_devices: int,
                  num_processes: int = 1) -> None:
  """Rejects a training batch that does not split over the devices and hosts.

  Each train step feeds `global_batch_size / grad_accum_steps` examples, sharded over
  every device (and fed by every host in equal parts). Evaluation has no such constraint:
  it pads its batches to a multiple of the device count (`eval_batch_size`).
  """
  if config.mode not in ("train", "train_and_eval"):
    return
  t = config.train
  micro = t.global_batch_size // max(1, t.grad_accum_steps)
  need = math.lcm(num_devices, num_processes)
  if micro % need:
    lower, upper = (micro // need) * need, (micro // need + 1) * need
    sizes = " or ".join(str(b * t.grad_accum_steps) for b in (lower, upper) if b > 0)
    per_step = (f"config.train.global_batch_size={t.global_batch_size} / "
                f"config.train.grad_accum_steps={t.grad_accum_steps} = {micro}"
                if t.grad_accum_steps > 1 else
                f"config.train.global_batch_size={t.global_batch_size}")
    _fail("train.global_batch_size",
          f"{per_step} examples per step do not split over {num_devices} device(s) on "
          f"{num_processes} host(s); use a multiple of {need * t.grad_accum_steps} "
          f"(e.g. {sizes}) or run on a divisor of it")


def eval_batch_size(batch_size: int, num_devices: int) -> int:
  """`config.eval.batch_size` rounded up to a multiple of the device count (the padded
  rows are masked out), so any eval batch runs on any number of devices."""
  return math.ceil(batch_size / num_devices) * num_devices


def normalize_switches(argv: Sequence[str], prefix: str = "--config.") -> list[str]:
  """Command line with `True/False/true/false/yes/no` of the `SWITCHES` written as 1/0.

  An int key (`model.cluster_inter`, 0/1 as in the authors' scripts) and a bool key then
  both accept either spelling (absl parses 1/0 for both).
  """
  names = "|".join(re.escape(prefix + k) for k in SWITCHES)
  pattern = re.compile(rf"^({names})=(true|false|yes|no)$", re.IGNORECASE)
  values = {"true": "1", "yes": "1", "false": "0", "no": "0"}
  out = []
  args = list(argv)
  for i, arg in enumerate(args):
    m = pattern.match(arg)
    if m:
      arg = f"{m.group(1)}={values[m.group(2).lower()]}"
    elif (i > 0 and re.fullmatch(names, args[i - 1])
          and arg.lower() in values):
      arg = values[arg.lower()]
    out.append(arg)
  return out
