r"""Training input pipeline throughput: videos/s, per CPU core, at 224 px.

  python tools/input_benchmark.py [--batches 8] [--batch 16]
  python tools/input_benchmark.py --dataset msrvtt --data_dir ~/tensorflow_datasets \
      --split train_9k

Without --dataset it builds (once, under --work_dir) a synthetic benchmark at 224 x 224
px (128 videos of 24-45 frames; flat shapes, so its JPEGs decode somewhat faster than
natural video) and times `data.pipeline.benchmark`: the train stream as training reads
it (TSN sampling of 12 frames, decode of only those, resize and crop to uint8, tokenise,
batch)
on this host's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from centerclip_jax import console  # pylint: disable=g-import-not-at-top
console.quiet_tensorflow()

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from centerclip_jax.data import pipeline
from centerclip_jax.data.datasets import synthetic


def synthetic_224(work_dir: str) -> tfds.core.DatasetBuilder:
  config = synthetic.SyntheticConfig(name="bench224", num_train=128, num_val=8, num_test=8,
                                     min_frames=24, max_frames=45, frame_size=224)
  builder = synthetic.SyntheticVideoText(data_dir=work_dir, config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="", help="a prepared TFDS dataset (default: "
                      "the synthetic 224 px benchmark)")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--split", default="train")
  parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "centerclip_input_benchmark"))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--frames", type=int, default=12)
  parser.add_argument("--resolution", type=int, default=224)
  args = parser.parse_args()
  if args.dataset:
    import centerclip_jax.data.datasets  # pylint: disable=g-import-not-at-top,unused-import
    builder = tfds.builder(args.dataset, data_dir=os.path.expanduser(args.data_dir) or None)
  else:
    builder = synthetic_224(args.work_dir)
  result = pipeline.benchmark(builder, args.split, batch_size=args.batch,
                              max_frames=args.frames, resolution=args.resolution,
                              num_batches=args.batches)
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                    for k, v in result.items()}))


if __name__ == "__main__":
  main()
