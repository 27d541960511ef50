"""Flax CLIP vs the reference PyTorch CLIP (clip-anytorch), through the weight converter.

Random weights at the real ViT-B/32 and ViT-B/16 shapes, written as a plain state dict and
as an OpenAI-style fp16 TorchScript archive, read back with `porting.read_torch_checkpoint`
and `porting.torch_to_flax`. The fp16 archive is compared with the reference holding the
same fp16-rounded weights in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centerclip_jax.models import clip as clip_lib
from centerclip_jax.models import layers
from centerclip_jax.weights import porting
from tests import torch_checkpoints as tc

ARCHS = ("ViT-B/32", "ViT-B/16")
FORMATS = ("state_dict", "torchscript")
ATOL = 1e-4
EOT_77 = (5, 40, 76)
EOT_32 = (3, 17, 31)


@dataclasses.dataclass
class Case:
  config: clip_lib.CLIPConfig
  images: np.ndarray        # [3, 224, 224, 3]
  text77: np.ndarray        # [3, 77]
  text32: np.ndarray        # [3, 32]
  text32_padded: np.ndarray  # [3, 77], text32 followed by zeros
  ref: dict                 # format -> name -> reference output
  params: dict              # format -> converted Flax params
  kinds: dict               # format -> source kind reported by the reader
  configs: dict             # format -> inferred CLIPConfig


def _reference_outputs(model, inputs, full: bool, with_logits: bool) -> dict:
  """Reference outputs; `full` adds the length-32 texts, `with_logits` the logits."""
  images, text77, text32, text32_padded = inputs
  out = {"image": tc.torch_image_features(model, images),
         "text77": tc.torch_text_features(model, text77),
         "logit_scale": float(model.logit_scale.detach())}
  if full:
    out["text32"] = tc.torch_text_features(model, text32)
    out["text32_padded"] = tc.torch_text_features(model, text32_padded)
  if with_logits:
    out["logits"] = tc.torch_logits(model, images, text77)
  return out


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory) -> Case:
  config = clip_lib.PRESETS[request.param]
  images = tc.make_images(config, 3, seed=0)
  text77 = tc.make_text(config, EOT_77, 77, seed=1)
  text32 = tc.make_text(config, EOT_32, 32, seed=2)
  text32_padded = np.pad(text32, ((0, 0), (0, 77 - 32)))
  inputs = (images, text77, text32, text32_padded)
  folder = tmp_path_factory.mktemp(request.param.replace("/", "-"))
  files = {"state_dict": folder / "plain.pt", "torchscript": folder / "openai_style.pt"}

  model = tc.reference_model(config, seed=0)
  ref = {"state_dict": _reference_outputs(model, inputs, True, request.param == ARCHS[0])}
  tc.write_state_dict(model, files["state_dict"])
  half_names = tc.round_to_fp16_(model)
  assert len(half_names) > 4 * (config.vision_layers + config.transformer_layers)
  ref["torchscript"] = _reference_outputs(model, inputs, False, False)
  tc.write_torchscript(model, files["torchscript"], half_names)
  del model

  params, kinds, configs = {}, {}, {}
  for fmt, path in files.items():
    state, kinds[fmt] = porting.read_torch_checkpoint(path)
    configs[fmt], params[fmt], extras, _ = porting.torch_to_flax(state)
    assert extras == {}
    del state
    path.unlink()
  return Case(config, images, text77, text32, text32_padded, ref, params, kinds, configs)


@functools.lru_cache(maxsize=None)
def _flax_fns(config: clip_lib.CLIPConfig, dtype=jnp.float32):
  """Jitted (encode_image, encode_text, logits_per_image) of the Flax CLIP."""
  model = clip_lib.CLIP(config, dtype)

  def jitted(method, index=None):
    def fn(params, *args):
      with jax.default_matmul_precision("highest"):  # no TF32 if run on a GPU
        out = model.apply({"params": params}, *args, method=method)
      return out if index is None else out[index]
    return jax.jit(fn)
  return jitted("encode_image"), jitted("encode_text"), jitted("__call__", 0)


def _max_diff(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _cosine(a, b) -> np.ndarray:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_and_inferred_architecture(case, fmt):
  assert case.kinds[fmt] == fmt
  assert case.configs[fmt] == case.config
  assert porting.preset_name(case.configs[fmt]) in ARCHS
  np.testing.assert_array_equal(case.params[fmt]["logit_scale"],
                                np.float32(case.ref[fmt]["logit_scale"]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_features(case, fmt):
  image_fn, _, _ = _flax_fns(case.config)
  out = image_fn(case.params[fmt], case.images)
  assert out.shape == (3, case.config.embed_dim)
  diff = _max_diff(out, case.ref[fmt]["image"])
  print(f"image {case.config.vision_patch_size} {fmt}: max abs diff {diff:.2e}")
  assert diff <= ATOL
  # Not trivially close: the features vary across images and are O(1).
  assert np.std(case.ref[fmt]["image"]) > 0.1


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_features(case, fmt):
  _, text_fn, _ = _flax_fns(case.config)
  out = text_fn(case.params[fmt], case.text77)
  diff = _max_diff(out, case.ref[fmt]["text77"])
  print(f"text77 {case.config.vision_patch_size} {fmt}: max abs diff {diff:.2e}")
  assert diff <= ATOL
  assert np.std(case.ref[fmt]["text77"]) > 0.1


def test_text_length_32_matches_padded_77(case):
  """CLIP4Clip feeds 32 tokens; the EOT feature must equal the 77-padded one."""
  _, text_fn, _ = _flax_fns(case.config)
  params, ref = case.params["state_dict"], case.ref["state_dict"]
  short = text_fn(params, case.text32)
  padded = text_fn(params, case.text32_padded)
  diffs = [_max_diff(short, ref["text32"]), _max_diff(short, ref["text32_padded"]),
           _max_diff(padded, ref["text32_padded"])]
  print(f"text32 {case.config.vision_patch_size}: max abs diffs {diffs}")
  assert max(diffs) <= ATOL


@pytest.mark.parametrize("case", ARCHS[:1], indirect=True)  # once: the head is shared
def test_logits(case):
  _, _, logits_fn = _flax_fns(case.config)
  out = logits_fn(case.params["state_dict"], case.images, case.text77)
  ref = case.ref["state_dict"]["logits"]
  assert out.shape == (3, 3)
  # logit_scale = log(20): logits are 20 * cosine, so 1e-3 is 5e-5 in cosine.
  diff = _max_diff(out, ref)
  print(f"logits: max abs diff {diff:.2e} (scale {np.exp(case.ref['state_dict']['logit_scale']):.1f})")
  assert diff <= 1e-3
  assert np.ptp(ref) > 0.2  # the logits do differ between pairs


@pytest.mark.parametrize("case", ARCHS[:1], indirect=True)  # once: same code at any shape
def test_bfloat16_compute(case):
  image_fn, text_fn, _ = _flax_fns(case.config, jnp.bfloat16)
  params, ref = case.params["state_dict"], case.ref["state_dict"]
  image, text = image_fn(params, case.images), text_fn(params, case.text77)
  assert image.dtype == jnp.float32 and text.dtype == jnp.float32
  cos_image, cos_text = _cosine(image, ref["image"]), _cosine(text, ref["text77"])
  print(f"bfloat16 cosine: image {cos_image.min():.5f} text {cos_text.min():.5f}")
  assert cos_image.min() > 0.99 and cos_text.min() > 0.99
  # bfloat16 really ran: the result is not bit-identical to float32.
  assert _max_diff(image, ref["image"]) > 1e-5


def test_patch_embed_value_and_grads_equal_the_strided_conv():
  """`layers.patch_project` (patchify + matmul, custom VJP) vs `lax.conv` and its autodiff."""
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.standard_normal((3, 16, 24, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((8, 8, 3, 5)) * 0.1, jnp.float32)
  probe = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)

  def conv(x, k):
    y = jax.lax.conv_general_dilated(x, k, (8, 8), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision="highest")
    return y.reshape(3, -1, 5)

  ours = lambda x, k: layers.patch_project(x, k, 8)
  np.testing.assert_allclose(ours(images, kernel), conv(images, kernel), atol=1e-5)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * probe)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(images, kernel)
  g_conv = jax.grad(loss(conv), argnums=(0, 1))(images, kernel)
  for a, b in zip(g_ours, g_conv):
    assert np.abs(np.asarray(b)).max() > 0.1
    np.testing.assert_allclose(a, b, atol=1e-5)
