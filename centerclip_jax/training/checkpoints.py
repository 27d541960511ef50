"""Checkpoints: Orbax CheckpointManager with exact resume, keep-last-N + best, preemption.

A checkpoint step directory holds two items:
  state/  the train-state pytree (params, optimizer state, ...), Orbax standard format;
          global `jax.Array`s are written shard by shard by every host.
  meta/   JSON: the data position (dict), the RNG key (impl name + key data) and metrics.
Retention: the last `max_to_keep` steps plus, with `keep_best`, the step with the best
`best_metric` among those saved with metrics (Orbax preservation policies LatestN | BestN).

For `resolver.load_params_only`, the state must be a dict with the params under 'params'.
A step that cannot be read at resume is set aside (`checkpoints/corrupt.<step>`) and the
previous one is used; a failed write raises `CheckpointWriteError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from typing import Any, Mapping, Optional, Tuple, Union

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from centerclip_jax import paths
from centerclip_jax.weights import resolver
from centerclip_jax.weights.resolver import META, STATE, abstract_tree

CORRUPT_PREFIX = "corrupt."


class CheckpointWriteError(resolver.CheckpointError):
  """A checkpoint could not be written (full disk, I/O error); one line for the user."""

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
    self.directory = paths.user_path(workdir) / resolver.CHECKPOINTS
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
        cleanup_tmp_directories=True,  # half-written steps of a killed run
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, META))
    self._pending: Optional[int] = None  # the step an async save is writing

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
      self.wait()
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
    self.wait()  # the previous async save: its write error is about its own step
    with self._write_errors(int(step)):
      started = self._manager.save(int(step), args=args, metrics=ranked, force=True)
    self._pending = int(step)
    return started

  @contextlib.contextmanager
  def _write_errors(self, step: int):
    """Turns an OSError of the writer (ENOSPC, EIO, ...) into one line naming the path."""
    try:
      yield
    except OSError as e:
      failed = self._pending if self._pending is not None else step
      self._pending = None
      good = [s for s in self.all_steps() if s != failed]
      kept = (f"the previous checkpoint (step {good[-1]}) is intact" if good else
              "no earlier checkpoint exists")
      where = e.filename or self.step_path(failed)
      raise CheckpointWriteError(
          f"writing checkpoint step {failed} failed: {where}: {e.strerror or e} "
          f"(free space or fix the storage, then run again to resume; {kept})") from None

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
      path = paths.user_path(step_or_path)
      if not (path / STATE).is_dir():
        raise ValueError(f"{path} is not a checkpoint step directory (no '{STATE}/' inside)")
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, args=args)
    meta = restored[META]
    return int(meta["step"]), restored[STATE], meta["data_position"], _rng_from_json(meta["rng"])

  def restore_latest(self, abstract_state: PyTree):
    """(step, state, data_position, rng) of the newest readable checkpoint, or None.

    A newer step that cannot be read (truncated or deleted files) while an older one can
    is logged as a warning naming it, set aside as `checkpoints/corrupt.<step>` (so that
    the run can write that step again) and skipped. If no step can be read, the newest
    step's error is raised (e.g. a model that no longer matches the checkpoints).
    """
    failed = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # TensorStore: plain Exception
        failed.append((step, e))
        continue
      for bad, e in failed:
        logging.warning("checkpoint step %d in %s is unreadable (%s); set aside as %s%d, "
                        "resuming from step %d", bad, self.directory, resolver.brief(e),
                        CORRUPT_PREFIX, bad, step)
        self._set_aside(bad)
      return restored
    if failed:
      step, e = failed[0]
      raise resolver.CorruptCheckpointError(
          f"cannot resume: no checkpoint in {self.directory} can be read; step {step}: "
          f"{resolver.brief(e)}", step) from e
    return None

  def _set_aside(self, step: int) -> None:
    """Renames an unreadable step out of orbax's view (primary host; all hosts wait)."""
    if jax.process_index() == 0:
      paths.replace(self.directory / str(step), self.directory / f"{CORRUPT_PREFIX}{step}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()

  def metrics(self, step: int) -> Optional[dict]:
    """Metrics saved with `step` (None if saved without)."""
    if step not in self._manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {self.directory}")
    self._manager.wait_until_finished()
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]["metrics"]

  def step_path(self, step: int) -> epath.Path:
    """Directory of `step` (for `resolver.read_params` or `restore(path, ...)`)."""
    return self.directory / str(int(step))

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
    """Blocks until an async save is written; its write error is raised here."""
    with self._write_errors(self._pending or 0):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_json(path, obj: Any) -> None:
  """Writes `obj` as JSON to `path` atomically (a temporary sibling, then a move): a failed
  write (full disk, I/O error) raises one line naming the path and leaves the old file."""
  path = paths.user_path(path)
  tmp = path.parent / f".{path.name}.tmp"
  try:
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    paths.replace(tmp, path)
  except OSError as e:
    try:
      if tmp.exists():
        tmp.unlink()
    except OSError:
      pass
    kept = "the previous version is unchanged" if path.exists() else "nothing was written"
    raise CheckpointWriteError(f"writing {path} failed: {e.strerror or e} ({kept})") from None


class PreemptionWatch:
  """The preemption flag, read once per step and the same on every host.

  `reached(step)` is called once per training step by every process, with the number of
  steps done; True means: save `step` now and exit. With several processes it is JAX's
  preemption sync point (`multihost_utils.reached_preemption_sync_point`): a preemption
  notice (SIGTERM by default) reaching any host makes every host return True at the same
  step, and orbax's `CheckpointManager` treats that step as a preemption save. With one
  process (or the JAX preemption service off) a SIGTERM handler sets the flag; with
  several processes and the service off, the flags are gathered once per step.
  Construct it from the main thread, after `jax.distributed.initialize`.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._sync_point = (jax.process_count() > 1 and
                        bool(jax.config.jax_enable_preemption_service))
    self._event = threading.Event()
    if not self._sync_point:  # the JAX service installs its own SIGTERM notifier
      for sig in signals:
        signal.signal(sig, lambda signum, frame: self._event.set())

  def reached(self, step: int) -> bool:
    if self._sync_point:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    flag = self._event.is_set()
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
      flag = bool(np.any(flags))
    return flag
