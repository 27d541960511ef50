"""The Apache Beam build (`prepare_data --beam_runner`) writes what the process pool writes.

Needs apache-beam (requirements-beam.txt, part of requirements-dev.txt).
"""

from __future__ import annotations

import json
import tempfile

import apache_beam  # noqa: F401  (fails here, not mid-build, without requirements-beam.txt)
import pytest
import tensorflow_datasets as tfds

from centerclip_jax import paths
from centerclip_jax.data import datasets
from centerclip_jax.data.datasets import common
from tests import video_fixtures as vf
from tests.test_datasets import _row, _tool

CONFIG = common.VideoTextConfig(fps=3, short_side=32)  # Named 'fps3_32'.
SOURCES = [0, 3, 7, 10, 13, 17]  # 2 s at 10 fps read at 3 fps (see test_video).


def _examples(builder, decode: bool = True) -> dict:
  """{split: {video_id: example}} of a built dataset (frames as JPEG bytes unless decode)."""
  decoders = None if decode else {"frames": tfds.decode.SkipDecoding()}
  return {split: {ex["video_id"].decode(): ex for ex in tfds.as_numpy(
              builder.as_dataset(split=split, decoders=decoders))}
          for split in builder.info.splits}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, gcs):
  """Miniature MSR-VTT (one corrupt video, one missing) built by the process pool from
  local files into a local folder, and by Beam's DirectRunner from the same files in the
  GCS emulator's bucket into the bucket, as Dataflow workers would (nothing local)."""
  raw = tmp_path_factory.mktemp("raw") / "msrvtt"
  layout = vf.write_msrvtt_layout(raw)
  remote_raw = gcs.url("raw/msrvtt")
  paths.copytree(paths.user_path(raw), paths.user_path(remote_raw))
  scratch = tmp_path_factory.mktemp("scratch")
  tool, out = _tool(), {}
  for name, manual_dir, data_dir, extra in [
      ("pool", str(raw), str(tmp_path_factory.mktemp("pool")), ["--num_workers", "2"]),
      ("beam", remote_raw, gcs.url("beam_build"),
       ["--beam_runner", "DirectRunner", "--beam_pipeline_options", "direct_num_workers=1"])]:
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch)  # this process's $TMPDIR
    try:
      assert tool.main(["msrvtt", "--manual_dir", manual_dir, "--data_dir", data_dir,
                        "--short_side", "32", *extra]) == 0
    finally:
      tempfile.tempdir = saved
    out[name] = datasets.BUILDERS["msrvtt"](data_dir=data_dir, config=CONFIG)
  left = [p for p in scratch.rglob("*") if p.is_file()]
  return layout, out["pool"], out["beam"], (str(raw), remote_raw), left


def test_beam_from_the_bucket_leaves_no_local_copy(two_builds):
  *_, left = two_builds
  assert left == []  # each worker's copy of its video is removed once decoded


def test_beam_writes_the_same_examples(two_builds):
  layout, pool, beam, *_ = two_builds
  pool_jpegs, beam_jpegs = _examples(pool, decode=False), _examples(beam, decode=False)
  beam_examples = _examples(beam)
  nonempty = {s for s, examples in layout.expected.items() if examples}
  assert set(pool_jpegs) == set(beam_jpegs) == nonempty
  for split in nonempty:
    expected = layout.expected[split]
    assert set(beam_jpegs[split]) == set(pool_jpegs[split]) == set(expected), split
    assert beam.info.splits[split].num_examples == len(expected)
    for vid, captions in expected.items():
      a, b = pool_jpegs[split][vid], beam_jpegs[split][vid]
      assert [c.decode() for c in b["captions"]] == [c.decode() for c in a["captions"]]
      assert [c.decode() for c in b["captions"]] == captions
      assert b["num_frames"] == a["num_frames"] == 6 and b["fps"] == a["fps"] == 3.0
      assert list(b["frames"]) == list(a["frames"]), (split, vid)  # The same JPEG bytes.
      # ... of the right video (test_datasets checks the pool's frames the same way).
      frames = beam_examples[split][vid]["frames"]
      assert frames.shape == (6, 32, 42, 3)
      assert [vf.source_index(f, 20) for f in frames] == SOURCES
      assert abs(float(frames[..., 1].mean()) - vf.video_level(layout.seeds[vid])) < 4


def test_beam_writes_the_same_report(two_builds):
  """The same report, naming the bucket's paths where the pool's names the local ones."""
  _, pool, beam, (local_raw, remote_raw), _ = two_builds
  as_local = lambda x: json.loads(json.dumps(x).replace(remote_raw, local_raw))
  assert beam.info.metadata["manual_dir"] == remote_raw
  assert pool.info.metadata["manual_dir"] == local_raw
  for key in ("listed", "skipped", "short", "empty_splits"):
    assert as_local(beam.info.metadata[key]) == pool.info.metadata[key], key
  undecodable = beam.info.metadata["skipped"]["train_9k"][0]
  assert undecodable["path"].startswith(remote_raw + "/")
  assert undecodable["reason"].startswith(f"undecodable: {undecodable['path']}: ")
  assert beam.info.metadata["decode"]["runner"] == "DirectRunner"
  assert beam.info.metadata["decode"]["videos"] == pool.info.metadata["decode"]["videos"] == 5
  pool_report = pool.report_path().read_text()
  beam_report = beam.report_path().read_text()
  assert remote_raw in beam_report and local_raw not in beam_report
  assert beam_report.replace(remote_raw, local_raw) == pool_report
  # listed, written, missing, undecodable, short
  assert _row(pool_report, "train_9k") == [4, 3, 0, 1, 0]
  assert _row(pool_report, "test_1k") == [3, 2, 1, 0, 0]
  skipped = {s: {i["video_id"]: i["reason"].split(":")[0] for i in items}
             for s, items in beam.info.metadata["skipped"].items()}
  assert skipped == {"train_7k": {}, "train_9k": {"video5": "undecodable"},
                     "test_1k": {"video4": "missing"}}
  assert not list(beam.data_path.glob("beam_video_status*"))  # Removed after the build.


def _error_line(capsys) -> str:
  """The tool's last stderr line (log lines of TFDS may come before it), no traceback."""
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  return err.strip().splitlines()[-1]


def test_beam_build_errors_are_one_line(tmp_path, capsys):
  raw = tmp_path / "raw"
  layout = vf.write_msrvtt_layout(raw)
  argv = ["msrvtt", "--manual_dir", str(raw), "--data_dir", str(tmp_path / "out"),
          "--short_side", "32", "--beam_runner"]
  assert _tool().main(argv + ["NoSuchRunner"]) == 2
  assert _error_line(capsys).startswith("error: Unexpected pipeline runner: NoSuchRunner.")
  # Every video of test_1k unreadable: the pool leaves the split out; Beam cannot.
  for vid in layout.expected["test_1k"]:
    vf.write_garbage(raw / "videos" / "all" / f"{vid}.mp4")
  assert _tool().main(argv + ["DirectRunner"]) == 2
  assert _error_line(capsys) == (
      "error: msrvtt: no video of split test_1k could be decoded in the Beam pipeline, and "
      "TFDS cannot write an empty split (the process-pool build, without --beam_runner, "
      "leaves it out and lists its videos in the report)")
