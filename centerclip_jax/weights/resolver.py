"""The one checkpoint resolver: which trained params a path means, and reading them.

A training workdir holds `checkpoints/<step>/{state,meta}` (`training.checkpoints`).
`config.init_from` (and every command that takes a checkpoint) accepts:

  DIR             a training workdir: its BEST step by `text_to_video/R@1` (the metric
                  the run selected on), or its latest step if no step has that metric;
                  a converted CLIP checkpoint (tools/convert_clip_weights.py) as is;
  DIR@latest      the workdir's latest step;
  DIR@STEP        that step (e.g. `runs/msrvtt@1400`);
  DIR/checkpoints/STEP  a step directory (the same as DIR@STEP).

DIR is a local or `gs://` path (etils `epath`). The steps are orbax's
(`CheckpointManager`, read-only here): only complete, committed steps are listed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Union

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from centerclip_jax import paths

PyTree = Any
STATE = "state"
META = "meta"
CHECKPOINTS = "checkpoints"
SELECTION_METRIC = "text_to_video/R@1"
LATEST = "latest"


class CheckpointError(ValueError):
  """A checkpoint that cannot be found or read; the message is one line for the user."""


class CorruptCheckpointError(CheckpointError):
  """A listed step whose files cannot be read (truncated, deleted, half-copied)."""

  def __init__(self, message: str, step: Optional[int] = None):
    super().__init__(message)
    self.step = step


@dataclasses.dataclass(frozen=True)
class Resolved:
  """What a checkpoint spec means.

  kind: 'trained' (a step of a training workdir) or 'converted' (CLIP weights).
  root: the workdir or the converted checkpoint directory.
  path: the step directory (trained) or `root` (converted).
  step: the step (trained) or None.
  reason: why this step ('best by text_to_video/R@1 = 43.1', 'asked for', ...).
  """
  kind: str
  root: epath.Path
  path: epath.Path
  step: Optional[int] = None
  reason: str = ""

  @property
  def spec(self) -> str:
    """A spec that pins this exact checkpoint (`DIR@STEP` for a trained step)."""
    return f"{self.root}@{self.step}" if self.kind == "trained" else str(self.root)

  def describe(self) -> str:
    if self.kind == "trained":
      return f"step {self.step} of {self.root} ({self.reason})"
    return f"converted CLIP weights {self.root}"


def split_spec(value: str) -> tuple[str, Optional[str]]:
  """'DIR@latest' -> ('DIR', 'latest'); 'DIR@12' -> ('DIR', '12'); 'DIR' -> ('DIR', None)."""
  head, sep, tail = str(value).rpartition("@")
  if sep and head and (tail == LATEST or tail.isdecimal()):
    return head, tail
  return str(value), None


def is_workdir(path: epath.Path) -> bool:
  return (path / CHECKPOINTS).is_dir()


def _manager(root: epath.Path, metric: str, mode: str) -> ocp.CheckpointManager:
  """A read-only orbax manager over `root/checkpoints`, ranking steps by `metric`."""
  worst = -np.inf if mode == "max" else np.inf

  def metric_fn(metrics):
    value = (metrics or {}).get(metric)
    return worst if value is None else float(value)

  options = ocp.CheckpointManagerOptions(read_only=True, best_fn=metric_fn, best_mode=mode)
  return ocp.CheckpointManager(root / CHECKPOINTS, options=options, item_names=(STATE, META))


def ranked_steps(root: epath.Path, metric: str = SELECTION_METRIC, mode: str = "max"
                 ) -> list[tuple[int, Optional[float]]]:
  """[(step, metric value or None)] of a workdir's complete steps, best first.

  Steps saved with `metric` come first, best to worst (ties: the later step first, as
  orbax ranks them); then the others, latest first.
  """
  mgr = _manager(root, metric, mode)
  try:
    steps = sorted(mgr.all_steps())
    values = {}
    for s in steps:
      value = (mgr.metrics(s) or {}).get(metric)
      values[s] = None if value is None else float(value)
    best = mgr.best_step() if any(v is not None for v in values.values()) else None
  finally:
    mgr.close()
  scored = [s for s in steps if values[s] is not None]
  sign = -1.0 if mode == "max" else 1.0
  scored.sort(key=lambda s: (sign * values[s], -s))
  if best is not None and scored and scored[0] != best:  # follow orbax's choice exactly
    scored.remove(best)
    scored.insert(0, best)
  rest = sorted((s for s in steps if values[s] is None), reverse=True)
  return [(s, values[s]) for s in scored + rest]


def resolve(value: Union[str, os.PathLike], *, field: str = "init_from",
            metric: str = SELECTION_METRIC, mode: str = "max") -> Resolved:
  """The checkpoint `value` means (see the module docstring); errors name `config.<field>`."""
  value = os.fspath(value)
  if "\x00" in value:
    raise CheckpointError(f"config.{field}: invalid path {value!r}")
  head, selector = split_spec(value)
  path = paths.user_path(head)
  if selector is None and (path / STATE).is_dir() and path.name.isdecimal():
    path, selector = path.parent.parent, path.name  # a step directory: DIR@STEP
  if not path.exists():
    raise FileNotFoundError(
        f"config.{field}: {path} does not exist. Convert OpenAI CLIP weights with "
        "`python tools/convert_clip_weights.py --input ViT-B-32.pt --output DIR` and set "
        f"--config.{field}=DIR (or point it at a training workdir).")
  if not is_workdir(path):
    if selector is not None:
      raise CheckpointError(f"config.{field}: '@{selector}' picks a step of a training "
                            f"workdir, but {path} has no {CHECKPOINTS}/ folder")
    return Resolved("converted", path, path)
  ranked = ranked_steps(path, metric, mode)
  if not ranked:
    raise CheckpointError(f"config.{field}: {path}/{CHECKPOINTS} has no complete checkpoint "
                          "yet (train first, or wait for the first save)")
  steps = sorted(s for s, _ in ranked)
  if selector == LATEST:
    step, reason = steps[-1], "latest, asked for"
  elif selector is not None:
    step, reason = int(selector), "asked for"
    if step not in steps:
      raise CheckpointError(f"config.{field}: {path} has no complete checkpoint at step "
                            f"{step}; it has steps {steps}")
  else:
    step, best_value = ranked[0]
    reason = (f"best by {metric} = {best_value:g}" if best_value is not None else
              f"latest (no step has {metric})")
  return Resolved("trained", path, path / CHECKPOINTS / str(step), step, reason)


def fallback_for(resolved: Resolved, metric: str = SELECTION_METRIC, mode: str = "max"
                 ) -> Optional[int]:
  """The step to use instead of `resolved` if it is unreadable: the next best one (by the
  same rule), else the latest other step; only steps whose files look complete."""
  if resolved.kind != "trained":
    return None
  order = [s for s, _ in ranked_steps(resolved.root, metric, mode) if s != resolved.step]
  if "best" not in resolved.reason:  # latest / asked for: the newest other step
    order.sort(reverse=True)
  for s in order:
    if looks_complete(resolved.root / CHECKPOINTS / str(s)):
      return s
  return None


def looks_complete(step_dir: epath.Path) -> bool:
  """The files every complete step has (a cheap check, not a full read)."""
  return all((step_dir / p).exists() for p in (
      f"{STATE}/_METADATA", f"{STATE}/manifest.ocdbt", f"{META}/metadata"))


def abstract_tree(tree: PyTree) -> PyTree:
  """Arrays -> `jax.ShapeDtypeStruct` (keeping a jax.Array's sharding); restore target."""
  def convert(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    return x
  return jax.tree.map(convert, tree)


def brief(e: BaseException, limit: int = 160) -> str:
  """One short line out of an exception (TensorStore errors span pages)."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def read_params(step_dir: epath.Path, abstract_params: PyTree) -> PyTree:
  """state['params'] of one step directory (no optimizer state is read)."""
  target = {"params": abstract_tree(abstract_params)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        step_dir / STATE,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True))
  return restored["params"]


def load_params(resolved: Resolved, abstract_params: PyTree, *, field: str = "init_from"
                ) -> PyTree:
  """Params of a resolved trained step; an unreadable step is refused with one line that
  names it and the `DIR@STEP` to use instead."""
  try:
    return read_params(resolved.path, abstract_params)
  except Exception as e:  # pylint: disable=broad-except  # TensorStore raises plain Exception
    fallback = fallback_for(resolved)
    hint = (f"use --config.{field}={resolved.root}@{fallback} (the previous complete step)"
            if fallback is not None else "no other complete step to fall back to")
    raise CorruptCheckpointError(
        f"config.{field}: checkpoint step {resolved.step} of {resolved.root} is unreadable "
        f"(truncated or missing files? {brief(e)}); {hint}", resolved.step) from None


def load_params_only(value: Union[str, os.PathLike], abstract_params: PyTree) -> PyTree:
  """Params of the checkpoint `value` means (`resolve`), logging which step and why.

  `abstract_params` gives the structure (arrays or ShapeDtypeStructs, with shardings to
  restore onto a mesh).
  """
  resolved = resolve(value)
  if resolved.kind != "trained":
    raise CheckpointError(f"{resolved.root} is not a training workdir or step directory "
                          f"(no {CHECKPOINTS}/ or {STATE}/ inside)")
  logging.info("loading params: %s", resolved.describe())
  return load_params(resolved, abstract_params)
