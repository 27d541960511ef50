r"""What the memory peak of the compiled train step holds, baseline vs `B6 - 4, K`.

  python tools/memory_breakdown.py [--arch ViT-B/32] [--train_batch 32] [--dtype float32]
  python tools/benchmark.py --memory-breakdown   # the same, ViT-B/32, batch 32, float32

Each configuration's train step (`benchmark.train_memory`: training's own step and
optimizer, state donated) is compiled, not run, in a fresh process with
`XLA_FLAGS=--xla_dump_to=DIR`. XLA writes the live ranges of the scheduled program and the
buffers live at its peak (`*-live-range.txt`); each buffer is attributed by the op that
made it (the `op_name` metadata of its instruction in `*_after_optimizations.txt`):

- state and batch: entry parameters (params, AdamW moments, the uint8 frames, the tokens);
- text residuals / video residuals: made by the forward pass of the text tower / of the
  rest (the video tower, the loss), alive because the backward pass needs them;
- backward temporaries: made by the backward pass (`transpose(jvp(...))`);
- fragmentation: XLA's memory analysis figure (`benchmark.train_memory`) minus the live
  bytes at the peak.

It prints the parts in GB for both and their ratios, and `floor`: the ratio with the
backward temporaries and fragmentation left out, i.e. the lowest `train_memory_ratio` any
schedule of these saved activations can reach without remat.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

PARTS = ("state_and_batch", "text_residuals", "video_residuals", "backward_temporaries",
         "fragmentation")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$")
_PEAK_HEADER = re.compile(r"^\s+Live ranges at \d+ \(peak\):")
_LIVE = re.compile(r"^\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes")


def _one(folder: pathlib.Path, suffix: str) -> str:
  found = sorted(folder.glob(f"*train_step*after_optimizations{suffix}"))
  if not found:
    raise FileNotFoundError(f"{folder}: no XLA dump of the train step (*{suffix})")
  return found[-1].read_text()


def peak_buffers(live_range_text: str) -> list[tuple[str, int]]:
  """(instruction, bytes) of every buffer XLA lists as live at the peak."""
  out, inside = [], False
  for line in live_range_text.splitlines():
    if _PEAK_HEADER.match(line):
      inside = True
      continue
    if inside:
      m = _LIVE.match(line)
      if not m:
        break
      out.append((m.group(1), int(m.group(2))))
  if not out:
    raise ValueError("no 'Live ranges at N (peak)' section in XLA's live-range dump")
  return out


def part_of(hlo_line: str) -> str:
  """The part a buffer belongs to, from the HLO line of the instruction that made it."""
  if re.match(r"^\S+ parameter\(", hlo_line):
    return "state_and_batch"
  m = re.search(r'op_name="([^"]*)"', hlo_line)
  op = m.group(1) if m else ""
  if "transpose(" in op:
    return "backward_temporaries"
  return "text_residuals" if "encode_text" in op else "video_residuals"


def breakdown(folder: pathlib.Path, total_bytes: int) -> dict[str, int]:
  """Bytes of each part of `PARTS` at the peak of the dumped train step."""
  lines = {}
  for line in _one(folder, ".txt").splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      lines.setdefault(m.group(1), m.group(2))
  parts = collections.Counter({p: 0 for p in PARTS})
  for name, size in peak_buffers(_one(folder, "-live-range.txt")):
    parts[part_of(lines.get(name, ""))] += size
  parts["fragmentation"] = total_bytes - sum(parts.values())
  return dict(parts)


def _compile_and_dump(arch: str, variant: int, dtype: str, batch: int) -> None:
  """Child process: compile one train step (XLA_FLAGS set by the parent); print its bytes."""
  import benchmark  # pylint: disable=g-import-not-at-top  (tools/, beside this file)
  _, overrides = benchmark.variants(arch, quick=True)[variant]
  print(json.dumps({"total_bytes": benchmark.train_memory(
      benchmark.build(arch, overrides, dtype), batch)}))


def measure(arch: str = "ViT-B/32", batch: int = 32, dtype: str = "float32") -> dict:
  """{config name: {part: bytes}} for the baseline and `B6 - 4, K` k-medoids++."""
  import benchmark  # pylint: disable=g-import-not-at-top  (tools/, beside this file)
  out = {}
  for variant, (name, _) in enumerate(benchmark.variants(arch, quick=True)[:2]):
    with tempfile.TemporaryDirectory() as folder:
      env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                        f" --xla_dump_to={folder} --xla_dump_hlo_as_text"
                                        " --xla_dump_hlo_module_re=.*train_step.*").strip())
      job = json.dumps({"arch": arch, "variant": variant, "dtype": dtype, "batch": batch})
      proc = subprocess.run([sys.executable, __file__, "--compile", job], env=env,
                            capture_output=True, text=True, check=False)
      if proc.returncode:
        raise RuntimeError(f"compiling {name} failed:\n{proc.stderr[-3000:]}")
      total = json.loads(proc.stdout.strip().splitlines()[-1])["total_bytes"]
      out[name] = breakdown(pathlib.Path(folder), total)
  return out


def print_report(result: dict) -> None:
  (base_name, base), (name, ours) = result.items()
  print(f"{'GB at the peak':24s} {base_name:>12s} {name:>20s}  ratio")
  for part in PARTS + ("total",):
    b = sum(base.values()) if part == "total" else base[part]
    o = sum(ours.values()) if part == "total" else ours[part]
    ratio = f"{o / b:6.4f}" if b > 1e6 else "   -  "
    print(f"{part:24s} {b / 1e9:12.3f} {o / 1e9:20.3f}  {ratio}")
  saved = lambda d: d["state_and_batch"] + d["text_residuals"] + d["video_residuals"]
  print(f"floor (state, batch and residuals only): {saved(ours) / saved(base):.4f}")


def run(arch: str, batch: int, dtype: str, json_path: str | None = None) -> dict:
  """`measure`, printed (and written to `json_path` as {config: {part: bytes}})."""
  result = measure(arch, batch, dtype)
  print_report(result)
  if json_path:
    pathlib.Path(json_path).write_text(json.dumps(result, indent=2))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--arch", default="ViT-B/32", choices=("ViT-B/32", "ViT-B/16"))
  parser.add_argument("--train_batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--json", help="also write {config: {part: bytes}} here")
  parser.add_argument("--compile", help=argparse.SUPPRESS)  # the child process's job
  args = parser.parse_args()
  if args.compile:
    _compile_and_dump(**json.loads(args.compile))
    return
  run(args.arch, args.train_batch, args.dtype, args.json)


if __name__ == "__main__":
  main()
