r"""Embeddings for your own videos and captions.

  python -m centerclip_jax.encode --config configs/msrvtt.py \
      --config.init_from=/path/to/converted_or_trained \
      --videos a.mp4 b.avi frames.npy --captions captions.txt --output out.npz

Videos: any file PyAV decodes (decoded at `--fps`, default 3 as the datasets), or `.npy`
arrays `[T, H, W, 3]` uint8 of already extracted frames. `config.model.max_frames`
frames are sampled uniformly (`int(tick/2 + tick*i)`, `tick = T/max_frames`; shorter
videos repeat their last frame, masked), resized (shorter side, bicubic), centre-cropped
and CLIP-normalised. The clustering keys of `config.model` apply as in training.

Output `.npz`: `video_embeddings [V, D]`, `text_embeddings [C, D]` (float32,
L2-normalised, input order), `video_paths`, `captions`, `logit_scale` (already exp'ed).
"""

from __future__ import annotations

import logging
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from centerclip_jax.inference import encoder
from centerclip_jax.inference.encoder import InputError

def define_flags() -> dict:
  """The CLI's flags. Defined only when this module runs as a program, so that other
  CLIs (e.g. `centerclip_jax.search`) can import its functions without flag clashes."""
  return {
      "config": config_flags.DEFINE_config_file("config", None,
                                                "Config file (configs/<name>.py)."),
      "videos": flags.DEFINE_multi_string("videos", [], "Video files or .npy frame arrays."),
      "captions": flags.DEFINE_string("captions", None, "Text file, one caption per line."),
      "output": flags.DEFINE_string("output", None, "Output .npz path."),
      "fps": flags.DEFINE_float("fps", 3.0, "Frame rate videos are decoded at before sampling."),
      "batch_size": flags.DEFINE_integer("batch_size", 8,
                                         "Videos / 32x captions per forward pass."),
  }


def main(argv, cli_flags: dict):
  """`cli_flags`: the holders from `define_flags()`."""
  config, videos, captions_file, output, fps, batch_size = (
      cli_flags[k].value for k in ("config", "videos", "captions", "output", "fps",
                                   "batch_size"))
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if config is None:
    raise app.UsageError("--config is required (e.g. --config configs/msrvtt.py)")
  if output is None:
    raise app.UsageError("--output OUT.npz is required")
  if not videos and not captions_file:
    raise app.UsageError("give --videos and/or --captions")
  try:
    captions = encoder.read_captions(captions_file) if captions_file else []
    result = encoder.encode(config, videos, captions, fps=fps, batch_size=batch_size)
  except (InputError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out = pathlib.Path(output)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez(out, **result)
  logging.info("wrote %d video and %d text embeddings to %s",
               len(result["video_embeddings"]), len(result["text_embeddings"]), out)
  print(f"wrote {len(result['video_embeddings'])} video and "
        f"{len(result['text_embeddings'])} text embeddings to {out}")


if __name__ == "__main__":
  _cli_flags = define_flags()
  app.run(lambda argv: main(argv, _cli_flags))
