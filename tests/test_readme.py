"""The README's commands run: every ```bash block of README.md is a test (slow).

Convention (also written at the top of README.md, as an HTML comment):
  * Blocks run in README order, each as `bash -e -o pipefail` from one scratch folder
    that is also $HOME (so `~/x` stays inside it), with `configs/`, `tools/` and `docs/`
    linked in from the checkout. A block must exit 0 and print no "Traceback". Blocks
    build on each other as a reader's session would (the demo block makes `runs/demo`,
    the converter `clip/ViT-B-32`, the MSR-VTT block `runs/msrvtt`, ...).
  * Placeholders, made before the first block (`PLACEHOLDERS`): `ViT-B-32.pt` (a
    random-weight checkpoint with ViT-B/32's shapes, written with torch), `/data/msrvtt`
    (replaced by a miniature MSR-VTT layout, `video_fixtures.write_msrvtt_layout`),
    `a.mp4`, `b.avi`, `clip.mp4`, `~/videos/` (generated PyAV videos), `captions.txt`.
  * Set-up commands: a leading `pip install ... &&` is dropped (the checkout is already
    installed); the test command (`python -m pytest`) is not run here: `.ci/run` runs it,
    and `test_ci_runs_the_readme_test_command` checks that `.ci/run` holds it verbatim.
  * `python -m centerclip_jax.main` gets a short run appended (`SHORT_RUN`): few steps,
    small batches, and the demo on the 24-video `synthetic_video_text/tiny`.
  * A block preceded by `<!-- readme-test: skip: REASON -->` (blank lines allowed in
    between) is reported as skipped with REASON: for what a CPU machine cannot run
    (a TPU pod, a GPU).
New blocks need nothing here unless they use a new placeholder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINKED = ("configs", "tools", "docs")
# Text replaced in every block: README path -> path under the scratch folder.
PLACEHOLDER_PATHS = {"/data/msrvtt": "raw/msrvtt"}
SHORT_RUN = {
    "configs/demo.py": ("--config.dataset=synthetic_video_text/tiny "
                        "--config.train.num_train_steps=4 --config.train.global_batch_size=8 "
                        "--config.eval.batch_size=8"),
    "": ("--config.train.num_train_steps=2 --config.train.global_batch_size=2 "
         "--config.eval.batch_size=2"),
}
TEST_COMMAND = "python -m pytest"
BLOCK_TIMEOUT_S = 3000  # the MSR-VTT block took 1,112 s on a machine loaded 15x

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_SKIP = re.compile(r"^\s*<!--\s*readme-test:\s*skip:\s*(.+?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  line: int      # 1-based line of the opening fence
  text: str      # the commands, indentation removed
  skip: str      # reason, or ""

  @property
  def name(self) -> str:
    words = re.findall(r"(?:-m |tools/)([\w.]+)", self.text) or [self.text.split()[0]]
    return f"line{self.line}-{words[-1].removesuffix('.py').replace('.', '_')}"


def bash_blocks(markdown: str) -> list[Block]:
  """The ```bash blocks of a markdown text, with their skip reasons."""
  lines = markdown.splitlines()
  blocks, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, lang, start = m.group(1), m.group(2), i
    i += 1
    body = []
    while i < len(lines) and not _FENCE.match(lines[i]):
      body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
      i += 1
    i += 1  # the closing fence
    if lang != "bash":
      continue
    above = start - 1
    while above >= 0 and not lines[above].strip():
      above -= 1
    skip = _SKIP.match(lines[above]) if above >= 0 else None
    blocks.append(Block(start + 1, "\n".join(body).strip(), skip.group(1) if skip else ""))
  return blocks


def _join_continuations(text: str) -> list[str]:
  return [line.strip() for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines() if line.strip()]


def _drop_pip(line: str) -> str:
  parts = [p.strip() for p in line.split("&&")]
  while parts and parts[0].startswith("pip install"):
    parts.pop(0)
  return " && ".join(parts)


def _short_run(command: str) -> str:
  if "python -m centerclip_jax.main" not in command:
    return command
  config = re.search(r"--config[ =](\S+)", command)
  path = config.group(1).split(":")[0] if config else ""
  return f"{command} {SHORT_RUN.get(path, SHORT_RUN[''])}"


def script(block: Block, scratch: Path) -> str:
  """The bash script a block runs as (see the module docstring)."""
  lines = []
  for line in _join_continuations(block.text):
    line = " && ".join(_short_run(part.strip()) for part in _drop_pip(line).split("&&"))
    for placeholder, rel in PLACEHOLDER_PATHS.items():
      line = line.replace(placeholder, shlex.quote(str(scratch / rel)))
    if line:
      lines.append(line)
  return "\n".join(lines)


def readme_test_command() -> str:
  (block,) = [b for b in bash_blocks(README.read_text()) if TEST_COMMAND in b.text]
  (line,) = _join_continuations(block.text)
  return line


BLOCKS = bash_blocks(README.read_text())


# ------------------------------------------------------------------------- fast checks


def test_parser_reads_fences_skips_and_continuations(tmp_path):
  text = ("x\n```bash\necho 1\n```\n\n<!-- readme-test: skip: needs a TPU pod -->\n\n"
          "```bash\ntpu-run\n```\n```\nnot bash\n```\n1. item\n\n   ```bash\n"
          "   pip install -e . && python -m centerclip_jax.main --config configs/msrvtt.py \\\n"
          "       --workdir w --x=/data/msrvtt\n   ```\n")
  blocks = bash_blocks(text)
  assert [(b.line, b.text, b.skip) for b in blocks[:2]] == [
      (2, "echo 1", ""), (8, "tpu-run", "needs a TPU pod")]
  assert blocks[2].name == "line16-centerclip_jax_main"
  assert script(blocks[2], tmp_path) == (
      "python -m centerclip_jax.main --config configs/msrvtt.py --workdir w "
      f"--x={tmp_path / 'raw/msrvtt'} {SHORT_RUN['']}")


def test_setup_commands_install_the_package():
  setup = [b for b in BLOCKS if b.text.startswith("pip install")]
  assert len(setup) >= 2 and all(b.text.startswith("pip install -e . ") for b in setup)
  assert any("configs/demo.py --workdir runs/demo" in b.text for b in setup)


def test_ci_runs_the_readme_test_command():
  command = readme_test_command()
  assert command.startswith("pip install -e . -r requirements-dev.txt")
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert command in ci, f".ci/run does not run the README's test command: {command}"


# ------------------------------------------------------------------------- the blocks


def _make_placeholders(scratch: Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from centerclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from tests import torch_checkpoints, video_fixtures as vf  # pylint: disable=g-import-not-at-top
  for name in LINKED:
    (scratch / name).symlink_to(REPO / name)
  model = torch_checkpoints.reference_model(clip_lib.get_preset("ViT-B/32"))
  torch_checkpoints.write_state_dict(model, scratch / "ViT-B-32.pt", dtype=torch.float16)
  del model
  vf.write_msrvtt_layout(scratch / PLACEHOLDER_PATHS["/data/msrvtt"])
  vf.write_video(scratch / "a.mp4", seed=1, pattern="moving")
  vf.write_video(scratch / "b.avi", seed=2)
  vf.write_video(scratch / "clip.mp4", seed=3, pattern="moving")
  vf.write_video(scratch / "videos" / "one.mp4", seed=4)
  vf.write_video(scratch / "videos" / "sub" / "two.avi", seed=5, pattern="moving")
  (scratch / "captions.txt").write_text("a man is cooking\na red square moves left\n")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  folder = tmp_path_factory.mktemp("readme")
  _make_placeholders(folder)
  return folder


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_block(block, scratch):
  if block.skip:
    pytest.skip(f"README line {block.line}: {block.skip}")
  if TEST_COMMAND in block.text:
    pytest.skip(f"README line {block.line}: the test command; .ci/run runs it "
                "(test_ci_runs_the_readme_test_command)")
  commands = script(block, scratch)
  env = dict(os.environ, HOME=str(scratch))
  proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", commands], cwd=scratch, env=env,
                        capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
  output = proc.stdout + proc.stderr
  where = f"README line {block.line}:\n{commands}\n--- output (tail) ---\n{output[-4000:]}"
  assert proc.returncode == 0, where
  assert "Traceback" not in output, where
