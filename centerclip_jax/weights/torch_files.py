"""Reading PyTorch checkpoint files safely: format sniffing, `weights_only` unpickling,
TorchScript archives. Every failure is a one-line `CheckpointError` naming the file.

torch is imported lazily (`import_torch`); nothing here knows CLIP's key layout (that is
`porting.py`).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class CheckpointError(ValueError):
  """A file or directory is not a usable CLIP checkpoint; the message is one line."""


def brief(e: BaseException) -> str:
  """One line out of an exception, without torch's long advice paragraphs."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading PyTorch checkpoints needs torch: pip install -r "
                      "requirements-dev.txt (CPU torch==2.13.0)") from None
  return torch


def _sniff(path: Path) -> str:
  """'torchscript' or 'pickle' (torch.save zip or legacy), else CheckpointError."""
  with open(path, "rb") as f:
    head = f.read(8)
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise CheckpointError(f"{path}: corrupt zip archive ({brief(e)})") from None
    if any(re.fullmatch(r"[^/]+/(constants\.pkl|code/.*)", n) for n in names):
      return "torchscript"
    if any(re.fullmatch(r"[^/]+/data\.pkl", n) for n in names):
      return "pickle"
    raise CheckpointError(f"{path}: a zip archive, but not a PyTorch checkpoint (no data.pkl)")
  if head.startswith(b"PK"):
    raise CheckpointError(f"{path}: truncated or corrupt zip archive (incomplete download?); "
                          "download it again")
  if head[:1] == b"\x80":
    return "pickle"
  raise CheckpointError(f"{path}: not a PyTorch checkpoint (unrecognised header {head[:4]!r})")


def _numpy_safe_globals():
  """numpy scalars/dtypes that training scripts leave in checkpoints (e.g. best_acc1)."""
  try:
    from numpy._core.multiarray import scalar  # pylint: disable=g-import-not-at-top
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar  # pylint: disable=g-import-not-at-top
  dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType",
                                             "Int32DType", "BoolDType") if hasattr(np.dtypes, n)]
  return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def _torch_load_safely(torch, path: Path):
  """torch.load with weights_only=True; Python objects in the pickle are refused, not run."""
  try:
    with torch.serialization.safe_globals(_numpy_safe_globals()):
      return torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "Weights only load failed" not in str(e):
      raise CheckpointError(f"{path}: cannot unpickle ({brief(e)})") from None
    found = re.findall(r"GLOBAL (\S+)", str(e))
    try:
      found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) or found
    except Exception:  # pylint: disable=broad-except
      pass
    raise CheckpointError(
        f"{path}: refused to unpickle Python objects other than tensors ({', '.join(found)}); "
        "loading is weights_only for safety: re-save only the weights, e.g. "
        "torch.save(model.state_dict(), ...)") from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: cannot read ({brief(e)}); truncated or corrupt?") from None


def _weights_dict(obj, path: Path) -> Mapping[str, Any]:
  """The tensor dict of a loaded object: the object itself, or its 'state_dict'/'model'."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  for key in ("state_dict", "model"):
    if isinstance(obj.get(key), Mapping):
      return obj[key]
  return obj


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], str]:
  """path -> (every tensor of the checkpoint as numpy, floating ones as float32; format
  'torchscript' or 'pickle')."""
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file")
  fmt = _sniff(path)
  torch = import_torch()
  if fmt == "torchscript":
    try:
      obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{path}: cannot read TorchScript archive ({brief(e)})") from None
  else:
    obj = _torch_load_safely(torch, path)
  weights = _weights_dict(obj, path)
  state = {}
  for key, value in weights.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      state[str(key)] = (value.to(torch.float32) if value.is_floating_point() else value).numpy()
  if not state:
    raise CheckpointError(f"{path}: no tensors in this checkpoint")
  return state, fmt
