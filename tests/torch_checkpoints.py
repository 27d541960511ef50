"""Test helpers: reference PyTorch CLIPs with random weights, written as checkpoints.

Formats written, as the converter meets them in the wild:
  * a plain state dict (`torch.save(model.state_dict())`);
  * a TorchScript archive made like OpenAI's: traced, the tensors that
    `clip.model.convert_weights` makes fp16 stored as fp16, integer entries
    `input_resolution`, `context_length`, `vocab_size`, saved with `torch.jit.save`;
  * a CenterCLIP / CLIP4Clip training checkpoint: `{'state_dict': {'module.clip.<key>': ...,
    'module.frame_position_embeddings.weight': ..., ...}, 'epoch': ..., 'optimizer': ...}`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from centerclip_jax.weights import reference
from centerclip_jax.models.clip import CLIPConfig

# Small but complete: 2 heads per tower, 2 blocks each, 4x4 patches grid.
TINY = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
                  vision_patch_size=8, context_length=16, vocab_size=100,
                  transformer_width=128, transformer_heads=2, transformer_layers=2)


def reference_model(config: CLIPConfig, seed: int = 0) -> torch.nn.Module:
  """`clip.model.CLIP` (float32, eval) with random weights; every kind of tensor is non-trivial.

  Besides `initialize_parameters`, LayerNorm scales/biases and all Linear/attention biases
  (zeros or ones at init) are perturbed, and logit_scale is moved off its default.
  """
  ref = reference.reference_clip_module()
  with torch.random.fork_rng():
    torch.manual_seed(seed)
    model = ref.CLIP(**dataclasses.asdict(config)).eval()
    with torch.no_grad():
      for name, p in model.named_parameters():
        if ".ln_" in name or name.startswith("ln_"):
          p.add_(0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
          p.copy_(0.05 * torch.randn_like(p))
      model.logit_scale.fill_(math.log(1 / 0.05))
  return model


def round_to_fp16_(model: torch.nn.Module) -> list[str]:
  """In place: rounds the tensors that OpenAI's archives store in fp16; returns their names.

  The model stays float32 (it is the fp32 reference for an fp16 archive); the names are
  those that `clip.model.convert_weights` turns to fp16.
  """
  reference.reference_clip_module().convert_weights(model)
  names = [k for k, v in model.state_dict().items() if v.dtype == torch.float16]
  model.float()
  return names


def write_state_dict(model: torch.nn.Module, path: Path, dtype=None) -> Path:
  sd = model.state_dict()
  if dtype is not None:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
  torch.save(sd, path)
  return path


def write_torchscript(model: torch.nn.Module, path: Path, half_names=()) -> Path:
  """Saves `model` traced, like OpenAI's archives: tensors in `half_names` stored as fp16,
  plus the integer entries `input_resolution`, `context_length`, `vocab_size`.

  Only `encode_text` is traced, in float32 (cheap on CPU); the archive holds every
  parameter all the same. The `half_names` tensors should already be fp16-exact
  (`round_to_fp16_`); `model` is left as it was.
  """
  ints = {"input_resolution": model.visual.input_resolution,
          "context_length": model.context_length, "vocab_size": model.vocab_size}
  text = torch.zeros(1, ints["context_length"], dtype=torch.long)
  del model.context_length, model.vocab_size  # plain attributes in clip.model; buffers here
  try:
    for name, value in ints.items():
      model.register_buffer(name, torch.tensor(value))
    with torch.no_grad(), warnings.catch_warnings():
      warnings.simplefilter("ignore", torch.jit.TracerWarning)
      traced = torch.jit.trace_module(model, {"encode_text": text}, check_trace=False)
  finally:
    for name in ints:
      delattr(model, name)
    model.context_length, model.vocab_size = ints["context_length"], ints["vocab_size"]
  params = dict(traced.named_parameters())  # shared with `model`: restored below
  try:
    for name in half_names:
      params[name].data = params[name].data.half()
    torch.jit.save(traced, str(path))
  finally:
    for name in half_names:
      params[name].data = params[name].data.float()
  return path


def finetuned_extras(config: CLIPConfig, seed: int = 1) -> dict[str, torch.Tensor]:
  """Non-CLIP tensors of a CenterCLIP checkpoint (seqTransf head, cluster embedding, buffer)."""
  g = torch.Generator().manual_seed(seed)
  width = config.transformer_width
  return {
      "frame_position_embeddings.weight": torch.randn(config.context_length, width, generator=g),
      "transformerClip.resblocks.0.attn.in_proj_weight": torch.randn(3 * width, width, generator=g),
      "transformerClip.resblocks.0.ln_1.weight": torch.randn(width, generator=g),
      "clip.visual.transformer.resblocks.1.tokencluster_inter.cluster_embed":
          torch.randn(4, config.vision_width, generator=g),
      "clip.visual.position_ids": torch.arange(config.num_patches + 1)[None],
  }


def write_finetuned(model: torch.nn.Module, path: Path, ddp: bool = True) -> dict[str, torch.Tensor]:
  """Writes a CenterCLIP-style `ckpt.best.pth.tar`; returns its extras (without 'module.')."""
  extras = finetuned_extras(_config_of(model))
  lead = "module." if ddp else ""
  sd = {f"{lead}clip.{k}": v for k, v in model.state_dict().items()}
  sd.update({lead + k: v for k, v in extras.items()})
  ckpt = {"epoch": 3, "global_step": 120, "arch": "CLIp4Clip", "best_acc1": np.float64(44.1),
          "state_dict": sd,
          "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                        "param_groups": [{"lr": 1e-4, "weight_decay": 0.2, "params": [0]}]}}
  torch.save(ckpt, path)
  return extras


def _config_of(model: torch.nn.Module) -> CLIPConfig:
  return CLIPConfig.from_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})


def torch_image_features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """Reference image features [n, embed_dim]; images [n, H, W, 3] (NHWC, as the Flax model)."""
  with torch.no_grad():
    return model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def torch_text_features(model: torch.nn.Module, text: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model.encode_text(torch.from_numpy(text).long()).numpy()


def torch_logits(model: torch.nn.Module, images: np.ndarray, text: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    logits, _ = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                      torch.from_numpy(text).long())
  return logits.numpy()


def make_images(config: CLIPConfig, num: int, seed: int = 0) -> np.ndarray:
  """Random CLIP-normalised images [num, res, res, 3] float32 (NHWC)."""
  res = config.image_resolution
  return np.random.default_rng(seed).standard_normal((num, res, res, 3)).astype(np.float32)


def make_text(config: CLIPConfig, eot_positions, length: int, seed: int = 0) -> np.ndarray:
  """Token ids [len(eot_positions), length]: random ids, EOT (the largest id), zero padding."""
  rng = np.random.default_rng(seed)
  text = np.zeros((len(eot_positions), length), np.int32)
  for i, eot in enumerate(eot_positions):
    text[i, :eot] = rng.integers(1, config.vocab_size - 1, eot)
    text[i, eot] = config.vocab_size - 1
  return text
