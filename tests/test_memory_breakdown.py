"""tools/memory_breakdown.py on XLA's dump of a small program with known buffers."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Two branches, one named by argv[1] ("encode_text" or not) on 256 rows and the other on 1024 rows, each 4 tanh layers
# whose outputs the backward pass needs; small weights, so that the residuals dominate.
ROWS_TEXT, ROWS_VIDEO, WIDTH, LAYERS = 256, 1024, 128, 4
_PROGRAM = f"""
import json, sys
import jax, jax.numpy as jnp

def branch(h, ws):
  for w in ws:
    h = jnp.tanh(h @ w)
  return h

def loss(params, x, t):
  with jax.named_scope(sys.argv[1]):
    a = branch(t, params["text"])
  v = branch(x, params["video"])
  return jnp.sum(a.mean(0) * v.mean(0))

w = jax.ShapeDtypeStruct(({WIDTH}, {WIDTH}), jnp.float32)
params = {{"text": [w] * {LAYERS}, "video": [w] * {LAYERS}}}
x = jax.ShapeDtypeStruct(({ROWS_VIDEO}, {WIDTH}), jnp.float32)
t = jax.ShapeDtypeStruct(({ROWS_TEXT}, {WIDTH}), jnp.float32)
def train_step(params, x, t):  # SGD, the params donated as training's state is
  grads = jax.grad(loss)(params, x, t)
  return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
mem = jax.jit(train_step, donate_argnums=0).lower(params, x, t).compile().memory_analysis()
print(json.dumps({{"total": mem.temp_size_in_bytes + mem.argument_size_in_bytes
                  + mem.output_size_in_bytes - mem.alias_size_in_bytes}}))
"""


def _tool():
  spec = importlib.util.spec_from_file_location("memory_breakdown",
                                                REPO / "tools" / "memory_breakdown.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _breakdown(folder: pathlib.Path, scope: str) -> dict[str, int]:
  env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={folder} --xla_dump_hlo_as_text "
             "--xla_dump_hlo_module_re=.*train_step.*", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _PROGRAM, scope], env=env,
                        capture_output=True, text=True, check=True)
  total = json.loads(proc.stdout.strip().splitlines()[-1])["total"]
  parts = _tool().breakdown(folder, total)
  assert sum(parts.values()) == total
  assert 0 <= parts["fragmentation"] <= 0.15 * total
  return parts


def test_breakdown_of_a_dumped_program(tmp_path):
  text, video = ROWS_TEXT * WIDTH * 4, ROWS_VIDEO * WIDTH * 4  # bytes of one activation
  weights = 2 * LAYERS * WIDTH * WIDTH * 4
  parts = _breakdown(tmp_path / "text", "encode_text")
  # Entry parameters: both inputs (live throughout), the weights (donated) at most.
  assert text + video <= parts["state_and_batch"] <= text + video + weights
  # Each branch keeps tanh outputs for the backward pass: several, at most one per layer
  # and one more; the backward pass has made something by the peak.
  assert 2 * text <= parts["text_residuals"] <= (LAYERS + 1) * text
  assert 2 * video <= parts["video_residuals"] <= (LAYERS + 1) * video + 2 * text
  assert parts["backward_temporaries"] > 0
  # The same program with the first branch under another name: nothing is text.
  other = _breakdown(tmp_path / "other", "encode_other")
  assert other["text_residuals"] == 0
  assert other["video_residuals"] >= parts["video_residuals"] + 2 * text


def test_peak_section_parsing_and_missing_section():
  tool = _tool()
  text = ("HloLiveRange (max 9):\n  Live ranges at 4 (peak):\n"
          "    fusion.1{}: 1024 bytes (cumulative: 1024 bytes)\n"
          "    while.2{3}: 8 bytes (cumulative: 1032 bytes)\n"
          "  Stack trace breakdown for peak usage: 1 032 bytes\n")
  assert tool.peak_buffers(text) == [("fusion.1", 1024), ("while.2", 8)]
  try:
    tool.peak_buffers("HloLiveRange (max 9):\n")
  except ValueError as e:
    assert "peak" in str(e)
  else:
    raise AssertionError("a dump without a peak section was accepted")
