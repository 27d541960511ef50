"""Build a video-text TFDS dataset from its manually downloaded files.

  python tools/prepare_data.py msrvtt --manual_dir RAW --data_dir OUT \
      [--num_workers N] [--fps 3] [--short_side 224] [--keep_frame_cache] \
      [--overwrite] [--benchmark]

Datasets: msrvtt, msvd, lsmdc, activitynet_captions, didemo (each builder's
MANUAL_DOWNLOAD_INSTRUCTIONS describe what RAW must hold). Videos are decoded
with PyAV in `--num_workers` processes (default: all cores) at `--fps`, shorter
side `--short_side`, and stored as JPEG frames. Decoded videos are cached in
OUT/downloads/centerclip_frames/<name> so that an interrupted build restarts
fast; the cache is deleted after a successful build unless --keep_frame_cache.
Prints the examples per split, the skipped videos (missing / undecodable, also
kept in the dataset's metadata.json) and the build time per video;
`--benchmark` then times the tf.data training pipeline on the built data.

TFDS CLI alternative (default config fps3_224, all cores, cache kept):

  tfds build msrvtt --imports centerclip_jax.data.datasets \
      --manual_dir RAW --data_dir OUT [--config fps3_224] [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Runnable from a checkout without installing the package. Only light imports at
# module level: decode workers are spawned and re-import this file.


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset", help="msrvtt, msvd, lsmdc, activitynet_captions or didemo")
  parser.add_argument("--manual_dir", required=True, help="the raw (downloaded) files")
  parser.add_argument("--data_dir", required=True, help="where TFDS writes the dataset")
  parser.add_argument("--num_workers", type=int, default=0,
                      help="decoding processes (default 0: all cores)")
  parser.add_argument("--fps", type=float, default=3.0, help="frames per second to keep")
  parser.add_argument("--short_side", type=int, default=224, help="shorter side in pixels")
  parser.add_argument("--keep_frame_cache", action="store_true",
                      help="keep the decoded-frame cache after a successful build")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild even if the dataset already exists")
  parser.add_argument("--benchmark", action="store_true",
                      help="time the tf.data training pipeline on the built data")
  parser.add_argument("--benchmark_batches", type=int, default=20)
  parser.add_argument("--benchmark_batch_size", type=int, default=32)
  return parser.parse_args(argv)


def _benchmark(builder, args) -> None:
  try:
    from centerclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"benchmark unavailable: centerclip_jax.data.pipeline cannot be imported ({e})")
    return
  if not hasattr(pipeline, "benchmark"):
    print("benchmark unavailable: centerclip_jax.data.pipeline has no benchmark()")
    return
  splits = list(builder.info.splits)
  split = next((s for s in splits if s.startswith("train")), splits[0])
  stats = pipeline.benchmark(builder, split, batch_size=args.benchmark_batch_size,
                             num_batches=args.benchmark_batches)
  print(f"tf.data pipeline on {builder.name}/{split} (batch {stats['batch_size']}, "
        f"{stats['max_frames']} frames at {stats['resolution']} px): "
        f"{stats['videos_per_s']:.1f} videos/s on {stats['cores']} cores = "
        f"{stats['videos_per_s_per_core']:.1f} videos/s per core "
        f"({stats['videos_per_cpu_s']:.1f} videos per CPU second)")


def main(argv=None) -> int:
  args = parse_args(argv)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from centerclip_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from centerclip_jax.data.datasets import common  # pylint: disable=g-import-not-at-top

  if args.dataset not in datasets.BUILDERS:
    print(f"unknown dataset {args.dataset!r}; choose one of {sorted(datasets.BUILDERS)}",
          file=sys.stderr)
    return 2
  if not os.path.isdir(args.manual_dir):
    print(f"--manual_dir {args.manual_dir} is not a folder", file=sys.stderr)
    return 2
  cls = datasets.BUILDERS[args.dataset]
  name = common.config_name(args.fps, args.short_side)
  config = cls.builder_configs.get(name) or common.VideoTextConfig(
      fps=args.fps, short_side=args.short_side)
  builder = cls(data_dir=args.data_dir, config=config, num_workers=args.num_workers,
                keep_frame_cache=args.keep_frame_cache)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  existed = builder.data_path.exists() and not args.overwrite
  start = time.perf_counter()
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=args.manual_dir, download_mode=mode, try_download_gcs=False))
  except (ValueError, FileNotFoundError) as e:  # Bad annotations or layout.
    print(f"error: {e}", file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start

  info = builder.info
  print(f"\n{builder.name}/{builder.builder_config.name} in {builder.data_dir}")
  total = 0
  for split, split_info in sorted(info.splits.items()):
    print(f"  {split}: {split_info.num_examples} videos")
    total += split_info.num_examples
  metadata = info.metadata or {}
  if metadata.get("empty_splits"):
    print(f"  left out (no readable video): {', '.join(metadata['empty_splits'])}")
  print("skipped videos:\n  " + common.skip_report(metadata).replace("\n", "\n  "))
  if existed:
    print("(already built: nothing was decoded; pass --overwrite to rebuild)")
  else:
    decode = metadata.get("decode", {})
    videos = max(decode.get("videos", 0), 1)
    print(f"build time {seconds:.1f} s for {decode.get('videos')} distinct video files = "
          f"{seconds / videos:.3f} s per video (decoding {decode.get('seconds', 0):.1f} s "
          f"in {decode.get('workers')} processes = {decode.get('seconds', 0) / videos:.3f} "
          "s per video)")
  if args.benchmark:
    _benchmark(builder, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
