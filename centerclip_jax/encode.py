r"""Embeddings for your own videos and captions.

  python -m centerclip_jax.encode --config configs/msrvtt.py \
      --config.init_from=/path/to/converted_or_trained \
      --videos a.mp4 b.avi frames.npy --captions captions.txt --output out.npz

`--videos` takes one or more files (and may be repeated). Videos: any file PyAV decodes
(decoded at `--fps`, default 3 as the datasets), or `.npy` arrays `[T, H, W, 3]` uint8 of
already extracted frames; they take the frame path evaluation uses
(`centerclip_jax.inference.encoder`). Captions: a UTF-8 text file, one caption per line.

Output `.npz`, local or `gs://` (the `.npz` suffix is added if missing):
`video_embeddings [V, D]`, `text_embeddings [C, D]` (float32, L2-normalised, input order),
`video_paths`, `captions`, `logit_scale` (already exp'ed). Logs go to `OUT.log` next to a
local output (for a bucket output to `$TMPDIR/centerclip_jax-logs/`), and to the console with
`--verbosity=1`. Bad input: one `error:` line, exit 2, before
any compute.
"""

from __future__ import annotations

import os
from typing import Sequence

from centerclip_jax import console  # pylint: disable=g-import-not-at-top
console.quiet_tensorflow()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags
import numpy as np

from centerclip_jax import config as config_lib
from centerclip_jax import console
from centerclip_jax import paths
from centerclip_jax.inference import encoder
from centerclip_jax.inference.encoder import InputError

MULTI_FLAGS = ("videos",)


def define_flags() -> dict:
  """The CLI's flags."""
  return {
      "config": config_flags.DEFINE_config_file("config", None,
                                                "Config file (configs/<name>.py)."),
      "videos": flags.DEFINE_multi_string(
          "videos", [], "Video files or .npy frame arrays (several after one flag, or the "
          "flag repeated)."),
      "captions": flags.DEFINE_string("captions", None, "Text file, one caption per line."),
      "output": flags.DEFINE_string("output", None, "Output .npz path."),
      "fps": flags.DEFINE_float("fps", 3.0, "Frame rate videos are decoded at before sampling."),
      "batch_size": flags.DEFINE_integer("batch_size", 8,
                                         "Videos / 32x captions per forward pass."),
  }


def expand_multi(argv: Sequence[str], names: Sequence[str] = MULTI_FLAGS) -> list[str]:
  """`--videos a b c` -> `--videos=a --videos=b --videos=c` (absl takes one value per
  flag); the values run up to the next argument that starts with '-'."""
  out, current = [], None
  for arg in argv:
    if current is not None and not arg.startswith("-"):
      out.append(f"--{current}={arg}")
      continue
    current = None
    name = arg.lstrip("-")
    if arg.startswith("-") and name in names:
      current = name
      continue
    if arg.startswith("-") and "=" in name and name.split("=", 1)[0] in names:
      current = name.split("=", 1)[0]
    out.append(arg)
  return out


def output_path(output: str):
  """The file the result goes to (`.npz` added as numpy does), checked writable; an
  `epath.Path`, local or gs://."""
  path = paths.user_path(output)
  if path.suffix != ".npz" and not path.is_dir():
    path = path.with_name(path.name + ".npz")
  return console.check_output_file(path, "--output")


def log_path(out):
  """`OUT.log` beside a local output; for a gs:// output, $TMPDIR/centerclip_jax-logs/<name>.log
  (logging cannot append to an object in a bucket)."""
  if paths.is_uri(out):
    return console.default_log_dir() / out.with_suffix(".log").name
  return out.with_suffix(".log")


def main(argv, cli_flags: dict):
  """`cli_flags`: the holders from `define_flags()`."""
  config, videos, captions_file, output, fps, batch_size = (
      cli_flags[k].value for k in ("config", "videos", "captions", "output", "fps",
                                   "batch_size"))
  if len(argv) > 1:
    console.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if config is None:
    console.fail("--config is required (e.g. --config configs/msrvtt.py)")
  if output is None:
    console.fail("--output OUT.npz is required")
  if not videos and not captions_file:
    console.fail("give --videos FILE [FILE ...] and/or --captions FILE")
  if batch_size < 1:
    console.fail(f"--batch_size must be >= 1, got {batch_size}")
  with console.errors_as_one_line(InputError, ValueError, FileNotFoundError):
    out = output_path(output)
    encoder.check_fps(fps)
    config_lib.validate(config)
    log = console.setup_logging(log_path(out))
    captions = encoder.read_captions(captions_file) if captions_file else []
    missing = [v for v in videos if not os.path.isfile(v)]
    if missing:
      raise InputError(f"--videos: {missing[0]}: no such file"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    console.say(f"encoding {len(videos)} video(s) and {len(captions)} caption(s) "
                f"(log: {log})")
    # pylint: disable-next=g-import-not-at-top
    from centerclip_jax.evaluation import evaluate as evaluate_lib
    result = encoder.encode(config, videos, captions, fps=fps, batch_size=batch_size)
    evaluate_lib.check_finite(result["video_embeddings"], list(videos), "encode: video")
    evaluate_lib.check_finite(result["text_embeddings"], captions, "encode: caption")
    with paths.staged_output(out) as local:  # written locally, then uploaded for gs://
      np.savez(os.fspath(local), **result)
  console.say(f"wrote {len(result['video_embeddings'])} video and "
              f"{len(result['text_embeddings'])} text embeddings to {out}")


if __name__ == "__main__":
  _cli_flags = define_flags()
  app.run(lambda argv: main(argv, _cli_flags),
          flags_parser=console.flags_parser(
              "config", lambda a: expand_multi(config_lib.normalize_switches(a))))
