"""ActivityNet Captions (Krishna et al., ICCV 2017) as paragraph-to-video retrieval."""

from __future__ import annotations

import json
from pathlib import Path

from etils import epath

from centerclip_jax.data.datasets import common

_FILES = {"train": "train.json", "val_1": "val_1.json"}


def read_json(file: Path):
  try:
    return json.loads(epath.Path(file).read_text())
  except json.JSONDecodeError as e:
    raise common.AnnotationError(f"{file}, line {e.lineno}: invalid JSON ({e.msg})") from e


def read_paragraphs(file: Path) -> dict[str, str]:
  """{video_id: {'duration', 'timestamps', 'sentences'}} -> {video_id: paragraph}.

  The paragraph is the video's sentences, each stripped, joined with a space.
  """
  data = read_json(file)
  common.check(isinstance(data, dict), file, "top level", "expected an object keyed by video id")
  paragraphs = {}
  for vid, item in data.items():
    sentences = item.get("sentences") if isinstance(item, dict) else None
    ok = isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)
    common.check(ok, file, f"key {vid!r}", "expected {'sentences': [str, ...], ...}")
    paragraph = common.strip_join(sentences)
    common.check(bool(paragraph), file, f"key {vid!r}", "no non-empty sentence")
    paragraphs[vid] = paragraph
  return paragraphs


class ActivitynetCaptions(common.VideoTextBuilder):
  """ActivityNet Captions: 20k YouTube videos, one paragraph (all sentences) each."""

  HOMEPAGE = "https://cs.stanford.edu/people/ranjaykrishna/densevid/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir (annotations at the top level or one folder down):
    train.json, val_1.json (the ActivityNet Captions annotations)
  and the videos anywhere below manual_dir, named v_<id>.mp4 (or <id>.<ext>,
  and .mkv / .webm also work). Splits: train, val_1; each video's caption is
  the paragraph of its sentences.
  """

  def _read_splits(self, manual_dir: Path) -> dict[str, list[common.VideoJob]]:
    splits = {}
    for split, name in _FILES.items():
      paragraphs = read_paragraphs(common.find_annotation(manual_dir, name))
      splits[split] = [
          common.VideoJob(vid, (vid, vid[2:]) if vid.startswith("v_") else (vid, "v_" + vid),
                          (text,))
          for vid, text in paragraphs.items()]
    return splits
