"""Tests for the TFDS builders on miniatures of each dataset's official layout."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from centerclip_jax.data import datasets, video
from centerclip_jax.data.datasets import common, lsmdc, msrvtt, msvd
from tests import video_fixtures as vf

CONFIG = common.VideoTextConfig(fps=3, short_side=32)  # Named 'fps3_32'.
SOURCES = [0, 3, 7, 10, 13, 17]  # 2 s at 10 fps read at 3 fps (see test_video).


def build(name, manual_dir, data_dir, **kwargs):
  kwargs.setdefault("num_workers", 1)
  builder = datasets.BUILDERS[name](data_dir=str(data_dir), config=CONFIG, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


def read_split(builder, split):
  return {ex["video_id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """Miniature layouts, written once: {name: (manual_dir, Layout)}."""
  root = tmp_path_factory.mktemp("raw")
  return {name: (root / name, write(root / name)) for name, write in vf.LAYOUTS.items()}


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
  """Each dataset built once (serially, no cache kept): {name: builder}."""
  out = tmp_path_factory.mktemp("built")
  return {name: build(name, manual_dir, out, keep_frame_cache=False)
          for name, (manual_dir, _) in raw.items()}


def test_registered_with_tfds():
  for name, cls in datasets.BUILDERS.items():
    assert tfds.builder_cls(name) is cls
  assert set(datasets.BUILDERS) == {"msrvtt", "msvd", "lsmdc", "activitynet_captions",
                                    "didemo"}


@pytest.mark.parametrize("name", list(vf.LAYOUTS))
def test_build_miniature(raw, built, name):
  _, layout = raw[name]
  builder = built[name]
  nonempty = {s for s, examples in layout.expected.items() if examples}
  assert set(builder.info.splits) == nonempty
  for split in nonempty:
    expected = layout.expected[split]
    examples = read_split(builder, split)
    assert builder.info.splits[split].num_examples == len(expected)
    assert set(examples) == set(expected)
    for vid, ex in examples.items():
      assert [c.decode() for c in ex["captions"]] == expected[vid]
      assert ex["num_frames"] == 6 and ex["fps"] == 3.0
      assert ex["frames"].shape == (6, 32, 42, 3)
      assert [vf.source_index(f, 20) for f in ex["frames"]] == SOURCES
      # The right video: its green level is set by the seed it was written with.
      assert abs(float(ex["frames"][..., 1].mean()) - vf.video_level(layout.seeds[vid])) < 4
  skipped = builder.info.metadata["skipped"]
  assert set(skipped) == set(layout.expected)
  for split, reasons in layout.skipped.items():
    got = {s["video_id"]: s["reason"] for s in skipped[split]}
    assert set(got) == set(reasons)
    for vid, prefix in reasons.items():
      assert got[vid].startswith(prefix)
  assert builder.info.metadata["empty_splits"] == sorted(set(layout.expected) - nonempty)
  decode = builder.info.metadata["decode"]
  assert (decode["fps"], decode["short_side"], decode["jpeg_quality"]) == (3.0, 32, 95)
  assert decode["videos"] == len(layout.seeds) + 1  # The readable ones and the corrupt one.
  assert not os.path.exists(builder.frame_cache_dir)  # keep_frame_cache=False.


def test_metadata_survives_reload(raw, built):
  builder = built["msrvtt"]
  again = datasets.BUILDERS["msrvtt"](data_dir=builder.data_dir_root, config=CONFIG)
  assert again.info.splits["train_9k"].num_examples == 3
  skipped = again.info.metadata["skipped"]
  assert [s["video_id"] for s in skipped["train_9k"]] == ["video5"]
  assert skipped["test_1k"][0]["reason"].startswith("missing")
  report = again.report()
  rows = {line.split()[0]: line.split()[1:] for line in report.splitlines()[2:5]}
  # listed, written, missing, undecodable, short
  assert rows == {"test_1k": ["3", "2", "1", "0", "0"], "train_7k": ["2", "2", "0", "0", "0"],
                  "train_9k": ["4", "3", "0", "1", "0"]}
  assert "  missing, test_1k (1): video4" in report
  assert "  undecodable, train_9k (1):\n    video5: " in report
  full = again.report_path().read_text()
  assert full.startswith(again.report(show=None)) and "video4: no video file named video4" in full


def test_frame_cache_makes_rebuild_skip_decoding(raw, built, tmp_path, monkeypatch):
  manual_dir, _ = raw["msrvtt"]
  cache = tmp_path / "cache"
  build("msrvtt", manual_dir, tmp_path / "a", frame_cache_dir=cache)
  assert len(os.listdir(cache)) == 4  # video0-3 decoded; video5 corrupt, video4 missing.

  def fail(*args, **kwargs):
    raise AssertionError("decoded although cached")

  monkeypatch.setattr(video, "iter_frames", fail)
  again = build("msrvtt", manual_dir, tmp_path / "b", frame_cache_dir=cache)
  first = read_split(built["msrvtt"], "train_9k")
  second = read_split(again, "train_9k")
  assert set(first) == set(second)
  for vid in first:
    np.testing.assert_array_equal(first[vid]["frames"], second[vid]["frames"])
  assert [s["video_id"] for s in again.info.metadata["skipped"]["train_9k"]] == ["video5"]


def test_process_pool_build_matches_serial(raw, built, tmp_path):
  manual_dir, _ = raw["activitynet_captions"]
  pooled = build("activitynet_captions", manual_dir, tmp_path, num_workers=2)
  for split in ("train", "val_1"):
    serial, parallel = read_split(built["activitynet_captions"], split), read_split(pooled, split)
    assert set(serial) == set(parallel)
    for vid in serial:
      np.testing.assert_array_equal(serial[vid]["frames"], parallel[vid]["frames"])
  assert pooled.info.metadata["skipped"] == built["activitynet_captions"].info.metadata["skipped"]


def _copy(raw, name, tmp_path):
  manual_dir, _ = raw[name]
  dest = tmp_path / name
  shutil.copytree(manual_dir, dest)
  return dest


def _append(path, text):
  with open(path, "a") as f:
    f.write(text)


def _edit_json(path, fn):
  import json
  data = json.loads(path.read_text())
  fn(data)
  path.write_text(json.dumps(data))


@pytest.mark.parametrize("name,edit,error,match", [
    ("lsmdc", lambda d: _append(d / "LSMDC16_annos_val.csv", "clip\t1\t2\t3\tonly five\n"),
     common.AnnotationError, r"LSMDC16_annos_val\.csv, line 2: expected 6 tab-separated"),
    ("msrvtt", lambda d: _edit_json(d / "MSRVTT_data.json",
                                    lambda j: j["sentences"][1].pop("caption")),
     common.AnnotationError, r"MSRVTT_data\.json, sentences\[1\]"),
    ("msrvtt", lambda d: _append(d / "MSRVTT_train.7k.csv", "video99\n"),
     common.AnnotationError, r"MSRVTT_data\.json, video_id 'video99'.*MSRVTT_train\.7k\.csv"),
    ("msrvtt", lambda d: (d / "MSRVTT_JSFUSION_test.csv").write_text("a,b\n"),
     common.AnnotationError, r"MSRVTT_JSFUSION_test\.csv, line 1"),
    ("msvd", lambda d: _append(d / "test_list.txt", "zzz\n"),
     common.AnnotationError, r"raw-captions\.pkl, key 'zzz'"),
    ("activitynet_captions", lambda d: _edit_json(
        d / "val_1.json", lambda j: j["v_ccc"].update(sentences="not a list")),
     common.AnnotationError, r"val_1\.json, key 'v_ccc'"),
    ("didemo", lambda d: (d / "train_data.json").write_text('[\n{"video": "x",\n'),
     common.AnnotationError, r"train_data\.json, line 3: invalid JSON"),
    ("didemo", lambda d: (d / "val_data.json").unlink(),
     FileNotFoundError, r"val_data\.json not found"),
])
def test_malformed_annotations_fail_naming_file(raw, tmp_path, name, edit, error, match):
  manual_dir = _copy(raw, name, tmp_path)
  edit(manual_dir)
  with pytest.raises(error, match=match):
    build(name, manual_dir, tmp_path / "out")


def test_msvd_refuses_malicious_pickle(tmp_path):
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.mkdir, (str(marker),))

  file = tmp_path / "raw-captions.pkl"
  file.write_bytes(pickle.dumps({"vid": Evil()}))
  with pytest.raises(common.AnnotationError, match=r"raw-captions\.pkl.*forbidden global"):
    msvd.read_raw_captions(file)
  assert not marker.exists()
  # Plain structures load, in protocol 0 (GLOBAL opcodes) as well as the default.
  for protocol in (0, pickle.DEFAULT_PROTOCOL):
    file.write_bytes(pickle.dumps({"v": [["a", "b"], ["c"]]}, protocol=protocol))
    assert msvd.read_raw_captions(file) == {"v": ["a b", "c"]}
  file.write_bytes(pickle.dumps({"v": [["a", 3]]}))
  with pytest.raises(common.AnnotationError, match="key 'v'"):
    msvd.read_raw_captions(file)


def test_real_jsfusion_test_csv(test_data):
  file = test_data / "msrvtt_jsfusion_test.csv"
  pairs = msrvtt.read_jsfusion(file)
  assert len(pairs) == 1000 and len({v for v, _ in pairs}) == 1000
  lines = file.read_text().splitlines()
  assert pairs[0] == ("video9770", "a person is connecting something to system")
  assert pairs[-1] == (lines[-1].split(",")[2], lines[-1].split(",", 3)[3])


def test_real_lsmdc_sentences(test_data, tmp_path):
  sentences = (test_data / "lsmdc16_test_captions.txt").read_text().splitlines()
  file = tmp_path / "LSMDC16_challenge_1000_publictect.csv"
  file.write_text("".join(
      f"3001_MOVIE_{i:04d}\t01.02.27.034\t01.02.29.000\t01.02.27.000\t01.02.29.500\t{s}\n"
      for i, s in enumerate(sentences)))
  captions = lsmdc.read_annotations(file)
  assert len(captions) == 1000
  assert [c[0] for c in captions.values()] == [s.strip() for s in sentences]


def test_video_index_finds_names_and_stems(tmp_path):
  for rel in ("a/x.mp4", "b/x.mp4", "b/y.avi", "c/z.mov.mp4", "c/notes.txt"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b"")
  index = common.VideoIndex(tmp_path)
  assert len(index) == 3 and index.duplicates == 1
  assert index.find(["x"]) == str(tmp_path / "a" / "x.mp4")  # First in sorted order.
  assert index.find(["y.avi"]) == str(tmp_path / "b" / "y.avi")
  assert index.find(["z.mov", "z"]) == str(tmp_path / "c" / "z.mov.mp4")
  assert index.find(["notes"]) is None


def _tool():
  import importlib.util
  repo = Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location("prepare_data", repo / "tools" / "prepare_data.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool


def test_prepare_data_tool(raw, tmp_path, capsys):
  tool = _tool()
  manual_dir, _ = raw["msvd"]
  argv = ["msvd", "--manual_dir", str(manual_dir), "--data_dir", str(tmp_path),
          "--num_workers", "1", "--short_side", "32"]
  assert tool.main(argv) == 0
  out = capsys.readouterr().out
  # listed, written, missing, undecodable, short
  assert _row(out, "train") == [3, 2, 0, 1, 0] and _row(out, "val") == [1, 1, 0, 0, 0]
  assert _row(out, "test") == [1, 0, 1, 0, 0]
  assert "left out (no readable video): test" in out
  assert "missing, test (1): q9_10_20" in out and "undecodable, train (1):\n    bad_1_2: " in out
  report_file = tmp_path / "msvd" / "fps3_32" / "1.0.0" / "build_report.txt"
  assert f"every id of each list: {report_file}" in out and report_file.exists()
  assert "s per video" in out
  assert not (tmp_path / "downloads" / "centerclip_frames" / "msvd").exists()
  assert tool.main(argv) == 0
  assert "already built" in capsys.readouterr().out
  assert tool.main(["msvd", "--manual_dir", str(tmp_path / "nope"), "--data_dir", "x"]) == 2


def write_activitynet_many(root, num_ids: int) -> list[str]:
  """An ActivityNet layout listing `num_ids` videos (half train, half val_1) of which
  only 3 exist: two readable, one corrupt. Returns the ids."""
  import json
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  ids = [f"v_{i:011d}" for i in range(num_ids)]
  ann = lambda i: {"duration": 2.0, "timestamps": [[0.0, 1.0]], "sentences": [f"Clip {i}."]}
  half = num_ids // 2
  (root / "train.json").write_text(json.dumps({v: ann(i) for i, v in enumerate(ids[:half])}))
  (root / "val_1.json").write_text(json.dumps({v: ann(i) for i, v in enumerate(ids[half:])}))
  vf.write_video(root / "videos" / f"{ids[0]}.mp4", seed=1)
  vf.write_video(root / "videos" / f"{ids[half]}.mp4", seed=2)
  vf.write_garbage(root / "videos" / f"{ids[1]}.mp4")
  return ids


def test_build_report_is_short_and_says_everything_once(tmp_path, capfd):
  """Most videos missing: the printed report has counts and a few ids per list; the full
  lists are in the report file; nothing printed twice, no id on stderr."""
  ids = write_activitynet_many(tmp_path / "raw", 400)
  argv = ["activitynet_captions", "--manual_dir", str(tmp_path / "raw"), "--data_dir",
          str(tmp_path / "out"), "--num_workers", "1", "--short_side", "32"]
  assert _tool().main(argv) == 0
  out, err = capfd.readouterr()
  assert len(out.splitlines()) < 20, out
  assert not any(v in err for v in ids), err[-2000:]
  assert _row(out, "train") == [200, 1, 198, 1, 0] and _row(out, "val_1") == [200, 1, 199, 0, 0]
  assert f"missing, train (198): {', '.join(ids[2:7])}, ... and 193 more" in out
  assert f"undecodable, train (1):\n    {ids[1]}: " in out
  lines = [line for line in out.splitlines() if line.strip()]
  assert len(lines) == len(set(lines)), "a line printed twice"
  full = (tmp_path / "out" / "activitynet_captions" / "fps3_32" / "1.0.0" /
          "build_report.txt").read_text()
  assert all(f"    {v}: no video file named {v} or {v[2:]}" in full
             for v in ids if v not in (ids[0], ids[1], ids[200]))


def test_short_videos_are_kept_and_listed(raw, tmp_path):
  """A video under 1 s (< 3 frames at 3 fps) is written and listed as short."""
  manual_dir = _copy(raw, "activitynet_captions", tmp_path)
  vf.write_video(manual_dir / "videos" / "v_aaa.mp4", num_frames=5, fps=10, seed=0)  # 0.5 s
  builder = build("activitynet_captions", manual_dir, tmp_path / "out")
  short = builder.info.metadata["short"]
  assert [(s["video_id"], s["num_frames"]) for s in short["train"]] == [("v_aaa", 2)]
  assert short["val_1"] == []
  assert read_split(builder, "train")["v_aaa"]["num_frames"] == 2
  assert "  short, train (1):\n    v_aaa (2 frames)" in builder.report()
  assert _row(builder.report(), "train") == [3, 2, 0, 1, 1]


def _row(report: str, split: str) -> list[int]:
  """The counts row of `split` in a printed build report."""
  line = next(line for line in report.splitlines() if line.split()[:1] == [split])
  return [int(x) for x in line.split()[1:]]


def _run_tool(cwd, *args):
  import subprocess
  import sys
  repo = Path(__file__).resolve().parents[1]
  return subprocess.run([sys.executable, str(repo / "tools" / "prepare_data.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=cwd)


def test_prepare_data_bad_inputs_give_one_line(raw, tmp_path):
  """Each bad input: exit status 2, one `error:` line naming the flag or file, no traceback;
  a missing annotation file is reported before TFDS prints anything."""
  manual_dir = _copy(raw, "didemo", tmp_path)
  (manual_dir / "val_data.json").unlink()
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  cases = [
      (["msrvtt", "--manual_dir", str(tmp_path / "nope"), "--data_dir", str(tmp_path / "o")],
       f"error: --manual_dir {tmp_path / 'nope'} is not a folder"),
      (["msrvt", "--manual_dir", str(manual_dir), "--data_dir", str(tmp_path / "o")],
       "error: unknown dataset 'msrvt'; choose one of activitynet_captions, didemo, lsmdc, "
       "msrvtt, msvd"),
      (["didemo", "--manual_dir", str(manual_dir), "--data_dir", str(a_file)],
       f"error: --data_dir {a_file} is a file; give a folder (it is created if missing)"),
      (["didemo", "--data_dir", str(tmp_path / "o")],
       "error: --manual_dir is required (the folder with the downloaded annotations and "
       "videos)"),
      (["didemo", "--manual_dir", str(manual_dir), "--data_dir", str(tmp_path / "o")],
       f"error: val_data.json not found in {manual_dir} (or its subfolders); see the "
       "dataset's MANUAL_DOWNLOAD_INSTRUCTIONS."),
      (["didemo", "--data_dir", str(tmp_path / "o"), "--verify"],
       f"error: no didemo/fps3_224 in {tmp_path / 'o'}; build it first (give --manual_dir)"),
  ]
  for args, line in cases:
    proc = _run_tool(tmp_path, *args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == [line], (args, proc.stderr)


def test_duplicate_video_in_split_fails(raw, tmp_path):
  manual_dir = _copy(raw, "msrvtt", tmp_path)
  _append(manual_dir / "MSRVTT_train.7k.csv", "video0\n")
  with pytest.raises(common.AnnotationError, match="split train_7k: video id 'video0' listed twice"):
    build("msrvtt", manual_dir, tmp_path / "out")
