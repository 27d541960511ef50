"""Tests of the synthetic video-text benchmark builder (the 'tiny' config)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from centerclip_jax.data.datasets import synthetic

# The grammar as documented in the module docstring, written out independently here.
_COLOUR_RGB = {"red": (225, 35, 35), "green": (40, 195, 60), "blue": (45, 85, 240),
               "yellow": (240, 220, 35), "white": (240, 240, 240)}
_VERBS = {"moves left": "moves left", "slides to the left": "moves left",
          "goes left": "moves left", "moves right": "moves right",
          "slides to the right": "moves right", "goes right": "moves right",
          "appears": "appears", "shows up": "appears", "fades in": "appears",
          "disappears": "disappears", "vanishes": "disappears", "fades out": "disappears"}
_EVENT = (r"a (red|green|blue|yellow|white) (square|circle|triangle) (" +
          "|".join(sorted(map(re.escape, _VERBS), key=len, reverse=True)) + ")")
_CAPTION = re.compile(rf"(?:first )?{_EVENT}(?:, then| and then) {_EVENT}")


def parse(caption: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
  match = _CAPTION.fullmatch(caption)
  assert match, f"caption outside the grammar: {caption!r}"
  g = match.groups()
  return (g[0], g[1], _VERBS[g[2]]), (g[3], g[4], _VERBS[g[5]])


def _build(data_dir) -> tfds.core.DatasetBuilder:
  builder = tfds.builder("synthetic_video_text/tiny", data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def _read(builder, split, decode=True) -> list[dict]:
  decoders = None if decode else {"frames": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  return list(tfds.as_numpy(ds))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("synthetic_a"))


@pytest.fixture(scope="module")
def examples(built):
  return {split: _read(built, split) for split in ("train", "val", "test")}


def test_event_combinations_are_split_disjointly():
  parts = synthetic.split_combinations(seed=0)
  sets = {k: set(v) for k, v in parts.items()}
  assert sum(len(v) for v in parts.values()) == 5 * 4 * 3 * 3 * 4 * 4
  for a, b in itertools.combinations(sets.values(), 2):
    assert not a & b
  # Room for the default config's 100 distinct val / test captions, and most for train.
  assert len(sets["val"]) >= 200 and len(sets["test"]) >= 200
  assert len(sets["train"]) >= 2000
  assert all(e1.colour != e2.colour for e1, e2 in sets["train"])
  # Another seed partitions differently.
  assert set(synthetic.split_combinations(seed=1)["test"]) != sets["test"]


def test_sizes_and_schema(built, examples):
  assert {k: v.num_examples for k, v in built.info.splits.items()} == {
      "train": 24, "val": 8, "test": 8}
  for split, rows in examples.items():
    for row in rows:
      frames = row["frames"]
      assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3)
      assert 5 <= row["num_frames"] == len(frames) <= 14
      assert row["fps"] == pytest.approx(4.0)
      assert row["video_id"].decode().startswith(split + "_")
      assert len(row["captions"]) in ((1, 2) if split == "train" else (1,))
  lengths = [r["num_frames"] for rows in examples.values() for r in rows]
  assert min(lengths) < 12 < max(lengths)  # The pipeline tests need short and long videos.


def test_captions_disjoint_across_splits_and_distinct_in_test(examples):
  captions = {s: [c.decode() for r in rows for c in r["captions"]]
              for s, rows in examples.items()}
  combos = {s: [parse(c) for c in caps] for s, caps in captions.items()}
  for a, b in itertools.combinations(captions, 2):
    assert not set(captions[a]) & set(captions[b])
    assert not set(combos[a]) & set(combos[b])
  for split in ("val", "test"):
    assert len(set(combos[split])) == len(combos[split])
  for row in examples["train"]:  # Paraphrases of one video describe the same events.
    assert len({parse(c.decode()) for c in row["captions"]}) == 1
    assert len(set(row["captions"])) == len(row["captions"])


def test_two_builds_are_identical(built, tmp_path):
  again = _build(tmp_path)
  for split in ("train", "test"):
    a, b = _read(built, split, decode=False), _read(again, split, decode=False)
    assert len(a) == len(b)
    for x, y in zip(a, b):
      assert x["video_id"] == y["video_id"]
      assert list(x["captions"]) == list(y["captions"])
      assert list(x["frames"]) == list(y["frames"])  # Identical JPEG bytes.


def _object_pixels(frame: np.ndarray, colour: str) -> np.ndarray:
  """Pixels near `colour` whose nearest palette entry (+ the frame's median) it is.

  (The distance cap leaves out blends of a fading object with the background.)
  """
  palette = np.array(list(_COLOUR_RGB.values()) + [np.median(frame, axis=(0, 1))],
                     np.float32)
  distance = np.linalg.norm(frame[:, :, None, :].astype(np.float32) - palette, axis=-1)
  index = list(_COLOUR_RGB).index(colour)
  return (distance.argmin(-1) == index) & (distance[..., index] < 90.0)


def _shape_of(mask: np.ndarray) -> str:
  """The template (in the mask's bounding box) with the best IoU."""
  ys, xs = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]  # No strays.
  box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  v, u = (np.mgrid[0:box.shape[0], 0:box.shape[1]] + 0.5) / np.array(box.shape)[:, None, None]
  templates = {"square": np.ones_like(box),
               "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
               "triangle": np.abs(u - 0.5) <= v / 2}
  iou = {k: (box & t).sum() / (box | t).sum() for k, t in templates.items()}
  return max(iou, key=iou.get)


def test_frames_show_the_captioned_events_in_order(examples):
  checked = 0
  for row in examples["train"] + examples["test"]:
    frames = row["frames"]
    t = np.arange(len(frames)) / (len(frames) - 1)
    for k, (colour, shape, action) in enumerate(parse(row["captions"][0].decode())):
      pixels = np.stack([_object_pixels(f, colour) for f in frames])
      counts = pixels.sum(axis=(1, 2))
      visible_first, visible_last = counts[0] > 80, counts[-1] > 80
      assert visible_first == (action != "appears"), (row["captions"][0], k, counts)
      assert visible_last == (action != "disappears"), (row["captions"][0], k, counts)
      full = pixels[0] if action != "appears" else pixels[-1]
      assert _shape_of(full) == shape, (row["captions"][0], k)
      if action.startswith("moves"):
        x_first = np.nonzero(pixels[0])[1].mean()
        x_last = np.nonzero(pixels[-1])[1].mean()
        shift = (x_last - x_first) * (1 if action == "moves right" else -1)
        assert shift > 0.25 * 64, (row["captions"][0], x_first, x_last)
      # Event 1 is over by mid-clip; event 2 has not started before it.
      still = t >= 0.5 if k == 0 else t <= 0.5
      reference = pixels[-1] if k == 0 else pixels[0]
      for mask in pixels[still]:
        assert np.sum(mask != reference) <= 4, (row["captions"][0], k)
      checked += 1
  assert checked == 2 * (24 + 8)


def test_asking_for_more_distinct_test_videos_than_exist_fails(tmp_path):
  config = synthetic.SyntheticConfig(name="too_big", num_train=1, num_val=1, num_test=5000)
  builder = synthetic.SyntheticVideoText(config=config, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="num_test"):
    builder.download_and_prepare()
