"""Checks a prepared dataset's shards: every record readable, every frame a JPEG.

`scan(builder)` reads each TFRecord shard of each split record by record and returns
the bad ones (a truncated or corrupt shard, an example that does not parse, a frame
that is not a JPEG). `decode=True` also decodes every frame (`prepare_data --verify`);
without it only the JPEG headers are read, which is fast enough to run when a
training or eval read fails (`pipeline` does, to name the shard).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from typing import Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

DEFAULT_FPS, DEFAULT_SHORT_SIDE = 3.0, 224  # prepare_data's defaults.


@dataclasses.dataclass(frozen=True)
class Problem:
  """One bad record: its shard, its index in the shard (-1: the shard itself) and why."""
  split: str
  shard: str
  record: int
  video_id: str
  reason: str

  def detail(self) -> str:
    """'record N (video ID): reason', or the reason alone for a shard-level problem."""
    where = f"record {self.record}" if self.record >= 0 else ""
    if self.video_id:
      where += f" (video {self.video_id})"
    return f"{where}: {self.reason}" if where else self.reason

  def __str__(self) -> str:
    return f"{self.split}: {os.path.basename(self.shard)}: {self.detail()}"


class CorruptDataError(ValueError):
  """A prepared dataset that cannot be read; the message names the shard and the fix."""


def _first_line(e: Exception) -> str:
  """A TF error's message without its op and function-node decorations."""
  text = (getattr(e, "message", None) or str(e)).strip()
  text = text.splitlines()[0] if text else type(e).__name__
  text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
  return re.sub(r"\s*\[Op:.*$", "", text).strip() or type(e).__name__


def _check_frames(frames: tf.Tensor, decode: bool) -> str | None:
  for i, jpeg in enumerate(frames.numpy()):
    if jpeg[:3] != b"\xff\xd8\xff":
      return f"frame {i} is not a JPEG (starts with {jpeg[:4]!r})"
    try:
      if decode:
        tf.io.decode_jpeg(jpeg, channels=3)
      else:
        tf.io.extract_jpeg_shape(jpeg)
    except tf.errors.OpError as e:
      return f"frame {i} is not a readable JPEG ({_first_line(e)})"
  if frames.shape[0] == 0:
    return "no frames"
  return None


def scan_shard(builder: tfds.core.DatasetBuilder, split: str, shard: str,
               decode: bool = False) -> list[Problem]:
  """The bad records of one shard file (a read error ends the shard's scan)."""
  problems, index = [], -1
  features = builder.info.features
  try:
    for index, record in enumerate(tf.data.TFRecordDataset(shard)):
      video_id = ""
      try:
        example = features.deserialize_example(
            record, decoders={"frames": tfds.decode.SkipDecoding()})
        video_id = example["video_id"].numpy().decode("utf-8", "replace")
        reason = _check_frames(example["frames"], decode)
      except tf.errors.OpError as e:
        reason = f"example does not parse ({_first_line(e)})"
      if reason:
        problems.append(Problem(split, shard, index, video_id, reason))
  except tf.errors.OpError as e:  # DataLossError: truncated or corrupt shard.
    problems.append(Problem(split, shard, -1, "",
                            f"unreadable after record {index} ({_first_line(e)})"))
  return problems


def shards(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  """The shard files of a split (a sub-split like 'train[:50%]' names its base split)."""
  base = split.split("[", 1)[0]
  return [os.fspath(p) for p in builder.info.splits[base].filepaths]


def scan(builder: tfds.core.DatasetBuilder, splits: Sequence[str] | None = None,
         decode: bool = False) -> list[Problem]:
  """Bad records of the given splits (default: all), shard by shard."""
  splits = sorted(builder.info.splits) if splits is None else splits
  problems = []
  for split in splits:
    for shard in shards(builder, split):
      if not tf.io.gfile.exists(shard):  # Also gs:// paths.
        problems.append(Problem(split, shard, -1, "", "shard file is missing"))
      else:
        problems += scan_shard(builder, split, shard, decode=decode)
  return problems


def rebuild_command(builder: tfds.core.DatasetBuilder) -> str:
  """The `tools/prepare_data.py` command that rebuilds this dataset from its raw files."""
  metadata = builder.info.metadata or {}
  manual_dir = metadata.get("manual_dir") or "RAW"
  decode = dict(metadata.get("decode", {}))
  # data_dir is ROOT/<full_name> (name/config/version); a builder read from its folder
  # has that folder as data_dir_root.
  root = os.fspath(builder.data_dir)
  for _ in builder.info.full_name.split("/"):
    root = os.path.dirname(root)
  args = ["python", "tools/prepare_data.py", builder.name, "--manual_dir", manual_dir,
          "--data_dir", root]
  fps, short_side = decode.get("fps", DEFAULT_FPS), decode.get("short_side", DEFAULT_SHORT_SIDE)
  if float(fps) != DEFAULT_FPS:
    args += ["--fps", f"{float(fps):g}"]
  if int(short_side) != DEFAULT_SHORT_SIDE:
    args += ["--short_side", str(int(short_side))]
  return " ".join(shlex.quote(a) for a in args + ["--overwrite"])


def corrupt_error(builder: tfds.core.DatasetBuilder, split: str, error: Exception,
                  decode: bool = False) -> CorruptDataError | None:
  """A one-line error naming the bad shard(s) of `split` and the rebuild command, or
  None if the scan finds nothing wrong (then `error` was not the data's fault)."""
  problems = scan(builder, [split], decode=decode)
  if not problems:
    return None
  names = sorted({os.path.basename(p.shard) for p in problems})
  more = f" (and {len(problems) - 1} more bad records)" if len(problems) > 1 else ""
  return CorruptDataError(
      f"{builder.info.full_name} split {split!r}: corrupt shard "
      f"{', '.join(os.path.join(os.fspath(builder.data_dir), n) for n in names)}: "
      f"{problems[0].detail()}{more}; rebuild it with: {rebuild_command(builder)}")
