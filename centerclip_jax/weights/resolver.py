"""The one checkpoint resolver: which trained params a path means, and reading them.

A training workdir holds `checkpoints/<step>/{state,meta}` (`training.checkpoints`).
`load_params_only` reads only `state['params']` of one step.
"""

from __future__ import annotations

import os
from typing import Any, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
STATE = "state"
META = "meta"


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


def load_params_only(path: Union[str, os.PathLike], abstract_params: PyTree) -> PyTree:
  """Params from any checkpoint, for eval: `path` is a step dir or a workdir (latest step).

  Reads only state['params'] (no optimizer state); `abstract_params` gives the structure
  (arrays or ShapeDtypeStructs, with shardings to restore onto a mesh).
  """
  path = os.fspath(path)
  if not os.path.isdir(os.path.join(path, STATE)):
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    if not steps:
      raise ValueError(f"load_params_only: no checkpoint found at {path} (expected a step "
                       f"directory with '{STATE}/' inside, or a workdir with checkpoints/)")
    path = os.path.join(root, str(max(steps)))
  target = {"params": abstract_tree(abstract_params)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        os.path.join(path, STATE),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True))
  return restored["params"]
