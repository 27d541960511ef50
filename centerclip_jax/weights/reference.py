"""The reference PyTorch CLIP (clip-anytorch) and the Flax-vs-PyTorch numerics check.

Used by `tools/convert_clip_weights.py --verify` and the parity tests; needs torch and
`pip install --no-deps clip-anytorch==2.6.0` (both in the test requirements).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Mapping, Optional

import jax
import numpy as np

from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import torch_files

CLIPConfig = clip_lib.CLIPConfig


def reference_clip_module():
  """clip-anytorch's `clip/model.py` (the reference PyTorch CLIP), loaded on its own.

  `import clip.model` would run `clip/__init__.py`, which needs torchvision and
  pkg_resources; `model.py` itself needs only torch and numpy.
  """
  name = "_centerclip_reference_clip_model"
  if name not in sys.modules:
    spec = importlib.util.find_spec("clip")
    path = (Path(list(spec.submodule_search_locations)[0]) / "model.py"
            if spec and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
      raise ImportError("the reference PyTorch CLIP needs clip-anytorch: "
                        "pip install --no-deps clip-anytorch==2.6.0")
    torch_files.import_torch()
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name]


def random_inputs(config: CLIPConfig, num: int = 2, seed: int = 0, length: Optional[int] = None):
  """Random images [num, res, res, 3] float32 and token ids [num, length] int32.

  Each text is random ids, the EOT id (vocab_size - 1, the largest) at a random position,
  then zero padding, as the CLIP tokenizer produces.
  """
  rng = np.random.default_rng(seed)
  length = length or config.context_length
  res = config.image_resolution
  images = rng.standard_normal((num, res, res, 3)).astype(np.float32)
  text = np.zeros((num, length), np.int32)
  for i in range(num):
    eot = int(rng.integers(1, length))
    text[i, :eot] = rng.integers(1, config.vocab_size - 1, eot)
    text[i, eot] = config.vocab_size - 1
  return images, text


def verify_against_torch(config: CLIPConfig, clip_state_dict: Mapping[str, np.ndarray], params,
                         num: int = 2, seed: int = 0) -> dict[str, float]:
  """Max abs difference of image and text features, reference PyTorch CLIP vs Flax (fp32).

  The reference is `clip.model.CLIP` built from `config` and loaded (strictly) with the
  float32 OpenAI-layout `clip_state_dict`; `build_model` is avoided since it rounds to fp16.
  """
  torch = torch_files.import_torch()
  model = reference_clip_module().CLIP(**dataclasses.asdict(config)).eval()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32))
                         for k, v in clip_state_dict.items()}, strict=True)
  images, text = random_inputs(config, num, seed)
  with torch.no_grad():
    ref_image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ref_text = model.encode_text(torch.from_numpy(text).long()).numpy()
  flax_model = clip_lib.CLIP(config)
  variables = {"params": params}
  # Full float32 matmuls: on GPUs, XLA's default would use TF32 and differ by ~1e-3.
  with jax.default_matmul_precision("highest"):
    apply = lambda method: jax.jit(functools.partial(flax_model.apply, method=method))
    out_image = apply("encode_image")(variables, images)
    out_text = apply("encode_text")(variables, text)
  return {"image": float(np.max(np.abs(np.asarray(out_image) - ref_image))),
          "text": float(np.max(np.abs(np.asarray(out_text) - ref_text)))}
