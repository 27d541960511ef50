"""Converts a PyTorch CLIP checkpoint to the Flax CLIP (an orbax checkpoint directory).

  python tools/convert_clip_weights.py --input ~/models/ViT-B-32.pt --output weights/vit_b32
  python tools/convert_clip_weights.py --input ckpt.best.pth.tar --output weights/ft --verify

Inputs: OpenAI's TorchScript archives (`ViT-B-32.pt`, `ViT-B-16.pt`, ...), plain state dicts,
and CLIP4Clip / CenterCLIP training checkpoints (their non-CLIP tensors are kept as extras).
The output directory holds `params/` (orbax: {'params', 'extras'}), `clip_config.json` and
`conversion.json`; load it with `centerclip_jax.weights.porting.load_converted`.
`--verify` runs the reference PyTorch CLIP (clip-anytorch) and the Flax model on the same
random inputs and fails if the features differ by more than 1e-4.

Exit status: 0 done, 1 not a usable CLIP checkpoint, 2 --output exists (see --overwrite),
3 verification failed, 4 verification impossible (clip-anytorch missing).
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from centerclip_jax import paths
from centerclip_jax import console  # pylint: disable=g-import-not-at-top
from centerclip_jax.weights import porting  # pylint: disable=g-import-not-at-top
from centerclip_jax.weights import reference  # pylint: disable=g-import-not-at-top

VERIFY_TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, type=paths.user_path,
                      help="PyTorch checkpoint file (local or gs://)")
  parser.add_argument("--output", required=True, type=paths.user_path,
                      help="directory to create (local or gs://)")
  parser.add_argument("--verify", action="store_true",
                      help="compare with the reference PyTorch CLIP on random inputs")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing converted checkpoint at --output")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  log = logging.getLogger("convert_clip_weights")
  if args.output.exists() and not args.overwrite:
    log.error("%s exists; pass --overwrite to replace it", args.output)
    return 2
  if args.input.is_dir():
    log.error("--input: %s is a folder; give the checkpoint file (e.g. ViT-B-32.pt)",
              args.input)
    return 1
  try:  # before reading a large input: the output's folder must be writable
    console.make_writable_dir(args.output.parent, "--output")
  except console.UsageError as e:
    log.error("%s", e)
    return 2
  start = time.perf_counter()
  try:
    with paths.local_copy(args.input) as local:  # torch reads local files only
      state, kind = porting.read_torch_checkpoint(local)
    config, params, extras, report = porting.torch_to_flax(state)
  except porting.CheckpointError as e:
    log.error("%s", e if str(e).startswith(str(args.input)) else f"{args.input}: {e}")
    return 1
  arch = (f"matches preset {report.preset}" if report.preset else "no preset matches")
  log.info("read %s (%s, key prefix %r): ViT, %s", args.input, kind, report.prefix, arch)
  log.info("architecture: %s", config.to_json().replace("\n", ""))
  log.info("%.1fM CLIP parameters", report.num_params / 1e6)
  for name, shape in report.extras.items():
    log.info("extra tensor %s %s", name, list(shape))
  for name in report.ignored:
    log.info("ignored non-float buffer %s", name)
  clip_state = porting.split_clip_state_dict(state)[0] if args.verify else None
  del state  # the float32 copy of the source is only needed again by --verify
  metadata = porting.conversion_metadata(args.input, kind, report)
  try:
    out = porting.save_converted(args.output, config, params, extras, metadata,
                                 overwrite=args.overwrite)
  except FileExistsError as e:
    log.error("%s", e)
    return 2
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  log.info("wrote %s in %.1f s (peak RSS %.0f MiB)", out, time.perf_counter() - start, peak_mib)
  if args.verify:
    try:
      diffs = reference.verify_against_torch(config, clip_state, params)
    except ImportError as e:
      log.error("cannot verify: %s", e)
      return 4
    log.info("verify: max abs diff image features %.2e, text features %.2e (tolerance %.0e)",
             diffs["image"], diffs["text"], VERIFY_TOLERANCE)
    if max(diffs.values()) > VERIFY_TOLERANCE:
      log.error("verification FAILED: the Flax model does not match the PyTorch reference")
      return 3
  return 0


if __name__ == "__main__":
  # Progress on stdout, warnings and errors (one line each) on stderr.
  _out, _err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
  _out.addFilter(lambda record: record.levelno < logging.WARNING)
  _err.setLevel(logging.WARNING)
  for _h in (_out, _err):
    _h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
  logging.basicConfig(level=logging.WARNING, handlers=[_out, _err])
  logging.getLogger("convert_clip_weights").setLevel(logging.INFO)
  sys.exit(main())
