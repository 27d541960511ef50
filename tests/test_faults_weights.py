"""Untrusted weight files stay inert: pickle payloads that would write a file when
unpickled are refused by the converter (weights/porting.py) without running.

tests/test_convert.py plants the payload in a `torch.save` zip and in a raw pickle (read
with `torch.load(weights_only=True)`); here it hides in an archive that looks like
TorchScript, which takes the `torch.jit.load` route instead.
"""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")

from centerclip_jax.weights import porting  # pylint: disable=g-import-not-at-top


class _WritesAFile:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


class _Tiny(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Parameter(torch.zeros(2, 2))

  def forward(self, x):
    return x @ self.proj


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_payload_in_a_torchscript_archive_is_not_executed(tmp_path, member):
  """A real TorchScript archive (torch.jit.save, records aligned as torch writes them)
  with one pickle record swapped for the payload: torch.jit.load's unpickler refuses it."""
  marker = str(tmp_path / "PWNED")
  good, path = str(tmp_path / "good.pt"), tmp_path / "ViT-B-32.pt"
  torch.jit.save(torch.jit.script(_Tiny()), good)
  reader = torch._C.PyTorchFileReader(good)  # pylint: disable=protected-access
  writer = torch._C.PyTorchFileWriter(str(path))  # pylint: disable=protected-access
  swapped = False
  for name in reader.get_all_records():
    data = reader.get_record(name)
    if name.endswith(member):
      data, swapped = pickle.dumps({"visual.proj": _WritesAFile(marker)}, protocol=2), True
    writer.write_record(name, data, len(data))
  writer.write_end_of_file()
  del writer
  assert swapped
  with pytest.raises(porting.CheckpointError) as info:
    porting.read_torch_checkpoint(path)
  msg = str(info.value)
  print(msg)
  assert "\n" not in msg and str(path) in msg and "TorchScript" in msg, msg
  assert "mkdir" in msg  # refused at the payload's global, not on some other flaw
  assert not os.path.exists(marker), "the pickle payload ran"
