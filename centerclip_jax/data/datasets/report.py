"""The build report of a video-text dataset: per split, what was written and what was not.

A listed video is one of:
  * written: decoded to at least one frame and stored;
  * missing: no file under the manual dir matches its id;
  * undecodable: the file is there but PyAV cannot read a frame from it;
  * short: written, but fewer than `min_frames(fps)` frames decoded (under
    `MIN_SECONDS` of video). Short videos are kept (every video with a frame gets
    an embedding; the pipeline repeats its last frame) and listed so that a person
    can check them.

The lists live in the dataset's metadata (`skipped`, `short`, `listed`), so the
report can be rendered again from a built dataset; `render` prints the first few ids
of each list, `render(..., show=None)` all of them (the `REPORT_FILE` in the data dir).
"""

from __future__ import annotations

import math
from typing import Mapping

MIN_SECONDS = 1.0
SHOW = 5
REPORT_FILE = "build_report.txt"
KINDS = ("missing", "undecodable", "short")


def min_frames(fps: float) -> int:
  """Decoded frames below which a video counts as short: ceil(fps * MIN_SECONDS)."""
  return max(1, math.ceil(fps * MIN_SECONDS - 1e-9))


def kind_of(item: Mapping) -> str:
  """'missing' or 'undecodable' for an entry of metadata['skipped'], 'short' otherwise."""
  reason = item.get("reason")
  return reason.split(":", 1)[0] if reason else "short"


def lists(metadata: Mapping) -> dict[str, dict[str, list[Mapping]]]:
  """{split: {kind: [entry, ...]}} from the dataset's metadata (every split listed)."""
  metadata = metadata or {}
  splits = set(metadata.get("listed", {})) | set(metadata.get("skipped", {}))
  out = {s: {k: [] for k in KINDS} for s in sorted(splits)}
  for field in ("skipped", "short"):
    for split, items in dict(metadata.get(field, {})).items():
      for item in items:
        out.setdefault(split, {k: [] for k in KINDS})[kind_of(item)].append(item)
  return out


def _detail(kind: str, item: Mapping) -> str:
  if kind == "short":
    return f"{item['video_id']} ({item['num_frames']} frames)"
  return f"{item['video_id']}: {item['reason'].split(': ', 1)[-1]}"


def render(metadata: Mapping, title: str, show: int | None = SHOW) -> str:
  """The report as text: a table of counts, then the first `show` ids of each list
  (None: every id, one per line, with its reason)."""
  metadata = metadata or {}
  per_split = lists(metadata)
  listed = dict(metadata.get("listed", {}))
  fps = float(dict(metadata.get("decode", {})).get("fps", 3.0))
  lines = [f"{title}: videos per split (short = fewer than {min_frames(fps)} decoded frames, "
           f"under {MIN_SECONDS:g} s; kept)",
           f"  {'split':<12} {'listed':>7} {'written':>8} {'missing':>8} {'undecodable':>12} "
           f"{'short':>6}"]
  for split, kinds in per_split.items():
    n = listed.get(split)
    written = "?" if n is None else n - len(kinds["missing"]) - len(kinds["undecodable"])
    lines.append(f"  {split:<12} {'?' if n is None else n:>7} {written:>8} "
                 f"{len(kinds['missing']):>8} {len(kinds['undecodable']):>12} "
                 f"{len(kinds['short']):>6}")
  for split, kinds in per_split.items():
    for kind in KINDS:
      items = kinds[kind]
      if not items:
        continue
      head = f"  {kind}, {split} ({len(items)})"
      if show is None:
        lines.append(head + ":")
        lines += [f"    {_detail(kind, it)}" for it in items]
      elif kind == "missing":
        more = f", ... and {len(items) - show} more" if len(items) > show else ""
        lines.append(f"{head}: " + ", ".join(it["video_id"] for it in items[:show]) + more)
      else:
        lines.append(head + ":")
        lines += [f"    {_detail(kind, it)}" for it in items[:show]]
        if len(items) > show:
          lines.append(f"    ... and {len(items) - show} more")
  if metadata.get("empty_splits"):
    lines.append(f"  left out (no readable video): {', '.join(metadata['empty_splits'])}")
  return "\n".join(lines)
