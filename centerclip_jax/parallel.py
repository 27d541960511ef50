"""Data parallelism: one `jax.jit` step over a mesh of every device of every host.

Why jit + mesh rather than `pmap`: since JAX 0.8, `jax.pmap` is in maintenance mode and is
itself implemented on `jax.jit` + `jax.shard_map`; JAX asks new code to use those
directly. So the training step is a single `jax.jit` over a 1-D `Mesh` (axis 'batch')
that spans all devices of all processes: params and optimizer state are replicated
(`replicated(mesh)`), each batch is a global `jax.Array` sharded along its leading axis
(`batch_sharding(mesh)`), and the loss is written on the global batch, so XLA inserts the
gradient all-reduce and the all-gathers of the contrastive score matrix itself. Each host
only feeds its own slice of the batch (`host_batch_to_global`), and the same program runs
unchanged on 1 device, 8 devices or many hosts. Per-device code, where clearer, goes in
`jax.shard_map` over the same mesh.
"""

from __future__ import annotations

import collections
import itertools
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
BATCH_AXIS = "batch"


# ----------------------------------------------------------------------------- processes


def detect_multiprocess_env(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """Name of the multi-process launcher found in `environ`, or None for one process.

  Recognised: explicit JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID),
  Slurm with more than one task, Open MPI with more than one rank, and Cloud TPU pods
  (more than one worker host).
  """
  env = os.environ if environ is None else environ

  def more_than_one(key):
    try:
      return int(env.get(key, "1")) > 1
    except ValueError:
      return False

  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  if "SLURM_JOB_ID" in env and more_than_one("SLURM_NTASKS"):
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and more_than_one("OMPI_COMM_WORLD_SIZE"):
    return "ompi"
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "tpu"
  return None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           *, force: bool = False, **kwargs) -> bool:
  """Calls `jax.distributed.initialize` when there is more than one process.

  It runs when arguments are given, `force=True`, or `detect_multiprocess_env()` finds a
  launcher (for the 'env' launcher, JAX_NUM_PROCESSES and JAX_PROCESS_ID are read);
  otherwise it is a no-op. Safe to call twice. Must run before any other JAX call.

  Returns:
    True when the JAX distributed system is initialised (now or before).
  """
  if jax.distributed.is_initialized():
    return True
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  launcher = detect_multiprocess_env()
  if not (explicit or force or launcher):
    return False
  if launcher == "env":
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
      num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
      process_id = int(os.environ["JAX_PROCESS_ID"])
  if jax.config.jax_cpu_collectives_implementation is None:
    # Cross-process collectives on CPU hosts (the default in recent JAX; older ones had none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kwargs)
  except RuntimeError as e:
    raise RuntimeError(
        "initialize_distributed must run before any other JAX call (device query, array "
        f"creation, jit); call it first in main. JAX said: {e}") from e
  except ValueError as e:
    raise ValueError(
        "initialize_distributed: could not work out the multi-process setup (launcher "
        f"{launcher!r}); pass coordinator_address='host:port', num_processes and "
        f"process_id, or set JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID. "
        f"JAX said: {e}") from e
  return True


# ----------------------------------------------------------------------------- mesh


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """1-D mesh with axis 'batch' over `devices` (default: every device of every host).

  Devices are ordered by (process, id), so each process owns one contiguous block of
  the global batch: process p holds rows [p * B / P, (p + 1) * B / P).
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices")
  devices.sort(key=lambda d: (d.process_index, d.id))
  try:
    axis_types = (jax.sharding.AxisType.Auto,)
    return Mesh(np.array(devices), (BATCH_AXIS,), axis_types=axis_types)
  except (AttributeError, TypeError):  # Older JAX without axis types.
    return Mesh(np.array(devices), (BATCH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of params / optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch arrays: leading axis split over 'batch'."""
  return NamedSharding(mesh, P(BATCH_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  """Raises ValueError unless `global_batch` splits evenly over the mesh and the hosts."""
  n_dev = mesh.devices.size
  n_proc = len({d.process_index for d in mesh.devices.flat})
  if global_batch <= 0 or global_batch % n_dev:
    raise ValueError(
        f"global batch size {global_batch} must be a positive multiple of the number of "
        f"devices ({n_dev} over {n_proc} process(es)); change the batch size in the config "
        f"(e.g. to {max(n_dev, (global_batch // n_dev) * n_dev)}) or run on a divisor of it")


def _local_device_count(mesh: Mesh) -> int:
  return len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This host's slice of the batch -> global `jax.Array`s sharded on 'batch'.

  Args:
    batch: name -> array [local_batch, ...]; every host passes the same names, shapes
      and dtypes, and its own rows (process p: rows [p * local_batch, (p + 1) *
      local_batch) of the global batch).
    mesh: from `make_mesh`.

  Returns:
    name -> jax.Array [local_batch * num_processes, ...] with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  n_local_dev = _local_device_count(mesh)
  n_proc = len({d.process_index for d in mesh.devices.flat})
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"host_batch_to_global: batch[{name!r}] is a scalar; every batch "
                       "entry needs a leading batch axis")
    if value.shape[0] % n_local_dev:
      raise ValueError(
          f"host_batch_to_global: batch[{name!r}] has {value.shape[0]} rows on this host, "
          f"not a multiple of its {n_local_dev} local devices; make the per-host batch "
          "size a multiple of the local device count")
    global_shape = (value.shape[0] * n_proc,) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def prefetch_to_mesh(batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict]:
  """This host's batches -> global batches (`host_batch_to_global`), `size - 1` ahead.

  The transfers are asynchronous, so while the step on batch n runs, batch n + 1 is
  already on its way to the devices (flax's `prefetch_to_device` for a mesh). size 1
  transfers each batch only when it is asked for.
  """
  if size < 1:
    raise ValueError(f"prefetch_to_mesh: size must be >= 1, got {size}")
  batches = iter(batches)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append(host_batch_to_global(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def _host_value(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError("replicate: got a sharded multi-host array; gather it first "
                       "(global_to_host)")
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Puts a pytree (params, optimizer state) on every device of the mesh.

  Every host must pass the same values (e.g. the same init seed or checkpoint).
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = _host_value(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree)


def global_to_host(tree: PyTree) -> PyTree:
  """Gathers (sharded) global arrays to full NumPy arrays on every host.

  Used for eval embeddings: each host embeds its slice, then every host gets all rows.
  """
  def gather(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(gather, tree)


# ------------------------------------------------------------------------------ models


def jit_encoders(model, mesh=None):
  """jit-compiled (encode_video(params, frames, mask), encode_text(params, tokens)).

  With a `mesh` (`make_mesh`), params are replicated and the batch is sharded
  on its leading axis over the mesh's devices (pass `host_batch_to_global`
  arrays); without one, everything runs on the default device.
  """
  video_fn = lambda p, f, m: model.apply({"params": p}, f, m, method=model.encode_video)
  text_fn = lambda p, t: model.apply({"params": p}, t, method=model.encode_text)
  if mesh is None:
    return jax.jit(video_fn), jax.jit(text_fn)
  rep, shard = replicated(mesh), batch_sharding(mesh)
  return (jax.jit(video_fn, in_shardings=(rep, shard, shard), out_shardings=shard),
          jax.jit(text_fn, in_shardings=(rep, shard), out_shardings=shard))
