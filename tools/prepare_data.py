"""Build a video-text TFDS dataset from its manually downloaded files.

  python tools/prepare_data.py msrvtt --manual_dir RAW --data_dir OUT \
      [--num_workers N] [--fps 3] [--short_side 224] [--keep_frame_cache] \
      [--overwrite] [--benchmark]
      [--beam_runner DirectRunner|DataflowRunner|... [--beam_pipeline_options K=V,...]]
  python tools/prepare_data.py msrvtt --data_dir OUT --verify

Datasets: msrvtt, msvd, lsmdc, activitynet_captions, didemo (each builder's
MANUAL_DOWNLOAD_INSTRUCTIONS describe what RAW must hold). The annotation files
are checked first; videos are then decoded with PyAV in `--num_workers`
processes (default: all cores) at `--fps`, shorter side `--short_side`, and
stored as JPEG frames. Decoded videos are cached in
OUT/downloads/centerclip_frames/<name> so that an interrupted build restarts
fast; the cache is deleted after a successful build unless --keep_frame_cache.
Prints the build report (per split: videos listed, written, missing,
undecodable, short; the first ids of each list; every id is in
build_report.txt in the dataset's folder) and the build time per video;
`--benchmark` then times the tf.data training pipeline on the built data.
`--beam_runner` builds in an Apache Beam pipeline instead (TFDS's distributed
path; `pip install -r requirements-beam.txt`): the same examples and report.
`--verify` reads every example of a built dataset, decodes every frame and
lists the bad ones (exit status 1 if any).

Both folders may be in a bucket (`gs://...`). From a bucket --manual_dir the
annotations are read in place, and each named video is copied to $TMPDIR by the
process (pool worker or Beam worker) that decodes it, and removed once decoded:
local disk holds one video per worker, never the dataset, and a Beam runner's
workers (Dataflow) need nothing but the bucket. The reports name bucket paths.

TFDS CLI alternative (default config fps3_224, all cores, cache kept):

  tfds build msrvtt --imports centerclip_jax.data.datasets \
      --manual_dir RAW --data_dir OUT [--config fps3_224] [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Only light imports at module level: decode workers are spawned and re-import this file.


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset", help="msrvtt, msvd, lsmdc, activitynet_captions or didemo")
  parser.add_argument("--manual_dir", help="the raw (downloaded) files (not for --verify)")
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
  parser.add_argument("--verify", action="store_true",
                      help="read every example of the built dataset and list the bad ones")
  parser.add_argument("--beam_runner", help="build in an Apache Beam pipeline on this runner "
                      "(DirectRunner, DataflowRunner, ...; needs requirements-beam.txt) "
                      "instead of the process pool")
  parser.add_argument("--beam_pipeline_options", default="",
                      help="comma-separated Beam options without '--', e.g. "
                      "project=P,region=R,temp_location=gs://b/tmp")
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


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _check_args(args) -> str | None:
  """The one-line problem with the paths and numbers, checked before TensorFlow starts."""
  if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
    return f"--data_dir {args.data_dir} is a file; give a folder (it is created if missing)"
  if args.fps <= 0 or args.short_side <= 0:
    return f"--fps ({args.fps:g}) and --short_side ({args.short_side}) must be > 0"
  if args.verify:
    return None
  if args.beam_runner or args.beam_pipeline_options:
    try:
      import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      return "--beam_runner needs Apache Beam: pip install -r requirements-beam.txt"
  if not args.manual_dir:
    return "--manual_dir is required (the folder with the downloaded annotations and videos)"
  if "://" not in args.manual_dir and not os.path.isdir(args.manual_dir):
    return f"--manual_dir {args.manual_dir} is not a folder"
  return None


def _check_bucket_dir(uri: str) -> str | None:
  """The one-line problem with a bucket --manual_dir (checked once TF can reach it)."""
  from centerclip_jax import paths  # pylint: disable=g-import-not-at-top
  if not paths.user_path(uri).is_dir():
    return f"--manual_dir {uri}: no such folder in the bucket"
  return None


def _beam_config(args) -> dict:
  """DownloadConfig's beam_runner / beam_options ({} for the process pool)."""
  if not (args.beam_runner or args.beam_pipeline_options):
    return {}
  import logging  # pylint: disable=g-import-not-at-top
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  # Beam logs a failing step's traceback, then re-raises: the error is printed once, below.
  logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
  flags = [f"--{o.strip()}" for o in args.beam_pipeline_options.split(",") if o.strip()]
  return {"beam_runner": args.beam_runner,
          "beam_options": pipeline_options.PipelineOptions(flags)}


def _verify(builder) -> int:
  from centerclip_jax.data.datasets import verify  # pylint: disable=g-import-not-at-top
  if not builder.data_path.exists():
    return _fail(f"no {builder.name}/{builder.builder_config.name} in {builder.data_dir_root}; "
                 "build it first (give --manual_dir)")
  start = time.perf_counter()
  problems = verify.scan(builder, decode=True)
  examples = sum(s.num_examples for s in builder.info.splits.values())
  print(f"{builder.name}/{builder.builder_config.name} in {builder.data_dir}: "
        f"{examples} examples in {len(builder.info.splits)} splits read in "
        f"{time.perf_counter() - start:.1f} s, {len(problems)} bad")
  for problem in problems:
    print(f"  {problem}")
  if problems:
    print(f"rebuild: {verify.rebuild_command(builder)}")
  return 1 if problems else 0


def main(argv=None) -> int:
  args = parse_args(argv)
  if problem := _check_args(args):
    return _fail(problem)
  from centerclip_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_tensorflow()
  from centerclip_jax.data import datasets  # pylint: disable=g-import-not-at-top
  if args.dataset not in datasets.BUILDERS:
    return _fail(f"unknown dataset {args.dataset!r}; choose one of "
                 f"{', '.join(sorted(datasets.BUILDERS))}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from centerclip_jax.data.datasets import common  # pylint: disable=g-import-not-at-top

  cls = datasets.BUILDERS[args.dataset]
  name = common.config_name(args.fps, args.short_side)
  config = cls.builder_configs.get(name) or common.VideoTextConfig(
      fps=args.fps, short_side=args.short_side)
  builder = cls(data_dir=args.data_dir, config=config, num_workers=args.num_workers,
                keep_frame_cache=args.keep_frame_cache)
  if args.verify:
    return _verify(builder)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  existed = builder.data_path.exists() and not args.overwrite
  start = time.perf_counter()
  try:
    if not existed:
      if "://" in args.manual_dir and (problem := _check_bucket_dir(args.manual_dir)):
        return _fail(problem)
      builder.read_annotations(args.manual_dir)  # Bad annotations reported before TFDS starts.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=args.manual_dir, download_mode=mode, try_download_gcs=False,
        **_beam_config(args)))
  except (ValueError, OSError) as e:  # Bad annotations or layout, an unwritable data_dir.
    if isinstance(e, OSError) and e.filename:
      return _fail(f"{e.filename}: {e.strerror or e}")
    return _fail(str(e).replace("\n", "\n  "))
  seconds = time.perf_counter() - start

  print(f"\n{builder.name}/{builder.builder_config.name} in {builder.data_dir}")
  print(builder.report())
  if builder.report_path().exists():
    print(f"every id of each list: {builder.report_path()}")
  if existed:
    print("(already built: nothing was decoded; pass --overwrite to rebuild)")
  else:
    decode = builder.info.metadata.get("decode", {})
    videos = max(decode.get("videos", 0), 1)
    if decode.get("runner"):
      print(f"build time {seconds:.1f} s for {decode.get('videos')} distinct video files in "
            f"a Beam pipeline ({decode['runner']}) = {seconds / videos:.3f} s per video")
    else:
      print(f"build time {seconds:.1f} s for {decode.get('videos')} distinct video files = "
            f"{seconds / videos:.3f} s per video (decoding {decode.get('seconds', 0):.1f} s "
            f"in {decode.get('workers')} processes = {decode.get('seconds', 0) / videos:.3f} "
            "s per video)")
  if args.benchmark:
    _benchmark(builder, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
