"""LSMDC 2016 task 1 (movie description) for retrieval: train / val / test (1k)."""

from __future__ import annotations

import io
from pathlib import Path

from centerclip_jax.data.datasets import common

_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
          "test": "LSMDC16_challenge_1000_publictect.csv"}


def read_annotations(file: Path) -> dict[str, list[str]]:
  """A task-1 csv -> {clip_id: [sentence, ...]} in file order.

  Each line: CLIP_ID, START_ALIGNED, END_ALIGNED, START_EXTRACTED,
  END_EXTRACTED, SENTENCE, tab-separated; a clip id may occur on several lines.
  """
  captions: dict[str, list[str]] = {}
  with io.StringIO(common.read_text(file), newline=None) as f:
    for line_no, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split("\t")
      common.check(len(fields) == 6, file, f"line {line_no}",
                   f"expected 6 tab-separated fields (clip id, 4 times, sentence), "
                   f"got {len(fields)}")
      clip_id, sentence = fields[0].strip(), fields[5].strip()
      common.check(bool(clip_id), file, f"line {line_no}", "empty clip id")
      captions.setdefault(clip_id, []).append(sentence)
  return captions


class Lsmdc(common.VideoTextBuilder):
  """LSMDC16 task 1: movie clips with their audio-description sentences."""

  HOMEPAGE = "https://sites.google.com/site/describingmovies/lsmdc-2016"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir (annotations at the top level or one folder down):
    LSMDC16_annos_training.csv, LSMDC16_annos_val.csv,
    LSMDC16_challenge_1000_publictect.csv
  and the clips as avi/<movie>/<clip_id>.avi (e.g.
  avi/0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi;
  any folder below manual_dir works). Splits: train, val, test; one example per
  clip with all of its sentences.
  """

  def _read_splits(self, manual_dir: Path) -> dict[str, list[common.VideoJob]]:
    splits = {}
    for split, name in _FILES.items():
      captions = read_annotations(common.find_annotation(manual_dir, name))
      splits[split] = [common.VideoJob(clip, (clip,), tuple(caps))
                       for clip, caps in captions.items()]
    return splits
