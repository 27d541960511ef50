"""Synthetic video-text benchmark: coloured shapes that move, appear and disappear.

A small, fully deterministic stand-in for MSR-VTT that needs no download: the demo trains a
random-init CLIP on it in minutes and checks that retrieval works. Registered with TFDS as
`synthetic_video_text`; it writes the shared feature schema of `features.py`.

Grammar (every video shows exactly two events, in this order):

  caption := event ", then " event            (+ paraphrased joiners, see below)
  event   := "a " COLOUR " " SHAPE " " ACTION
  COLOUR  := red | green | blue | yellow | white
  SHAPE   := square | circle | triangle
  ACTION  := moves left | moves right | appears | disappears

e.g. "a red square moves left, then a blue circle appears". The two objects always have
different colours. Paraphrases (chosen by the video's generator) replace the joiner
("{a}, then {b}", "first {a}, then {b}", "{a} and then {b}") and the verb phrase (e.g.
"slides to the left", "shows up", "vanishes"); every surface form names its event
unambiguously, so a caption determines its event combination.

Rendering: a plain grey background of size `frame_size`; the two objects are large
(radius ~ 0.14-0.19 x frame) and live in opposite halves (which half is random). Event 1
happens in about the first 40% of the clip, event 2 in about the last 40%; outside its
event an object is still (a mover rests at its start or end position, an appearing object
is absent before and present after, a disappearing one the reverse). Consecutive frames
therefore differ only a little, and the order of the two events is visible only in time.

Splits: the (5 * 4 colours) * (3 * 3 shapes) * (4 * 4 actions) = 2880 ordered event
combinations are partitioned by a hash of (seed, canonical caption) into ~80% train / ~10%
val / ~10% test, so no caption (and no combination) occurs in two splits; val and test draw
distinct combinations, so no two of their videos share a caption. Train videos have 1-2
paraphrased captions, val and test videos one. Every video is drawn with
`np.random.default_rng(seed + split offset + index)` and nothing else, so two builds are
identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow_datasets as tfds

from centerclip_jax.data.datasets import features

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 85, 240),
    "yellow": (240, 220, 35),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle")
ACTIONS = ("moves left", "moves right", "appears", "disappears")
# Surface forms of each action; index 0 is the canonical one.
ACTION_PHRASES: dict[str, tuple[str, ...]] = {
    "moves left": ("moves left", "slides to the left", "goes left"),
    "moves right": ("moves right", "slides to the right", "goes right"),
    "appears": ("appears", "shows up", "fades in"),
    "disappears": ("disappears", "vanishes", "fades out"),
}
JOINERS = ("{a}, then {b}", "first {a}, then {b}", "{a} and then {b}")
SPLITS = ("train", "val", "test")
# Seed offsets per split: video i of split s uses default_rng(seed + offset[s] + i).
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
# Percent of the hash space per split (train, val, test).
_SPLIT_PERCENT = (80, 10, 10)


class Event(NamedTuple):
  colour: str
  shape: str
  action: str


Combination = tuple[Event, Event]


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Sizes and rendering of one synthetic variant."""

  num_train: int = 2000
  num_val: int = 100
  num_test: int = 100
  min_frames: int = 8
  max_frames: int = 16
  frame_size: int = 64
  fps: float = 4.0
  seed: int = 0


def event_text(event: Event, phrase: int = 0) -> str:
  """'a red square moves left' (phrase picks the action's surface form)."""
  return f"a {event.colour} {event.shape} {ACTION_PHRASES[event.action][phrase]}"


def caption(combo: Combination, joiner: int = 0, phrases: tuple[int, int] = (0, 0)) -> str:
  """The caption of a two-event combination; all zeros give the canonical form."""
  return JOINERS[joiner].format(a=event_text(combo[0], phrases[0]),
                                b=event_text(combo[1], phrases[1]))


def all_combinations() -> list[Combination]:
  """Every ordered pair of events whose objects have different colours."""
  events = [Event(c, s, a) for c, s, a in itertools.product(COLOURS, SHAPES, ACTIONS)]
  return [(e1, e2) for e1, e2 in itertools.product(events, events) if e1.colour != e2.colour]


def _hash(seed: int, combo: Combination, salt: str) -> int:
  digest = hashlib.sha256(f"{salt}|{seed}|{caption(combo)}".encode()).hexdigest()
  return int(digest[:16], 16)


def split_combinations(seed: int) -> dict[str, list[Combination]]:
  """Disjoint partition of `all_combinations()` into train/val/test, each in hash order.

  The order within a split is a seeded pseudo-random order (by a second hash), so video i
  of a split gets combination i (mod the split's size).
  """
  parts: dict[str, list[Combination]] = {s: [] for s in SPLITS}
  bounds = np.cumsum(_SPLIT_PERCENT)
  for combo in all_combinations():
    bucket = _hash(seed, combo, "split") % 100
    parts[SPLITS[int(np.searchsorted(bounds, bucket, side="right"))]].append(combo)
  for name in SPLITS:
    parts[name].sort(key=lambda c: _hash(seed, c, "order"))
  seen = [set(parts[s]) for s in SPLITS]
  for a, b in itertools.combinations(seen, 2):
    assert not a & b, "synthetic splits share an event combination"
  assert sum(map(len, seen)) == len(all_combinations())
  return parts


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
  """Boolean mask of a shape centred at the origin; dx, dy are pixel offsets."""
  if shape == "circle":
    return dx * dx + dy * dy <= radius * radius
  if shape == "square":
    half = 0.85 * radius
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  if shape == "triangle":  # Apex up, base at the bottom.
    top, bottom = -radius, 0.8 * radius
    width = (dy - top) / (bottom - top) * 1.05 * radius
    return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= width)
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_video(combo: Combination, rng: np.random.Generator, *, num_frames: int,
                 size: int) -> np.ndarray:
  """Draws the two events of `combo` as uint8 frames [num_frames, size, size, 3]."""
  background = rng.integers(25, 85) + rng.integers(-6, 7, size=3)
  first_on_top = rng.random() < 0.5
  # Event intervals in normalised time [0, 1].
  intervals = [(rng.uniform(0.0, 0.1), rng.uniform(0.35, 0.45)),
               (rng.uniform(0.55, 0.65), rng.uniform(0.9, 1.0))]
  objects = []
  for k, event in enumerate(combo):
    radius = rng.uniform(0.14, 0.19) * size
    on_top = first_on_top if k == 0 else not first_on_top
    cy = (rng.uniform(0.2, 0.3) if on_top else rng.uniform(0.7, 0.8)) * size
    shift = 0.0
    if event.action == "moves left":
      cx, shift = rng.uniform(0.68, 0.78) * size, -rng.uniform(0.35, 0.45) * size
    elif event.action == "moves right":
      cx, shift = rng.uniform(0.22, 0.32) * size, rng.uniform(0.35, 0.45) * size
    else:
      cx = rng.uniform(0.3, 0.7) * size
    colour = np.clip(np.array(COLOURS[event.colour]) + rng.integers(-12, 13, size=3), 0, 255)
    objects.append((event, radius, cx, cy, shift, colour, intervals[k]))

  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for f in range(num_frames):
    t = f / max(num_frames - 1, 1)
    canvas = np.broadcast_to(background, (size, size, 3)).astype(np.float32)
    for event, radius, cx, cy, shift, colour, (start, end) in objects:
      progress = float(np.clip((t - start) / (end - start), 0.0, 1.0))
      alpha = {"appears": progress, "disappears": 1.0 - progress}.get(event.action, 1.0)
      if alpha <= 0.0:
        continue
      mask = _shape_mask(event.shape, xs - (cx + progress * shift), ys - cy, radius)
      weight = (alpha * mask)[..., None]
      canvas = canvas * (1.0 - weight) + colour * weight
    frames[f] = np.round(canvas).astype(np.uint8)
  return frames


def video_example(config: SyntheticConfig, split: str, index: int,
                  combo: Combination) -> dict:
  """One example of the feature schema (frames as uint8 arrays, TFDS encodes JPEG)."""
  rng = np.random.default_rng(config.seed + SPLIT_OFFSETS[split] + index)
  num_frames = int(rng.integers(config.min_frames, config.max_frames + 1))
  frames = render_video(combo, rng, num_frames=num_frames, size=config.frame_size)
  num_captions = int(rng.integers(1, 3)) if split == "train" else 1
  forms = list(itertools.product(range(len(JOINERS)), range(3), range(3)))
  chosen = rng.choice(len(forms), size=num_captions, replace=False)
  captions = [caption(combo, forms[i][0], forms[i][1:]) for i in chosen]
  return {
      "video_id": f"{split}_{index:05d}",
      "frames": list(frames),
      "num_frames": num_frames,
      "fps": config.fps,
      "captions": captions,
  }


def _check_config(config: SyntheticConfig, parts: dict[str, Sequence[Combination]]) -> None:
  if not 1 <= config.min_frames <= config.max_frames:
    raise ValueError(f"SyntheticConfig {config.name!r}: need 1 <= min_frames <= max_frames, "
                     f"got {config.min_frames}, {config.max_frames}")
  for split, count in (("val", config.num_val), ("test", config.num_test)):
    if count > len(parts[split]):
      raise ValueError(f"SyntheticConfig {config.name!r}: num_{split}={count} exceeds the "
                       f"{len(parts[split])} distinct {split} captions; lower it")


class SyntheticVideoText(tfds.core.GeneratorBasedBuilder):
  """Two-event coloured-shape videos with time-ordered captions (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name="default", description="2000/100/100 videos, 8-16 frames, 64px."),
      SyntheticConfig(name="tiny", description="Test-sized: 24/8/8 videos, 5-14 frames.",
                      num_train=24, num_val=8, num_test=8, min_frames=5, max_frames=14),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features.video_text_features(),
        description=__doc__.split("\n\n")[0],
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    parts = split_combinations(config.seed)
    _check_config(config, parts)
    sizes = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    return {split: self._generate_examples(split, sizes[split], parts[split])
            for split in SPLITS}

  def _generate_examples(self, split: str, count: int,
                         combos: Sequence[Combination]) -> Iterator[tuple[str, dict]]:
    for index in range(count):
      example = video_example(self.builder_config, split, index, combos[index % len(combos)])
      yield example["video_id"], example


def save_video(path: str, split: str = "test", index: int = 0, config: str = "default") -> str:
  """Writes video `index` of `split` (the one the dataset holds) as uint8 frames
  [T, H, W, 3] to `path` (.npy, which encode / search / visualize_clusters read);
  returns its caption."""
  config = next(c for c in SyntheticVideoText.BUILDER_CONFIGS if c.name == config)
  combos = split_combinations(config.seed)[split]
  example = video_example(config, split, index, combos[index % len(combos)])
  np.save(path, np.stack(example["frames"]).astype(np.uint8))
  return example["captions"][0]

