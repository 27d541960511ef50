"""The CenterCLIP model keys (`config.model`) and their validation against a CLIP architecture.

Key names follow the authors' CenterCLIP scripts, so their command lines port 1:1 (per-block
lists are tuples). `validate_model` rejects a bad `config.model` with a message naming the
field, before anything compiles; `cluster_settings` / `cluster_plan` turn the keys into the
clustering module's settings and steps.
"""

from __future__ import annotations

import ml_collections

from centerclip_jax.clustering import segments as segments_lib
from centerclip_jax.clustering import tome as tome_lib
from centerclip_jax.models import clip as clip_lib

SIM_HEADERS = ("meanP", "seqTransf")
DTYPES = ("float32", "bfloat16")


def model_config(max_frames: int = 12, num_blocks: int = 12,
                 tokens_per_frame: int = 49) -> ml_collections.ConfigDict:
  """CenterCLIP model keys (`config.model`), default `B6 - 4, 49` k-medoids++ on ViT-B/32."""
  m = ml_collections.ConfigDict()
  m.arch = "ViT-B/32"             # used for random init when config.init_from is empty
  m.clip_dims = ml_collections.ConfigDict()  # optional custom CLIPConfig fields (demo)
  m.dtype = "float32"             # compute dtype; params are always float32
  m.remat = False                 # recompute residual blocks in the backward (TPU/GPU; not CPU)
  m.max_frames = max_frames
  m.max_words = 32
  m.sim_header = "meanP"          # 'meanP' or 'seqTransf'
  m.seq_transformer_layers = 4    # seqTransf: layers copied from the CLIP text tower
  # Token clustering (names as in the authors' scripts).
  m.cluster_inter = 1             # 0 turns clustering off (the CLIP4Clip baseline)
  # 'kmedoids++' ('kmediods++'), 'spectral', 'pooling', 'sparse_sampling', 'tome'
  m.cluster_algo = "kmedoids++"
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
  # Token merging (cluster_algo='tome', clustering/tome.py): at each step a segment is
  # merged down to the same K tokens; `tome_r` (one int per block, () for none) also merges
  # r tokens per row before every later block, ToMe's own schedule.
  m.tome_r = ()
  m.tome_proportional_attention = True  # add log(token size) to the attention logits
  return m


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
        svd_correct_sign=bool(m.svd_correct_sign),
        proportional_attention=bool(m.get("tome_proportional_attention", True)))
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


def tome_schedule(m: ml_collections.ConfigDict, clip_config: clip_lib.CLIPConfig
                  ) -> tuple[int, ...]:
  """The per-block `tome_r` merges (all zeros unless cluster_algo is 'tome')."""
  tome_r = tuple(m.get("tome_r", ()) or ())
  steps = cluster_plan(m, clip_config)
  if any(tome_r) and cluster_settings(m).algo != "tome":
    _fail("model.tome_r", f"needs cluster_algo='tome', not {m.cluster_algo!r}")
  try:
    return tome_lib.check_schedule(tome_r, steps, clip_config.vision_layers,
                                   clip_config.num_patches)
  except ValueError as e:
    raise ValueError(f"config.model.{e}") from None


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
  if (m.sim_header == "seqTransf"
      and not 1 <= m.seq_transformer_layers <= clip_config.transformer_layers):
    _fail("model.seq_transformer_layers",
          f"must be in [1, {clip_config.transformer_layers}] (copied from the text tower)")
  cluster_settings(m)
  cluster_plan(m, clip_config)
  tome_schedule(m, clip_config)
