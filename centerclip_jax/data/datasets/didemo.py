"""DiDeMo (Hendricks et al., ICCV 2017) as paragraph-to-video retrieval."""

from __future__ import annotations

import os
from pathlib import Path

from centerclip_jax.data.datasets import activitynet, common

_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}
# Annotations cover at most the first 30 s (longer videos were truncated for
# annotation), so frames are kept up to 31 s, as CLIP4Clip's loader does.
END_TIME = 31.0


def read_paragraphs(file: Path) -> dict[str, str]:
  """[{'video', 'description', 'times', ...}] -> {video: paragraph}.

  A video's paragraph is its descriptions in file order, stripped, joined.
  """
  data = activitynet.read_json(file)
  common.check(isinstance(data, list), file, "top level", "expected a list of annotations")
  descriptions: dict[str, list[str]] = {}
  for i, item in enumerate(data):
    ok = (isinstance(item, dict) and isinstance(item.get("video"), str)
          and isinstance(item.get("description"), str))
    common.check(ok, file, f"item [{i}]", "expected {'video': str, 'description': str, ...}")
    descriptions.setdefault(item["video"], []).append(item["description"])
  return {vid: common.strip_join(d) for vid, d in descriptions.items()}


class Didemo(common.VideoTextBuilder):
  """DiDeMo: 10k Flickr videos; the caption is the paragraph of all descriptions."""

  HOMEPAGE = "https://github.com/LisaAnne/LocalizingMoments"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir (annotations at the top level or one folder down):
    train_data.json, val_data.json, test_data.json
  and the videos anywhere below manual_dir, named as the annotation's 'video'
  field (e.g. 12345@N00_678_abc.mov), or that name with its extension replaced
  or a new one appended (converted copies such as 12345@N00_678_abc.mp4).
  Splits: train, val, test; frames up to 31 s.
  """

  def _read_splits(self, manual_dir: Path) -> dict[str, list[common.VideoJob]]:
    splits = {}
    for split, name in _FILES.items():
      paragraphs = read_paragraphs(common.find_annotation(manual_dir, name))
      splits[split] = [
          common.VideoJob(vid, (vid, os.path.splitext(vid)[0]), (text,), end_time=END_TIME)
          for vid, text in paragraphs.items()]
    return splits
