"""Evaluation: embed a whole split once, score every caption against every video.

`embed_split` runs the video and text towers over the padded, per-host-sharded eval
streams of `data.pipeline.eval_datasets`, gathers the embeddings of every host and drops
the padding, so that every video and caption counts exactly once. The eval batch is
`config.eval.batch_size` rounded up to a multiple of the device count (padded rows are
masked out), so any batch size runs on any number of devices. `evaluate_split` turns the
embeddings into the retrieval table of `centerclip_jax.evaluation.metrics`, with the
number of videos and captions scored and the split's size at build time.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import jax
import numpy as np
import tqdm

from centerclip_jax import config as config_lib
from centerclip_jax import parallel
from centerclip_jax.data import pipeline
from centerclip_jax.evaluation import metrics as metrics_lib


class NonFiniteEmbeddingError(ValueError):
  """A video or caption whose embedding has NaN/inf entries."""


def _collect(stream, fn, keys, mesh, total: int, desc: str, show: bool):
  """Runs `fn` on every batch; returns (outputs [n, D], index [n]) of the valid rows."""
  outs, idx = [], []
  with tqdm.tqdm(total=total, desc=desc, disable=not show, unit="ex", leave=False) as bar:
    for batch in stream:
      glob = parallel.host_batch_to_global({k: batch[k] for k in keys + ("valid", "video_index")},
                                           mesh)
      emb = parallel.global_to_host(fn(*[glob[k] for k in keys]))
      valid = parallel.global_to_host(glob["valid"]).astype(bool)
      outs.append(emb[valid])
      idx.append(parallel.global_to_host(glob["video_index"])[valid])
      bar.update(int(valid.sum()))
  return np.concatenate(outs), np.concatenate(idx)


def check_finite(embeddings: np.ndarray, names: Sequence[str], what: str) -> None:
  """Raises NonFiniteEmbeddingError naming the rows of `embeddings [n, D]` with NaN/inf."""
  bad = np.flatnonzero(~np.all(np.isfinite(embeddings), axis=-1))
  if bad.size:
    shown = ", ".join(repr(str(names[i])) for i in bad[:5])
    more = f" and {bad.size - 5} more" if bad.size > 5 else ""
    raise NonFiniteEmbeddingError(
        f"{what}: non-finite (NaN/inf) embedding for {bad.size} of {len(embeddings)}: "
        f"{shown}{more}")


def embed_split(model, params, builder, split: str, config, mesh) -> dict[str, Any]:
  """Embeddings of a split: `video [V, D]` (in video_index order), `text [C, D]`,
  `text_to_video [C]` (the video index of every caption)."""
  res = model.clip_config.image_resolution
  global_bs = config_lib.eval_batch_size(config.eval.batch_size, mesh.devices.size)
  if global_bs != config.eval.batch_size:
    logging.info("eval batch %d -> %d (a multiple of the %d devices; padding is masked)",
                 config.eval.batch_size, global_bs, mesh.devices.size)
  per_host = global_bs // jax.process_count()
  data = pipeline.eval_datasets(
      builder, split, batch_size=per_host, max_frames=model.max_frames,
      max_words=config.model.max_words, resolution=res,
      process_index=jax.process_index(), process_count=jax.process_count())
  encode_video, encode_text = parallel.jit_encoders(model, mesh)
  show = jax.process_index() == 0
  num_videos = data.num_videos
  video_fn = lambda f, m: encode_video(params, f, m)
  text_fn = lambda t: encode_text(params, t)
  v_emb, v_idx = _collect(data.videos, video_fn, ("frames", "frame_mask"), mesh, num_videos,
                          f"embed {split} videos", show)
  t_emb, t_idx = _collect(data.texts, text_fn, ("text",), mesh, data.num_texts,
                          f"embed {split} captions", show)
  if sorted(v_idx.tolist()) != list(range(num_videos)):
    raise RuntimeError(f"eval of {split}: got {len(v_idx)} videos, expected each of "
                       f"{num_videos} exactly once")
  video = np.zeros_like(v_emb)
  video[v_idx] = v_emb
  order = np.argsort(t_idx, kind="stable")
  check_finite(video, data.videos.keys, f"eval of {config.dataset}/{split}, video")
  check_finite(t_emb[order], np.asarray(data.texts.keys)[order] if len(order) else [],
               f"eval of {config.dataset}/{split}, caption")
  return {"video": video, "text": t_emb[order], "text_to_video": t_idx[order]}


def expected_videos(builder, split: str) -> int:
  """The split's size in its annotation: the dataset's metadata `listed`, else the built
  videos plus those skipped at build time (`metadata['skipped']`)."""
  meta = builder.info.metadata or {}
  listed = dict(meta.get("listed") or {})
  if split in listed:
    return int(listed[split])
  skipped = dict(meta.get("skipped") or {})
  return int(builder.info.splits[split].num_examples) + len(skipped.get(split, ()))


def count_warning(counts: dict[str, int], split: str) -> str:
  """'' or the warning for a split scored on fewer videos than its annotation lists."""
  got, expected = counts["videos"], counts["expected_videos"]
  if got >= expected:
    return ""
  return (f"WARNING: {split} scored on {got} of its {expected} videos "
          f"({expected - got} missing or undecodable at build time): these metrics are not "
          "comparable to a full-split result; see the dataset's build report")


def evaluate_split(model, params, builder, split: str, config, mesh) -> dict[str, Any]:
  """Retrieval metrics of `split` (t2v, v2t, DSL and max-over-captions variants), plus
  `counts` {videos, captions, expected_videos} and `warning` ('' when complete)."""
  start = time.time()
  emb = embed_split(model, params, builder, split, config, mesh)
  sim = emb["text"] @ emb["video"].T
  results: dict[str, Any] = metrics_lib.evaluate_retrieval(sim, emb["text_to_video"],
                                                           dsl=config.eval.dsl)
  results["counts"] = {"videos": int(len(emb["video"])), "captions": int(len(emb["text"])),
                       "expected_videos": expected_videos(builder, split)}
  results["warning"] = count_warning(results["counts"], split)
  if results["warning"]:
    logging.warning("%s", results["warning"])
  logging.info("eval on %s: %d videos, %d captions, %.1f s", split, len(emb["video"]),
               len(emb["text"]), time.time() - start)
  return results


def format_table(results: dict[str, Any]) -> str:
  """The retrieval table as text (one row per direction/variant, then the counts)."""
  lines = [f"{'':34s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'MdR':>6s} {'MnR':>7s}"]
  for name, m in results.items():
    if isinstance(m, dict) and "R@1" in m:
      lines.append(f"{name:34s} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} "
                   f"{m['MdR']:6.1f} {m['MnR']:7.1f}")
  counts = results.get("counts")
  if counts:
    lines.append(f"scored {counts['videos']} videos and {counts['captions']} captions "
                 f"(the annotation lists {counts['expected_videos']} videos)")
  if results.get("warning"):
    lines.append(results["warning"])
  return "\n".join(lines)
