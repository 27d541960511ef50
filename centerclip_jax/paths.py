"""User paths, local or in a bucket (`gs://...`), and the GCS emulator wiring.

Every path a user gives (workdir, data_dir, init_from, --output, --index, ...) goes through
`user_path`, an etils `epath.Path`: local paths are `~`-expanded and made absolute, bucket
URIs are kept as they are. Code then uses only `epath` methods on it (no `os.path`,
`open()`, `os.listdir`, `resolve()`), so the same code runs on a laptop and on a TPU pod.

Which library does the I/O for `gs://` in this install:
  * `epath.Path('gs://...')` uses TensorFlow's `tf.io.gfile` (etils picks it whenever TF is
    installed; gcsfs only without TF), as do TFDS, tf.data's TFRecord reader, and the
    TensorBoard writers: all TF's C++ GCS file system.
  * orbax writes array data with TensorStore's own GCS driver (metadata and directories
    through `epath`, i.e. TF).

GCS emulators: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` is the standard variable; gcsfs
and the google-cloud clients read it themselves. `configure_storage()` (called by
`user_path`, so before any bucket access) sets from it what the others need:
`TENSORSTORE_GCS_HTTP_URL` for TensorStore, and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (read by
TensorStore and TF) so that neither looks for real credentials. TF's GCS file system has
its endpoints compiled in (`https://www.googleapis.com`, `https://storage.googleapis.com`)
and no variable to change them, so it cannot be pointed at an emulator; it honours curl's
`https_proxy` and `CURL_CA_BUNDLE`, which is how the tests reach the emulator through a
local TLS proxy (tests/gcs_emulator.py).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Mapping, MutableMapping, Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike]

EMULATOR_VAR = "STORAGE_EMULATOR_HOST"
TENSORSTORE_URL_VAR = "TENSORSTORE_GCS_HTTP_URL"
TEST_TOKEN_VAR = "GOOGLE_AUTH_TOKEN_FOR_TESTING"


def emulator_endpoint(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """'http://host:port' from STORAGE_EMULATOR_HOST (scheme added if missing), else None."""
  host = environ.get(EMULATOR_VAR, "").strip().rstrip("/")
  if not host:
    return None
  return host if "://" in host else f"http://{host}"


def configure_storage(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
  """Sets each component's emulator variable from STORAGE_EMULATOR_HOST; returns what it set.

  Idempotent, and a variable the user set is left alone. Without the emulator variable
  nothing changes (real GCS, credentials from the environment or the TPU VM).
  """
  endpoint = emulator_endpoint(environ)
  if endpoint is None:
    return {}
  wanted = {TENSORSTORE_URL_VAR: endpoint, TEST_TOKEN_VAR: "emulator"}
  set_now = {k: v for k, v in wanted.items() if k not in environ}
  environ.update(set_now)
  return set_now


def is_uri(value: PathLike) -> bool:
  """True for 'gs://...' (any 'scheme://'), False for local paths."""
  return "://" in os.fspath(value)


def user_path(value: PathLike) -> epath.Path:
  """A user path as an `epath.Path`: local ones `~`-expanded and absolute, URIs as given."""
  configure_storage()
  text = os.fspath(value)
  if is_uri(text):
    return epath.Path(text)
  return epath.Path(text).expanduser().absolute()


def rmtree(path: epath.Path) -> None:
  """Removes a directory tree (local or bucket); a missing path is not an error."""
  if path.exists():
    path.rmtree()


def copytree(src: epath.Path, dst: epath.Path) -> None:
  """Copies a directory tree file by file (local <-> bucket in any direction)."""
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      copytree(child, dst / child.name)
    else:
      child.copy(dst / child.name, overwrite=True)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[epath.Path]:
  """Yields a local path holding `path`'s file: itself if local, else a temporary copy."""
  path = user_path(path)
  if not is_uri(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="centerclip-") as tmp:
    local = epath.Path(tmp) / path.name
    path.copy(local)
    yield local


@contextlib.contextmanager
def staged_output(path: PathLike) -> Iterator[epath.Path]:
  """Yields a local path to write `path` to; for a URI, uploaded when the block succeeds.

  Works for a file or a directory: whatever the block leaves at the yielded path is copied
  to `path` (replacing it), and the local copy is removed.
  """
  path = user_path(path)
  if not is_uri(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="centerclip-") as tmp:
    local = epath.Path(tmp) / path.name
    yield local
    if local.is_dir():
      rmtree(path)
      copytree(local, path)
    elif local.exists():
      local.copy(path, overwrite=True)


@contextlib.contextmanager
def staged_tree(path: PathLike, upload: bool = True) -> Iterator[epath.Path]:
  """Yields a local folder with `path`'s files, for code that needs a local directory.

  Local paths are yielded as they are. For a URI the folder is a temporary copy (empty
  if `path` does not exist yet); with `upload`, it replaces `path` when the block
  succeeds (nothing is uploaded if it raises). The copy is removed in any case.
  """
  path = user_path(path)
  if not is_uri(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="centerclip-") as tmp:
    local = epath.Path(tmp) / path.name
    if path.is_dir():
      copytree(path, local)
    else:
      local.mkdir()
    yield local
    if upload:
      rmtree(path)
      copytree(local, path)


def replace(src: epath.Path, dst: epath.Path) -> None:
  """Moves `src` over `dst` (a file or a directory, replacing what is there).

  A local file move is atomic; a local directory that exists is removed first. Buckets
  have no directory rename: there the tree is copied and `src` removed.
  """
  if not is_uri(src) and not is_uri(dst):
    if dst.is_dir():
      rmtree(dst)
    os.replace(os.fspath(src), os.fspath(dst))
    return
  if src.is_dir():
    rmtree(dst)
    copytree(src, dst)
    rmtree(src)
  else:
    src.copy(dst, overwrite=True)
    src.unlink()

