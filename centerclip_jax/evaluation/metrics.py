"""Text-video retrieval metrics: ranks, R@K, MdR, MnR and dual-softmax re-scoring.

Pure NumPy; everything works on a similarity matrix `sim_t2v` of shape
`[num_texts, num_videos]` (higher is more similar) and `text_to_video`, the
`[num_texts]` index of the video each text describes. Multi-caption splits
(MSR-VTT full, MSVD) have several texts per video; paragraph splits
(ActivityNet, DiDeMo) and MSR-VTT 1k-A have exactly one.

Tie rule (all ranks here): the rank of a query is 1 + the number of candidates
that score *strictly* higher than its ground truth, so ties are resolved in the
query's favour and every query contributes exactly one rank. (The CLIP4Clip /
CenterCLIP `compute_metrics` locates the ground-truth score in the sorted row
with `np.where(sorted == gt)`, which yields one entry per tied candidate, so a
tied query is counted several times; its multi-sentence path uses a double
argsort, which breaks ties by sort order.) With continuous similarities ties
are rare and the rules agree.
"""

from __future__ import annotations

import numpy as np

_RECALL_AT = (1, 5, 10)


def ranks(sim: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """1-based rank of each query's ground-truth candidate.

  Args:
    sim: `[queries, candidates]` scores, higher is better.
    gt: `[queries]` integer index of each query's ground-truth candidate.

  Returns:
    `[queries]` int64, `1 + #{c : sim[q, c] > sim[q, gt[q]]}` (ties count in the
    query's favour).
  """
  sim = _check_sim(sim, "sim")
  gt = _check_index(gt, "gt", length=sim.shape[0], upper=sim.shape[1],
                    upper_name="number of candidates (sim.shape[1])")
  gt_score = sim[np.arange(sim.shape[0]), gt]
  return 1 + np.sum(sim > gt_score[:, None], axis=1, dtype=np.int64)


def retrieval_metrics(ranks: np.ndarray) -> dict[str, float]:
  """R@1/5/10 (percent), median rank MdR and mean rank MnR of `[queries]` ranks."""
  r = np.asarray(ranks)
  if r.ndim != 1 or r.size == 0:
    raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}.")
  if not np.issubdtype(r.dtype, np.integer) or np.any(r < 1):
    raise ValueError("ranks must be integers >= 1 (1 = ground truth retrieved first).")
  out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in _RECALL_AT}
  out["MdR"] = float(np.median(r))
  out["MnR"] = float(np.mean(r))
  return out


def dual_softmax(sim: np.ndarray, temperature: float = 100.0, *,
                 axis: int = 0) -> np.ndarray:
  """Dual-softmax (DSL) inference re-scoring, Cheng et al. 2021.

  Returns `sim * softmax(sim * temperature, axis=axis)`: each score is
  weighted by how strongly the *candidate* prefers this query over all other
  queries, so `axis` must be the query axis. For text-to-video on
  `sim_t2v [texts, videos]` that is `axis=0` (softmax over texts for each
  video); for video-to-text apply it to `sim_t2v.T [videos, texts]`, again
  with `axis=0` (softmax over videos for each text). `temperature` multiplies
  the scores, like CLIP's logit scale (100 for cosine similarities; use 1 for
  scores that already include the logit scale). The CLIP2Video/CAMoE code also
  multiplies by the number of queries, a constant that changes no rank.

  Args:
    sim: `[queries, candidates]` scores.
    temperature: multiplier of the scores inside the softmax (> 0).
    axis: the query axis to normalise over.

  Returns:
    `[queries, candidates]` float64 re-scored matrix.
  """
  sim = _check_sim(sim, "sim").astype(np.float64)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  logits = sim * temperature
  logits = logits - np.max(logits, axis=axis, keepdims=True)
  prior = np.exp(logits)
  prior /= np.sum(prior, axis=axis, keepdims=True)
  return sim * prior


def evaluate_retrieval(sim_t2v: np.ndarray, text_to_video: np.ndarray, *,
                       dsl: bool = False,
                       dsl_temperature: float = 100.0) -> dict[str, dict[str, float]]:
  """Text-to-video and video-to-text metrics of a whole split.

  Args:
    sim_t2v: `[num_texts, num_videos]` similarity of every text to every video.
    text_to_video: `[num_texts]` video index of each text; every video needs
      at least one text.
    dsl: also report the metrics after dual-softmax re-scoring.
    dsl_temperature: `temperature` of `dual_softmax`.

  Returns:
    A dict of metric dicts (`R@1`, `R@5`, `R@10` in percent, `MdR`, `MnR`):
    - "text_to_video": each text queries all videos.
    - "video_to_text": each video queries all texts; its rank is
      `1 + #{texts t : sim[t, v] > max over v's captions c of sim[c, v]}`,
      i.e. the best rank of any of its captions (a video is retrieved at K if
      any of its captions is in the top K).
    - "video_to_text_max_over_captions" (only when some video has several
      texts): the CLIP4Clip/CenterCLIP multi-sentence protocol. Candidates are
      the videos' caption groups, each scored by its best caption:
      `G[v, u] = max_{t of video u} sim[t, v]`, and video `v` is ranked
      against the `num_videos` groups with ground truth `u = v`. Other videos'
      captions thus count once per video, not once per caption.
    - with `dsl=True`, "text_to_video_dsl", "video_to_text_dsl" (and
      "video_to_text_max_over_captions_dsl"): the same after re-scoring
      `dual_softmax(sim_t2v, axis=0)` for text-to-video and
      `dual_softmax(sim_t2v.T, axis=0)` (softmax over videos) for
      video-to-text, before any reduction over captions.
  """
  sim = _check_sim(sim_t2v, "sim_t2v")
  num_texts, num_videos = sim.shape
  t2v = _check_index(text_to_video, "text_to_video", length=num_texts,
                     upper=num_videos,
                     upper_name="number of videos (sim_t2v.shape[1])")
  counts = np.bincount(t2v, minlength=num_videos)
  if np.any(counts == 0):
    missing = np.flatnonzero(counts == 0)
    raise ValueError(
        f"{missing.size} video(s) have no caption in text_to_video (first: "
        f"{missing[:5].tolist()}); every column of sim_t2v needs at least one "
        "text. Drop those videos from sim_t2v or fix text_to_video.")
  multi = bool(np.any(counts > 1))

  results = _evaluate(sim, sim.T, t2v, multi, "")
  if dsl:
    results.update(_evaluate(dual_softmax(sim, dsl_temperature, axis=0),
                             dual_softmax(sim.T, dsl_temperature, axis=0),
                             t2v, multi, "_dsl"))
  return results


def _evaluate(sim_t2v: np.ndarray, sim_v2t: np.ndarray, t2v: np.ndarray,
              multi: bool, suffix: str) -> dict[str, dict[str, float]]:
  """Metrics from text->video scores `[T, V]` and video->text scores `[V, T]`."""
  num_videos = sim_v2t.shape[0]
  out = {"text_to_video" + suffix: retrieval_metrics(ranks(sim_t2v, t2v))}
  # Best ground-truth caption score of each video, then count strictly better texts.
  gt_scores = sim_v2t[t2v, np.arange(t2v.size)]
  best = np.full(num_videos, -np.inf)
  np.maximum.at(best, t2v, gt_scores)
  v2t_ranks = 1 + np.sum(sim_v2t > best[:, None], axis=1, dtype=np.int64)
  out["video_to_text" + suffix] = retrieval_metrics(v2t_ranks)
  if multi:
    order = np.argsort(t2v, kind="stable")
    starts = np.searchsorted(t2v[order], np.arange(num_videos))
    grouped = np.maximum.reduceat(sim_v2t[:, order], starts, axis=1)  # [V, V]
    out["video_to_text_max_over_captions" + suffix] = retrieval_metrics(
        ranks(grouped, np.arange(num_videos)))
  return out


def _check_sim(sim: np.ndarray, name: str) -> np.ndarray:
  sim = np.asarray(sim)
  if sim.ndim != 2 or 0 in sim.shape:
    raise ValueError(f"{name} must be a non-empty 2-D [queries, candidates] array, "
                     f"got shape {sim.shape}.")
  if not np.issubdtype(sim.dtype, np.number) or np.issubdtype(sim.dtype, np.complexfloating):
    raise ValueError(f"{name} must hold real numbers, got dtype {sim.dtype}.")
  if not np.all(np.isfinite(sim)):
    raise ValueError(f"{name} has {np.sum(~np.isfinite(sim))} NaN/inf entries; "
                     "similarities must be finite.")
  return sim


def _check_index(idx: np.ndarray, name: str, *, length: int, upper: int,
                 upper_name: str) -> np.ndarray:
  idx = np.asarray(idx)
  if idx.shape != (length,):
    raise ValueError(f"{name} must have shape ({length},), one entry per query, "
                     f"got {idx.shape}.")
  if not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"{name} must be integer indices, got dtype {idx.dtype}.")
  bad = (idx < 0) | (idx >= upper)
  if np.any(bad):
    raise ValueError(f"{name} has {np.sum(bad)} index(es) outside [0, {upper}) "
                     f"(the {upper_name}), e.g. {idx[bad][:5].tolist()}.")
  return idx.astype(np.int64)
