"""A local, in-memory GCS emulator for the tests (`gcp-storage-emulator`), in a child process.

`python -m tests.gcs_emulator --bucket B --dir D` serves the GCS JSON API on 127.0.0.1 and
writes `D/ready.json` with the addresses; it exits by itself when its parent process (or
`--parent PID`) exits.

TensorStore (under orbax) and gcsfs reach the emulator through `STORAGE_EMULATOR_HOST`
(`centerclip_jax.paths` sets TensorStore's own variable from it). TensorFlow's C++ GCS file
system (under `tf.io.gfile`, TFDS, tf.data, `epath` with TF installed, TensorBoard) has its
endpoint compiled in (`https://www.googleapis.com/storage/v1/`, `https://storage.googleapis.com`)
and no variable to change it. It does honour curl's `https_proxy` and `CURL_CA_BUNDLE`, so
the child also runs a small HTTPS proxy: it answers `CONNECT` for those hosts with a
certificate from a throw-away CA and relays the decrypted requests to the emulator.
`Emulator.env` holds every variable a client process needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_certs(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """A self-signed CA and a leaf certificate for GOOGLE_HOSTS; returns (ca, cert, key)."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "centerclip test CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256()))
  leaf = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  paths = folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"
  paths[0].write_bytes(ca.public_bytes(pem))
  paths[1].write_bytes(leaf.public_bytes(pem))
  paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return paths


def _read_body(rfile, headers: list[bytes]) -> bytes:
  """The request body, de-chunked (the emulator does not decode chunked uploads)."""
  fields = {}
  for h in headers:
    name, _, value = h.decode("latin-1").partition(":")
    fields[name.strip().lower()] = value.strip()
  if "chunked" in fields.get("transfer-encoding", "").lower():
    body = b""
    while (size := int(rfile.readline(1024).split(b";")[0].strip() or b"0", 16)):
      body += rfile.read(size)
      rfile.readline(16)
    while rfile.readline(65536) not in (b"\r\n", b"\n", b""):
      pass
    return body
  return rfile.read(int(fields.get("content-length", 0)))


def _forward(rfile, wfile, line: str, headers: list[bytes], upstream) -> None:
  """Sends one request to the emulator with a plain body and relays the whole answer.

  A client that asks `Expect: 100-continue` (curl, under TF, for every upload) is told to
  go on at once, as GCS does; unanswered, curl waits a second before each body."""
  if any(h.split(b":")[0].strip().lower() == b"expect" and b"100-continue" in h.lower()
         for h in headers):
    wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    wfile.flush()
  body = _read_body(rfile, headers)
  keep = [h for h in headers if h.split(b":")[0].strip().lower() not in
          (b"transfer-encoding", b"content-length", b"connection", b"proxy-connection",
           b"expect")]
  head = (line.encode("latin-1") + b"".join(keep) +
          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
  with socket.create_connection(upstream) as up:
    up.sendall(head + body)
    while data := up.recv(1 << 16):
      wfile.write(data)
  wfile.flush()


def _read_head(rfile) -> tuple[str, list[bytes]]:
  line = rfile.readline(65536).decode("latin-1")
  headers = []
  while (header := rfile.readline(65536)) not in (b"\r\n", b"\n", b""):
    headers.append(header)
  return line, headers


def _proxy_handler(context: ssl.SSLContext, upstream: tuple[str, int]):
  class Handler(socketserver.StreamRequestHandler):

    def handle(self):
      line, headers = _read_head(self.rfile)
      method, target, version = (line.split() + ["", "", ""])[:3]
      if target.startswith("http://"):  # plain http: the emulator's upload session URLs
        host, _, path = target[len("http://"):].partition("/")
        if host.split(":")[0] in GOOGLE_HOSTS:
          _forward(self.rfile, self.wfile, f"{method} /{path} {version}\r\n", headers,
                   upstream)
          return
      host = target.rsplit(":", 1)[0]
      if method != "CONNECT" or host not in GOOGLE_HOSTS:
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        return
      self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
      self.wfile.flush()
      try:
        tls = context.wrap_socket(self.connection, server_side=True)
      except (ssl.SSLError, OSError):
        return
      try:  # one request per connection (Connection: close), as the emulator speaks HTTP/1.0
        rfile, wfile = tls.makefile("rb"), tls.makefile("wb")
        line, headers = _read_head(rfile)
        if line:
          _forward(rfile, wfile, line, headers, upstream)
      except (ssl.SSLError, OSError):
        pass
      finally:
        try:
          tls.close()
        except OSError:
          pass

  return Handler


class _Threading(socketserver.ThreadingMixIn, socketserver.TCPServer):
  daemon_threads = True
  allow_reuse_address = True


def _patch_emulator() -> None:
  """Three fixes to the emulator, for what the real service does.

  Empty media uploads (TF's `makedirs` writes a 0-byte `dir/`) failed; downloads lacked
  the `x-goog-generation` header, which TensorStore reads (OCDBT manifests under orbax);
  TF's `storageLayout` query of a bucket was a 404.
  """
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  media_upload, download = objects._media_upload, objects.download

  def patched_upload(request, response, storage):
    if request.data is None:
      request._data = b""
    return media_upload(request, response, storage)

  def patched_download(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  objects._media_upload, objects.download = patched_upload, patched_download
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      if handler is download:
        methods[method] = patched_download

  def storage_layout(request, response, storage):
    """GET b/BUCKET/storageLayout (TF asks it before writing): a flat-namespace bucket."""
    response.json({"kind": "storage#storageLayout", "bucket": request.params["bucket_name"],
                   "location": "US-CENTRAL1", "locationType": "region",
                   "hierarchicalNamespace": {"enabled": False}})

  server.HANDLERS = ((r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$",
                      {"GET": storage_layout}),) + tuple(server.HANDLERS)


def serve(bucket: str, folder: pathlib.Path, parent: int) -> None:
  """Runs the emulator and the proxy until process `parent` exits."""
  from gcp_storage_emulator.server import create_server

  _patch_emulator()
  port = _free_port()
  emulator = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  emulator.start()
  ca, cert, key = _write_certs(folder)
  context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  context.load_cert_chain(cert, key)
  proxy = _Threading(("127.0.0.1", 0), _proxy_handler(context, ("127.0.0.1", port)))
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  ready = {"emulator": f"http://127.0.0.1:{port}",
           "proxy": f"http://127.0.0.1:{proxy.server_address[1]}", "ca": str(ca)}
  tmp = folder / "ready.json.tmp"
  tmp.write_text(json.dumps(ready))
  tmp.rename(folder / "ready.json")
  while _alive(parent):
    time.sleep(0.5)
  proxy.shutdown()
  emulator.stop()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


@dataclasses.dataclass
class Emulator:
  """A running emulator: `env` for clients, `bucket`, and `url(path)` -> 'gs://bucket/path'."""
  process: subprocess.Popen
  bucket: str
  env: dict[str, str]

  def url(self, path: str = "") -> str:
    return f"gs://{self.bucket}/{path}".rstrip("/") if path else f"gs://{self.bucket}"

  def apply(self, environ=os.environ) -> None:
    environ.update(self.env)

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(10)


def start(bucket: str, folder: pathlib.Path, timeout: float = 60) -> Emulator:
  """Starts the child process and waits until it serves."""
  folder.mkdir(parents=True, exist_ok=True)
  process = subprocess.Popen(
      [sys.executable, "-m", "tests.gcs_emulator", "--bucket", bucket, "--dir", str(folder),
       "--parent", str(os.getpid())],
      cwd=pathlib.Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
      stderr=open(folder / "emulator.log", "wb"))
  ready = folder / "ready.json"
  deadline = time.monotonic() + timeout
  while not ready.exists():
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      raise RuntimeError(f"GCS emulator did not start; see {folder / 'emulator.log'}")
    time.sleep(0.1)
  info = json.loads(ready.read_text())
  env = {
      "STORAGE_EMULATOR_HOST": info["emulator"],
      # TensorFlow's GCS file system only: through the proxy, trusting its test CA.
      "https_proxy": info["proxy"], "HTTPS_PROXY": info["proxy"],
      "http_proxy": info["proxy"], "HTTP_PROXY": info["proxy"],
      "CURL_CA_BUNDLE": info["ca"],
      "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
  }
  return Emulator(process, bucket, env)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bucket", required=True)
  parser.add_argument("--dir", required=True, type=pathlib.Path)
  parser.add_argument("--parent", type=int, default=os.getppid(),
                      help="exit when this process exits (default: the parent)")
  args = parser.parse_args()
  serve(args.bucket, args.dir, args.parent)


if __name__ == "__main__":
  main()
