"""Model fingerprint of a search index: which embeddings may share one index.

`model_fingerprint(config, fps)` hashes `config.model`, the identity of the checkpoint
`loading.load_model(config)` loads (`checkpoint_identity`), the frame rate videos are
decoded at and the frame settings: embeddings with the same fingerprint are comparable,
others are not.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import ml_collections

from centerclip_jax.weights import resolver

_FULL_HASH_BYTES = 4 << 20   # checkpoint files up to this size are hashed whole
_SAMPLE_BLOCK = 64 << 10     # larger ones: this many bytes at each of _SAMPLES offsets
_SAMPLES = 16


def _file_digest(h, path: pathlib.Path) -> None:
  """Adds a file's size and content to `h`: whole if small, else sampled blocks."""
  with path.open("rb") as f:  # a local or gs:// path
    f.seek(0, 2)
    size = f.tell()  # (TF's GFile, under gs:// paths, returns None from seek)
    f.seek(0)
    h.update(f"{size}:".encode())
    if size <= _FULL_HASH_BYTES:
      h.update(f.read())
      return
    for i in range(_SAMPLES):
      f.seek((size - _SAMPLE_BLOCK) * i // (_SAMPLES - 1))
      h.update(f.read(_SAMPLE_BLOCK))


def _all_files(root) -> list:
  """Every file under `root` (a local or `gs://` epath; no `**` glob, which GCS refuses)."""
  out = []
  for p in root.iterdir():
    out += _all_files(p) if p.is_dir() else [p]
  return out


def checkpoint_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What identifies the weights `loading.load_model(config)` loads.

  Converted CLIP checkpoint: a digest of every file of it; training workdir: the step
  `load_model` restores (`resolver.resolve`) and a digest of its files; no `init_from`: the
  random-init seed. Digests hash each file's relative path and size, and its content
  (files over 4 MiB: 16 blocks of 64 KiB spread over the file), so that a copied or moved
  checkpoint keeps its identity and a re-trained or re-converted one does not.
  """
  if not config.init_from:
    return {"kind": "random", "seed": int(config.seed)}
  source = resolver.resolve(config.init_from)  # the step load_model loads
  ident: dict[str, Any] = {"kind": source.kind}
  if source.kind == "trained":
    ident["step"] = source.step
  files_root = source.path
  h = hashlib.sha256()
  for f in sorted(_all_files(files_root), key=str):
    h.update(f.relative_to(files_root).as_posix().encode() + b"\0")
    _file_digest(h, f)
  ident["digest"] = h.hexdigest()
  return ident


def model_fingerprint(config: ml_collections.ConfigDict, fps: float) -> tuple[str, dict]:
  """(fingerprint, its parts): hash of `config.model`, the checkpoint identity, fps and the
  frame settings (`config.data.decode_short_side`, `config.data.jpeg_quality`)."""
  model_json = json.dumps(config.model.to_dict(), sort_keys=True)
  parts = {"model_config_sha256": hashlib.sha256(model_json.encode()).hexdigest(),
           "checkpoint": checkpoint_identity(config), "fps": float(fps),
           "frames": {"decode_short_side": int(config.data.decode_short_side),
                      "jpeg_quality": int(config.data.jpeg_quality)}}
  digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
  return digest, parts


def mismatch_reason(old: dict, new: dict) -> str:
  why = []
  if old.get("model_config_sha256") != new["model_config_sha256"]:
    why.append("config.model differs")
  if old.get("checkpoint") != new["checkpoint"]:
    why.append(f"the checkpoint differs (index: {old.get('checkpoint')}, "
               f"now: {new['checkpoint']})")
  if old.get("fps") != new["fps"]:
    why.append(f"fps differs (index: {old.get('fps')}, now: {new['fps']})")
  if old.get("frames") != new["frames"]:
    why.append(f"the frame settings differ (index: {old.get('frames')}, now: "
               f"{new['frames']})")
  return "; ".join(why) or "unknown difference"
