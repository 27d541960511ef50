"""The console shows warnings, not other libraries' deprecation or read-only notices nor
TensorStore's late callbacks after a failed restore; the log file keeps everything."""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

from centerclip_jax import console


def _emit(pathname: str, level: int, message: str):
  logger = logging.getLogger("somelib")
  logger.handle(logger.makeRecord("somelib", level, pathname, 1, message, (), None))


def test_library_deprecations_go_to_the_log_file_only(tmp_path, capfd):
  log = console.setup_logging(tmp_path / "log.txt", verbosity=0)
  try:
    absl_logging.use_absl_handler()
    _emit("/x/site-packages/tensorflow_datasets/core/features/feature.py", logging.WARNING,
          "`TensorInfo.dtype` is deprecated. Please change your code")
    _emit("/x/site-packages/orbax/checkpoint/manager.py", logging.WARNING,
          "step 7 could not be read")
    _emit("/x/site-packages/lib/old.py", logging.ERROR, "deprecated path failed")
    _emit(console.__file__, logging.WARNING, "our own option is deprecated")
    _emit("/x/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.WARNING,
          "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.")
    _emit("/x/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.WARNING,
          "Given directory is read only=/runs/a/checkpoints")
    for handler in logging.getLogger().handlers:
      handler.flush()
    err = capfd.readouterr().err
  finally:
    console.setup_logging(None, verbosity=0)
  assert "TensorInfo.dtype" not in err
  assert "read_only=True" not in err and "read only=" not in err
  assert "step 7 could not be read" in err          # other warnings still shown
  assert "deprecated path failed" in err            # errors always shown
  assert "our own option is deprecated" in err      # this package's own notices shown
  text = log.read_text()
  for message in ("TensorInfo.dtype", "step 7 could not be read", "our own option",
                  "read_only=True, setting", "Given directory is read only"):
    assert message in text, message


class _RaisesOnDelete:
  def __init__(self, exc: Exception):
    self.exc = exc

  def __del__(self):
    raise self.exc


def test_late_event_loop_callbacks_go_to_the_log_file_only(tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  log = console.setup_logging(tmp_path / "log.txt", verbosity=0)
  try:
    obj = _RaisesOnDelete(RuntimeError("Event loop is closed"))
    del obj  # what a TensorStore read finishing after orbax closed its loop raises
    other = _RaisesOnDelete(ValueError("a real problem"))
    del other
    for handler in logging.getLogger().handlers:
      handler.flush()
  finally:
    console.setup_logging(None, verbosity=0)
  assert [str(e) for e in seen] == ["a real problem"]  # the previous hook gets the rest
  assert "late TensorStore callback" in log.read_text()


def _exc_info_raised_in(filename: str):
  code = compile("def read():\n  raise ValueError('Error reading zarr chunk')\n", filename, "exec")
  namespace = {}
  exec(code, namespace)  # pylint: disable=exec-used
  try:
    namespace["read"]()
  except ValueError:
    return sys.exc_info()
  raise AssertionError("did not raise")


def test_unretrieved_orbax_task_errors_go_to_the_log_file_only(tmp_path, capfd):
  """A failed restore's other reads end as asyncio "Task exception was never retrieved"
  ERRORs; from orbax/TensorStore they stay off the console, any other task's still show."""
  log = console.setup_logging(tmp_path / "log.txt", verbosity=0)
  try:
    absl_logging.use_absl_handler()
    asyncio_logger = logging.getLogger("asyncio")
    for where in ("/x/site-packages/orbax/checkpoint/_src/serialization/tensorstore.py",
                  "/x/site-packages/someserver/handlers.py"):
      asyncio_logger.handle(asyncio_logger.makeRecord(
          "asyncio", logging.ERROR, "/usr/lib/python3/asyncio/base_events.py", 1,
          "Task exception was never retrieved\nfuture: <Task finished name='Task-7' "
          "coro=<_wrap_awaitable()> exception=ValueError('Error reading zarr chunk')>", (),
          _exc_info_raised_in(where)))
    for handler in logging.getLogger().handlers:
      handler.flush()
    err = capfd.readouterr().err
  finally:
    console.setup_logging(None, verbosity=0)
  assert "orbax/checkpoint" not in err
  assert err.count("Task exception was never retrieved") == 1 and "someserver" in err
  text = log.read_text()
  assert text.count("Task exception was never retrieved") == 2 and "orbax/checkpoint" in text
