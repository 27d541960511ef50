"""MSR-VTT (Xu et al., CVPR 2016) with the CLIP4Clip splits: 7k / 9k train, 1k-A test."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from etils import epath

from centerclip_jax.data.datasets import common

_DATA = "MSRVTT_data.json"
_TRAIN = {"train_7k": "MSRVTT_train.7k.csv", "train_9k": "MSRVTT_train.9k.csv"}
_TEST = "MSRVTT_JSFUSION_test.csv"


def read_captions(file: Path) -> dict[str, list[str]]:
  """MSRVTT_data.json -> {video_id: [caption, ...]} in file order."""
  try:
    data = json.loads(epath.Path(file).read_text())
  except json.JSONDecodeError as e:
    raise common.AnnotationError(f"{file}, line {e.lineno}: invalid JSON ({e.msg})") from e
  common.check(isinstance(data, dict) and isinstance(data.get("sentences"), list),
               file, "top level", "expected an object with a 'sentences' list")
  captions: dict[str, list[str]] = {}
  for i, item in enumerate(data["sentences"]):
    ok = (isinstance(item, dict) and isinstance(item.get("video_id"), str)
          and isinstance(item.get("caption"), str))
    common.check(ok, file, f"sentences[{i}]", "expected {'video_id': str, 'caption': str}")
    captions.setdefault(item["video_id"], []).append(item["caption"])
  return captions


def read_video_ids(file: Path) -> list[str]:
  """A split csv with a `video_id` column -> video ids in file order."""
  with io.StringIO(common.read_text(file), newline="") as f:
    reader = csv.DictReader(f)
    common.check(reader.fieldnames is not None and "video_id" in reader.fieldnames,
                 file, "line 1", f"no 'video_id' column in header {reader.fieldnames}")
    ids = []
    for row in reader:
      common.check(bool(row["video_id"]), file, f"line {reader.line_num}", "empty video_id")
      ids.append(row["video_id"].strip())
  return ids


def read_jsfusion(file: Path) -> list[tuple[str, str]]:
  """MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence) -> [(video_id, sentence)].

  Unquoted commas inside the sentence are kept (the sentence is the last column).
  """
  pairs = []
  with io.StringIO(common.read_text(file), newline="") as f:
    rows = csv.reader(f)
    header = next(rows, None)
    common.check(header is not None and header[:4] == ["key", "vid_key", "video_id", "sentence"],
                 file, "line 1", f"expected header key,vid_key,video_id,sentence, got {header}")
    for row in rows:
      if not row:
        continue
      common.check(len(row) >= 4 and row[2], file, f"line {rows.line_num}",
                   f"expected 4 comma-separated fields, got {row}")
      pairs.append((row[2].strip(), ",".join(row[3:]).strip()))
  return pairs


class Msrvtt(common.VideoTextBuilder):
  """MSR-VTT: 10k web videos, 20 captions each; test_1k = the JSFusion 1k-A split."""

  HOMEPAGE = ("https://www.microsoft.com/en-us/research/publication/"
              "msr-vtt-a-large-video-description-dataset-for-bridging-video-and-language/")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir (annotations at the top level or one folder down, e.g. the
  `msrvtt_data/` folder of CLIP4Clip's msrvtt_data.zip):
    MSRVTT_data.json, MSRVTT_train.7k.csv, MSRVTT_train.9k.csv,
    MSRVTT_JSFUSION_test.csv
  and the videos as videos/all/video<N>.mp4 (or videos/video<N>.mp4; any
  folder below manual_dir works).
  Splits: train_7k, train_9k (all captions of each video), test_1k (the one
  JSFusion sentence per video, 1,000 videos).
  """

  def _read_splits(self, manual_dir: Path) -> dict[str, list[common.VideoJob]]:
    data_file = common.find_annotation(manual_dir, _DATA)
    captions = read_captions(data_file)
    splits = {}
    for split, name in _TRAIN.items():
      file = common.find_annotation(manual_dir, name)
      jobs = []
      for vid in read_video_ids(file):
        common.check(vid in captions, data_file, f"video_id {vid!r}",
                     f"no sentences for this video of {file.name}")
        jobs.append(common.VideoJob(vid, (vid,), tuple(captions[vid])))
      splits[split] = jobs
    test_file = common.find_annotation(manual_dir, _TEST)
    splits["test_1k"] = [common.VideoJob(vid, (vid,), (sentence,))
                         for vid, sentence in read_jsfusion(test_file)]
    return splits
