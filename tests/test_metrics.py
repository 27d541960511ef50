"""Retrieval metrics on hand-made similarity matrices with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from centerclip_jax.evaluation import metrics

KEYS = {"R@1", "R@5", "R@10", "MdR", "MnR"}


def _assert_metrics(got, r1, r5, r10, mdr, mnr):
  assert set(got) == KEYS
  assert all(type(v) is float for v in got.values())
  np.testing.assert_allclose(
      [got["R@1"], got["R@5"], got["R@10"], got["MdR"], got["MnR"]],
      [r1, r5, r10, mdr, mnr], rtol=0, atol=1e-9)


def test_ranks_strictly_higher_and_ties_in_favour():
  sim = np.array([[0.9, 0.5, 0.9, 0.1],
                  [0.2, 0.2, 0.2, 0.2],
                  [0.8, 0.3, 0.1, 0.8],
                  [0.4, 0.3, 0.2, 0.1]], np.float32)
  gt = np.array([2, 1, 1, 3])
  # Row 0: ties the 0.9 at column 0 -> 1. Row 1: all tied -> 1.
  # Row 2: 0.3 beaten by the two 0.8 -> 3. Row 3: worst of four -> 4.
  got = metrics.ranks(sim, gt)
  assert got.tolist() == [1, 1, 3, 4]
  assert got.dtype == np.int64


def test_ranks_rectangular():
  sim = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
  assert metrics.ranks(sim, np.array([0])).tolist() == [6]
  assert metrics.ranks(sim.T, np.zeros(6, int)).tolist() == [1] * 6


def test_retrieval_metrics_values():
  _assert_metrics(metrics.retrieval_metrics(np.array([1, 1, 3, 6, 12])),
                  40.0, 60.0, 80.0, 3.0, 4.6)
  # Even count: median is the mean of the middle two.
  _assert_metrics(metrics.retrieval_metrics(np.array([2, 4])), 0.0, 100.0, 100.0, 3.0, 3.0)
  _assert_metrics(metrics.retrieval_metrics([5, 10, 11]),
                  0.0, 100 / 3, 200 / 3, 10.0, 26 / 3)


@pytest.mark.parametrize("bad", [np.array([]), np.array([0, 1]), np.array([[1, 2]]),
                                 np.array([1.5, 2.0])])
def test_retrieval_metrics_rejects_bad_ranks(bad):
  with pytest.raises(ValueError, match="ranks"):
    metrics.retrieval_metrics(bad)


def test_paragraph_split_one_text_per_video():
  # Text t describes video text_to_video[t] (a permutation).
  sim = np.array([[0.2, 0.9, 0.1],
                  [0.5, 0.4, 0.3],
                  [0.6, 0.6, 0.35]])
  t2v = np.array([1, 2, 0])
  out = metrics.evaluate_retrieval(sim, t2v)
  assert set(out) == {"text_to_video", "video_to_text"}
  # t2v ranks: t0 -> 1, t1 (0.3 < 0.5, 0.4) -> 3, t2 (ties 0.6) -> 1.
  _assert_metrics(out["text_to_video"], 200 / 3, 100.0, 100.0, 1.0, 5 / 3)
  # v2t ranks: v0 column [0.2, 0.5, 0.6] gt t2 -> 1; v1 [0.9, 0.4, 0.6] gt t0 -> 1;
  # v2 [0.1, 0.3, 0.35] gt t1 -> 2.
  _assert_metrics(out["video_to_text"], 200 / 3, 100.0, 100.0, 1.0, 4 / 3)


# Five texts of three videos, in shuffled order: video 0 has t1, t3; video 1
# has t2; video 2 has t0, t4.
MULTI_SIM = np.array([[0.1, 0.5, 0.4],    # t0 (video 2)
                      [0.3, 0.6, 0.2],    # t1 (video 0)
                      [0.7, 0.55, 0.0],   # t2 (video 1)
                      [0.9, 0.65, 0.3],   # t3 (video 0)
                      [0.2, 0.2, 0.9]])   # t4 (video 2)
MULTI_T2V = np.array([2, 0, 1, 0, 2])


def test_multi_caption_split():
  out = metrics.evaluate_retrieval(MULTI_SIM, MULTI_T2V)
  assert set(out) == {"text_to_video", "video_to_text", "video_to_text_max_over_captions"}
  # t2v ranks: t0 2 (0.5 > 0.4), t1 2 (0.6 > 0.3), t2 2 (0.7 > 0.55), t3 1, t4 1.
  _assert_metrics(out["text_to_video"], 40.0, 100.0, 100.0, 2.0, 1.6)
  # Standard v2t, best ground-truth caption vs every text:
  # v0: best of t1, t3 is 0.9, nothing higher -> 1.
  # v1: t2 scores 0.55; t1 (0.6) and t3 (0.65) are higher -> 3.
  # v2: best of t0, t4 is 0.9 -> 1.
  _assert_metrics(out["video_to_text"], 200 / 3, 100.0, 100.0, 1.0, 5 / 3)
  # Max over captions: video 1 sees groups {v0: max(0.6, 0.65), v1: 0.55,
  # v2: max(0.5, 0.2)}; only v0's group is higher -> 2. v0 and v2 stay at 1.
  _assert_metrics(out["video_to_text_max_over_captions"], 200 / 3, 100.0, 100.0, 1.0, 4 / 3)


def test_multi_caption_ranks_beyond_ten():
  # One query video (0) with one caption scoring 0.5; video 1 has twelve
  # captions, eleven of them above 0.5 for video 0.
  num_texts = 13
  sim = np.zeros((num_texts, 2))
  sim[0] = [0.5, 0.0]                 # caption of video 0
  sim[1:12, 0] = 0.6 + 0.01 * np.arange(11)
  sim[12, 0] = 0.1
  sim[1:, 1] = 1.0                    # video 1's captions all match video 1
  t2v = np.array([0] + [1] * 12)
  out = metrics.evaluate_retrieval(sim, t2v)
  # Standard: 11 texts beat video 0's caption -> rank 12; video 1 -> rank 1.
  _assert_metrics(out["video_to_text"], 50.0, 50.0, 50.0, 6.5, 6.5)
  # Max over captions: a single group (video 1, max 0.7) beats it -> rank 2.
  _assert_metrics(out["video_to_text_max_over_captions"], 50.0, 100.0, 100.0, 1.5, 1.5)


def test_dual_softmax_matches_formula():
  sim = np.array([[1.0, 0.0, 0.5],
                  [0.5, 0.2, -0.3]])
  t = 2.0
  e = math.exp
  # axis=0: each column normalised over the two rows.
  expected0 = np.array([
      [1.0 * e(2.0) / (e(2.0) + e(1.0)), 0.0, 0.5 * e(1.0) / (e(1.0) + e(-0.6))],
      [0.5 * e(1.0) / (e(2.0) + e(1.0)), 0.2 * e(0.4) / (e(0.0) + e(0.4)),
       -0.3 * e(-0.6) / (e(1.0) + e(-0.6))]])
  np.testing.assert_allclose(metrics.dual_softmax(sim, t), expected0, rtol=1e-12)
  np.testing.assert_allclose(metrics.dual_softmax(sim, t, axis=0), expected0, rtol=1e-12)
  # axis=1: each row normalised over the three columns.
  z0 = e(2.0) + e(0.0) + e(1.0)
  z1 = e(1.0) + e(0.4) + e(-0.6)
  expected1 = np.array([[1.0 * e(2.0) / z0, 0.0, 0.5 * e(1.0) / z0],
                        [0.5 * e(1.0) / z1, 0.2 * e(0.4) / z1, -0.3 * e(-0.6) / z1]])
  np.testing.assert_allclose(metrics.dual_softmax(sim, t, axis=1), expected1, rtol=1e-12)


def test_dual_softmax_large_temperature_is_stable():
  sim = np.array([[0.9, 0.1], [0.8, 0.95]])
  out = metrics.dual_softmax(sim, 1000.0)
  assert np.all(np.isfinite(out))
  # Column 0: row 0 wins by 0.1 * 1000 -> weight ~1, row 1 weight ~e^-100.
  np.testing.assert_allclose(out, [[0.9, 0.1 * math.exp(-850)], [0.8 * math.exp(-100), 0.95]],
                             rtol=1e-6, atol=1e-300)


def test_dsl_rescoring_fixes_hub_video_for_text_to_video():
  # Video 0 is a "hub": it scores high for every text.
  sim = np.array([[0.50, 0.45, 0.0],
                  [0.60, 0.10, 0.0],
                  [0.55, 0.00, 0.3]])
  out = metrics.evaluate_retrieval(sim, np.array([1, 0, 2]), dsl=True)
  assert set(out) == {"text_to_video", "video_to_text", "text_to_video_dsl",
                      "video_to_text_dsl"}
  # Plain t2v ranks: t0 2 (0.5 > 0.45), t1 1, t2 2 (0.55 > 0.3).
  _assert_metrics(out["text_to_video"], 100 / 3, 100.0, 100.0, 2.0, 5 / 3)
  # DSL (softmax over texts per video, x100): t0's score on video 0 is
  # 0.5 * e^-10 / (1 + e^-5 + e^-10) ~ 2e-5 < its 0.45 * ~1 on video 1 -> all rank 1.
  _assert_metrics(out["text_to_video_dsl"], 100.0, 100.0, 100.0, 1.0, 1.0)
  # v2t: each video's own caption is already its top text.
  _assert_metrics(out["video_to_text"], 100.0, 100.0, 100.0, 1.0, 1.0)
  _assert_metrics(out["video_to_text_dsl"], 100.0, 100.0, 100.0, 1.0, 1.0)


def test_dsl_rescoring_fixes_hub_text_for_video_to_text():
  # Text 0 is a "hub": it scores high for every video. Identity ground truth.
  sim = np.array([[0.50, 0.48, 0.46],
                  [0.10, 0.40, 0.00],
                  [0.00, 0.10, 0.40]])
  out = metrics.evaluate_retrieval(sim, np.arange(3), dsl=True)
  # Plain v2t: videos 1 and 2 rank text 0 above their own caption -> ranks 1, 2, 2.
  _assert_metrics(out["video_to_text"], 100 / 3, 100.0, 100.0, 2.0, 5 / 3)
  # DSL for v2t normalises each text over the videos: text 0's weight on video 1
  # is e^-2 / (1 + e^-2 + e^-4) ~ 0.117, so 0.48 * 0.117 < 0.40 * ~1 -> all rank 1.
  # (Normalising over texts instead would keep video 1 at rank 2.)
  _assert_metrics(out["video_to_text_dsl"], 100.0, 100.0, 100.0, 1.0, 1.0)
  _assert_metrics(out["text_to_video"], 100.0, 100.0, 100.0, 1.0, 1.0)
  _assert_metrics(out["text_to_video_dsl"], 100.0, 100.0, 100.0, 1.0, 1.0)


def test_dsl_with_multi_caption_keys():
  out = metrics.evaluate_retrieval(MULTI_SIM, MULTI_T2V, dsl=True)
  assert set(out) == {"text_to_video", "video_to_text", "video_to_text_max_over_captions",
                      "text_to_video_dsl", "video_to_text_dsl",
                      "video_to_text_max_over_captions_dsl"}
  # Without DSL the results are those of test_multi_caption_split.
  _assert_metrics(out["text_to_video"], 40.0, 100.0, 100.0, 2.0, 1.6)
  _assert_metrics(out["video_to_text_max_over_captions"], 200 / 3, 100.0, 100.0, 1.0, 4 / 3)
  # t2v DSL (softmax x100 over the 5 texts of each video column):
  # video 1 column [0.5, 0.6, 0.55, 0.65, 0.2] -> weights ~[e^-15, e^-5, e^-10, 1, e^-45].
  # t2 on video 1: 0.55 e^-10 ~ 2.5e-5 beats its 0.7 e^-20 ~ 1.4e-9 on video 0 -> rank 1
  # (was 2); t0 and t1 stay at 2 (their ground-truth weights are e^-50 and e^-60).
  _assert_metrics(out["text_to_video_dsl"], 60.0, 100.0, 100.0, 1.0, 1.4)
  # v2t DSL (softmax x100 over the 3 videos of each text): on video 1, t0 keeps
  # 0.5 * ~1 and t1 0.6 * ~1, while its own caption t2 = [0.7, 0.55, 0.0] prefers
  # video 0 and drops to 0.55 e^-15 ~ 1.7e-7: rank 3 both ways (groups v0: 0.6,
  # v2: 0.49998 are both above); videos 0 and 2 stay at rank 1.
  _assert_metrics(out["video_to_text_dsl"], 200 / 3, 100.0, 100.0, 1.0, 5 / 3)
  _assert_metrics(out["video_to_text_max_over_captions_dsl"], 200 / 3, 100.0, 100.0, 1.0,
                  5 / 3)


def test_float32_and_float64_agree():
  rng = np.random.default_rng(0)
  sim = rng.normal(size=(40, 20))
  t2v = np.arange(40) % 20
  a = metrics.evaluate_retrieval(sim, t2v, dsl=True)
  b = metrics.evaluate_retrieval(sim.astype(np.float32), t2v, dsl=True)
  assert a.keys() == b.keys()
  for key in a:
    for name in KEYS:
      assert a[key][name] == pytest.approx(b[key][name], abs=1e-9)


@pytest.mark.parametrize("sim, t2v, match", [
    (np.ones((3, 3)), np.array([0, 1, 1]), r"no caption.*\[2\]"),
    (np.ones((3, 3)), np.array([0, 1, 3]), "outside"),
    (np.ones((3, 3)), np.array([0, -1, 2]), "outside"),
    (np.ones((3, 3)), np.array([0, 1]), "shape"),
    (np.ones((3, 3)), np.array([0.0, 1.0, 2.0]), "integer"),
    (np.ones(3), np.array([0, 1, 2]), "2-D"),
    (np.zeros((0, 3)), np.zeros(0, int), "2-D"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), "NaN"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), np.array([0, 1]), "NaN"),
])
def test_evaluate_retrieval_bad_input(sim, t2v, match):
  with pytest.raises(ValueError, match=match):
    metrics.evaluate_retrieval(sim, t2v)


def test_ranks_bad_input():
  with pytest.raises(ValueError, match="gt"):
    metrics.ranks(np.ones((2, 3)), np.array([0, 3]))
  with pytest.raises(ValueError, match="temperature"):
    metrics.dual_softmax(np.ones((2, 2)), 0.0)


# ----------------------------------------------------- counts, warnings, non-finite rows


class _Split:
  def __init__(self, n):
    self.num_examples = n


class _Info:
  def __init__(self, built, metadata):
    self.splits = {k: _Split(v) for k, v in built.items()}
    self.metadata = metadata


class _Builder:
  def __init__(self, built, metadata=None):
    self.info = _Info(built, metadata)


def test_expected_videos_from_metadata():
  from centerclip_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  # The annotation's count when the builder recorded it ('listed').
  b = _Builder({"test_1k": 2}, {"listed": {"test_1k": 1000}, "skipped": {"test_1k": []}})
  assert evaluate.expected_videos(b, "test_1k") == 1000
  # Else built + skipped at build time.
  b = _Builder({"test": 7, "val": 3}, {"skipped": {"test": [{"video_id": "a"}] * 5}})
  assert evaluate.expected_videos(b, "test") == 12
  assert evaluate.expected_videos(b, "val") == 3
  assert evaluate.expected_videos(_Builder({"test": 4}, None), "test") == 4


def test_fewer_videos_than_expected_is_a_loud_warning():
  from centerclip_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  counts = {"videos": 2, "captions": 2, "expected_videos": 1000}
  warning = evaluate.count_warning(counts, "test_1k")
  assert warning.startswith("WARNING") and "2 of its 1000 videos" in warning
  assert evaluate.count_warning({"videos": 5, "captions": 9, "expected_videos": 5}, "t") == ""
  results = metrics.evaluate_retrieval(np.eye(2), np.arange(2))
  results.update(counts=counts, warning=warning)
  table = evaluate.format_table(results)
  assert "scored 2 videos and 2 captions (the annotation lists 1000 videos)" in table
  assert table.splitlines()[-1] == warning
  assert table.count("text_to_video") == 1


def test_non_finite_embedding_names_the_example():
  from centerclip_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  emb = np.ones((4, 3), np.float32)
  evaluate.check_finite(emb, ["a", "b", "c", "d"], "eval video")
  emb[2, 1] = np.nan
  emb[3, 0] = np.inf
  with pytest.raises(evaluate.NonFiniteEmbeddingError,
                     match=r"eval video: non-finite .* 2 of 4: 'c', 'd'$"):
    evaluate.check_finite(emb, ["a", "b", "c", "d"], "eval video")
