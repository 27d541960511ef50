"""`centerclip_jax.inference.clusters` and `tools/visualize_clusters.py` on a tiny 2-step model."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from centerclip_jax.inference import clusters as cluster_inspect
from centerclip_jax import config as config_lib
from centerclip_jax.inference import encoder as encode
from centerclip_jax.clustering import kmedoids
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import loading
from centerclip_jax.weights import porting
from tests import video_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 blocks, 32 px, 8 px patches: N = 16 patches per frame, 4 frames.
TINY3 = clip_lib.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=64,
                            vision_patch_size=8, context_length=77, vocab_size=49408,
                            transformer_width=64, transformer_heads=1, transformer_layers=1)
# Step 1 before block 2: 4 frames -> 2 segments of d = 2 frames, K = 8 (M = 32);
# step 2 before block 3: 2 -> 1 segment of the 2 x 8 kept tokens, K = 4 (M = 16).
TFB, CNB = (4, 2, 1), (16, 8, 4)
RES, PATCH, N, SCALE = 32, 8, 16, 4
WHITE = (255, 255, 255)


def load_tool():
  spec = importlib.util.spec_from_file_location(
      "visualize_clusters", os.path.join(REPO, "tools", "visualize_clusters.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(ckpt):
  c = config_lib.base_config()
  c.init_from = str(ckpt)
  c.model = config_lib.model_config(max_frames=4, num_blocks=3, tokens_per_frame=N)
  c.model.target_frames_blocks = TFB
  c.model.cluster_num_blocks = CNB
  c.data.decode_short_side = RES
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("visualize")
  params = jax.tree.map(np.asarray, clip_lib.init_params(TINY3, jax.random.PRNGKey(3)))
  porting.save_converted(root / "clip", TINY3, params, {}, {"source": "test"})
  video = video_fixtures.write_video(root / "clip.mp4", num_frames=30, fps=10, seed=4,
                                     pattern="moving")
  config = tiny_config(root / "clip")
  model, model_params = loading.load_model(config)
  frames, mask, _ = encode.file_inputs(str(video), fps=3.0, short_side=RES, max_frames=4,
                                       resolution=RES)
  steps = cluster_inspect.cluster_medoids(model, model_params, frames[None], mask[None])
  return root, video, model_params, frames, steps


def test_medoids_match_an_independent_clustering(setup):
  """Tokens from clip.CLIP's visual modules by hand, grouped frame-major, kmedoids_pp."""
  _, _, params, frames, steps = setup
  assert [s.step.block for s in steps] == [1, 2] and [s.step.k for s in steps] == [8, 4]
  clip_model = clip_lib.CLIP(TINY3)
  run_block = jax.jit(lambda p, x, b: clip_model.apply(
      {"params": p}, x, method=lambda m, t: m.visual.block(b, t)), static_argnums=2)
  embed = jax.jit(lambda p, im: clip_model.apply(
      {"params": p}, im, method=lambda m, t: m.visual.embed(t)))
  cluster = jax.jit(functools.partial(kmedoids.kmedoids_pp, k=8))
  pixels = clip_lib.normalize_pixels(jnp.asarray(frames))  # the visual tower takes floats
  x = np.asarray(run_block(params["clip"], embed(params["clip"], pixels), 0))
  kept_tokens, kept_patches = [], []  # per segment: [1 + 8, W] tokens, [8] (frame, patch)
  first = steps[0]
  for s in range(2):
    points = np.concatenate([x[2 * s, 1:], x[2 * s + 1, 1:]])  # frame 2s, then frame 2s+1
    assignment, medoids = map(np.asarray, cluster(jnp.asarray(points)))
    np.testing.assert_array_equal(first.medoids[0, s], medoids)
    np.testing.assert_array_equal(first.assignment[0, s], assignment)
    np.testing.assert_array_equal(first.medoid_patches()[0, s],
                                  np.stack([medoids // N, medoids % N], axis=1))
    cls = (x[2 * s, 0] + x[2 * s + 1, 0]) / 2
    kept_tokens.append(np.concatenate([cls[None], points[medoids]]))
    kept_patches += [(2 * s + m // N, m % N) for m in medoids]
  # Step 2 clusters the 2 x 8 kept tokens after block 3's predecessor (block index 1).
  y = np.asarray(run_block(params["clip"], jnp.asarray(np.stack(kept_tokens)), 1))
  points = np.concatenate([y[0, 1:], y[1, 1:]])
  assignment, medoids = map(np.asarray, jax.jit(
      functools.partial(kmedoids.kmedoids_pp, k=4))(jnp.asarray(points)))
  second = steps[1]
  np.testing.assert_array_equal(second.medoids[0, 0], medoids)
  np.testing.assert_array_equal(second.assignment[0, 0], assignment)
  assert second.input_frames == 4
  assert [tuple(fp) for fp in second.medoid_patches()[0, 0]] == [kept_patches[m] for m in medoids]


def test_cli_draws_medoid_outlines(setup, tmp_path):
  root, video, _, frames, steps = setup
  tool = load_tool()
  out = tmp_path / "png"
  cmd = [sys.executable, os.path.join(REPO, "tools", "visualize_clusters.py"), "--config",
         os.path.join(REPO, "configs", "msrvtt.py"), f"--config.init_from={root / 'clip'}",
         "--config.model.max_frames=4", f"--config.model.target_frames_blocks={TFB}",
         f"--config.model.cluster_num_blocks={CNB}", f"--config.data.decode_short_side={RES}",
         "--video", str(video),
         "--output", str(out), "--scale", str(SCALE)]
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The pictures, and the run's library log (visualize writes OUTPUT/log.txt).
  assert sorted(p.name for p in out.iterdir()) == [
      "log.txt", "step1_segment0.png", "step1_segment1.png", "step2_segment0.png"]
  assert frames.dtype == np.uint8
  rgb = frames.astype(np.float64)  # the model's uint8 input frames, drawn as they are
  for i, sc in enumerate(steps, start=1):
    for s in range(sc.medoids.shape[1]):
      d = sc.input_frames
      img = np.asarray(Image.open(out / f"step{i}_segment{s}.png").convert("RGB"))
      assert img.shape == (RES * SCALE, d * RES * SCALE, 3)
      medoid_patches = {tuple(fp) for fp in sc.medoid_patches()[0, s].tolist()}
      point_cluster = {}
      for src, a in zip(sc.sources[0, s], sc.assignment[0, s]):
        point_cluster[(src // N, src % N)] = a
      outlined, size = set(), PATCH * SCALE
      for f in range(d):
        for p in range(N):
          x0, y0 = (f * RES + (p % 4) * PATCH) * SCALE, (p // 4) * PATCH * SCALE
          ring = np.concatenate([img[y0, x0:x0 + size], img[y0 + size - 1, x0:x0 + size],
                                 img[y0:y0 + size, x0], img[y0:y0 + size, x0 + size - 1]])
          if (ring == WHITE).all():
            outlined.add((f, p))
          # The patch centre: tinted by its cluster colour, or darkened if dropped earlier.
          centre = img[y0 + size // 2, x0 + size // 2].astype(np.float64)
          src_px = rgb[s * d + f, (p // 4) * PATCH + PATCH // 2, (p % 4) * PATCH + PATCH // 2]
          if (f, p) in point_cluster:
            colour = tool.palette(sc.step.k)[point_cluster[(f, p)]]
            expect = 0.55 * src_px + 0.45 * colour
          else:
            expect = 0.4 * src_px
          np.testing.assert_allclose(centre, expect, atol=1.01)
      assert outlined == medoid_patches, (i, s)
      assert len(outlined) == sc.step.k
      kept = " ".join(f"f{s * d + f}({p // 4},{p % 4})" for f, p in sorted(medoid_patches))
      assert f"kept frame(row,col) {kept}" in proc.stdout


def test_palette_is_distinct_and_never_white():
  tool = load_tool()
  for k in (4, 12, 49, 160):
    colours = tool.palette(k)
    assert colours.shape == (k, 3) and colours.max() < 250
    assert len({tuple(c) for c in colours.tolist()}) == k


def test_models_without_medoids_are_rejected():
  cfg = config_lib.model_config(max_frames=4, num_blocks=3, tokens_per_frame=N)
  cfg.target_frames_blocks, cfg.cluster_num_blocks = TFB, CNB
  cfg.cluster_algo = "pooling"
  frames, mask = np.zeros((1, 4, RES, RES, 3), np.uint8), np.ones((1, 4), bool)
  with pytest.raises(ValueError, match="pooling"):
    cluster_inspect.cluster_medoids(centerclip.build_model(cfg, TINY3), {}, frames, mask)
  cfg.cluster_algo, cfg.cluster_inter = "kmedoids++", 0
  with pytest.raises(ValueError, match="no clustering step"):
    cluster_inspect.cluster_medoids(centerclip.build_model(cfg, TINY3), {}, frames, mask)
