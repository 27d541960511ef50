"""Tests for centerclip_jax.training.optim: schedule, param groups, decay masks, freezing,
clipping, BertAdam mode and gradient accumulation. Expected values are written inline."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from centerclip_jax.training import optim
from centerclip_jax.models import clip as clip_lib

TINY = clip_lib.CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=64,
                           vision_patch_size=16, context_length=16, vocab_size=50,
                           transformer_width=64, transformer_heads=1, transformer_layers=2)


@pytest.fixture(scope="module")
def params():
  """{'clip': tiny CLIP params (random values), 'head': a new module with a LayerNorm}."""
  model = clip_lib.CLIP(TINY)
  shapes = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32)),
      jax.random.key(0))["params"]
  rng = np.random.default_rng(0)
  fill = lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32)
  tree = {"clip": jax.tree.map(fill, shapes),
          "head": {"dense": {"kernel": fill(jax.ShapeDtypeStruct((4, 4), jnp.float32)),
                             "bias": fill(jax.ShapeDtypeStruct((4,), jnp.float32))},
                   "LayerNorm_0": {"scale": fill(jax.ShapeDtypeStruct((4,), jnp.float32)),
                                   "bias": fill(jax.ShapeDtypeStruct((4,), jnp.float32))}}}
  return tree


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _one_update(tx, params, grads):
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  return _flat(updates)


# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_schedule_values():
  base, total, warm = 1e-4, 100, 0.1

  def formula(step):  # CLIP4Clip BertAdam warmup_cosine, progress over the whole run.
    x = step / total
    return base * (x / warm if x < warm else 0.5 * (1.0 + math.cos(math.pi * x)))

  sched = optim.warmup_cosine_schedule(base, total, warm)
  for step in [0, 1, 5, 9, 10, 11, 37, 50, 90, 99, 100]:
    np.testing.assert_allclose(float(sched(step)), formula(step), rtol=1e-5, atol=1e-7 * base)
  # The cosine is over the whole progress: right after warm-up the lr is
  # 0.5 * (1 + cos(0.1 pi)) = 0.9755 * base, not base.
  np.testing.assert_allclose(float(sched(10)) / base, 0.5 * (1 + math.cos(0.1 * math.pi)),
                             rtol=1e-6)
  assert float(sched(0)) == 0.0  # BertAdam's first update has lr 0.
  # Past the end the progress is clamped (no rise of the cosine).
  assert float(sched(150)) == pytest.approx(0.0, abs=1e-12)
  sched0 = optim.warmup_cosine_schedule(2.0, 10, 0.0)
  np.testing.assert_allclose(float(sched0(0)), 2.0)
  np.testing.assert_allclose(float(sched0(5)), 1.0, rtol=1e-6)


def test_returned_schedules_use_lr_and_coef_lr(params):
  _, scheds = optim.make_optimizer(params, lr=1e-3, coef_lr=0.01, total_steps=20,
                                   warmup_proportion=0.0)
  np.testing.assert_allclose(float(scheds["new"](0)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(scheds["pretrained"](0)), 1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------- groups


def test_param_groups_lr_by_sgd_like_step(params):
  lr, coef, eps = 0.1, 0.01, 1e-6
  tx, _ = optim.make_optimizer(params, lr=lr, coef_lr=coef, total_steps=1000,
                               warmup_proportion=0.0, weight_decay=0.0, clip_norm=None, eps=eps)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  upd = _one_update(tx, params, grads)
  # First Adam step (bias-corrected): g / (|g| + eps); lr(step 0) = base lr (cos 0 = 1).
  adam = 0.5 / (0.5 + eps)
  for name, u in upd.items():
    want = -(lr * coef if name.startswith("['clip']") else lr) * adam
    np.testing.assert_allclose(u, want, rtol=1e-5, err_msg=name)


def test_no_weight_decay_masks(params):
  lr, wd = 0.5, 0.2
  tx, _ = optim.make_optimizer(params, lr=lr, coef_lr=1.0, total_steps=1000,
                               warmup_proportion=0.0, weight_decay=wd, clip_norm=None,
                               decay_norm_scales=False)
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd = _one_update(tx, params, zeros)  # Zero grads: the update is the decay alone.
  p = _flat(params)
  no_decay = {n for n in upd if n.endswith("['bias']") or n.endswith("['scale']")}
  # The LayerNorms: CLIP's ln_* and a Flax-named LayerNorm_0 in a new module.
  assert "['clip']['visual']['ln_pre']['scale']" in no_decay
  assert "['head']['LayerNorm_0']['scale']" in no_decay
  for name, u in upd.items():
    want = 0.0 if name in no_decay else -lr * wd * p[name]
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-12, err_msg=name)
  # Decayed: kernels, embeddings, projections, logit_scale.
  for name in ["['clip']['visual']['conv1']['kernel']", "['clip']['logit_scale']",
               "['clip']['visual']['class_embedding']", "['clip']['text_projection']",
               "['head']['dense']['kernel']"]:
    assert np.abs(upd[name]).max() > 0, name

  # The original's literal rule (both recipes' default) decays LayerNorm scales (only
  # biases are excluded).
  tx2, _ = optim.make_optimizer(params, lr=lr, coef_lr=1.0, total_steps=1000,
                                warmup_proportion=0.0, weight_decay=wd, clip_norm=None)
  upd2 = _one_update(tx2, params, zeros)
  name = "['clip']['transformer']['resblocks_0']['ln_1']['scale']"
  np.testing.assert_allclose(upd2[name], -lr * wd * p[name], rtol=1e-6)
  np.testing.assert_allclose(upd2["['clip']['ln_final']['bias']"], 0.0)


FROZEN_AT_1 = {
    "['clip']['token_embedding']['embedding']", "['clip']['positional_embedding']",
    "['clip']['visual']['conv1']['kernel']", "['clip']['visual']['class_embedding']",
    "['clip']['visual']['positional_embedding']", "['clip']['visual']['ln_pre']['scale']",
    "['clip']['visual']['ln_pre']['bias']",
}


def _expected_frozen(names, freeze_layer_num):
  out = set()
  for n in names:
    if n in FROZEN_AT_1:
      out.add(n)
    for tower in ("['clip']['transformer']", "['clip']['visual']['transformer']"):
      for i in range(freeze_layer_num):
        if n.startswith(f"{tower}['resblocks_{i}']"):
          out.add(n)
  return out


@pytest.mark.parametrize("freeze_layer_num", [0, 1, 2])
def test_freeze_layer_num_zero_updates(params, freeze_layer_num):
  tx, _ = optim.make_optimizer(params, lr=0.1, coef_lr=1.0, total_steps=100,
                               warmup_proportion=0.0, weight_decay=0.2,
                               freeze_layer_num=freeze_layer_num)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  upd = _one_update(tx, params, grads)
  frozen = _expected_frozen(upd, freeze_layer_num)
  assert len(frozen) >= 7
  for name, u in upd.items():
    if name in frozen:
      assert np.all(u == 0.0), f"{name} is frozen but got an update"
    else:
      assert np.abs(u).max() > 0, f"{name} should train"
  labels = _flat(optim.param_groups(params, freeze_layer_num=freeze_layer_num))
  assert {n for n, l in labels.items() if l == "frozen"} == frozen


def test_frozen_grads_do_not_count_in_global_norm(params):
  kw = dict(lr=0.1, coef_lr=1.0, total_steps=100, warmup_proportion=0.0, eps=1.0,
            freeze_layer_num=1, clip_norm=1.0)
  tx, _ = optim.make_optimizer(params, **kw)
  labels = _flat(optim.param_groups(params, freeze_layer_num=1))
  small = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 1e-3), params)
  huge_frozen = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 1e3 if labels[jax.tree_util.keystr(p)] == "frozen" else 1e-3),
      params)
  a, b = _one_update(tx, params, small), _one_update(tx, params, huge_frozen)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ----------------------------------------------------------------------------- clipping


def _small_tree():
  rng = np.random.default_rng(5)
  p = {"clip": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                "logit_scale": jnp.float32(2.0)},
       "head": {"kernel": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
  g = {"clip": {"w": jnp.asarray(3 * rng.normal(size=(3, 4)), jnp.float32),
                "logit_scale": jnp.float32(0.3)},
       "head": {"kernel": jnp.asarray(0.1 * rng.normal(size=(5,)), jnp.float32)}}
  return p, g


@pytest.mark.parametrize("mode", ["global", "per_param", "none"])
def test_clip_modes(mode):
  p, g = _small_tree()
  c = 1.0
  # eps=1 makes the first Adam step g / (|g| + 1) depend on the gradient's scale.
  tx, _ = optim.make_optimizer(p, lr=1.0, coef_lr=1.0, total_steps=10, warmup_proportion=0.0,
                               weight_decay=0.0, eps=1.0, clip_norm=c, clip_mode=mode)
  upd = _one_update(tx, p, g)
  gf = _flat(g)
  if mode == "global":
    norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in gf.values()))
    assert norm > c
    clipped = {n: x * min(1.0, c / norm) for n, x in gf.items()}
  elif mode == "per_param":
    clipped = {n: x * min(1.0, c / (float(np.linalg.norm(x)) + 1e-6)) for n, x in gf.items()}
  else:
    clipped = gf
  for n, u in upd.items():
    np.testing.assert_allclose(u, -clipped[n] / (np.abs(clipped[n]) + 1.0), rtol=1e-5,
                               err_msg=n)


def test_bertadam_mode_matches_reference_update_rule():
  """optimizer='bertadam' (no bias correction, per-param clipping, warmup_cosine) =
  BertAdam, written out in NumPy."""
  p, _ = _small_tree()
  lr, coef, wd, b1, b2, e, total, warm = 0.05, 0.1, 0.2, 0.9, 0.98, 1e-6, 10, 0.3
  tx, _ = optim.make_optimizer(p, lr=lr, coef_lr=coef, total_steps=total,
                               warmup_proportion=warm, weight_decay=wd, b1=b1, b2=b2, eps=e,
                               clip_norm=1.0, optimizer="bertadam")
  state = tx.init(p)
  params = p
  ref = {n: x.astype(np.float64) for n, x in _flat(p).items()}
  m = {n: np.zeros_like(x) for n, x in ref.items()}
  v = {n: np.zeros_like(x) for n, x in ref.items()}
  rng = np.random.default_rng(9)
  update = jax.jit(tx.update)
  for step in range(5):
    g = jax.tree.map(lambda x: jnp.asarray(2 * rng.normal(size=x.shape), jnp.float32), p)
    upd, state = update(g, state, params)
    params = optax.apply_updates(params, upd)
    x = step / total
    sched = x / warm if x < warm else 0.5 * (1 + math.cos(math.pi * x))
    for n, gn in _flat(g).items():
      gn = gn.astype(np.float64)
      gn = gn * min(1.0, 1.0 / (np.linalg.norm(gn) + 1e-6))
      m[n] = b1 * m[n] + (1 - b1) * gn
      v[n] = b2 * v[n] + (1 - b2) * gn * gn
      u = m[n] / (np.sqrt(v[n]) + e)
      if not n.endswith("['bias']"):
        u = u + wd * ref[n]
      group_lr = lr * coef if n.startswith("['clip']") else lr
      ref[n] = ref[n] - group_lr * sched * u
  got = _flat(params)
  for n in ref:
    np.testing.assert_allclose(got[n], ref[n], rtol=1e-5, atol=1e-7, err_msg=n)
  assert np.abs(got["['head']['kernel']"] - np.asarray(p["head"]["kernel"])).max() > 1e-3


# ----------------------------------------------------------------------------- accumulation


def test_multisteps_accumulation_equals_big_batch():
  rng = np.random.default_rng(3)
  p = {"clip": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
       "head": {"bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
  x = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(12, 2)), jnp.float32)

  def loss(params, x, y):  # Mean over examples: k micro-batch means average to the big mean.
    pred = x @ params["clip"]["w"] + params["head"]["bias"]
    return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))

  kw = dict(lr=0.1, coef_lr=0.5, total_steps=5, warmup_proportion=0.0, weight_decay=0.2,
            clip_norm=1.0)
  k = 3
  tx_big, _ = optim.make_optimizer(p, **kw)
  tx_acc, _ = optim.make_optimizer(p, grad_accum_steps=k, **kw)

  def run(tx, batches, steps):
    params, state = p, tx.init(p)
    history = []

    @jax.jit
    def step(params, state, xb, yb):
      upd, state = tx.update(jax.grad(loss)(params, xb, yb), state, params)
      return optax.apply_updates(params, upd), state

    for s in range(steps):
      params, state = step(params, state, *batches(s))
      history.append(_flat(params))
    return history

  # Two optimizer updates: big batch of 12 vs 3 micro-batches of 4, twice.
  big = run(tx_big, lambda s: (x * (1 + s), y), 2)
  acc = run(tx_acc, lambda s: (x[(s % k) * 4:(s % k + 1) * 4] * (1 + s // k),
                               y[(s % k) * 4:(s % k + 1) * 4]), 2 * k)
  for n in big[0]:
    np.testing.assert_array_equal(acc[0][n], np.asarray(_flat(p)[n]))  # micro-step: no update
    np.testing.assert_array_equal(acc[1][n], np.asarray(_flat(p)[n]))
    np.testing.assert_allclose(acc[k - 1][n], big[0][n], rtol=1e-6, atol=1e-7, err_msg=n)
    np.testing.assert_allclose(acc[2 * k - 1][n], big[1][n], rtol=1e-6, atol=1e-7, err_msg=n)
  assert np.abs(big[1]["['clip']['w']"] - np.asarray(p["clip"]["w"])).max() > 1e-3


# ----------------------------------------------------------------------------- misc


def test_clamp_logit_scale():
  p = {"clip": {"logit_scale": jnp.float32(7.0), "w": jnp.ones(2)}, "head": {}}
  out = optim.clamp_logit_scale(p)
  np.testing.assert_allclose(float(out["clip"]["logit_scale"]), math.log(100.0), rtol=1e-6)
  p["clip"]["logit_scale"] = jnp.float32(-1.0)
  np.testing.assert_allclose(float(optim.clamp_logit_scale(p)["clip"]["logit_scale"]), 0.1)
  np.testing.assert_allclose(float(optim.clamp_logit_scale(p, min_value=None)["clip"]["logit_scale"]), -1.0)


def test_bad_arguments(params):
  with pytest.raises(ValueError, match="clip_mode"):
    optim.make_optimizer(params, lr=1e-3, coef_lr=1.0, total_steps=10, clip_mode="tensor")
  with pytest.raises(ValueError, match="pretrained_prefix"):
    optim.make_optimizer({"model": params["clip"]}, lr=1e-3, coef_lr=1.0, total_steps=10,
                         freeze_layer_num=2)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_optimizer(params, lr=1e-3, coef_lr=1.0, total_steps=0)
  with pytest.raises(ValueError, match="freeze_layer_num"):
    optim.make_optimizer(params, lr=1e-3, coef_lr=1.0, total_steps=10, freeze_layer_num=-2)
