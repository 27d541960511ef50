"""MSVD (Chen & Dolan, ACL 2011) with the standard 1,200 / 100 / 670 split."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from etils import epath

from centerclip_jax.data.datasets import common

_CAPTIONS = "raw-captions.pkl"
_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
_ALLOWED = {("builtins", "dict"): dict, ("builtins", "list"): list,
            ("builtins", "str"): str, ("__builtin__", "dict"): dict,
            ("__builtin__", "list"): list, ("__builtin__", "unicode"): str,
            ("__builtin__", "str"): str}


class _RestrictedUnpickler(pickle.Unpickler):
  """Loads only dict / list / str: refuses any other class or callable."""

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def read_raw_captions(file: Path) -> dict[str, list[str]]:
  """raw-captions.pkl ({video_id: [[token, ...], ...]}) -> {video_id: [caption]}.

  Read with a restricted unpickler (dict / list / str only), so a tampered file
  cannot run code; captions are the tokens joined with spaces.
  """
  try:
    data = _RestrictedUnpickler(io.BytesIO(epath.Path(file).read_bytes())).load()
  except Exception as e:
    raise common.AnnotationError(
        f"{file}: not a plain pickle of dict/list/str ({type(e).__name__}: {e})") from e
  common.check(isinstance(data, dict), file, "top level", "expected a dict")
  captions = {}
  for vid, caps in data.items():
    ok = isinstance(vid, str) and isinstance(caps, list) and all(
        isinstance(c, list) and all(isinstance(t, str) for t in c) for c in caps)
    common.check(ok, file, f"key {vid!r}", "expected a list of token lists")
    captions[vid] = [" ".join(tokens) for tokens in caps]
  return captions


def read_list(file: Path) -> list[str]:
  return [line.strip() for line in epath.Path(file).read_text().splitlines() if line.strip()]


class Msvd(common.VideoTextBuilder):
  """MSVD: 1,970 YouTube clips with about 40 English captions each."""

  HOMEPAGE = "https://www.cs.utexas.edu/users/ml/clamp/videoDescription/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in manual_dir (annotations at the top level or one folder down, e.g.
  CLIP4Clip's msvd_data/): raw-captions.pkl, train_list.txt, val_list.txt,
  test_list.txt; and the clips YouTubeClips/<video_id>.avi (any folder below
  manual_dir works). Splits: train, val, test (all captions of each video).
  """

  def _read_splits(self, manual_dir: Path) -> dict[str, list[common.VideoJob]]:
    cap_file = common.find_annotation(manual_dir, _CAPTIONS)
    captions = read_raw_captions(cap_file)
    splits = {}
    for split, name in _LISTS.items():
      file = common.find_annotation(manual_dir, name)
      jobs = []
      for vid in read_list(file):
        common.check(vid in captions, cap_file, f"key {vid!r}",
                     f"no captions for this video of {file.name}")
        jobs.append(common.VideoJob(vid, (vid,), tuple(captions[vid])))
      splits[split] = jobs
    return splits
