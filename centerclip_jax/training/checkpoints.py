"""Checkpoints: Orbax CheckpointManager with exact resume, keep-last-N + best, preemption.

A checkpoint step directory holds two items:
  state/  the train-state pytree (params, optimizer state, ...), Orbax standard format;
          global `jax.Array`s are written shard by shard by every host.
  meta/   JSON: the data position (dict), the RNG key (impl name + key data) and metrics.
Retention: the last `max_to_keep` steps plus, with `keep_best`, the step with the best
`best_metric` among those saved with metrics (Orbax preservation policies LatestN | BestN).

For `load_params_only`, the state must be a dict with the params under 'params'.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from centerclip_jax.weights.resolver import META, STATE, abstract_tree

PyTree = Any


def _host_array(x) -> np.ndarray:
  """A (possibly replicated multi-host) array as NumPy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _rng_to_json(rng) -> dict:
  if rng is None:
    return {"kind": "none"}
  if isinstance(rng, jax.Array) and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    data = _host_array(jax.random.key_data(rng))
    return {"kind": "typed", "impl": str(jax.random.key_impl(rng)),
            "shape": list(data.shape), "data": data.ravel().tolist()}
  data = _host_array(rng)
  if data.dtype != np.uint32:
    raise ValueError(f"Checkpointer.save: rng must be a jax PRNG key (typed, or raw uint32), "
                     f"got dtype {data.dtype}")
  return {"kind": "raw", "shape": list(data.shape), "data": data.ravel().tolist()}


def _rng_from_json(d: Mapping[str, Any]):
  if d["kind"] == "none":
    return None
  data = np.asarray(d["data"], np.uint32).reshape(d["shape"])
  if d["kind"] == "raw":
    return jax.numpy.asarray(data)
  return jax.random.wrap_key_data(data, impl=d["impl"])


def _to_float_metrics(metrics: Optional[Mapping[str, Any]]) -> Optional[dict]:
  if metrics is None:
    return None
  out = {}
  for k, v in metrics.items():
    try:
      out[str(k)] = float(np.asarray(v))
    except (TypeError, ValueError) as e:
      raise ValueError(f"Checkpointer.save: metric {k!r} must be a scalar number, got "
                       f"{v!r}") from e
  return out


class Checkpointer:
  """Keeps the last N checkpoints plus the best one; exact resume of a training run.

  With several processes, every process constructs it and calls `save`/`restore` at the
  same steps, and `workdir` is storage that all hosts share (e.g. a GCS bucket).

  Args:
    workdir: checkpoints go to `<workdir>/checkpoints/<step>/`.
    max_to_keep: number of most recent steps kept.
    keep_best: also keep the step with the best `best_metric`.
    best_metric: key of the `metrics` dict passed to `save` that ranks checkpoints.
    best_mode: 'max' or 'min'.
    async_save: write in a background thread (call `wait()` before reading them back).
  """

  def __init__(self, workdir: Union[str, os.PathLike], *, max_to_keep: int = 3,
               keep_best: bool = True, best_metric: str = "text_to_video/R@1",
               best_mode: str = "max", async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.join(os.fspath(workdir), "checkpoints")
    self.best_metric = best_metric
    self.keep_best = keep_best
    worst = -np.inf if best_mode == "max" else np.inf

    def metric_fn(metrics):
      value = (metrics or {}).get(best_metric)
      return worst if value is None else float(value)

    policies = [ocp_managers.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(ocp_managers.BestN(get_metric_fn=metric_fn, reverse=(best_mode == "min"),
                                         n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        best_fn=metric_fn if keep_best else None,
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, META))

  # -------------------------------------------------------------------------- save

  def save(self, step: int, state_pytree: PyTree, *, data_position: Mapping[str, Any], rng,
           metrics: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Saves `state_pytree` at `step` with the data position, RNG key and metrics.

    `data_position` must be JSON-serialisable (e.g. {'epoch': 1, 'index': 640}). If `step`
    already has a checkpoint it is kept and False is returned, unless `force=True`, which
    replaces it. Returns whether a save was started (asynchronous with `async_save`).
    """
    if not isinstance(data_position, Mapping):
      raise ValueError("Checkpointer.save: data_position must be a dict (JSON), got "
                       f"{type(data_position).__name__}")
    if step in self._manager.all_steps():
      if not force:
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    try:
      json.dumps(dict(data_position))
    except TypeError as e:
      raise ValueError("Checkpointer.save: data_position must be JSON-serialisable (plain "
                       f"int/float/str/list/dict; convert NumPy scalars): {e}") from e
    metrics = _to_float_metrics(metrics)
    meta = {"step": int(step), "data_position": dict(data_position),
            "rng": _rng_to_json(rng), "metrics": metrics}
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state_pytree),
                                 META: ocp.args.JsonSave(meta)})
    # Orbax ranks only the checkpoints given metrics; give them only when the selection
    # metric is there, so that a save with other metrics never counts as "best".
    ranked = metrics if metrics and self.best_metric in metrics else None
    return self._manager.save(int(step), args=args, metrics=ranked, force=True)

  # -------------------------------------------------------------------------- restore

  def restore(self, step_or_path: Union[int, str, os.PathLike], abstract_state: PyTree
              ) -> Tuple[int, PyTree, dict, Any]:
    """Restores (step, state, data_position, rng) from a step of this workdir or a path.

    `abstract_state`: a pytree of the saved structure; arrays or
    `jax.ShapeDtypeStruct`s (with shardings, to restore straight onto a mesh).
    """
    target = abstract_tree(abstract_state)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                 META: ocp.args.JsonRestore()})
    if isinstance(step_or_path, (int, np.integer)):
      step = int(step_or_path)
      if step not in self._manager.all_steps():
        raise ValueError(f"no checkpoint at step {step} in {self.directory}; available: "
                         f"{sorted(self._manager.all_steps())}")
      restored = self._manager.restore(step, args=args)
    else:
      path = os.fspath(step_or_path)
      if not os.path.isdir(os.path.join(path, STATE)):
        raise ValueError(f"{path} is not a checkpoint step directory (no '{STATE}/' inside)")
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, args=args)
    meta = restored[META]
    return int(meta["step"]), restored[STATE], meta["data_position"], _rng_from_json(meta["rng"])

  def restore_latest(self, abstract_state: PyTree):
    """(step, state, data_position, rng) of the latest checkpoint, or None if none."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state)

  def metrics(self, step: int) -> Optional[dict]:
    """Metrics saved with `step` (None if saved without)."""
    if step not in self._manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {self.directory}")
    self._manager.wait_until_finished()
    restored = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]["metrics"]

  def step_path(self, step: int) -> str:
    """Directory of `step` (for `load_params_only` or `restore(path, ...)`)."""
    return os.path.join(self.directory, str(int(step)))

  # -------------------------------------------------------------------------- queries

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """Step with the best `best_metric` (None if no checkpoint has it, or keep_best off)."""
    if not self.keep_best:
      return None
    return self._manager.best_step()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def install_preemption_handler(signals=(signal.SIGTERM,)) -> Callable[[], bool]:
  """Turns SIGTERM (by default) into a flag; returns `is_preempted()`.

  The training loop calls `is_preempted()` once per step and, when True, saves
  (`force=True`) and exits. With several processes, `is_preempted()` is a collective
  (any host signalled -> True on every host), so every process must call it at the same
  steps. Call from the main thread.
  """
  event = threading.Event()

  def handler(signum, frame):
    del signum, frame
    event.set()

  for sig in signals:
    signal.signal(sig, handler)

  def is_preempted() -> bool:
    flag = event.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
      flag = bool(np.any(flags))
    return flag

  return is_preempted
