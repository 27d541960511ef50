"""What the command-line apps print, and where library logs go.

A run's console shows only what a user needs (`say`: devices, dataset sizes, progress,
the metrics table, where results went) and warnings. INFO logs of the libraries (absl,
orbax, TensorFlow, JAX) and of this package go to a log file (`setup_logging`), and also to
the console with `--verbosity=1`. Bad user input ends the program with one line on
stderr (`fail`, `flags_parser`, `errors_as_one_line`), never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import sys
import tempfile
import traceback
from typing import Callable, Iterator, Optional, Sequence

from absl import flags
from absl import logging as absl_logging

from centerclip_jax import paths

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STATE = {"file_handler": None, "unraisablehook": sys.unraisablehook}


def quiet_tensorflow(env=os.environ) -> None:
  """Keeps TensorFlow's native INFO lines off the console; call before TF is imported.

  `TF_CPP_MIN_LOG_LEVEL` filters TF's own logger. TF >= 2.21 also prints a oneDNN notice
  through absl's C++ logger, which that variable does not reach, so oneDNN's custom ops
  are turned off too (TF here only decodes and resizes frames and reads records).
  Values the user set are kept."""
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class UsageError(Exception):
  """Bad user input: the program prints `error: <message>` (one line) and exits 2."""


def fail(message: str, status: int = 2):
  """Prints `error: message` on one line to stderr and exits with `status`."""
  first = " ".join(str(message).split())
  _to_log_file(logging.ERROR, f"error: {first}")
  print(f"error: {first}", file=sys.stderr, flush=True)
  raise SystemExit(status)


@contextlib.contextmanager
def errors_as_one_line(*types: type) -> Iterator[None]:
  """Turns exceptions of `types` (and UsageError) raised inside into `fail(...)`."""
  try:
    yield
  except (UsageError, *types) as e:
    fail(str(e) if str(e) else type(e).__name__)


def say(message: str) -> None:
  """A line for the user: stdout, and the log file (if any)."""
  print(message, flush=True)
  _to_log_file(logging.INFO, message)


def _to_log_file(level: int, message: str) -> None:
  handler = _STATE["file_handler"]
  if handler is not None:
    handler.handle(logging.LogRecord("console", level, __file__, 0, message, None, None))


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
  """Lines a library prints to stdout inside go to the log (INFO) instead."""
  class _ToLog:
    def write(self, text):
      if text.strip():
        logging.getLogger("stdout").info("%s", text.rstrip())
      return len(text)

    def flush(self):
      pass

  with contextlib.redirect_stdout(_ToLog()):
    yield


def default_log_dir() -> pathlib.Path:
  """Where commands without an output folder log: $TMPDIR/centerclip_jax-logs (not a
  valid module name: a folder named `centerclip_jax` in the working directory would
  shadow the package for commands started there)."""
  return pathlib.Path(tempfile.gettempdir()) / "centerclip_jax-logs"


class _LibraryNotices(logging.Filter):
  """Keeps other libraries' notices off the console below ERROR (the log file still gets
  them): deprecations (TFDS's `TensorInfo.dtype`, TF's `map_fn`, ...) and orbax restating
  the read-only manager the resolver opens ("CheckpointManagerOptions.read_only=True,
  setting ...", "Given directory is read only=..."). Also asyncio's "Task exception was
  never retrieved" (an ERROR with a traceback) for orbax / TensorStore tasks: the other
  reads of a failed restore, whose error was reported in one line, collected after the
  program gave up."""

  _OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if record.name == "asyncio" and "exception was never retrieved" in message:
      return not _from_checkpoint_io(record)
    if record.levelno >= logging.ERROR or record.pathname.startswith(self._OURS):
      return True
    return not ("deprecat" in message.lower() or "read_only=True" in message
                or message.startswith("Given directory is read only"))


def _from_checkpoint_io(record: logging.LogRecord) -> bool:
  """Whether a record's message or traceback comes from orbax or TensorStore."""
  text = record.getMessage()
  if record.exc_info and record.exc_info[2] is not None:
    text += "".join(traceback.format_tb(record.exc_info[2]))
  return "orbax" in text or "tensorstore" in text.lower()


def _late_callbacks_to_log(unraisable) -> None:
  """`sys.unraisablehook`: "Event loop is closed" from TensorStore reads that finish after
  a failed orbax restore has closed its event loop (the restore's own error is reported)
  goes to the log file; anything else to the previous hook (stderr)."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    _to_log_file(logging.INFO, "a late TensorStore callback after its event loop closed "
                 "(a failed restore's other reads finishing): ignored")
    return
  _STATE["unraisablehook"](unraisable)


_CONSOLE_FILTER = _LibraryNotices()


def setup_logging(log_file: Optional[os.PathLike], verbosity: Optional[int] = None
                  ) -> Optional[pathlib.Path]:
  """INFO logs to `log_file` (appended); the console shows them only at verbosity >= 1.

  Args:
    log_file: the log file (its folder is created); None: no file.
    verbosity: absl's `--verbosity` (default: the parsed flag, else 0). >= 1 shows INFO
      on the console, >= 2 DEBUG.
  Returns:
    The log file's path, or None.
  """
  if verbosity is None:
    verbosity = flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0
  console_level = (logging.DEBUG if verbosity >= 2 else
                   logging.INFO if verbosity >= 1 else logging.WARNING)
  root = logging.getLogger()
  root.setLevel(min(console_level, logging.INFO))
  absl_logging.set_verbosity(absl_logging.DEBUG if verbosity >= 2 else absl_logging.INFO)
  absl_logging.get_absl_handler().setLevel(console_level)
  absl_logging.get_absl_handler().addFilter(_CONSOLE_FILTER)
  for handler in root.handlers:
    if handler is not absl_logging.get_absl_handler() and not isinstance(
        handler, logging.FileHandler):
      handler.setLevel(console_level)
      handler.addFilter(_CONSOLE_FILTER)
  logging.captureWarnings(True)
  if sys.unraisablehook is not _late_callbacks_to_log:
    _STATE["unraisablehook"] = sys.unraisablehook
    sys.unraisablehook = _late_callbacks_to_log
  for name in ("py.warnings", "tensorflow"):
    logging.getLogger(name).setLevel(logging.INFO)
  old = _STATE["file_handler"]
  if old is not None:
    root.removeHandler(old)
    old.close()
    _STATE["file_handler"] = None
  if log_file is None:
    return None
  path = pathlib.Path(log_file).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  handler = logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(logging.INFO)
  handler.setFormatter(logging.Formatter(LOG_FORMAT))
  root.addHandler(handler)
  _STATE["file_handler"] = handler
  # TensorFlow's logger writes to its own stderr handler; send it through the root's.
  tf_logger = logging.getLogger("tensorflow")
  for h in list(tf_logger.handlers):
    tf_logger.removeHandler(h)
  tf_logger.propagate = True
  return path


def make_writable_dir(path: os.PathLike, flag: str) -> pathlib.Path:
  """Creates folder `path` (if missing) and checks this process can write into it; else
  UsageError naming `flag`. Returns the absolute path (an `epath.Path` for gs://)."""
  if paths.is_uri(path):
    return _make_writable_uri(path, flag)
  p = pathlib.Path(path).expanduser().absolute()
  if p.exists() and not p.is_dir():
    raise UsageError(f"{flag}: {p} is a file, not a folder; give a folder path")
  parent = p
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise UsageError(f"{flag}: {parent} is a file, so {p} cannot be a folder")
  try:
    p.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=p):
      pass
  except OSError as e:
    raise UsageError(f"{flag}: cannot write in {p} ({e.strerror or e}); choose another "
                     "folder") from None
  return p


def _make_writable_uri(path, flag: str):
  """make_writable_dir for a bucket path: creates it and writes (then deletes) a probe."""
  p = paths.user_path(path)
  try:
    if p.exists() and not p.is_dir():
      raise UsageError(f"{flag}: {p} is a file, not a folder; give a folder path")
    p.mkdir(parents=True, exist_ok=True)
    probe = p / f".write-probe-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # tf.errors are not OSErrors
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UsageError(f"{flag}: cannot write in {p} ({message}); check the bucket name and "
                     "your credentials") from None
  return p


def check_input_dir(path: os.PathLike, flag: str) -> None:
  """UsageError naming `flag` when `path` exists but is not a folder."""
  if paths.is_uri(path):
    return  # a bucket prefix is a folder as soon as it holds a file
  p = pathlib.Path(path).expanduser()
  if p.exists() and not p.is_dir():
    raise UsageError(f"{flag}: {p} is a file, not a folder")


def check_output_file(path: os.PathLike, flag: str) -> pathlib.Path:
  """`path` as a file this process can create: its folder exists and is writable, and it
  is not a folder; else UsageError naming `flag`. A gs:// path is returned as it is."""
  if paths.is_uri(path):
    return paths.user_path(path)
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    raise UsageError(f"{flag}: {p} is a folder; give a file path (e.g. {p / 'out.npz'})")
  if not p.parent.is_dir():
    raise UsageError(f"{flag}: folder {p.parent} does not exist; create it first")
  if not os.access(p.parent, os.W_OK | os.X_OK):
    raise UsageError(f"{flag}: folder {p.parent} is not writable")
  return p


# ---------------------------------------------------------------------------- flags


def _config_file_arg(argv: Sequence[str], name: str) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
  return None


def _key_error_line(e: Exception, argv: Sequence[str], name: str) -> Optional[str]:
  """'--config.a.b: the config has no field ...' for a misspelt key, else None."""
  text = str(e.args[0] if e.args else e)
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if hint:
    key = hint.group(2)
  elif re.fullmatch(r"['\"]*\w+['\"]*", text.split("\n")[0]):
    key = text.split("\n")[0].strip("'\"")
  else:
    return None
  culprit = next((a.split("=")[0] for a in argv if a.startswith(f"--{name}.")
                  and re.search(rf"\.{re.escape(key)}(\.|$)", a.split("=")[0])), None)
  msg = f"{culprit or f'--{name}.{key}'}: the config has no field {key!r}"
  return msg + (f'; did you mean "{hint.group(1)}"?' if hint else "")


def flags_parser(config_flag: Optional[str] = "config",
                 rewrite: Optional[Callable[[list[str]], list[str]]] = None):
  """A `flags_parser` for `absl.app.run`: one line on stderr (exit 2) for bad flags.

  Checks that the `--<config_flag>` file exists before ml_collections loads it, and turns
  flag errors (unknown flag, bad value, misspelt config key with its "did you mean")
  into one line. `rewrite(argv) -> argv` runs first (e.g. `config.normalize_switches`).
  """
  def parse(argv: list[str]) -> list[str]:
    argv = list(argv)
    if rewrite is not None:
      argv = rewrite(argv)
    if config_flag:
      value = _config_file_arg(argv[1:], config_flag)
      if value is not None:
        file = value.split(":", 1)[0] if not os.path.exists(value) else value
        if not os.path.isfile(os.path.expanduser(file)):
          fail(f"--{config_flag}: {file}: no such config file (e.g. configs/msrvtt.py)")
    try:
      return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
      fail(_key_error_line(e, argv, config_flag or "config") or f"--{config_flag}: {e}")
    except flags.Error as e:
      text = str(e)
      if "Traceback" in text:  # get_config() raised: keep its last line (the exception)
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        text = f"{text.split(':', 1)[0]}: {lines[-1]}"
      fail(f"{text} (see --helpshort)")
    except (OSError, ValueError, TypeError) as e:
      fail(f"--{config_flag}: {e}" if config_flag else str(e))
    return []
  return parse
