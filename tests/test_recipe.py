"""The paper's recipe (issue 17), checked against formulas written out here: the AdamW
schedule of each lr group, the decayed / frozen parameter paths of ViT-B/32, two AdamW
updates against NumPy and torch.optim.AdamW, and steps per epoch on a miniature MSR-VTT
with 3 captions per video."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from centerclip_jax import config as config_lib
from centerclip_jax.models import centerclip
from centerclip_jax.models import clip as clip_lib
from centerclip_jax.training import optim

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOOR = 1e-8


def lr_formula(peak: float, t: int, total: int, warmup_proportion: float = 0.1) -> float:
  """The authors' schedule: linear 1e-8 -> peak over w updates, then half-cosine, >= 1e-8."""
  w = int(warmup_proportion * total)
  if t < w:
    return FLOOR + (peak - FLOOR) * t / w
  return max(FLOOR, 0.5 * peak * (1.0 + math.cos(math.pi * (min(t, total) - w) / (total - w))))


def _keys(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("total", [100, 37])
def test_lr_of_each_group_at_the_named_updates(total):
  lr, coef = 5e-3, 1e-3
  _, schedules = optim.make_optimizer({"clip": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(2)}},
                                      lr=lr, coef_lr=coef, total_steps=total)
  w = int(0.1 * total)
  for group, peak in (("new", lr), ("pretrained", lr * coef)):
    for t in (0, 1, w, w + 1, total // 2, total - 1):
      np.testing.assert_allclose(float(schedules[group](t)), lr_formula(peak, t, total),
                                 rtol=2e-6, err_msg=f"{group} t={t}")
    assert float(schedules[group](0)) == pytest.approx(FLOOR, rel=1e-6)
    assert float(schedules[group](w)) == pytest.approx(peak, rel=1e-6)
    assert float(schedules[group](total + 5)) == pytest.approx(FLOOR, rel=1e-6)  # floored.


def test_the_optimizer_applies_the_schedule_to_its_groups():
  """Zero gradients: each update is the decoupled decay -lr_t * wd * p of its group."""
  rng = np.random.default_rng(0)
  params = {"clip": {"w": jnp.asarray(rng.normal(size=3), jnp.float32)},
            "head": {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}}
  lr, coef, wd, total = 0.5, 0.1, 0.2, 20
  tx, _ = optim.make_optimizer(params, lr=lr, coef_lr=coef, total_steps=total, weight_decay=wd)
  state, p = tx.init(params), params
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(tx.update)
  for t in range(total):
    upd, state = update(zeros, state, p)
    for group, peak in (("clip", lr * coef), ("head", lr)):
      want = -lr_formula(peak, t, total) * wd * np.asarray(p[group]["w"], np.float64)
      np.testing.assert_allclose(np.asarray(upd[group]["w"]), want, rtol=2e-5, atol=1e-12,
                                 err_msg=f"{group} t={t}")
    p = optax.apply_updates(p, upd)


# ----------------------------------------------------------------------------- groups


def _vit_b32_shapes():
  model = centerclip.build_model(config_lib.model_config(), clip_lib.get_preset("ViT-B/32"))
  return jax.eval_shape(lambda k: centerclip.init_params(model, k), jax.random.PRNGKey(0))


def _expected_vit_b32_paths():
  """Every ViT-B/32 param path, written from the OpenAI keys, split by the rule."""
  frozen = {"['clip']['token_embedding']['embedding']", "['clip']['positional_embedding']",
            "['clip']['visual']['conv1']['kernel']", "['clip']['visual']['class_embedding']",
            "['clip']['visual']['positional_embedding']",
            "['clip']['visual']['ln_pre']['scale']", "['clip']['visual']['ln_pre']['bias']"}
  decay = {"['clip']['ln_final']['scale']", "['clip']['text_projection']",
           "['clip']['logit_scale']", "['clip']['visual']['ln_post']['scale']",
           "['clip']['visual']['proj']"}
  no_decay = {"['clip']['ln_final']['bias']", "['clip']['visual']['ln_post']['bias']"}
  for tower in ("['clip']['transformer']", "['clip']['visual']['transformer']"):
    for i in range(12):
      block = f"{tower}['resblocks_{i}']"
      for module in ("['attn']['q_proj']", "['attn']['k_proj']", "['attn']['v_proj']",
                     "['attn']['out_proj']", "['mlp']['c_fc']", "['mlp']['c_proj']"):
        decay.add(f"{block}{module}['kernel']")
        no_decay.add(f"{block}{module}['bias']")
      for norm in ("['ln_1']", "['ln_2']"):
        decay.add(f"{block}{norm}['scale']")  # LayerNorm scales ARE decayed.
        no_decay.add(f"{block}{norm}['bias']")
  return frozen, decay, no_decay


def test_vit_b32_decayed_and_frozen_paths():
  shapes = _vit_b32_shapes()
  labels = _keys(optim.param_groups(shapes, freeze_layer_num=0, decay_norm_scales=True))
  frozen, decay, no_decay = _expected_vit_b32_paths()
  assert len(labels) == len(frozen) + len(decay) + len(no_decay) == 7 + 2 * 12 * 16 + 7
  assert {n for n, l in labels.items() if l == "frozen"} == frozen
  assert {n for n, l in labels.items() if l == "pretrained_decay"} == decay
  assert {n for n, l in labels.items() if l == "pretrained_no_decay"} == no_decay
  # freeze_layer_num = -1: nothing frozen; the same decay rule.
  free = _keys(optim.param_groups(shapes, freeze_layer_num=-1, decay_norm_scales=True))
  assert {n for n, l in free.items() if l == "pretrained_decay"} == decay | (frozen - {
      "['clip']['visual']['ln_pre']['bias']"})


def test_frozen_params_have_no_optimizer_state():
  shapes = _vit_b32_shapes()
  tx, _ = optim.make_optimizer(shapes, lr=5e-3, coef_lr=1e-3, total_steps=100,
                               freeze_layer_num=0)
  state = jax.eval_shape(tx.init, shapes)
  state_size = sum(x.size for x in jax.tree.leaves(state) if x.dtype == jnp.float32)
  total = sum(x.size for x in jax.tree.leaves(shapes))
  # OpenAI ViT-B/32 sizes: token and positional embeddings, conv1 (no bias), class and
  # visual positional embeddings, ln_pre scale and bias.
  frozen = 49408 * 512 + 77 * 512 + 32 * 32 * 3 * 768 + 768 + 50 * 768 + 2 * 768
  assert state_size == 2 * (total - frozen)  # Adam's mu and nu of the trainable params only.


# ----------------------------------------------------------------------------- updates


TINY = clip_lib.CLIPConfig(embed_dim=8, image_resolution=16, vision_layers=2, vision_width=64,
                           vision_patch_size=8, context_length=8, vocab_size=20,
                           transformer_width=16, transformer_heads=1, transformer_layers=2)
HP = dict(lr=0.1, coef_lr=0.1, wd=0.2, b1=0.9, b2=0.98, eps=1e-6, total=10)  # w = 1.


def _tiny_problem():
  """Tiny CLIP + a new module; two fixed gradient trees, large enough to be clipped."""
  model = clip_lib.CLIP(TINY)
  shapes = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32)),
      jax.random.key(0))["params"]
  rng = np.random.default_rng(0)
  fill = lambda s, scale=1.0: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32)
  params = {"clip": jax.tree.map(fill, shapes),
            "head": {"dense": {"kernel": fill(jnp.zeros((4, 4))), "bias": fill(jnp.zeros(4))}}}
  grads = [jax.tree.map(lambda p: fill(p, scale), params) for scale in (0.3, 3.0)]
  return params, grads


def _rule(name: str, frozen: set) -> tuple[str, bool]:
  """(group, decayed) of a path, from the recipe: CLIP at lr * coef, no decay on biases."""
  return ("clip" if name.startswith("['clip']") else "new"), not name.endswith("['bias']")


def _numpy_adamw(params, grads, frozen):
  """torch.optim.AdamW's algorithm in float64, with global-norm clipping as clip_grad_norm_."""
  p = {n: np.asarray(x, np.float64) for n, x in _keys(params).items()}
  m = {n: np.zeros_like(x) for n, x in p.items()}
  v = {n: np.zeros_like(x) for n, x in p.items()}
  for t, g_tree in enumerate(grads):
    g = {n: np.asarray(x, np.float64) for n, x in _keys(g_tree).items() if n not in frozen}
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    coef = min(1.0, 1.0 / (norm + 1e-6))
    assert coef < 1.0  # Clipping is active.
    for n, gn in g.items():
      group, decayed = _rule(n, frozen)
      lr_t = lr_formula(HP["lr"] * (HP["coef_lr"] if group == "clip" else 1.0), t, HP["total"])
      gn = gn * coef
      if decayed:
        p[n] = p[n] - lr_t * HP["wd"] * p[n]
      m[n] = HP["b1"] * m[n] + (1 - HP["b1"]) * gn
      v[n] = HP["b2"] * v[n] + (1 - HP["b2"]) * gn * gn
      m_hat = m[n] / (1 - HP["b1"] ** (t + 1))
      denom = np.sqrt(v[n]) / math.sqrt(1 - HP["b2"] ** (t + 1)) + HP["eps"]
      p[n] = p[n] - lr_t * m_hat / denom
  return p


def _ours(params, grads):
  tx, _ = optim.make_optimizer(params, lr=HP["lr"], coef_lr=HP["coef_lr"],
                               total_steps=HP["total"], weight_decay=HP["wd"], freeze_layer_num=0)
  state, p = tx.init(params), params
  update = jax.jit(tx.update)
  for g in grads:
    upd, state = update(g, state, p)
    p = optax.apply_updates(p, upd)
  return _keys(p)


@pytest.fixture(scope="module")
def two_updates():
  params, grads = _tiny_problem()
  frozen = {n for n, l in _keys(optim.param_groups(params, freeze_layer_num=0)).items()
            if l == "frozen"}
  assert len(frozen) == 7
  return params, grads, frozen, _ours(params, grads)


def test_two_adamw_updates_equal_numpy(two_updates):
  params, grads, frozen, ours = two_updates
  want = _numpy_adamw(params, grads, frozen)
  start = _keys(params)
  for n in want:
    np.testing.assert_allclose(ours[n], want[n], rtol=0, atol=1e-6, err_msg=n)
    if n in frozen:
      np.testing.assert_array_equal(ours[n], np.asarray(start[n]), err_msg=n)
    else:
      assert np.abs(ours[n] - np.asarray(start[n])).max() > 1e-5, n  # It did train.


def test_two_adamw_updates_equal_torch(two_updates):
  torch = pytest.importorskip("torch")
  params, grads, frozen, ours = two_updates
  start = _keys(params)
  tensors = {n: torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=n not in frozen)
             for n, x in start.items()}
  groups = {}
  for n, x in tensors.items():
    if n not in frozen:
      groups.setdefault(_rule(n, frozen), []).append(x)
  peak = {"clip": HP["lr"] * HP["coef_lr"], "new": HP["lr"]}
  opt = torch.optim.AdamW(
      [{"params": ps, "lr": peak[group], "weight_decay": HP["wd"] if decayed else 0.0,
        "peak": peak[group]} for (group, decayed), ps in groups.items()],
      betas=(HP["b1"], HP["b2"]), eps=HP["eps"])
  trainable = [x for x in tensors.values() if x.requires_grad]
  for t, g in enumerate(grads):
    for n, x in _keys(g).items():
      if n not in frozen:
        tensors[n].grad = torch.tensor(np.asarray(x), dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    for group in opt.param_groups:
      group["lr"] = lr_formula(group["peak"], t, HP["total"])
    opt.step()
  for n, x in tensors.items():
    np.testing.assert_allclose(ours[n], x.detach().numpy(), rtol=0, atol=1e-6, err_msg=n)


def test_bertadam_stays_available():
  params, grads = _tiny_problem()
  tx, schedules = optim.make_optimizer(params, lr=0.1, coef_lr=0.1, total_steps=10,
                                       optimizer="bertadam")
  assert float(schedules["new"](0)) == 0.0  # BertAdam's warmup_cosine starts at 0.
  np.testing.assert_allclose(float(schedules["new"](5)), 0.1 * 0.5 * (1 + math.cos(math.pi / 2)),
                             atol=1e-9)
  with pytest.raises(ValueError, match="optimizer must be one of"):
    optim.make_optimizer(params, lr=0.1, coef_lr=0.1, total_steps=10, optimizer="adam")


# ----------------------------------------------------------------------------- configs


def test_dataset_configs_follow_the_authors_scripts():
  want = {  # name, arg: frames, words, frames after block 6, lr, epochs, examples
      ("msrvtt", None): (12, 32, 4, 5e-3, 5, "captions"),
      ("msrvtt", "train_7k"): (12, 32, 4, 5e-3, 5, "videos"),
      ("msvd", None): (12, 32, 4, 5e-3, 5, "captions"),
      ("lsmdc", None): (12, 32, 4, 5e-3, 5, "videos"),
      ("activitynet", None): (60, 77, 20, 1e-2, 8, "videos"),
      ("activitynet", "60_15"): (60, 77, 15, 1e-2, 8, "videos"),
      ("activitynet", "64"): (64, 77, 16, 1e-2, 8, "videos"),
      ("didemo", None): (64, 64, 16, 5e-3, 5, "videos"),
  }
  for (name, arg), (frames, words, after6, lr, epochs, examples) in want.items():
    c = _load_config(name, arg)
    got = (c.model.max_frames, c.model.max_words, c.model.target_frames_blocks[6], c.train.lr,
           c.train.num_epochs, c.data.train_examples)
    assert got == (frames, words, after6, lr, epochs, examples), (name, arg)
    assert c.model.target_frames_blocks[:6] == (frames,) * 6
    assert (c.train.global_batch_size, c.train.coef_lr, c.train.optimizer,
            c.train.freeze_layer_num, c.train.weight_decay, c.train.warmup_proportion,
            c.train.clip_norm) == (128, 1e-3, "adamw", 0, 0.2, 0.1, 1.0), (name, arg)
  with pytest.raises(ValueError, match="activitynet.py: argument"):
    _load_config("activitynet", "61")


# ----------------------------------------------------------------------------- steps


@pytest.fixture(scope="module")
def msrvtt_3_captions(tmp_path_factory):
  """Miniature MSR-VTT: 9k list video0, video1, video2 (video5 undecodable), 3 captions each."""
  import tensorflow_datasets as tfds
  from centerclip_jax.data import datasets
  from centerclip_jax.data.datasets import common
  from tests import video_fixtures as vf
  raw = tmp_path_factory.mktemp("msrvtt_raw")
  vf.write_msrvtt_layout(raw)
  data = json.loads((raw / "MSRVTT_data.json").read_text())
  data["sentences"] = [{"caption": f"clip {v} caption {j}", "video_id": f"video{v}",
                        "sen_id": 3 * v + j} for v in range(6) for j in range(3)]
  (raw / "MSRVTT_data.json").write_text(json.dumps(data))
  out = tmp_path_factory.mktemp("msrvtt_tfds")
  builder = datasets.BUILDERS["msrvtt"](data_dir=str(out), num_workers=1,
                                        config=common.VideoTextConfig(fps=3, short_side=32))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(raw), try_download_gcs=False))
  return builder, out


def test_msrvtt_steps_per_epoch_are_caption_pairs_over_batch(msrvtt_3_captions):
  from centerclip_jax.data import pipeline
  from centerclip_jax.training import trainer
  builder, data_dir = msrvtt_3_captions
  assert builder.info.splits["train_9k"].num_examples == 3
  counts = pipeline.caption_counts(builder, "train_9k")
  assert counts.tolist() == [3, 3, 3]
  c = _load_config("msrvtt")
  c.data_dir = str(data_dir)
  c.train.global_batch_size = 3
  assert trainer._num_train_steps(c, builder, counts) == (5 * 3, 3)  # 9 pairs / 3.
  c.train.global_batch_size = 2
  assert trainer._num_train_steps(c, builder, counts) == (5 * 4, 4)  # floor(9 / 2).
  assert trainer._num_train_steps(c, builder) == (5 * 4, 4)  # Counts read when not given.
  c.data.train_examples = "videos"
  assert trainer._num_train_steps(c, builder) == (5 * 1, 1)  # The old 3 videos / 2.
  c.data.train_examples = "captions"
  c.train.global_batch_size = 10
  with pytest.raises(ValueError, match=r"larger than the 9 training \(video, caption\) pairs"):
    trainer._num_train_steps(c, builder, counts)


# ----------------------------------------------------------------------------- input overlap


def test_prefetch_to_mesh_keeps_the_next_batch_in_flight():
  from centerclip_jax import parallel
  mesh = parallel.make_mesh()
  n = jax.device_count()
  host = [{"x": np.full((2 * n, 3), i, np.float32), "m": np.arange(2 * n) % 2 == i % 2}
          for i in range(5)]
  for size, ahead in ((1, 0), (2, 1), (3, 2)):
    pulled = []

    def source():
      for i, b in enumerate(host):
        pulled.append(i)
        yield b

    out = []
    for k, batch in enumerate(parallel.prefetch_to_mesh(source(), mesh, size=size)):
      assert len(pulled) == min(k + 1 + ahead, len(host)), (size, k)
      assert batch["x"].sharding == parallel.batch_sharding(mesh)
      out.append(batch)
    assert len(out) == len(host)
    for got, want in zip(out, host):
      np.testing.assert_array_equal(np.asarray(got["x"]), want["x"])
      np.testing.assert_array_equal(np.asarray(got["m"]), want["m"])
  with pytest.raises(ValueError, match="size must be >= 1"):
    next(parallel.prefetch_to_mesh(iter(host), mesh, size=0))


def test_step_timer_counts_finished_steps_and_leaves_out_pauses():
  import time
  from centerclip_jax.training import trainer
  x = jnp.ones((256, 256))
  jax.block_until_ready(x @ x)  # Backend start and compile stay out of the timed part.
  timer = trainer.StepTimer()
  for _ in range(4):
    time.sleep(0.05)
    timer.step()
  timer.pause(x)
  time.sleep(1.0)  # An eval: if counted, the step time would be >= 0.3 s.
  timer.resume()
  dt = timer.lap(x @ x)
  assert 0.05 <= dt < 0.2, dt
  assert timer.steps == 0  # A lap starts the next measurement.


# ----------------------------------------------------------------------------- frozen


class _EmbeddingModel:
  """A CLIP-shaped stand-in for `make_train_step`: frames through one matrix, captions
  through a token embedding (frozen at freeze_layer_num=0, as CLIP's) and a projection."""

  def apply(self, variables, frames, frame_mask, text, train, rngs):
    del frame_mask, train, rngs
    p = variables["params"]["clip"]
    video = frames.reshape(frames.shape[0], -1) @ p["visual"]["proj"]
    words = p["token_embedding"]["embedding"][text].sum(1) @ p["text_projection"]
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return norm(video), norm(words), jnp.exp(p["logit_scale"])


def test_frozen_params_get_no_gradient_and_grad_norm_is_the_clipped_one():
  """As `requires_grad=False`: the frozen embedding's gradient (a scatter-add) is not in
  the compiled step, the logged grad_norm is clip_grad_norm_'s (trainable params only),
  and the update is the one the full gradient with zeroed frozen entries gives."""
  from centerclip_jax.training import trainer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {"clip": {"visual": {"proj": f32(12, 4)}, "token_embedding": {"embedding": f32(30, 6)},
                     "text_projection": f32(6, 4), "logit_scale": jnp.float32(np.log(10.0))}}
  batch = {"frames": f32(4, 1, 2, 2, 3), "frame_mask": jnp.ones((4, 1), bool),
           "text": jnp.asarray(rng.integers(0, 30, size=(4, 5)), jnp.int32)}
  tx, _ = optim.make_optimizer(params, lr=1e-2, coef_lr=1.0, total_steps=10, clip_norm=0.05,
                               freeze_layer_num=0)
  trainable = optim.trainable_mask(params, freeze_layer_num=0)
  assert not trainable["clip"]["token_embedding"]["embedding"]
  assert trainable["clip"]["text_projection"] and trainable["clip"]["visual"]["proj"]
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(0), "nonfinite": jnp.int32(0),
           "first_nonfinite": jnp.int32(0)}
  masked = jax.jit(trainer.make_train_step(_EmbeddingModel(), tx, trainable))
  full = jax.jit(trainer.make_train_step(_EmbeddingModel(), tx))
  embedding_grad = re.compile(r"= f32\[30,6\]\S* scatter\(")  # the token-embedding gradient
  assert embedding_grad.search(full.lower(state, batch).compile().as_text())
  assert not embedding_grad.search(masked.lower(state, batch).compile().as_text())

  def loss(p):
    from centerclip_jax.training import losses  # pylint: disable=g-import-not-at-top
    return losses.symmetric_infonce(*_EmbeddingModel().apply({"params": p}, batch["frames"],
                                                             None, batch["text"], True, None))
  grads = jax.grad(loss)(params)
  g = grads["clip"]
  trainable_norm = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in (
      g["visual"]["proj"], g["text_projection"], g["logit_scale"])))
  embedding_norm = float(jnp.linalg.norm(g["token_embedding"]["embedding"]))
  assert embedding_norm > 0.02 * trainable_norm  # the frozen gradient would show (>= 2e-4)
  new_masked, m_masked = masked(state, batch)
  new_full, m_full = full(state, batch)
  np.testing.assert_allclose(float(m_masked["grad_norm"]), trainable_norm, rtol=1e-5)
  np.testing.assert_allclose(float(m_full["grad_norm"]),
                             np.hypot(trainable_norm, embedding_norm), rtol=1e-5)
  assert trainable_norm > 0.05  # so clipping is active and uses the trainable norm
  for a, b in zip(jax.tree.leaves(new_masked["params"]), jax.tree.leaves(new_full["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(new_masked["params"]["clip"]["token_embedding"]["embedding"],
                                params["clip"]["token_embedding"]["embedding"])
