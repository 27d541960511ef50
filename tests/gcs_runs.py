"""Whole commands against the GCS emulator's bucket: what tests/test_gcs*.py share.

`main` and the CLIs run as subprocesses with the emulator's variables (set by the `gcs`
fixture in conftest.py) and the session's persistent XLA compilation cache inherited;
`tiny` is the demo on the 24-video `synthetic_video_text/tiny` with everything in the bucket.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

from centerclip_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12  # of every training run here: the SIGTERM tests need steps left after the kill


def env(**extra) -> dict:
  """The environment of a child: this one's, on CPU, one device, not part of a cluster."""
  out = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  out.pop("XLA_FLAGS", None)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    out.pop(k, None)
  out.update(extra)
  return out


def tool(name: str):
  """tools/<name>.py as a module (its `main(argv)` runs in this process)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(*args, timeout=900, **popen):
  """`python -m centerclip_jax.main ARGS`: run to the end (CompletedProcess), or started
  (Popen) when Popen arguments are given."""
  cmd = [sys.executable, "-m", "centerclip_jax.main", *args]
  if popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env(), text=True, **popen)
  return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=timeout)


def cli(module: str, *args, tmpdir):
  """`python -m MODULE ARGS` with its own $TMPDIR, run to the end."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=env(TMPDIR=str(tmpdir)), capture_output=True, text=True,
                        timeout=900)


def tiny(data_dir: str, workdir: str) -> list[str]:
  """The demo's flags for a short run on the tiny dataset, workdir and data_dir as given."""
  return ["--config", os.path.join(REPO, "configs", "demo.py"), "--workdir", workdir,
          "--config.dataset=synthetic_video_text/tiny", f"--config.data_dir={data_dir}",
          f"--config.train.num_train_steps={STEPS}", "--config.train.global_batch_size=8",
          "--config.train.log_every_steps=1", "--config.eval.batch_size=4", "--config.val_split="]


def params(workdir: str, step: int = STEPS) -> dict:
  """The params of a checkpoint in workdir, as NumPy arrays by key path (the saving run may
  have had 2 hosts)."""
  import jax
  import orbax.checkpoint as ocp
  from centerclip_jax.training import checkpoints
  path = paths.user_path(workdir) / "checkpoints" / str(step) / checkpoints.STATE
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    tree = ckptr.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


def assert_same_params(workdir_a: str, workdir_b: str) -> None:
  """The final params of two runs are bit-identical."""
  a, b = params(workdir_a), params(workdir_b)
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def steps(workdir: str) -> list[int]:
  """The checkpointed steps in workdir, ascending."""
  return sorted(int(p.name) for p in (paths.user_path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def results(workdir: str) -> dict:
  return json.loads((paths.user_path(workdir) / "results.json").read_text())


def prepare_demo_data(data_dir: str):
  """The tiny demo dataset built into data_dir by this process (as a pod prepares its data
  before training)."""
  from centerclip_jax import config as config_lib
  from centerclip_jax.training import trainer
  config = config_lib.base_config()
  config.dataset, config.data_dir = "synthetic_video_text/tiny", data_dir
  config.train_split, config.val_split, config.eval_split = "train", "", "test"
  return trainer.get_builder(config)
